# syntax=docker/dockerfile:1
# The scorefront router image: docker build -t scorefront .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The cache mounts keep downloaded crates and compiled dependencies between builds; the
# binary is copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p scorefront \
    && install -m 0755 target/release/scorefront /usr/local/bin/scorefront

# glibc, libgcc and CA certificates, no shell; runs as 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /usr/local/bin/scorefront /usr/local/bin/scorefront
USER 65532:65532
EXPOSE 8080 8443 9090
ENTRYPOINT ["/usr/local/bin/scorefront"]
CMD ["serve", "--config", "/etc/scorefront/config.yaml"]
