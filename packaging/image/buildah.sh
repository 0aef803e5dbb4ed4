# Sourced by build.sh and the image test's helpers: buildah with this repository's own
# storage (vfs: no overlay mounts, works in unprivileged sandboxes), so `make image` needs
# neither a daemon nor the machine's container storage.
SB_BUILDAH_ROOT=${SB_BUILDAH_ROOT:-$root/.buildah/storage}
SB_BUILDAH_RUNROOT=${SB_BUILDAH_RUNROOT:-$root/.buildah/run}
sb_buildah() {
  buildah --root "$SB_BUILDAH_ROOT" --runroot "$SB_BUILDAH_RUNROOT" --storage-driver vfs "$@"
}
