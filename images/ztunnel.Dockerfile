# ztunnel (weft-ztunnel and weft-cni): docker build -f images/ztunnel.Dockerfile -t ghcr.io/weft-mesh/ztunnel:0.1.0 .
# (images/build.sh makes the same image offline with buildah.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --profile dist -p weft-ztunnel --bin weft-ztunnel --bin weft-cni \
 && strip --strip-debug target/dist/weft-ztunnel target/dist/weft-cni

# The ztunnel runs nft to install each pod's capture rules, so its image
# carries nftables; it runs as root with NET_ADMIN/SYS_ADMIN (the DaemonSet
# grants them) to enter pod network namespaces.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/weft-ztunnel /src/target/dist/weft-cni /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/weft-ztunnel"]
