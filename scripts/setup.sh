#!/usr/bin/env bash
# Idempotent set-up of what one command needs: Debian packages (installed when root, else named),
# then the pinned .venv and the project itself (editable).
#
#   scripts/setup.sh [train]   make train: requirements.txt, the demo data (dataset-fashion-mnist)
#   scripts/setup.sh gpu       + requirements-loaders.txt: DALI, CuPy and FFCV (compiled: libturbojpeg,
#                              OpenCV and pkg-config headers)
#   scripts/setup.sh test      make test: + the test tools and what the tests start: PostgreSQL, a
#                              Docker engine with compose, debootstrap, Chromium
#
# A later level includes the earlier ones. Re-running costs a second once the stamp matches the
# level and the requirement files.
set -euo pipefail
cd "$(dirname "$0")/.."

level="${1:-train}"
case "$level" in
  train) rank=1 requirements=requirements.txt ;;
  gpu) rank=2 requirements=requirements-loaders.txt ;;
  test) rank=3 requirements=requirements-dev.txt ;;
  *) echo "setup: unknown level '$level': expected train, gpu or test" >&2; exit 2 ;;
esac

apt_packages=(dataset-fashion-mnist)  # the demo's data, as Debian ships it
python3 -c "import ensurepip" 2>/dev/null || apt_packages+=(python3-venv)
if [ "$rank" -ge 2 ]; then
  apt_packages+=(libturbojpeg0-dev libopencv-dev pkg-config)  # ffcv compiles against them
fi
if [ "$rank" -ge 3 ]; then
  # the MLflow-on-PostgreSQL tests, the image tests (Debian's engine unless one is installed, its
  # compose, debootstrap for the local base image) and the UI screenshots (headless Chromium)
  apt_packages+=(postgresql docker-compose debootstrap chromium)
  command -v dockerd >/dev/null || apt_packages+=(docker.io)
fi

VENV=.venv
STAMP="$VENV/.setup-stamp"
hash="$(cat requirements*.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$STAMP" ] && read -r done_rank done_hash < "$STAMP" \
    && [ "$done_hash" = "$hash" ] && [ "$done_rank" -ge "$rank" ]; then
  exit 0
fi

if command -v dpkg >/dev/null; then
  missing=()
  for pkg in "${apt_packages[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif [ ${#missing[@]} -gt 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}" >&2
    echo "setup: install them, then run this again:  sudo apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
else
  echo "setup: not a Debian system; this needs the equivalents of: ${apt_packages[*]}" >&2
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_install() {
  # Drop pip's notes about absent local mirrors; real errors still surface (set -o pipefail).
  "$VENV/bin/pip" install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade pip
# The project (and ffcv) are built without isolation: their build tools come first.
build_tools=(setuptools==84.2.1 wheel==0.48.0)
if [ "$rank" -ge 2 ]; then
  build_tools+=("$(grep '^numpy==' requirements.txt)" cython==3.3.1 pkgconfig==1.6.0)  # ffcv's build
fi
pip_install "${build_tools[@]}"
pip_install --no-build-isolation -r "$requirements"
# The project itself, editable: its packages, modules and console commands (colormae-*) work from
# any folder, no sys.path edits.
pip_install --no-deps --no-build-isolation -e .
echo "$rank $hash" > "$STAMP"
echo "setup: .venv ready ($level)"
