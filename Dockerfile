# syntax=docker/dockerfile:1
# tortie node image: the daemon (`tortie node`, the default command) and, from the same
# binary, the CNI plugin it installs on the host. Build:
#   docker build --build-arg VERSION=0.1.0 --build-arg GIT_COMMIT=$(git rev-parse HEAD) \
#     --build-arg SOURCE_URL=<repository URL> -t tortie .
# VERSION must be what `tortie version` prints (Cargo.toml's version; tests/image.rs checks
# the default below). scripts/image.sh builds the same image without Docker (same packages,
# same entrypoint, command and labels) and reads the version from the binary itself.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
ARG GIT_COMMIT=unknown
# Read by the build (option_env!) for `tortie version` and the tortie_build_info metric.
ENV TORTIE_GIT_COMMIT=${GIT_COMMIT}
WORKDIR /src
COPY . .
# Cache mounts keep the registry and compiled dependencies between builds.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin tortie \
    && install -m 0755 target/release/tortie /tortie

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG GIT_COMMIT=unknown
# The repository URL, e.g. --build-arg SOURCE_URL=https://github.com/<owner>/tortie
ARG SOURCE_URL=
LABEL org.opencontainers.image.title="tortie" \
      org.opencontainers.image.description="Kubernetes node networking daemon: Calico-compatible IPAM, CNI, VXLAN/IPIP overlay, policy" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
# nftables: the NAT and policy driver runs `nft`; iproute2: `ip` for diagnosis in the pod.
# (The API server's CA comes from the service account, so no ca-certificates.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables iproute2 \
    && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man /usr/share/info /usr/share/locale
COPY --from=build /tortie /usr/local/bin/tortie
# Health (/liveness, /readiness) and Prometheus metrics; hostNetwork pods listen on the node.
EXPOSE 9099 9091
ENTRYPOINT ["/usr/local/bin/tortie"]
CMD ["node"]
