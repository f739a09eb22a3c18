#!/usr/bin/env bash
# Build a minimal Debian base image locally, for machines that cannot reach an image
# registry: debootstrap a minbase root file system, then import it as an image.
#
#   docker/build-base-image.sh [IMAGE]        (default localhost/ncf-debian:bookworm)
#
# The image stands in for debian:bookworm as the Dockerfile's BASE_IMAGE:
#   make docker-build BASE_IMAGE=localhost/ncf-debian:bookworm
# Needs root, debootstrap and podman (or docker with CONTAINER_ENGINE=docker).
# Settings: DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
# CONTAINER_ENGINE (podman).
set -euo pipefail

image=${1:-localhost/ncf-debian:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
engine=${CONTAINER_ENGINE:-podman}

for tool in debootstrap "$engine"; do
    command -v "$tool" >/dev/null || { echo "$0: $tool not found" >&2; exit 1; }
done
if [[ $(id -u) -ne 0 ]]; then
    echo "$0: debootstrap needs root" >&2
    exit 1
fi

rootfs=$(mktemp -d "${TMPDIR:-/tmp}/ncf-rootfs.XXXXXX")
trap 'rm -rf "$rootfs"' EXIT

# minbase: dpkg, apt and the essential packages (bash, coreutils, tar, gzip), nothing else.
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

# What the official Debian images leave out as well: the downloaded package lists and
# .debs (the Dockerfile runs apt-get update itself), and logs of the bootstrap.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*.log \
    "$rootfs"/debootstrap

# Numeric owners: the image must not depend on this machine's user names.
tar --numeric-owner -C "$rootfs" -c . |
    "$engine" import --change 'CMD ["bash"]' - "$image"
echo "$image"
