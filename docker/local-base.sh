#!/usr/bin/env bash
# A Debian bookworm base image made from Debian's own archive, for machines that cannot pull from
# a container registry (run as root; needs debootstrap and a running Docker engine):
#
#   docker/local-base.sh [TAG]        # default TAG: colormae-base:bookworm
#   docker build -f docker/Dockerfile --build-arg BASE_IMAGE=colormae-base:bookworm ...
#
# DEBIAN_MIRROR picks the archive (default http://deb.debian.org/debian); a snapshot.debian.org
# address pins the package versions, so the same base can be made again later.
set -euo pipefail

tag="${1:-colormae-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

root="$(mktemp -d /tmp/colormae-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT

debootstrap --variant=minbase bookworm "$root" "$mirror"
cat > "$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
# Like Debian's own images: no package cache and no package lists in the base.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/tmp/*

tar --numeric-owner -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' - "$tag"
echo "local-base: $tag"
