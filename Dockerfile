# syntax=docker/dockerfile:1
#
# blinger-worker image: the worker (`blinger-worker run`) and its operator commands, nothing else.
# The sandbox Blinger (`blinger-sandbox`, whose /_sandbox/config answers with its token) is a test
# tool: it is not built here and not in the image (.ci/image_checks.py checks that).
#
#   docker build -t blinger-worker .
#   docker run --rm -p 9464:9464 -e AMQP_URL=amqp://user:pass@rabbitmq:5672/%2f \
#     -e BLINGER_API_TOKEN=... -v blinger-data:/var/lib/blinger-worker blinger-worker
#
# Runtime: distroless cc (glibc, libgcc, CA certificates, no shell), user nonroot 65532:65532.
# The only writable path the worker needs is its sled store, BLINGER_WORKER_DATA_DIR=/var/lib/blinger-worker;
# mount a volume there so the delivered-records store survives container restarts.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0

# 1. Dependency layer, cached until a manifest or Cargo.lock changes: build every dependency of the
#    worker against stub sources. Cargo loads every member of the workspace, so each crate's manifest
#    is copied and each target it declares ([lib], [[bin]], [[bench]], [[test]], [[example]]) gets a
#    stub, as does each crate's src/lib.rs.
COPY Cargo.toml Cargo.lock ./
COPY crates/blinger-api/Cargo.toml crates/blinger-api/
COPY crates/blinger-worker/Cargo.toml crates/blinger-worker/
COPY crates/blinger-sandbox/Cargo.toml crates/blinger-sandbox/
COPY crates/test-support/Cargo.toml crates/test-support/
RUN set -eux; \
    for dir in crates/*/; do \
      awk -F'"' -v dir="$dir" ' \
        /^[[:space:]]*\[/ { kind = $0; gsub(/[][[:space:]]/, "", kind); next } \
        kind ~ /^(bench|test|example)$/ && /^[[:space:]]*name[[:space:]]*=/ { print dir (kind == "bench" ? "benches" : kind "s") "/" $2 ".rs" } \
        kind ~ /^(lib|bin|bench|test|example)$/ && /^[[:space:]]*path[[:space:]]*=/ { print dir $2 } \
      ' "$dir/Cargo.toml"; \
    done > /tmp/stub-targets; \
    while read -r f; do mkdir -p "$(dirname "$f")"; echo 'fn main() {}' > "$f"; done < /tmp/stub-targets; \
    for dir in crates/*/; do mkdir -p "${dir}src"; : > "${dir}src/lib.rs"; done; \
    cargo build --release --locked -p blinger-worker --bin blinger-worker; \
    rm -rf crates/*/src crates/*/benches crates/*/tests crates/*/examples /tmp/stub-targets

# 2. The real sources (.dockerignore keeps target/, .git, helm/, deploy/ ... out of the context).
#    COPY keeps the files' old mtimes, which can be older than the stub build: touch them and drop the
#    workspace crates' own fingerprints so cargo rebuilds them instead of shipping the stubs.
COPY . .
RUN set -eux; \
    find crates -name '*.rs' -exec touch {} +; \
    rm -rf target/release/.fingerprint/blinger-worker-* target/release/.fingerprint/blinger-api-*; \
    cargo build --release --locked -p blinger-worker --bin blinger-worker; \
    mkdir -p /out/bin /out/data; \
    cp target/release/blinger-worker /out/bin/

FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="blinger-worker" \
      org.opencontainers.image.description="RabbitMQ -> Blinger API delivery worker" \
      org.opencontainers.image.licenses="MIT"
COPY --from=builder /out/bin/ /usr/local/bin/
COPY --from=builder --chown=65532:65532 /out/data /var/lib/blinger-worker
ENV BLINGER_WORKER_DATA_DIR=/var/lib/blinger-worker \
    BLINGER_WORKER_METRICS_ADDR=0.0.0.0:9464
USER 65532:65532
WORKDIR /var/lib/blinger-worker
# Metrics, /healthz and /readyz. (No HEALTHCHECK: distroless has no shell or curl; Kubernetes probes
# /healthz and /readyz directly, see helm/blinger-worker.)
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/blinger-worker"]
CMD ["run"]
