#!/usr/bin/env bash
# Install fvtrust into a virtual environment (default ~/.venvs/fvtrust).
#   scripts/install.sh          runtime only
#   scripts/install.sh --test   plus test tools, torch-lucent for parity tests, headless Chromium
# Idempotent: a second run only checks. Works offline from this machine's wheel cache.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${FVTRUST_VENV:-$HOME/.venvs/fvtrust}"
WITH_TEST=0
[[ "${1:-}" == "--test" ]] && WITH_TEST=1

apt_install() {  # only where apt exists and we are root; never fatal
  command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]] || return 0
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  echo "fvtrust setup: apt-get install ${missing[*]}"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null 2>&1 \
    || echo "fvtrust setup: could not install ${missing[*]} (continuing)"
}

apt_install dataset-fashion-mnist
[[ $WITH_TEST == 1 ]] && apt_install chromium chromium-driver

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "fvtrust setup: creating $VENV"
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [[ $WITH_TEST == 1 ]]; then
  "${PIP[@]}" -e ".[test]" 2>&1 | grep -v "is ignored" || true
  # lucent 0.1.8 pins kornia<=0.4.1, which no longer installs with torch 2.x: take lucent without deps.
  "${PIP[@]}" --no-deps "torch-lucent==0.1.8" 2>&1 | grep -v "is ignored" || true
  "${PIP[@]}" "kornia==0.9.0" decorator ipython 2>&1 | grep -v "is ignored" || true
  # optional model zoo (timm: specs); a failure leaves the base install intact and its tests skip
  "${PIP[@]}" "timm>=1.0" 2>&1 | grep -v "is ignored" || echo "fvtrust setup: timm not installed (optional)"
else
  "${PIP[@]}" -e . 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -c "import fvtrust, torch; print('fvtrust', fvtrust.__version__, 'torch', torch.__version__)"
