#!/usr/bin/env bash
# docs/dashboard.png: the Grafana dashboard drawn from a real run, without Grafana.
#
#   scripts/dashboard-picture.sh                 # about 4-5 minutes; writes docs/dashboard.png
#   LOAD_SECONDS=120 OUTAGE_SECONDS=15 OUT=/tmp/d.png scripts/dashboard-picture.sh
#
# What runs, all on loopback and all stopped at the end:
#   RabbitMQ at $AMQP_URL (ensure_rabbitmq), the sandbox Blinger (latency, ~5 % 5xx, ~3 % 429,
#   rare stalls), blinger-worker on its OWN exchange and queues (dash.blinger.outbound*, deleted at
#   the end: the default blinger.outbound queues are never touched), and Debian's prometheus
#   scraping the worker every second. A mixed load of all four job kinds is published for
#   LOAD_SECONDS through `blinger-worker publish --stdin` (plus a few invalid raw bodies straight
#   to the exchange, which the publish command would refuse); OUTAGE_SECONDS=N adds an N-second
#   Blinger outage (sandbox `down`) in the middle. Then scripts/render-dashboard.py evaluates every panel
#   query of deploy/grafana/blinger-worker-dashboard.json against that Prometheus over the run.
#
# Uses the binaries already built in target/debug (it does not build: `cargo build --bins` first).
# Logs, the worker's store and Prometheus' data stay in target/dash-run for a look afterwards.
# Env: AMQP_URL, LOAD_SECONDS (210), OUTAGE_SECONDS (0), OUT (docs/dashboard.png).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

load_seconds=${LOAD_SECONDS:-210}
outage_seconds=${OUTAGE_SECONDS:-0}
out=${OUT:-docs/dashboard.png}
bin=${CARGO_TARGET_DIR:-target}/debug
venv=target/dash-venv
run=target/dash-run
prefix=dash.blinger.outbound
retry_delays=5s,30s,2m
job=blinger-worker
token="sandbox-token" # the sandbox's dummy token, not a secret

for b in "$bin/blinger-worker" "$bin/blinger-sandbox"; do
  [ -x "$b" ] || die "$b not built (run: cargo build --bins)"
done

ensure_rabbitmq
ensure_prometheus

# matplotlib draws the picture; pika publishes the raw invalid bodies and deletes the topology.
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
fi
if ! "$venv/bin/python" -c 'import matplotlib, pika' 2>/dev/null; then
  log "installing matplotlib and pika into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check matplotlib pika
fi
py="$venv/bin/python"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# The worker and the publish command read the same settings: both see this topology.
export AMQP_URL
export BLINGER_WORKER_EXCHANGE=$prefix
export BLINGER_WORKER_QUEUE=$prefix
export BLINGER_WORKER_DEAD_LETTER_QUEUE=$prefix.dead
export BLINGER_WORKER_RECEIPTS_EXCHANGE=$prefix.events
export BLINGER_WORKER_RETRY_DELAYS=$retry_delays

# Deletes what the worker declared. Runs after the worker stopped, or it would declare it again.
delete_topology() {
  "$py" - "$prefix" "$retry_delays" <<'PY' || log "could not delete the $prefix queues (delete them by hand)"
import os, sys, pika
prefix, delays = sys.argv[1], sys.argv[2].split(",")
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
ch = conn.channel()
for q in [prefix, prefix + ".dead"] + [f"{prefix}.retry.{d}" for d in delays]:
    ch.queue_delete(q)
for x in (prefix, prefix + ".events"):
    ch.exchange_delete(x)
conn.close()
PY
}

pids=()
worker=""
cleanup() {
  local status=$?
  # The worker first (SIGTERM: it finishes or parks what it holds), then Prometheus and the sandbox.
  if [ -n "$worker" ] && kill -0 "$worker" 2>/dev/null; then
    kill -TERM "$worker" 2>/dev/null || true
    wait "$worker" 2>/dev/null || true
  fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$worker" ]; then
    delete_topology
    log "stopped everything; deleted the $prefix queues and exchanges"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rm -rf "$run"
mkdir -p "$run"
sandbox_port=$(free_port)
metrics_addr=127.0.0.1:$(free_port)
prom_port=$(free_port)
sandbox=http://127.0.0.1:$sandbox_port
prom=http://127.0.0.1:$prom_port
started=$SECONDS

# Enough misbehaviour that the failure panels have something to show: 25-75 ms per answer, 5 %
# 500/502/503, 3 % 429 (Retry-After 1 s, which closes the worker's limiter for everyone), and 0.3 %
# stalls of 5 s, longer than the worker's 3 s request timeout below (status "timeout").
log "starting the sandbox Blinger at $sandbox"
"$bin/blinger-sandbox" --addr "127.0.0.1:$sandbox_port" --token "$token" \
  --latency-ms 25 --latency-jitter-ms 50 --error-rate 0.05 --rate-429 0.03 --retry-after-secs 1 \
  --timeout-rate 0.003 --timeout-secs 5 --seed 42 2>"$run/sandbox.log" &
pids+=($!)
for _ in $(seq 1 50); do curl -fs "$sandbox/_sandbox/healthz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fs "$sandbox/_sandbox/healthz" >/dev/null || die "the sandbox did not start (see $run/sandbox.log)"

# Leftovers of an interrupted run would be consumed and skew the graphs: start from nothing.
delete_topology
log "starting blinger-worker (queue $prefix, metrics on $metrics_addr, log in $run/worker.log)"
BLINGER_API_URL="$sandbox/api/external/v1" BLINGER_API_TOKEN="$token" \
  BLINGER_WORKER_DATA_DIR="$run/data" BLINGER_WORKER_METRICS_ADDR="$metrics_addr" \
  BLINGER_WORKER_REQUEST_TIMEOUT=3s \
  "$bin/blinger-worker" run 2>"$run/worker.log" &
worker=$!
for _ in $(seq 1 100); do
  curl -fs "http://$metrics_addr/readyz" >/dev/null 2>&1 && break
  kill -0 "$worker" 2>/dev/null || { tail -20 "$run/worker.log" >&2; die "the worker exited"; }
  sleep 0.2
done
curl -fs "http://$metrics_addr/readyz" >/dev/null || die "the worker is not ready: $(curl -s "http://$metrics_addr/readyz")"

# Like .ci/prometheus-scrape-check.sh: a throwaway config, 1 s scrapes so a few minutes give
# detailed graphs. The broker's own per-queue metrics (the two RabbitMQ panels) are scraped only
# when its rabbitmq_prometheus plugin already listens; this script does not enable plugins.
rabbit_metrics=${RABBITMQ_METRICS_ADDR:-127.0.0.1:15692}
{
  cat <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: $job
    static_configs:
      - targets: ['$metrics_addr']
EOF
  if curl -fs --max-time 2 "http://$rabbit_metrics/metrics/per-object" >/dev/null 2>&1; then
    cat <<EOF
  - job_name: rabbitmq
    metrics_path: /metrics/per-object
    scrape_interval: 5s
    scrape_timeout: 5s
    static_configs:
      - targets: ['$rabbit_metrics']
EOF
  else
    log "no rabbitmq_prometheus endpoint at $rabbit_metrics: the RabbitMQ panels will say No data"
  fi
} >"$run/prometheus.yml"
log "starting prometheus on $prom (scraping the worker every 1s)"
prometheus --config.file="$run/prometheus.yml" --storage.tsdb.path="$run/prometheus" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$run/prometheus.log" 2>&1 &
pids+=($!)
up=""
for _ in $(seq 1 60); do
  if curl -fs "$prom/api/v1/query" --data-urlencode "query=up{job=\"$job\"} == 1" 2>/dev/null |
    grep -q '"value"'; then
    up=1
    break
  fi
  sleep 0.5
done
[ -n "$up" ] || die "prometheus does not scrape the worker (see $run/prometheus.log)"

# A quiet lead-in, so the graphs start from an idle worker.
start=$(date +%s)
sleep 10

log "publishing a mixed load for ${load_seconds}s (generator log $run/load.log, publish output $run/publish.*)"
# The generator writes valid jobs as JSON Lines to `blinger-worker publish --stdin` (the supported
# way in), line by line as time passes. Invalid bodies go to the exchange raw through pika, since
# publish validates and would refuse them: they are what the worker dead-letters as `invalid`.
load_started=$(date +%s)
"$py" - "$load_seconds" "$outage_seconds" "$sandbox" "$prefix" 2>"$run/load.log" <<'PY' |
import json, math, os, random, sys, time, urllib.request, uuid
from datetime import datetime, timedelta, timezone
import pika

seconds, outage, sandbox, exchange = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = random.Random(7)
conversations = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(300)]
agents = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(12)]
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
raw = conn.channel()
raw.confirm_delivery()
sent = []


def rate(t):
    """Jobs per second: a ramp up, a wave, a short peak, a ramp down (4 to 32 a second)."""
    x = t / seconds
    base = 6 + 14 * min(1.0, x / 0.2) * min(1.0, (1 - x) / 0.2)
    wave = 4 * math.sin(2 * math.pi * t / 45)
    peak = 8 if 0.30 <= x < 0.37 else 0
    return max(4.0, base + wave + peak)


def job():
    kind = rng.choices(["send-text", "send-file", "request-review", "assign-agent"], [50, 20, 15, 15])[0]
    j = {"kind": kind, "id": str(uuid.uuid4()), "conversation_id": rng.choice(conversations)}
    if kind == "send-text":
        j["text"] = rng.choice(["Hello!", "Your order has shipped.", "Thanks, we are on it.", "See you soon"])
        if rng.random() < 0.10:
            # Short-lived notices: dead-lettered as `expired` only when held up for over 4 s.
            j["expires_at"] = (datetime.now(timezone.utc) + timedelta(seconds=4)).isoformat()
    elif kind == "send-file":
        j["file_url"] = f"https://files.example.com/invoices/{rng.randrange(10**6)}.pdf"
    elif kind == "assign-agent":
        j["agent_id"] = rng.choice(agents)
    return j


# (routing key, body): what a buggy publisher might send.
INVALID = [
    ("send-file", lambda: {"kind": "send-file", "id": str(uuid.uuid4()),
                           "conversation_id": rng.choice(conversations), "file_url": "not-a-url"}),
    ("assign-agent", lambda: {"kind": "assign-agent", "id": str(uuid.uuid4()),
                              "conversation_id": rng.choice(conversations)}),
    ("send-text", lambda: "this is not JSON"),
    ("send-sticker", lambda: {"kind": "send-sticker", "id": str(uuid.uuid4()),
                              "conversation_id": rng.choice(conversations)}),
]


def sandbox_down(down):
    req = urllib.request.Request(f"{sandbox}/_sandbox/config", data=json.dumps({"down": down}).encode(),
                                 method="PATCH", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=5).read()
    print(f"{time.strftime('%H:%M:%S')} sandbox down={down}", file=sys.stderr, flush=True)


t0 = time.monotonic()
owed = 0.0
counts = {"jobs": 0, "duplicates": 0, "invalid": 0}
outage_at = seconds * 0.55
outage_state = None
while (t := time.monotonic() - t0) < seconds:
    if outage > 0 and outage_state is None and t >= outage_at:
        sandbox_down(True)
        outage_state = "down"
    if outage_state == "down" and t >= outage_at + outage:
        sandbox_down(False)
        outage_state = "over"
    owed += rate(t) * 0.1
    while owed >= 1:
        owed -= 1
        r = rng.random()
        if r < 0.01:
            key, make = rng.choice(INVALID)
            body = make()
            body = body if isinstance(body, str) else json.dumps(body)
            raw.basic_publish(exchange, key, body.encode(), pika.BasicProperties(
                delivery_mode=2, content_type="application/json", timestamp=int(time.time())))
            counts["invalid"] += 1
        elif r < 0.03 and sent:
            # The same id again (a publisher's retry): the worker acks it as a duplicate.
            sys.stdout.write(json.dumps(rng.choice(sent[-500:])) + "\n")
            counts["duplicates"] += 1
        else:
            j = job()
            sent.append(j)
            sys.stdout.write(json.dumps(j) + "\n")
            counts["jobs"] += 1
    sys.stdout.flush()  # publish reads line by line: no batching in a pipe buffer
    conn.sleep(0.1)  # paces the load and keeps the AMQP connection serviced (heartbeats)
if outage_state == "down":
    sandbox_down(False)
conn.close()
print(json.dumps(counts), file=sys.stderr)
PY
  "$bin/blinger-worker" publish --stdin >"$run/publish.out" 2>"$run/publish.err"
log "load done: $(tail -1 "$run/load.log")"

# Let the worker finish what it holds, parked jobs included (up to 2 minutes): nothing ready in
# the work and tier queues and nothing in flight, three times in a row. (A job waiting inside the
# worker, behind its conversation or the keyless limit, waits for one that is in flight.)
log "waiting for the worker to drain"
"$py" - "$prefix" "$retry_delays" "http://$metrics_addr/metrics" <<'PY' || log "not fully drained; rendering anyway"
import os, re, sys, time, urllib.request
import pika
prefix, delays, metrics = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
conn = pika.BlockingConnection(pika.URLParameters(os.environ["AMQP_URL"]))
ch = conn.channel()
quiet, deadline = 0, time.monotonic() + 120
while time.monotonic() < deadline:
    ready = sum(ch.queue_declare(q, passive=True).method.message_count
                for q in [prefix] + [f"{prefix}.retry.{d}" for d in delays])
    text = urllib.request.urlopen(metrics, timeout=5).read().decode()
    in_flight = float(re.search(r"^blinger_worker_jobs_in_flight (\S+)$", text, re.M).group(1))
    quiet = quiet + 1 if ready == 0 and in_flight == 0 else 0
    if quiet >= 3:
        sys.exit(0)
    conn.sleep(1)
sys.exit(1)
PY
# Two more scrapes, so the last state is in Prometheus. The range ends here, right after the
# load: the stat panels show the worker as it was working, as a live dashboard would.
sleep 3
end=$(date +%s)
curl -fs "$sandbox/_sandbox/stats" >"$run/sandbox-stats.json" || true

outage_note=""
if [ "$outage_seconds" != 0 ]; then
  outage_at=$((load_started + load_seconds * 55 / 100))
  outage_note="; sandbox down (503) for ${outage_seconds}s from $(date -u -d "@$outage_at" +%H:%M:%S)"
fi
note="Load: 4-32 jobs/s (ramp, wave, peak) for ${load_seconds}s, all four kinds, ~1% invalid raw bodies, ~2% re-published ids, 10% of send-text with a 4 s expires_at. Sandbox: 25-75 ms, 5% 5xx, 3% 429 (Retry-After 1 s), 0.3% 5 s stalls (worker timeout 3 s)${outage_note}. Worker: target/debug build; scraped every 1 s."
log "rendering $out"
"$py" scripts/render-dashboard.py "$prom" "$start" "$end" "$out" --job "$job" --var "queue=$prefix" \
  --scrape-interval 1s --rate-interval 15s --note "$note"
log "done in $((SECONDS - started))s: $out ($(du -k "$out" | cut -f1) KiB); logs in $run"
