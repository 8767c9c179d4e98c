#!/usr/bin/env bash
# A real Prometheus (Debian's `prometheus` package) scrapes a running worker, and the dashboard's
# "Delivery rate by kind" query returns data.
#
#   bash .ci/prometheus-scrape-check.sh 127.0.0.1:9464
#
# $1: the worker's metrics address (host:port). Publish jobs first: the worker creates its series at
# zero at start, but only deliveries while Prometheus scrapes make the rate non-zero.
# Env: PROM_PORT (default 9099), QUERY_TIMEOUT seconds (default 60), REQUIRE_NONZERO=1 to also require a
# positive rate (jobs delivered while Prometheus was scraping).
# Needs: prometheus (apt-get install -y prometheus), curl, python3. Listens on 127.0.0.1 only.
set -euo pipefail

target=${1:?usage: $0 HOST:PORT (the worker metrics address, e.g. 127.0.0.1:9464)}
prom_port=${PROM_PORT:-9099}
query_timeout=${QUERY_TIMEOUT:-60}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dashboard="$root/deploy/grafana/blinger-worker-dashboard.json"
panel_title="Delivery rate by kind"
job=blinger-worker
api="http://127.0.0.1:${prom_port}"

for tool in prometheus curl python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "prometheus-scrape-check: FAILED: $tool not installed" >&2; exit 1; }
done

tmp=$(mktemp -d -t prom-scrape-check.XXXXXX)
prom_pid=""
cleanup() {
  if [[ -n "$prom_pid" ]] && kill -0 "$prom_pid" 2>/dev/null; then
    kill "$prom_pid" 2>/dev/null || true
    wait "$prom_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

die() {
  echo "prometheus-scrape-check: FAILED: $*" >&2
  if [[ -f "$tmp/prometheus.log" ]]; then
    echo "--- prometheus log (last 20 lines):" >&2
    tail -n 20 "$tmp/prometheus.log" >&2 || true
  fi
  exit 1
}

# The panel's expression, with Grafana's variables replaced: $__rate_interval -> 1m (rate() needs two
# samples in the window: with a 1 s scrape interval they come within seconds), $job -> our job,
# $instance -> any.
expr=$(python3 - "$dashboard" "$panel_title" "$job" <<'PY'
import json, sys
path, title, job = sys.argv[1:4]
panels = json.load(open(path))["panels"]
hits = [p for p in panels if p.get("title") == title]
if len(hits) != 1 or not hits[0].get("targets"):
    sys.exit(f"panel {title!r} not found once (with a target) in {path}")
expr = hits[0]["targets"][0]["expr"]
for var, val in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
                 ("$job", job), ("$instance", ".*")):
    expr = expr.replace(var, val)
if "$" in expr:
    sys.exit(f"unsubstituted Grafana variable in {expr!r}")
print(expr)
PY
) || die "could not read the panel query from $dashboard"

cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: ${job}
    metrics_path: /metrics
    static_configs:
      - targets: ['${target}']
EOF

echo "prometheus-scrape-check: starting prometheus on 127.0.0.1:${prom_port}, scraping ${target} every 1s"
prometheus \
  --config.file="$tmp/prometheus.yml" \
  --storage.tsdb.path="$tmp/data" \
  --web.listen-address="127.0.0.1:${prom_port}" \
  --log.level=warn \
  >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!

# query EXPR -> prints the API's JSON answer
query() { curl -sf --max-time 5 "${api}/api/v1/query" --data-urlencode "query=$1"; }

ready=0
for _ in $(seq 1 60); do
  kill -0 "$prom_pid" 2>/dev/null || die "prometheus exited"
  if curl -sf --max-time 2 "${api}/-/ready" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.5
done
((ready)) || die "prometheus not ready after 30s"

up=0
for _ in $(seq 1 30); do
  if query "up{job=\"${job}\"} == 1" | python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["data"]["result"] else 1)'; then
    up=1; break
  fi
  sleep 1
done
if ((!up)); then
  curl -sf "${api}/api/v1/targets" | python3 -c '
import json, sys
for t in json.load(sys.stdin)["data"]["activeTargets"]:
    print("  target %s: health=%s lastError=%r" % (t["scrapeUrl"], t["health"], t["lastError"]), file=sys.stderr)' || true
  die "target ${target} not up after 30s"
fi
echo "prometheus-scrape-check: target ${target} is up"

echo "prometheus-scrape-check: querying panel \"${panel_title}\": ${expr}"
deadline=$((SECONDS + query_timeout))
answer=""
while ((SECONDS < deadline)); do
  if answer=$(query "$expr") && python3 - "$answer" "${REQUIRE_NONZERO:-0}" <<'PY'
import json, sys
res = json.loads(sys.argv[1])["data"]["result"]
need_positive = sys.argv[2] == "1"
ok = bool(res) and (not need_positive or any(float(r["value"][1]) > 0 for r in res))
sys.exit(0 if ok else 1)
PY
  then
    echo "prometheus-scrape-check: result:"
    python3 - "$answer" <<'PY'
import json, sys
for r in json.loads(sys.argv[1])["data"]["result"]:
    labels = ",".join(f'{k}="{v}"' for k, v in sorted(r["metric"].items()))
    print(f"  {{{labels}}} {r['value'][1]}")
PY
    echo "prometheus-scrape-check: passed"
    exit 0
  fi
  sleep 1
done
echo "prometheus-scrape-check: last answer: ${answer:-<none>}" >&2
die "the dashboard's delivery-rate query returned no data within ${query_timeout}s (did the worker deliver any job? its blinger_worker_jobs_delivered_total series exist only after the first delivery)"
