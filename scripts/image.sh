#!/usr/bin/env bash
# Builds tortie's node image without Docker: the release binary on a Debian bookworm rootfs
# (mmdebstrap, with nftables and iproute2), packed with umoci as an OCI image archive that
# `ctr -n k8s.io images import` and `skopeo` accept. The Dockerfile builds the same image on
# machines with Docker. Prints the archive's path on stdout; everything else goes to stderr.
#
#   scripts/image.sh                      # ghcr.io/tortie/tortie:<version>
#   TORTIE_IMAGE=ghcr.io/tortie/tortie:e2e-2 scripts/image.sh
#   TORTIE_IMAGE_PROFILE=dev scripts/image.sh   # the debug build (scripts/test.sh's e2e: the
#                                               # binary the tests built, no release build)
#
# The rootfs is cached under ${TORTIE_CACHE:-~/.cache/tortie}/image/ (keyed by suite and
# packages); the archive goes to ${CARGO_TARGET_DIR:-target}/image/. Needs root (mmdebstrap
# root mode), cargo, mmdebstrap, umoci, jq.
set -euo pipefail
export LC_ALL=C
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { echo "[image] $*" >&2; }
for tool in cargo mmdebstrap umoci jq tar sha256sum; do
  command -v "$tool" >/dev/null || { echo "[image] $tool is required" >&2; exit 1; }
done

# ---- the release binary -----------------------------------------------------------------
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
profile=${TORTIE_IMAGE_PROFILE:-release}
TORTIE_GIT_COMMIT=${TORTIE_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
# The debug build keeps the tests' build settings (a commit in its env would rebuild it).
[ "$profile" = release ] && export TORTIE_GIT_COMMIT
case $profile in
  release) log "cargo build --release (commit $TORTIE_GIT_COMMIT)"
    cargo build --release --locked --bin tortie >&2
    binary=$target_dir/release/tortie ;;
  dev) log "cargo build (debug)"
    cargo build --locked --bin tortie >&2
    binary=$target_dir/debug/tortie ;;
  *) echo "[image] TORTIE_IMAGE_PROFILE is release or dev, not $profile" >&2; exit 1 ;;
esac
# The label is what the binary itself reports, so `tortie version` and the image agree.
version=$("$binary" version | awk 'NR == 1 { print $2 }')
[ -n "$version" ] || { echo "[image] $binary version printed no version" >&2; exit 1; }
image_ref=${TORTIE_IMAGE:-ghcr.io/tortie/tortie:$version}

# ---- the Debian rootfs (cached) ---------------------------------------------------------
suite=bookworm
# nftables: the NAT and policy driver runs `nft`; iproute2: `ip` for diagnosis in the pod.
packages=nftables,iproute2
cache=${TORTIE_CACHE:-$HOME/.cache/tortie}/image
mkdir -p "$cache"
key=$(printf '%s\n' "$suite" "$packages" essential no-recommends merged-usr-hook v3 | sha256sum | cut -c1-16)
rootfs=$cache/rootfs-$suite-$key.tar
if [ ! -s "$rootfs" ]; then
  log "mmdebstrap $suite with $packages -> $rootfs"
  # variant essential: no apt, no init; /usr merged by mmdebstrap's hook rather than the
  # usrmerge package (which pulls in perl); no recommended packages; docs, man pages and
  # locales left out; no device nodes (the runtime provides /dev).
  mmdebstrap --variant=essential --include="$packages" \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --skip=output/dev --format=tar \
    "$suite" "$rootfs.part" >&2
  mv "$rootfs.part" "$rootfs"
else
  log "cached rootfs $rootfs"
fi

# ---- the OCI image ----------------------------------------------------------------------
out_dir=$target_dir/image
mkdir -p "$out_dir"
work=$(mktemp -d "$out_dir/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
layout=$work/layout
tag=$version
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci raw add-layer --image "$layout:$tag" \
  --history.created_by "mmdebstrap --variant=essential --include=$packages $suite" "$rootfs"
mkdir -p "$work/bin/usr/local/bin"
install -m 0755 "$binary" "$work/bin/usr/local/bin/tortie"
tar --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$work/bin" -cf "$work/bin.tar" usr
umoci raw add-layer --image "$layout:$tag" \
  --history.created_by "tortie $version ($TORTIE_GIT_COMMIT)" "$work/bin.tar"
umoci config --image "$layout:$tag" \
  --config.entrypoint /usr/local/bin/tortie --config.cmd node \
  --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --config.exposedports 9099/tcp --config.exposedports 9091/tcp \
  --config.label org.opencontainers.image.title=tortie \
  --config.label "org.opencontainers.image.description=Kubernetes node networking daemon: Calico-compatible IPAM, CNI, VXLAN/IPIP overlay, policy" \
  --config.label org.opencontainers.image.licenses=Apache-2.0 \
  --config.label "org.opencontainers.image.version=$version" \
  --config.label "org.opencontainers.image.revision=$TORTIE_GIT_COMMIT" \
  --architecture amd64 --os linux
umoci gc --layout "$layout"
# containerd names an imported image after `io.containerd.image.name`; the OCI ref name
# stays the tag, as the image-layout spec wants.
jq --arg ref "$image_ref" --arg tag "$tag" \
  '.manifests |= map(.annotations = {"org.opencontainers.image.ref.name": $tag, "io.containerd.image.name": $ref})' \
  "$layout/index.json" >"$work/index.json"
mv "$work/index.json" "$layout/index.json"

archive=$out_dir/tortie-${image_ref##*:}.oci.tar
tar --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$archive.part" oci-layout index.json blobs
mv "$archive.part" "$archive"
size_layers=$(jq -r '.manifests[0].digest' "$layout/index.json" | cut -d: -f2 |
  xargs -I{} jq '[.layers[].size] | add' "$layout/blobs/sha256/{}")
log "image $image_ref: $(du -h "$archive" | cut -f1) archive, $size_layers bytes of compressed layers"
echo "$archive"
