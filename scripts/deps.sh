#!/usr/bin/env bash
# The Debian packages the tests and the sandbox run (ping, nft, ip, conntrack, the CNI
# reference plugins, ...). Sourced by .ci/run, scripts/test.sh and scripts/run.sh: installs
# what is missing when it can (root with apt-get), otherwise stops with the exact command.
tortie_apt_packages=(iproute2 nftables iputils-ping conntrack tcpdump iperf3 openssl jq ca-certificates procps containernetworking-plugins ethtool)

tortie_ensure_deps() {
  local missing=() p
  for p in "${tortie_apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ "${TORTIE_NO_INSTALL:-}" != 1 ]; then
    echo "[deps] installing: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[deps] missing Debian packages: ${missing[*]}" >&2
    echo "[deps] install them with: apt-get install -y --no-install-recommends ${missing[*]}" >&2
    return 1
  fi
}
