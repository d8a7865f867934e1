#!/usr/bin/env bash
# The GPU check's rehearsal on the CPU: a virtual environment holding exactly a bare GPU image's
# packages (requirements-gpu-image.txt; built once, cached outside the repository under a hash of
# that list) runs the GPU check's CPU twin with the wheels that travel to a GPU node
# (`bench.gpu_check --smoke --wheels`), then collects `pytest -m gpu` with them. Any failed part or
# collection error fails the rehearsal.
#
#   scripts/gpu_rehearsal.sh            # what `make gpu-rehearsal` runs
#   scripts/gpu_rehearsal.sh wheels     # only fetch the wheels (`make gpu-wheels`)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${GPU_REHEARSAL_PYTHON:-python3}
WHEELS=${GPU_WHEELS:-gpu-wheels}  # in the tree (ignored): the device tool carries it to the GPU node
TRAVEL=(omegaconf)  # pure Python, needed by train.py, absent from the image; pins from requirements.txt
OUT=${GPU_REHEARSAL_OUT:-runs/gpu-rehearsal}

quiet() {
  # Drop pip's notes about absent local mirrors; real errors still surface (set -o pipefail).
  "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}

fetch_wheels() {
  local missing=()
  for name in "${TRAVEL[@]}"; do
    local pin
    pin=$(grep -E "^${name}==" requirements.txt)
    ls "$WHEELS/${name}-${pin#*==}-"*.whl >/dev/null 2>&1 || missing+=("$pin")
  done
  [ ${#missing[@]} -eq 0 ] && return
  # For the GPU image's Python 3.12 on manylinux; pure-Python wheels fit any other version too.
  quiet "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform any -d "$WHEELS" "${missing[@]}"
  echo "gpu-wheels: $(du -sh "$WHEELS" | cut -f1) in $WHEELS: $(cd "$WHEELS" && ls ./*.whl | xargs)"
}

build_env() {
  local key cache
  key=$( (cat requirements-gpu-image.txt; "$PYTHON" --version) | sha256sum | cut -c1-12)
  cache=${COLORMAE_CACHE:-$HOME/.cache/colormae}
  VENV="$cache/gpu-rehearsal-$key"
  [ -f "$VENV/.complete" ] && return
  mkdir -p "$cache"
  exec 9>"$cache/gpu-rehearsal.lock"
  flock 9  # one build at a time; a second caller waits for it and then reuses it
  [ -f "$VENV/.complete" ] && return
  echo "gpu-rehearsal: building $VENV from requirements-gpu-image.txt (once; local wheels)"
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  quiet "$VENV/bin/pip" install -q -r requirements-gpu-image.txt
  touch "$VENV/.complete"
}

fetch_wheels
[ "${1:-}" = wheels ] && exit 0
build_env
echo "gpu-rehearsal: $VENV ($("$VENV/bin/python" --version), $("$VENV/bin/pip" list 2>/dev/null | tail -n +3 | wc -l) packages)"
"$VENV/bin/python" -m bench.gpu_check --smoke --wheels "$WHEELS" --out "$OUT"
# Every test module holding a GPU test imports in the image (with the wheels): a collection error
# fails here (the check's pytest-gpu part above also counts one as a failure).
target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT
quiet "$VENV/bin/python" -m pip install -q --no-index --no-deps --target "$target" "$WHEELS"/*.whl
mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
PYTHONPATH="$target:$PWD" "$VENV/bin/python" -m pytest -q -m gpu --collect-only -p no:cacheprovider \
  "${gpu_tests[@]}" | tail -n 1
echo "gpu-rehearsal: ok (results in $OUT)"
