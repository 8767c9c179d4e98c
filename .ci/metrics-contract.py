#!/usr/bin/env python3
"""Every metric the dashboard and the alert rules use must exist in a live /metrics scrape of the worker.

    python3 .ci/metrics-contract.py SCRAPE_FILE [--dashboard FILE] [--rules FILE]

SCRAPE_FILE holds a scrape of the running worker, e.g. `curl -s http://127.0.0.1:9464/metrics > scrape.txt`.

Metric names are taken from the PromQL of the dashboard's panel queries and template-variable queries and of
the rules' `expr`s: names matching blinger_worker_* and process_*, with a histogram's _bucket/_sum/_count
suffix mapped to its base name. A name counts as present when the scrape has a `# TYPE <name>` line or a
sample of it (a labelled counter shows samples only once incremented, but its # TYPE line is always there
when the worker registers it). rabbitmq_* names come from the broker's own metrics (rabbitmq_prometheus
plugin), not from the worker: they are listed as exempt.

Also checks that the worker's samples carry the contract's labels with allowed values (issue 2): kind,
reason, endpoint, status.
Exit status: 0 when all present and well-labelled, 1 otherwise (every problem is listed).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"(?<![A-Za-z0-9_:])((?:blinger_worker|process|rabbitmq)_[a-z0-9_]+)")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+\S+")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

KINDS = {"send-text", "send-file", "request-review", "assign-agent", "unknown"}
REASONS = {"invalid", "rejected", "retries-exhausted", "expired", "conflict"}
ENDPOINTS = {"send-text-message", "send-file-message", "request-review", "assign-agent"}
STATUS = re.compile(r"^([1-5][0-9]{2}|error|timeout)$")
# metric (base name) -> {label: check}
LABELS = {
    "blinger_worker_jobs_received_total": {"kind": KINDS},
    "blinger_worker_jobs_delivered_total": {"kind": KINDS},
    "blinger_worker_jobs_duplicate_total": {"kind": KINDS},
    "blinger_worker_jobs_retried_total": {"kind": KINDS},
    "blinger_worker_jobs_deferred_total": {"kind": KINDS},
    "blinger_worker_jobs_dead_lettered_total": {"kind": KINDS, "reason": REASONS},
    "blinger_worker_api_requests_total": {"endpoint": ENDPOINTS, "status": STATUS},
    "blinger_worker_api_request_duration_seconds": {"endpoint": ENDPOINTS},
    "blinger_worker_delivery_latency_seconds": {"kind": KINDS},
}


def exprs_from_dashboard(path: Path) -> list[str]:
    dash = json.loads(path.read_text())
    out = []

    def panels(items: list[dict]) -> None:
        for p in items:
            out.extend(t.get("expr", "") for t in p.get("targets", []))
            panels(p.get("panels", []))  # collapsed rows hold their panels

    panels(dash.get("panels", []))
    for var in dash.get("templating", {}).get("list", []):
        q = var.get("query")
        if var.get("type") == "query":
            out.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    return out


def exprs_from_rules(path: Path) -> list[str]:
    doc = yaml.safe_load(path.read_text())
    groups = doc.get("groups") or doc.get("spec", {}).get("groups", [])
    return [str(r["expr"]) for g in groups for r in g.get("rules", [])]


def base_name(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def parse_scrape(text: str) -> tuple[dict[str, str], dict[str, list[dict[str, str]]]]:
    types: dict[str, str] = {}
    samples: dict[str, list[dict[str, str]]] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                types[parts[2]] = parts[3]
            continue
        if not line.strip() or line.startswith("#"):
            continue
        m = SAMPLE.match(line)
        if m:
            samples.setdefault(m.group(1), []).append(dict(LABEL.findall(m.group(3) or "")))
    return types, samples


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scrape", type=Path, help="file with a /metrics scrape of the running worker")
    ap.add_argument("--dashboard", type=Path, default=ROOT / "deploy/grafana/blinger-worker-dashboard.json")
    ap.add_argument("--rules", type=Path, default=ROOT / "deploy/prometheus/blinger-worker-rules.yaml")
    args = ap.parse_args()

    text = args.scrape.read_text()
    types, samples = parse_scrape(text)
    if not types and not samples:
        print(f"metrics-contract: FAILED: {args.scrape} holds no Prometheus metrics", file=sys.stderr)
        return 1

    used: dict[str, set[str]] = {}
    for source, exprs in ((args.dashboard.name, exprs_from_dashboard(args.dashboard)),
                          (args.rules.name, exprs_from_rules(args.rules))):
        for expr in exprs:
            for name in NAME.findall(expr):
                used.setdefault(name, set()).add(source)

    problems: list[str] = []
    exempt: list[str] = []
    checked: dict[str, str] = {}
    for name in sorted(used):
        where = ", ".join(sorted(used[name]))
        if name.startswith("rabbitmq_"):
            exempt.append(f"{name}  (used in {where})")
            continue
        base = base_name(name)
        present = (name in types or base in types or name in samples
                   or any(base + s in samples for s in HISTOGRAM_SUFFIXES))
        if name != base and base in types and types[base] not in ("histogram", "summary"):
            problems.append(f"{name}: {base} is a {types[base]}, not a histogram (used in {where})")
        if present:
            typ = types.get(base, types.get(name, "untyped"))
            checked[base] = typ if name == base else f"{typ}, used as {name}"
        else:
            problems.append(f"{name}: not in the scrape (used in {where})")

    # Contract labels and values on whatever samples the scrape has.
    for base, labels in LABELS.items():
        for sample_name in (base, base + "_bucket", base + "_sum", base + "_count"):
            for lbls in samples.get(sample_name, []):
                for label, allowed in labels.items():
                    value = lbls.get(label)
                    ok = value is not None and (allowed.match(value) if isinstance(allowed, re.Pattern) else value in allowed)
                    if not ok:
                        problems.append(f"{sample_name}{{{', '.join(f'{k}={v!r}' for k, v in lbls.items())}}}: "
                                        f"label {label}={value!r} not in the contract")

    print(f"metrics-contract: {len(checked)} metric names used by the dashboard and rules found in {args.scrape}:")
    for name, typ in checked.items():
        print(f"  ok       {name} ({typ})")
    for e in exempt:
        print(f"  exempt   {e}: RabbitMQ's own metric (rabbitmq_prometheus plugin), not the worker's")
    if problems:
        print(f"metrics-contract: FAILED, {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  MISSING/BAD  {p}", file=sys.stderr)
        return 1
    print("metrics-contract: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
