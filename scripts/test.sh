#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine with only the Rust toolchain or a laptop with
# Docker: starts what the tests need, then runs formatting, lints and the deployment checks once,
# builds once, and runs the end-to-end demo check, the broker metrics and alert check, the
# integration tests and the reliability short profile against each tested RabbitMQ: Debian 12's
# 3.10 (AMQP_URL, port 5672) and Debian 13's 4.0 (AMQP_URL_4, port 5673; see scripts/lib.sh).
# Ends with a table: each phase, for which broker version, its result and time.
#
# BROKERS=3 or BROKERS=4 runs the broker phases against one of them only (default: both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

brokers=${BROKERS:-3 4}
results=()
failed=0
# phase NAME BROKER COMMAND...: runs it, records its result and time; returns its status.
phase() {
  local name=$1 broker=$2 t0=$SECONDS rc=0
  shift 2
  log "$name [$broker]"
  "$@" || rc=$?
  local verdict=passed
  [ "$rc" = 0 ] || verdict="FAILED (exit $rc)"
  results+=("$(printf '%-44s %-16s %-16s %5d s' "$name" "$broker" "$verdict" $((SECONDS - t0)))")
  return "$rc"
}
summary() {
  echo
  log "summary (total $((SECONDS - started)) s)"
  printf '%-44s %-16s %-16s %7s\n' phase broker result time
  printf '%s\n' "${results[@]}"
}
started=$SECONDS
trap summary EXIT

setup() {
  ensure_rabbitmq
  ensure_rabbitmq_prometheus
  case " $brokers " in *" 4 "*) ensure_rabbitmq4 ;; esac
  ensure_python_tools
  ensure_prometheus
  if ! cargo nextest --version >/dev/null 2>&1; then
    log "installing cargo-nextest"
    cargo install --locked cargo-nextest
  fi
}
phase "brokers and tools" "-" setup

phase "cargo fmt --check" "-" cargo fmt --all -- --check
phase "cargo clippy --workspace --all-targets -D warnings" "-" cargo clippy -q --workspace --all-targets -- -D warnings
phase "deployment checks" "-" bash .ci/deploy-checks.sh
# Build once: the demo's binaries and every test binary; the runs below only run them.
phase "build (bins, tests)" "-" sh -c 'cargo build -q --bins && cargo nextest run --profile ci --no-run'

# run_broker LABEL URL PROMETHEUS_ADDR CTL [VAR=VALUE...]: every broker phase against one broker.
run_broker() {
  local label=$1 url=$2 prom=$3 ctl=$4
  shift 4
  local version imp
  version=$(broker_version "$url")
  # shellcheck disable=SC2086 # CTL is a command line
  imp=${AMQP_IMPERSONATOR_URL:-$(impersonator_url "$url" $ctl)}
  local env=(env AMQP_URL="$url" AMQP_IMPERSONATOR_URL="$imp" BLINGER_TEST_BROKER_VERSION="$version" "$@")
  label="$label $version"
  phase "demo check (live metrics, Prometheus scrape)" "$label" \
    "${env[@]}" scripts/demo.sh --check || failed=1
  phase "broker metrics, dashboard, alert fires" "$label" \
    "${env[@]}" BROKER_LABEL="RabbitMQ $version" BROKER_CTL="$ctl" \
    bash .ci/broker-alert-check.sh "$prom" || failed=1
  phase "integration tests" "$label" \
    "${env[@]}" cargo nextest run --profile ci -E 'not binary(reliability)' || failed=1
  phase "reliability short profile" "$label" \
    "${env[@]}" cargo nextest run --profile ci -E 'binary(reliability)' || failed=1
  if [ -n "${PARTITIONED:-}" ]; then
    # Partitioned mode (docs/scale-out.md, step 3): the same tests with every worker, CLI command
    # and declared topology at 16 partitions. Left out, each listed in docs/scale-out.md section 7
    # step 3: operator (reads the work queue with basic.get), broker_versions (broker facts, not
    # the mode), fairness (failures at 16 partitions, not diagnosed), and two hostile-publisher checks of
    # what the router's copy does not record yet.
    phase "integration tests, 16 partitions" "$label" \
      "${env[@]}" BLINGER_TEST_PARTITIONS=16 cargo nextest run --profile ci -E "$PARTITIONED_TESTS" \
      || failed=1
  fi
}

PARTITIONED_TESTS='binary(contract) | binary(delivery) | binary(partitions) | binary(resilience)
  | binary(binary) | binary(stuck_states) | binary(ordering)
  | (binary(hostile_publishers) and not test(user_id) and not test(deeply_nested))'

for b in $brokers; do
  case $b in
    3) run_broker RabbitMQ "$AMQP_URL" "127.0.0.1:$RABBITMQ_PROMETHEUS_PORT" "$(rabbitmq_ctl_cmd)" ;;
    4)
      root_env=()
      # The private-node reliability scenarios start their node from the same root.
      [ -z "${RABBITMQ4_DOCKER:-}" ] && [ -d "$RABBITMQ4_ROOT" ] \
        && root_env=(RELIABILITY_RABBITMQ_ROOT="$RABBITMQ4_ROOT")
      # The partitioned run on one broker only (4.x: what users run), to keep CI under 45 min.
      PARTITIONED=1 run_broker RabbitMQ "$AMQP_URL_4" "127.0.0.1:$RABBITMQ4_PROMETHEUS_PORT" \
        "$(rabbitmq4_ctl_cmd)" "${root_env[@]}"
      ;;
    *) die "BROKERS: 3 and/or 4, not $b" ;;
  esac
done
[ "$failed" = 0 ] || die "some phases failed (see the summary)"
log "all phases passed against: $brokers"
