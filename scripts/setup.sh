#!/usr/bin/env bash
# Install densify and what it needs on a fresh Linux machine (CPU). Idempotent.
#   bash scripts/setup.sh            # core + hf + ray + dev extras
#   EXTRAS=dev bash scripts/setup.sh # fewer extras
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${EXTRAS:-hf,ray,dev}
# Open3D needs libusb at import time.
if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq libusb-1.0-0 libgomp1) >/dev/null
  else
    echo "setup: please install libusb-1.0 (Debian: apt-get install libusb-1.0-0); Open3D needs it" >&2
  fi
fi
py=${PYTHON:-python3}
# The CPU build of torch: a bare 'torch' would pull a multi-GB CUDA build.
if [[ ",$extras," == *",hf,"* ]] && ! $py -c "import torch" 2>/dev/null; then
  $py -m pip install -q torch==2.13.0
fi
$py -m pip install -q -e ".[${extras}]"
echo "setup: densify installed ($($py -c 'import densify; print(densify.__version__)'))"
