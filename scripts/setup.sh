#!/usr/bin/env bash
# Set up fae on a fresh Debian/Ubuntu machine: the Fashion-MNIST data package, a virtual environment in .venv,
# the pinned CPU requirement set and the package itself. Safe to re-run; it skips what is already there.
#   bash scripts/setup.sh          # runtime (enough for `fae demo`)
#   bash scripts/setup.sh --test   # + test tools (and headless Chromium for the browser test)
set -euo pipefail
cd "$(dirname "$0")/.."

REQ=requirements/cpu.txt
[ "${1:-}" = "--test" ] && REQ=requirements/test.txt

# the demos' offline data: Fashion-MNIST (class-conditional) and the colour emoji font (text-to-image)
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
EMOJI=/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
if [ ! -f "$FMNIST" ] || [ ! -f "$EMOJI" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages dataset-fashion-mnist fonts-noto-color-emoji"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist fonts-noto-color-emoji >/dev/null
fi

# the browser test of `fae serve` (tests/test_serve.py): Debian's headless Chromium and its driver, no download
if [ "${1:-}" = "--test" ] && { [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; }; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages chromium chromium-driver"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
echo "setup: installing $REQ"
.venv/bin/python -m pip install -q --disable-pip-version-check -r "$REQ" 2> >(grep -v "is ignored: it is neither" >&2)
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . 2> >(grep -v "is ignored: it is neither" >&2)
echo "setup: done (.venv/bin/fae)"
