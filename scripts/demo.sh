#!/usr/bin/env bash
# The main job, end to end, on this machine:
#   RabbitMQ (reachable at $AMQP_URL, else Docker, else the Debian package)
#   -> the sandbox Blinger (unless BLINGER_API_URL and BLINGER_API_TOKEN name a real account)
#   -> blinger-worker -> one sample job of every kind published -> shown delivered.
#
#   scripts/demo.sh           run, show, keep running until Ctrl-C
#   scripts/demo.sh --check   run, verify (metrics contract, a real Prometheus scrape), stop
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

check=""
[ "${1:-}" = "--check" ] && check=1

demo=.demo
mkdir -p "$demo"
metrics_addr=${BLINGER_WORKER_METRICS_ADDR:-127.0.0.1:9464}
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

ensure_rabbitmq
log "building blinger-worker and blinger-sandbox"
cargo build -q --bins
bin=${CARGO_TARGET_DIR:-target}/debug

if [ -n "${BLINGER_API_URL:-}" ] && [ -n "${BLINGER_API_TOKEN:-}" ]; then
  log "using the Blinger account at $BLINGER_API_URL"
  sandbox=""
else
  sandbox_addr=127.0.0.1:18080
  export BLINGER_API_URL="http://$sandbox_addr/api/external/v1"
  export BLINGER_API_TOKEN=sandbox-token
  rm -f "$demo/sandbox.jsonl"
  log "starting the sandbox Blinger at $BLINGER_API_URL (requests recorded in $demo/sandbox.jsonl)"
  "$bin/blinger-sandbox" --addr "$sandbox_addr" --token "$BLINGER_API_TOKEN" \
    --record "$demo/sandbox.jsonl" --latency-ms 20 2> "$demo/sandbox.log" &
  pids+=($!)
  sandbox="http://$sandbox_addr"
  for _ in $(seq 1 50); do curl -fs "$sandbox/_sandbox/stats" >/dev/null 2>&1 && break; sleep 0.1; done
fi

export BLINGER_WORKER_DATA_DIR="$demo/data"
export BLINGER_WORKER_METRICS_ADDR="$metrics_addr"
log "starting blinger-worker (log in $demo/worker.log)"
"$bin/blinger-worker" run 2> "$demo/worker.log" &
worker=$!
pids+=("$worker")
for _ in $(seq 1 100); do
  curl -fs "http://$metrics_addr/readyz" >/dev/null 2>&1 && break
  kill -0 "$worker" 2>/dev/null || { cat "$demo/worker.log" >&2; die "the worker exited"; }
  sleep 0.2
done
curl -fs "http://$metrics_addr/readyz" >/dev/null || die "the worker is not ready: $(curl -s "http://$metrics_addr/readyz")"

conversation=$(python3 -c 'import uuid; print(uuid.uuid4())')
log "publishing one job of every kind to conversation $conversation"
ids=$("$bin/blinger-worker" publish --stdin <<JOBS
{"kind":"send-text","id":"$(python3 -c 'import uuid; print(uuid.uuid4())')","conversation_id":"$conversation","text":"Hello from the blinger-worker demo"}
{"kind":"send-file","id":"$(python3 -c 'import uuid; print(uuid.uuid4())')","conversation_id":"$conversation","file_url":"https://static.widget.blinger.io/demo/picture.png"}
{"kind":"request-review","id":"$(python3 -c 'import uuid; print(uuid.uuid4())')","conversation_id":"$conversation"}
{"kind":"assign-agent","id":"$(python3 -c 'import uuid; print(uuid.uuid4())')","conversation_id":"$conversation","agent_id":"c671d030-584e-4422-8710-9215c04b6a64"}
JOBS
)
echo "$ids" | sed 's/^/    published /'

delivered() {
  curl -fs "http://$metrics_addr/metrics" | awk '/^blinger_worker_jobs_delivered_total/ {s += $2} END {print s + 0}'
}
for _ in $(seq 1 150); do
  [ "$(delivered)" -ge 4 ] && break
  sleep 0.2
done
[ "$(delivered)" -ge 4 ] || { tail -20 "$demo/worker.log" >&2; die "jobs were not delivered"; }

if [ -n "$sandbox" ]; then
  log "what the sandbox Blinger received:"
  curl -fs "$sandbox/_sandbox/requests" | python3 -c '
import json, sys
for r in json.load(sys.stdin):
    print("    %s POST %s  body=%s" % (r["status"], r["path"], json.dumps(r["body"])))'
fi
log "metrics:"
curl -fs "http://$metrics_addr/metrics" | grep -E '^blinger_worker_(jobs_delivered_total|api_requests_total|jobs_in_flight|amqp_connected|paused)' | sed 's/^/    /'
log "metrics at http://$metrics_addr/metrics, health at /healthz and /readyz"

if [ -n "$check" ]; then
  curl -fs "http://$metrics_addr/metrics" > "$demo/scrape.txt"
  ensure_python_tools
  ensure_prometheus
  log "checking every metric named by the dashboard and alerts exists in the live scrape"
  python3 .ci/metrics-contract.py "$demo/scrape.txt"
  log "a real Prometheus scrapes the worker; the dashboard's delivery-rate query returns data"
  # Keep traffic flowing so rate() has something to see.
  ( for i in $(seq 1 40); do
      printf '{"kind":"send-text","id":"%s","conversation_id":"%s","text":"tick %s"}\n' \
        "$(python3 -c 'import uuid; print(uuid.uuid4())')" "$conversation" "$i"
      sleep 1
    done | "$bin/blinger-worker" publish --stdin >/dev/null ) &
  feeder=$!
  bash .ci/prometheus-scrape-check.sh "$metrics_addr"
  kill "$feeder" 2>/dev/null || true
  log "demo check passed"
  exit 0
fi

log "running; Ctrl-C to stop"
wait "$worker"
