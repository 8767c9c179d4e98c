#!/usr/bin/env bash
# The broker's own metrics, live: a real Prometheus scrapes RabbitMQ's rabbitmq_prometheus plugin
# (/metrics/per-object and /metrics/detailed) and a worker that is stalled (paused on a 401), and
#   1. every rabbitmq_* series the dashboard's queries and the alert rules name (with the chart's
#      default and its all-options values of prometheusRule.queueDepth) exists in a direct scrape
#      of the broker, with the work queue's `queue` label;
#   2. each dashboard query naming a rabbitmq_* metric returns data for the work queue;
#   3. the critical alert BlingerWorkerNoDeliveries is not firing while the queue is empty, fires
#      while jobs wait and the worker delivers nothing (the rule file of deploy/prometheus with its
#      `for` at 0s and the selector on this check's queue: same expression), and resolves once a
#      healthy worker has delivered them.
#
#   bash .ci/broker-alert-check.sh BROKER_PROMETHEUS_HOST:PORT
#
# Env: AMQP_URL (the broker), BROKER_LABEL (e.g. "RabbitMQ 4.0.5", for messages), BROKER_CTL (a
# rabbitmqctl command line for that broker, to delete the check's queues at the end; optional),
# BIN (directory of blinger-worker and blinger-sandbox, default $CARGO_TARGET_DIR/debug or
# target/debug), PROM_PORT (9098).
# Needs: prometheus, promtool, curl, python3. Everything listens on 127.0.0.1 only.
set -euo pipefail

broker_prom=${1:?usage: $0 BROKER_PROMETHEUS_HOST:PORT (rabbitmq_prometheus, e.g. 127.0.0.1:15692)}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${BIN:-${CARGO_TARGET_DIR:-$root/target}/debug}
label=${BROKER_LABEL:-RabbitMQ at $broker_prom}
prom_port=${PROM_PORT:-9098}
api="http://127.0.0.1:${prom_port}"
: "${AMQP_URL:?set AMQP_URL to the broker}"
tag=$(python3 -c 'import uuid; print(uuid.uuid4().hex[:8])')
queue="ci.alertcheck.$tag"
sandbox_addr=127.0.0.1:18081
stalled_metrics=127.0.0.1:9465
healthy_metrics=127.0.0.1:9466
say() { echo "broker-alert-check [$label]: $*"; }

tmp=$(mktemp -d -t broker-alert-check.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "${BROKER_CTL:-}" ]; then
    for q in "$queue" "$queue.dead" "$queue.retry.5s" "$queue.retry.30s" "$queue.retry.2m" \
      "$queue.retry.10m" "$queue.retry.30m"; do
      $BROKER_CTL -q delete_queue "$q" >/dev/null 2>&1 || true
    done
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
die() {
  echo "broker-alert-check [$label]: FAILED: $*" >&2
  for f in prometheus.log stalled.log healthy.log; do
    [ -f "$tmp/$f" ] && { echo "--- $f (last 15 lines):" >&2; tail -n 15 "$tmp/$f" >&2; }
  done
  exit 1
}
for tool in prometheus promtool curl python3; do
  command -v "$tool" >/dev/null || die "$tool not installed"
done

export BLINGER_WORKER_EXCHANGE="$queue.x" BLINGER_WORKER_QUEUE="$queue" \
  BLINGER_WORKER_DEAD_LETTER_QUEUE="$queue.dead" BLINGER_WORKER_RECEIPTS=false

"$bin/blinger-sandbox" --addr "$sandbox_addr" --token right-token 2> "$tmp/sandbox.log" &
pids+=($!)

# The stalled worker: a wrong token pauses it on the first 401 with its prefetch (2) unacked;
# the rest of the jobs stay ready in the queue.
BLINGER_API_URL="http://$sandbox_addr/api/external/v1" BLINGER_API_TOKEN=wrong-token \
  BLINGER_WORKER_PREFETCH=2 BLINGER_WORKER_DATA_DIR="$tmp/stalled" \
  BLINGER_WORKER_METRICS_ADDR="$stalled_metrics" "$bin/blinger-worker" run 2> "$tmp/stalled.log" &
stalled=$!
pids+=("$stalled")
for _ in $(seq 1 100); do
  curl -fs "http://$stalled_metrics/readyz" >/dev/null 2>&1 && break
  kill -0 "$stalled" 2>/dev/null || die "the stalled worker exited"
  sleep 0.2
done

# Rules: the standalone rule file, its NoDeliveries `for` at 0s, the queue selector on our queue.
python3 - "$root/deploy/prometheus/blinger-worker-rules.yaml" "$queue" > "$tmp/rules.yaml" <<'PY'
import sys, yaml
rules = yaml.safe_load(open(sys.argv[1]))
queue = sys.argv[2]
found = 0
for group in rules["groups"]:
    for rule in group["rules"]:
        if rule.get("alert") == "BlingerWorkerNoDeliveries":
            assert 'queue="blinger.outbound"' in rule["expr"], rule["expr"]
            rule["expr"] = rule["expr"].replace('queue="blinger.outbound"', f'queue="{queue}"')
            rule["for"] = "0s"
            found += 1
assert found == 1, "BlingerWorkerNoDeliveries not found once"
yaml.safe_dump(rules, sys.stdout, sort_keys=False)
PY
promtool check rules "$tmp/rules.yaml" >/dev/null || die "promtool check rules on the adapted rule file"

cat > "$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files: ['$tmp/rules.yaml']
scrape_configs:
  - job_name: blinger-worker
    static_configs:
      - targets: ['$stalled_metrics', '$healthy_metrics']
  - job_name: rabbitmq-per-object
    metrics_path: /metrics/per-object
    static_configs:
      - targets: ['$broker_prom']
  - job_name: rabbitmq-detailed
    metrics_path: /metrics/detailed
    params:
      family: [queue_coarse_metrics]
    static_configs:
      - targets: ['$broker_prom']
EOF
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn > "$tmp/prometheus.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 60); do curl -sf --max-time 2 "$api/-/ready" >/dev/null 2>&1 && break; sleep 0.5; done
curl -sf --max-time 2 "$api/-/ready" >/dev/null || die "prometheus not ready after 30 s"

query() { curl -sf --max-time 5 "$api/api/v1/query" --data-urlencode "query=$1"; }
# has EXPR: the query returns at least one series.
has() {
  query "$1" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'
}
# wait_for SECONDS DESCRIPTION COMMAND...
wait_for() {
  local seconds=$1 what=$2
  local deadline=$((SECONDS + seconds))
  shift 2
  while ((SECONDS < deadline)); do "$@" && return 0; sleep 1; done
  die "$what (waited ${seconds} s)"
}
firing() { has 'ALERTS{alertname="BlingerWorkerNoDeliveries",alertstate="firing"}'; }
not_firing() { ! firing; }

wait_for 30 "the broker's per-object and detailed endpoints are not both up in Prometheus" \
  has 'sum(up{job=~"rabbitmq-.*"}) == 2'
# The topology (declared by the worker) is in the broker's metrics with the queue label.
wait_for 30 "no rabbitmq_queue_messages_ready series for queue $queue" \
  has "rabbitmq_queue_messages_ready{queue=\"$queue\"}"
sleep 3
not_firing || die "BlingerWorkerNoDeliveries fires while the queue is empty"
say "queue empty, worker up: BlingerWorkerNoDeliveries not firing (right)"

conversation=$(python3 -c 'import uuid; print(uuid.uuid4())')
python3 - "$conversation" <<'PY' | "$bin/blinger-worker" publish --stdin > /dev/null
import json, sys, uuid
for i in range(20):
    print(json.dumps({"kind": "send-text", "id": str(uuid.uuid4()),
                      "conversation_id": sys.argv[1], "text": f"alert check {i}"}))
PY
say "20 jobs published; the worker is paused on a 401 (wrong token)"
wait_for 30 "the worker did not pause on the 401" \
  sh -c "curl -fs http://$stalled_metrics/metrics | grep -q '^blinger_worker_paused 1'"

# 1. Direct scrape of the broker: every rabbitmq_* metric named by the dashboard or the rules.
curl -fs "http://$broker_prom/metrics/per-object" > "$tmp/per-object.txt"
curl -fs "http://$broker_prom/metrics/detailed?family=queue_coarse_metrics" > "$tmp/detailed.txt"
python3 - "$root" "$queue" "$tmp/per-object.txt" "$tmp/detailed.txt" "$label" > "$tmp/exprs.txt" <<'PY'
import json, re, sys, yaml
root, queue, per_object, detailed, label = sys.argv[1:6]
dashboard = json.load(open(f"{root}/deploy/grafana/blinger-worker-dashboard.json"))
rules = yaml.safe_load(open(f"{root}/deploy/prometheus/blinger-worker-rules.yaml"))
values = yaml.safe_load(open(f"{root}/helm/blinger-worker/values.yaml"))
all_opts = yaml.safe_load(open(f"{root}/helm/blinger-worker/ci/all-options-values.yaml"))
exprs = []
def walk(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "expr" and isinstance(v, str):
                exprs.append(v)
            else:
                walk(v)
    elif isinstance(node, list):
        for v in node:
            walk(v)
walk(dashboard["panels"])
dashboard_exprs = [e for e in exprs if "rabbitmq_" in e]
rule_exprs = [r["expr"] for g in rules["groups"] for r in g["rules"] if "rabbitmq_" in r["expr"]]
names = set()
for e in dashboard_exprs + rule_exprs:
    names |= set(re.findall(r"\b(rabbitmq_[a-z_]+)", e))
for v in (values, all_opts):
    names.add(v["prometheusRule"]["queueDepth"]["metric"])
scraped = {}
for path in (per_object, detailed):
    for line in open(path):
        m = re.match(r"^(rabbitmq_[a-z_]+)\{([^}]*)\}", line)
        if m:
            scraped.setdefault(m.group(1), []).append(m.group(2))
missing = []
for n in sorted(names):
    series = scraped.get(n, [])
    mine = [s for s in series if f'queue="{queue}"' in s]
    if not mine:
        missing.append(n)
        print(f"  MISSING  {n}: no series with queue=\"{queue}\" ({len(series)} series of it)", file=sys.stderr)
    else:
        print(f"  ok       {n}{{{mine[0]}}}", file=sys.stderr)
if missing:
    sys.exit(f"{label}: metrics named by the dashboard/rules/chart values not in the broker's scrape: {missing}")
for e in sorted(set(dashboard_exprs)):
    print(e.replace("$queue", queue))
PY
[ -s "$tmp/exprs.txt" ] || die "no dashboard query names a rabbitmq_* metric, or the metric check failed"
say "every rabbitmq_* metric of the dashboard, the rules and prometheusRule.queueDepth is in the broker's scrape"

# 2. The dashboard's rabbitmq_* queries return data.
while IFS= read -r expr; do
  wait_for 30 "dashboard query returned no data: $expr" has "$expr"
  say "dashboard query has data: $expr"
done < "$tmp/exprs.txt"
wait_for 30 "the alternative queue depth metric (rabbitmq_detailed_queue_messages_ready) has no data" \
  has "rabbitmq_detailed_queue_messages_ready{queue=\"$queue\"} > 0"

# 3. The alert fires against the stalled worker.
wait_for 60 "BlingerWorkerNoDeliveries did not fire while 18 jobs waited and the worker delivered none" firing
say "BlingerWorkerNoDeliveries FIRING while jobs wait and the worker is stalled (right)"

# ...and resolves once a healthy worker delivers.
kill -TERM "$stalled"; wait "$stalled" 2>/dev/null || true
BLINGER_API_URL="http://$sandbox_addr/api/external/v1" BLINGER_API_TOKEN=right-token \
  BLINGER_WORKER_DATA_DIR="$tmp/healthy" BLINGER_WORKER_METRICS_ADDR="$healthy_metrics" \
  "$bin/blinger-worker" run 2> "$tmp/healthy.log" &
pids+=($!)
wait_for 60 "BlingerWorkerNoDeliveries still firing after a healthy worker delivered the jobs" not_firing
wait_for 30 "the healthy worker did not empty the queue" \
  has "sum(rabbitmq_queue_messages_ready{queue=\"$queue\"}) + sum(rabbitmq_queue_messages_unacked{queue=\"$queue\"}) == 0"
say "resolved after a healthy worker delivered the jobs; passed"
