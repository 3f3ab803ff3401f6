#!/usr/bin/env bash
# Install fvtrust into a virtual environment (default ~/.venvs/fvtrust).
#   scripts/install.sh          runtime only
#   scripts/install.sh --test   plus test tools, torch-lucent for parity tests, headless Chromium, timm, ray
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

# Anchors for compare-methods, never fatal. horama's deps are ours: it goes into the base venv (the `anchors`
# extra). faccent pins kornia==0.4.1 (and lucent==0.1.0): it gets its own venv that sees the base venv's packages
# through a .pth file, with kornia 0.4.1 and faccent's pure-Python deps installed there only, so the base venv keeps
# kornia 0.9.0. compare-methods finds it as ~/.venvs/fvtrust-anchors (or $FVTRUST_ANCHORS_PYTHON).
install_anchors() {
  # horama imports einops (a small pure-Python package) at import time: install it beside horama
  "${PIP[@]}" --no-deps "horama==0.3.0" einops 2>&1 | grep -v "is ignored" || true  # grep -v exits 1 on quiet pip
  "$VENV/bin/python" -c "import horama" 2>/dev/null || return 1
  local AV="${FVTRUST_ANCHORS_VENV:-$HOME/.venvs/fvtrust-anchors}"
  [[ -x "$AV/bin/python" ]] || python3 -m venv "$AV" || return 1
  local base_sp anchors_sp
  base_sp="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')" || return 1
  anchors_sp="$("$AV/bin/python" -c 'import site; print(site.getsitepackages()[0])')" || return 1
  echo "$base_sp" > "$anchors_sp/_fvtrust_base.pth"
  "$AV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --ignore-installed "faccent==1.0.3" "kornia==0.4.1" \
    einops decorator imageio ipywidgets comm widgetsnbextension jupyterlab_widgets 2>&1 | grep -v "is ignored" || true
  "$AV/bin/python" -c "import faccent.render, horama" 2>/dev/null || return 1
  "$VENV/bin/python" -c "import kornia; assert kornia.__version__ == '0.9.0'" || return 1
}

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
  install_anchors || echo "fvtrust setup: anchors (horama, faccent) not installed (continuing; compare-methods runs without them)"
  # optional model zoo (timm: specs); a failure leaves the base install intact and its tests skip
  "${PIP[@]}" "timm>=1.0" 2>&1 | grep -v "is ignored" || true  # grep -v exits 1 on quiet pip: check the import
  "$VENV/bin/python" -c "import timm" 2>/dev/null || echo "fvtrust setup: timm not installed (optional)"
  # optional scale-out backend (--ray); a failure leaves the base install intact, and the Makefile's test target
  # then fails the Ray tests instead of skipping them (FVTRUST_REQUIRE_RAY=1)
  "${PIP[@]}" "ray>=2.9" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import ray" 2>/dev/null || echo "fvtrust setup: ray not installed (optional; --ray unavailable)"
else
  "${PIP[@]}" -e . 2>&1 | grep -v "is ignored" || true
fi
"$VENV/bin/python" -c "import fvtrust, torch; print('fvtrust', fvtrust.__version__, 'torch', torch.__version__)"
