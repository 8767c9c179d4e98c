#!/usr/bin/env bash
# Same-run peak-RSS comparison of two worker builds (docs/performance.md): each drains N jobs
# (1,000 conversations) from its own queues against one sandbox, twice, alternating.
# Usage: scripts/compare-rss.sh OLD_BIN NEW_BIN   (release builds; RabbitMQ at 127.0.0.1:5672)
set -euo pipefail
N=${N:-20000}
JOBS=$(mktemp)
AMQP=amqp://guest:guest@127.0.0.1:5672/%2f
OLD=${1:?old binary}; NEW=${2:?new binary}
SB=${SANDBOX_BIN:-target/debug/blinger-sandbox}
$SB --addr 127.0.0.1:18080 --token memtok >/dev/null 2>&1 &
SBPID=$!
trap 'kill $SBPID 2>/dev/null; rm -f "$JOBS"' EXIT
sleep 1
python3 - "$N" > "$JOBS" <<'PY'
import json, sys, uuid
for i in range(int(sys.argv[1])):
    print(json.dumps({"kind":"send-text","id":str(uuid.uuid4()),"conversation_id":f"c-{i%1000}","text":"Hello! Your order has shipped."}))
PY
run() {
  local name=$1 bin=$2 tag=$3
  local q="mem.$tag.$RANDOM"
  local data; data=$(mktemp -d)
  "$NEW" publish --amqp-url "$AMQP" --exchange "$q.x" --queue "$q" --dead-letter-queue "$q.dead" --receipts-exchange "$q.ev" --stdin < "$JOBS" >/dev/null
  local port=$((19000 + RANDOM % 500))
  AMQP_URL=$AMQP BLINGER_WORKER_EXCHANGE=$q.x BLINGER_WORKER_QUEUE=$q BLINGER_WORKER_DEAD_LETTER_QUEUE=$q.dead \
  BLINGER_WORKER_RECEIPTS_EXCHANGE=$q.ev BLINGER_API_URL=http://127.0.0.1:18080/api/external/v1 BLINGER_API_TOKEN=memtok \
  BLINGER_WORKER_DATA_DIR=$data BLINGER_WORKER_METRICS_ADDR=127.0.0.1:$port BLINGER_WORKER_RATE_LIMIT=100000 BLINGER_WORKER_RATE_BURST=10000 \
  BLINGER_WORKER_LOG_LEVEL=warn "$bin" run >/dev/null 2>&1 &
  local pid=$!
  local start; start=$(date +%s.%N)
  for _ in $(seq 1 600); do
    d=$(curl -s "http://127.0.0.1:$port/metrics" | awk '/^blinger_worker_jobs_delivered_total\{kind="send-text"\}/ {print $2}')
    [ "${d:-0}" = "$N" ] && break
    sleep 0.2
  done
  local end; end=$(date +%s.%N)
  local hwm rss
  hwm=$(awk '/VmHWM/ {print $2}' /proc/$pid/status); rss=$(awk '/VmRSS/ {print $2}' /proc/$pid/status)
  kill -TERM $pid; wait $pid || true
  printf '%s\tdelivered=%s\tsecs=%.1f\tpeak_rss_mib=%.1f\trss_mib=%.1f\n' "$name" "$d" "$(echo "$end - $start" | bc)" "$(echo "$hwm/1024" | bc -l)" "$(echo "$rss/1024" | bc -l)"
  for x in "$q" "$q.dead" "$q.retry.5s" "$q.retry.30s" "$q.retry.2m" "$q.retry.10m" "$q.retry.1h"; do rabbitmqctl -q delete_queue "$x" >/dev/null 2>&1 || true; done
  rm -rf "$data"
}
for round in 1 2; do
  run "old: $OLD" "$OLD" old
  run "new: $NEW" "$NEW" new
done
