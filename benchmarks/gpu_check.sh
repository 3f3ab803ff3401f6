#!/usr/bin/env bash
# GPU evidence for fvtrust in one prepared run (at most ~8 minutes on one GPU).
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# Uses the machine's python3 with CUDA PyTorch; fvtrust runs from this checkout (PYTHONPATH), so no install.
# lucent's one-by-one baseline runs when torch-lucent (and kornia) are importable, e.g. from wheels in .whl/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu-check}}"
mkdir -p "$OUT"
if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fvtrust-site .whl/*.whl
  export PYTHONPATH="/tmp/fvtrust-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FVTRUST_PROGRESS=0 MPLBACKEND=Agg
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 python3 benchmarks/gpu_check.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
