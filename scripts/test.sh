#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with only the Rust toolchain or a laptop with
# Docker: starts what the tests need, then runs formatting, lints, the deployment checks, the
# end-to-end demo check, and every Rust test against the real RabbitMQ and the sandbox Blinger.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

ensure_rabbitmq
ensure_impersonator
ensure_python_tools
ensure_prometheus
if ! cargo nextest --version >/dev/null 2>&1; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy --all-targets -- -D warnings"
cargo clippy -q --all-targets -- -D warnings
log "deployment checks (Dockerfile, Helm chart, alerts, dashboard)"
bash .ci/deploy-checks.sh
log "end-to-end demo check (live metrics contract, real Prometheus scrape)"
scripts/demo.sh --check
log "tests (RabbitMQ at $(amqp_host_port | tr ' ' ':'))"
cargo nextest run --profile ci
