#!/usr/bin/env bash
# The package works when installed, not only from a checkout: build the wheel, install it into a fresh virtual
# environment outside the checkout, then run `fae --help`, `fae summary` on a paper config (found inside the
# package) and `fae demo --quick` (its configs, encoder and judge ship as package data). Used by .ci/run.
#   bash scripts/check_wheel.sh            # needs .venv (scripts/setup.sh) for pip's build
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
PY=${PYTHON:-python3}

echo "check_wheel: building the wheel"
.venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/fae-*.whl)
echo "check_wheel: $(basename "$wheel"), $(du -h "$wheel" | cut -f1)"
"$PY" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements/cpu.txt \
  2> >(grep -v "is ignored: it is neither" >&2)
"$work/venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$wheel"

cd "$work"   # outside the checkout: only the installed package can be imported
"$work/venv/bin/python" -c "import fae, sys; sys.exit(0 if '$repo' not in fae.__file__ else 'fae was imported from the checkout')"
"$work/venv/bin/fae" --help >/dev/null
"$work/venv/bin/python" -c "from fae.serve.server import page; assert b'id=\"generate\"' in page()"   # fae serve's page ships
"$work/venv/bin/fae" summary configs/paper/fae_dinov2_g14.yaml | tail -n 2
if ! FAE_CACHE="$work/cache" XDG_CACHE_HOME="$work/xdg" TQDM_DISABLE=1 "$work/venv/bin/fae" demo --quick \
    --out "$work/demo" --no-progress >"$work/demo.log" 2>&1; then
  cat "$work/demo.log"; echo "check_wheel: fae demo --quick failed from the installed wheel" >&2; exit 1
fi
grep -E "^\[demo\] (precision|finished)" "$work/demo.log"
test -f "$work/demo/index.html"
echo "check_wheel: the installed wheel runs fae --help, fae summary and fae demo --quick outside the checkout"
