#!/usr/bin/env bash
# Builds the test image of the local cluster as an OCI archive: agnhost (built from the
# Kubernetes module by build.sh) with the shell tools the upstream e2e tests exec in it
# (ping and the other busybox tools from Debian's busybox-static; `nc` is Debian's
# netcat-openbsd as in upstream's image, since `nc -u` is what the node-pod UDP test runs;
# curl and the libraries of both from this machine).
# Upstream's agnhost image defaults to `agnhost pause`, so the same archive also serves as
# the pod sandbox (pause) image. Prints the archive's path.
# Usage: images.sh <folder of build.sh>
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR
. "$here/oci.sh"
bin=$1
# The suffix names the recipe: a changed recipe builds a new archive.
out="$bin/agnhost-image-v3.tar"
[ -s "$out" ] && [ "$out" -nt "$bin/agnhost" ] && { echo "$out"; exit 0; }

log() { echo "[cluster-images] $*" >&2; }
command -v curl >/dev/null || { log "curl is required (apt-get install curl)"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,tmp,proc,sys,dev,uploads,usr/bin,lib64}
chmod 1777 "$rootfs/tmp"
cp "$bin/agnhost" "$rootfs/agnhost"
ln -s agnhost "$rootfs/agnhost-2"
(cd "$work" && apt-get download busybox-static netcat-openbsd >/dev/null 2>&1) \
  || { apt-get update -qq && (cd "$work" && apt-get download busybox-static netcat-openbsd >/dev/null); }
dpkg-deb -x "$work"/busybox-static_*.deb "$work/bb"
dpkg-deb -x "$work"/netcat-openbsd_*.deb "$work/nc"
cp "$work/bb/bin/busybox" "$rootfs/bin/busybox"
for applet in $("$rootfs/bin/busybox" --list); do
  [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
done
# with_libs <binary> <path in image>: the binary and the shared libraries it links.
with_libs() {
  mkdir -p "$rootfs$(dirname "$2")"
  cp "$1" "$rootfs$2"
  ldd "$1" | awk '/=> \// {print $3} /^\t\/lib/ {print $1}' | while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}
with_libs "$(command -v curl)" /usr/bin/curl
with_libs "$work/nc/bin/nc.openbsd" /usr/bin/nc.openbsd
ln -sf /usr/bin/nc.openbsd "$rootfs/bin/nc"
ln -sf /usr/bin/nc.openbsd "$rootfs/usr/bin/nc"
# Debian's busybox shell prefers its own applets to PATH (its nc has no -u): /bin/sh is dash.
with_libs /bin/dash /bin/dash
ln -sf dash "$rootfs/bin/sh"
printf 'root:x:0:0:root:/root:/bin/sh\nuser-defined-in-image:x:1000:1000::/home:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\ngroup-defined-in-image:x:50000:user-defined-in-image\n' >"$rootfs/etc/group"
oci_pack "$rootfs" "$out" registry.k8s.io/e2e-test-images/agnhost:2.56 '["/agnhost"]' '["pause"]'
log "agnhost image: $(du -h "$out" | cut -f1)"
echo "$out"
