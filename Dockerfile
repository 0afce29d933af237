# Berth host image. Build: docker build -t berth:dev .
#
# Stage 1 builds the release binary with the locked dependency set; stage 2
# is distroless (glibc, CA certificates, no shell), runs as a numeric
# non-root user, and execs berth directly so it is PID 1 and receives
# SIGTERM from the kubelet.

FROM rust:1.97-slim-bookworm AS builder
WORKDIR /src
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY host host
COPY guest-sdk guest-sdk
# `berth new` embeds the project templates (host/build.rs).
COPY templates templates
# host/Cargo.toml names the end-to-end tests as a target; cargo wants the
# file present even for a binary-only build.
COPY tests/e2e tests/e2e
# A workspace member: cargo loads every member's manifest before building.
COPY bench/native-hello bench/native-hello
RUN cargo build --release --locked --bin berth \
    && install -D -m 0755 target/release/berth /out/berth

# Pinned by digest (the multi-arch index of the `nonroot` tag), so a
# rebuild gets the bytes that were reviewed; bump it deliberately.
FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
COPY --from=builder /out/berth /usr/local/bin/berth
# Writable places come from volumes (the chart mounts emptyDirs here), so
# the root filesystem can stay read-only.
ENV BERTH_RUNTIME__CACHE_DIR=/var/cache/berth/compiled \
    LOG_FORMAT=json
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/berth"]
CMD ["serve", "--config", "/etc/berth/berth.toml"]
