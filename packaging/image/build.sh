#!/usr/bin/env bash
# `make image`: stages the release binary's file system (rootfs.sh) and builds
# packaging/Containerfile with buildah, without a registry or a daemon:
# --storage-driver vfs --isolation chroot, storage under .buildah/ (SB_BUILDAH_ROOT).
# Prints the image's name and size.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${CARGO_TARGET_DIR:-$root/target}
bin=${SB_IMAGE_BINARY:-$target/release/syncbridge-agent}
ctx=$target/image
image=${IMAGE:-localhost/syncbridge-agent}
command -v buildah >/dev/null || { echo "image: buildah is not installed: run make deps" >&2; exit 1; }
# shellcheck source=packaging/image/buildah.sh
. "$root/packaging/image/buildah.sh"

version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)
revision=$(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)
source=${SB_IMAGE_SOURCE:-$(git -C "$root" config --get remote.origin.url 2>/dev/null || echo unknown)}

bash "$root/packaging/image/rootfs.sh" "$bin" "$ctx/rootfs"
sb_buildah bud --isolation chroot --layers=false \
  -f "$root/packaging/Containerfile" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --build-arg CREATED="$created" --build-arg SOURCE="$source" \
  -t "$image:$version" "$ctx" >&2
# The staged copy is in the image now.
rm -rf "$ctx/rootfs"
# Dangling images of earlier builds of the same tag.
sb_buildah rmi --prune >/dev/null 2>&1 || true
size=$(sb_buildah images --format '{{.Size}}' "$image:$version")
echo "image: $image:$version ($size), revision $revision"
