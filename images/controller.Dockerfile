# weft-controller: docker build -f images/controller.Dockerfile -t ghcr.io/weft-mesh/weft-controller:0.1.0 .
# (images/build.sh makes the same image offline with buildah.)
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --profile dist -p weft-controller --bin weft-controller \
 && strip --strip-debug target/dist/weft-controller

# glibc and libgcc_s, nothing else; runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/dist/weft-controller /usr/local/bin/weft-controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/weft-controller"]
