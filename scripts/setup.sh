#!/usr/bin/env bash
# Idempotent set-up: system packages (when root), then the pinned .venv.
# Re-running costs seconds once the stamp matches the requirement files and pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql: the MLflow-on-PostgreSQL tests (docker/ issue) start a throw-away cluster.
APT_PACKAGES=(libturbojpeg0-dev libopencv-dev pkg-config dataset-fashion-mnist postgresql)
# The tests that build and run the images (tests/test_docker_images.py): Debian's Docker engine
# (unless one is installed already), its compose and debootstrap for the local base image.
command -v dockerd >/dev/null || APT_PACKAGES+=(docker.io)
APT_PACKAGES+=(docker-compose debootstrap)
VENV=.venv
STAMP="$VENV/.setup-stamp"
WANT="$(cat requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  exit 0
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: missing system packages: ${missing[*]}" >&2
    echo "setup: run as root: apt-get install -y ${missing[*]}" >&2
    exit 1
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
pip_install() {
  # Drop pip's notes about absent local mirrors; real errors still surface (set -o pipefail).
  "$VENV/bin/pip" install -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
pip_install --upgrade pip
# ffcv's build needs numpy, Cython and pkgconfig present; build it without isolation.
pip_install numpy==2.4.6 cython pkgconfig setuptools wheel
pip_install --no-build-isolation -r requirements-dev.txt
# The project itself, editable: its packages and modules import from anywhere, no sys.path edits.
pip_install --no-deps --no-build-isolation -e .
echo "$WANT" > "$STAMP"
echo "setup: .venv ready"
