#!/usr/bin/env bash
# Stages the image's whole file system in OUT: the agent binary, exactly the shared libraries
# it links (as `ldd` resolves them, at the same paths, plus the dynamic loader), the CA bundle,
# and /etc/passwd + /etc/group naming uid/gid 65532. Nothing else: no shell, no coreutils.
# packaging/Containerfile copies OUT as the image's only layer (`docker build` and
# `buildah bud` alike, with OUT as the build context).
#
#   packaging/image/rootfs.sh target/release/syncbridge-agent target/image/rootfs
set -euo pipefail
bin=${1:?usage: rootfs.sh BINARY OUT}
out=${2:?usage: rootfs.sh BINARY OUT}
ca=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
[ -x "$bin" ] || { echo "rootfs.sh: $bin is not an executable (cargo build --release -p syncbridge-agent)" >&2; exit 1; }
[ -s "$ca" ] || { echo "rootfs.sh: no CA bundle at $ca (apt-get install ca-certificates)" >&2; exit 1; }
rm -rf "$out"
mkdir -p "$out/usr/bin" "$out/etc/ssl/certs"
install -m 0755 "$bin" "$out/usr/bin/syncbridge-agent"

# `ldd` lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)" and the loader
# "/lib64/ld-linux-x86-64.so.2 (0x…)"; linux-vdso has no file. A library ldd cannot find
# stops the build rather than producing an image that cannot start.
if ldd "$bin" | grep -q 'not found'; then
  echo "rootfs.sh: $bin links a library that is not installed:" >&2; ldd "$bin" >&2; exit 1
fi
libs=$(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)
[ -n "$libs" ] || { echo "rootfs.sh: ldd found no libraries in $bin (a static binary needs none; remove this check)" >&2; exit 1; }
for lib in $libs; do
  mkdir -p "$out$(dirname "$lib")"
  # -L: the file the symlink names, under the name the binary asks for.
  cp -L "$lib" "$out$lib"
  chmod 0755 "$out$lib"
done

install -m 0644 "$ca" "$out/etc/ssl/certs/ca-certificates.crt"
# A name for the uid, for tools that look it up (and libpq-style "who am I" defaults).
printf 'nonroot:x:65532:65532:syncbridge-agent:/nonexistent:/nonexistent\n' > "$out/etc/passwd"
printf 'nonroot:x:65532:\n' > "$out/etc/group"
# glibc resolves host names from /etc/hosts then DNS (Kubernetes mounts both files).
printf 'hosts: files dns\n' > "$out/etc/nsswitch.conf"
chmod 0644 "$out/etc/passwd" "$out/etc/group" "$out/etc/nsswitch.conf"
# Kubernetes mounts writable volumes here; the root file system stays read-only.
mkdir -p "$out/tmp" "$out/var/lib/syncbridge"
chmod 1777 "$out/tmp"
echo "rootfs.sh: staged $out ($(du -sh "$out" | cut -f1)): $(echo $libs | tr '\n' ' ')" >&2
