# shellcheck shell=bash
# Sourced helper: packs a root filesystem folder into an OCI image layout archive
# (one uncompressed layer, config, manifest, index.json, oci-layout) that
# `ctr images import` reads. No registry, no Docker.
# oci_pack <rootfs dir> <out .tar> <image name> <entrypoint JSON array> <cmd JSON array>
oci_pack() {
  local rootfs=$1 out=$2 name=$3 entrypoint=$4 cmd=$5
  local work
  work=$(mktemp -d)
  mkdir -p "$work/blobs/sha256"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$rootfs" -cf "$work/layer.tar" .
  local layer_sha layer_size
  layer_sha=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
  layer_size=$(stat -c %s "$work/layer.tar")
  mv "$work/layer.tar" "$work/blobs/sha256/$layer_sha"
  jq -cn --argjson ep "$entrypoint" --argjson cmd "$cmd" --arg diff "sha256:$layer_sha" '{
      architecture: "amd64", os: "linux",
      config: {Entrypoint: $ep, Cmd: $cmd, Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"], WorkingDir: "/"},
      rootfs: {type: "layers", diff_ids: [$diff]}}' >"$work/config.json"
  local config_sha config_size
  config_sha=$(sha256sum "$work/config.json" | cut -d' ' -f1)
  config_size=$(stat -c %s "$work/config.json")
  mv "$work/config.json" "$work/blobs/sha256/$config_sha"
  jq -cn --arg c "sha256:$config_sha" --argjson cs "$config_size" --arg l "sha256:$layer_sha" --argjson ls "$layer_size" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar", digest: $l, size: $ls}]}' >"$work/manifest.json"
  local manifest_sha manifest_size
  manifest_sha=$(sha256sum "$work/manifest.json" | cut -d' ' -f1)
  manifest_size=$(stat -c %s "$work/manifest.json")
  mv "$work/manifest.json" "$work/blobs/sha256/$manifest_sha"
  jq -cn --arg m "sha256:$manifest_sha" --argjson ms "$manifest_size" --arg name "$name" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
        platform: {architecture: "amd64", os: "linux"},
        annotations: {"io.containerd.image.name": $name, "org.opencontainers.image.ref.name": $name}}]}' >"$work/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$work/oci-layout"
  tar --owner=0 --group=0 --numeric-owner -C "$work" -cf "$out.tmp" oci-layout index.json blobs
  mv "$out.tmp" "$out"
  rm -rf "$work"
}
