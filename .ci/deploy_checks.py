#!/usr/bin/env python3
"""Checks of the deployment artifacts (Helm chart, alert rules, Grafana dashboard), without a cluster.

Run from the repository root (normally through .ci/deploy-checks.sh):

    python3 .ci/deploy_checks.py                # all checks
    python3 .ci/deploy_checks.py --write-rules  # regenerate deploy/prometheus/blinger-worker-rules.yaml
                                                # from the chart, then check

Needs: helm-python-sdk (import helm_python), kubernetes-validate, PyYAML, jsonschema, and promtool on PATH.

What is checked, and how:
  * the two dashboard copies are byte-identical, valid JSON, well-formed (ids, datasource, variables), and
    every panel query is valid PromQL (promtool check rules on recording rules built from them);
  * values.schema.json accepts the default and the all-options values and rejects known-bad values;
  * helm lint --strict (helm-python-sdk) with the default and the all-options values; lint runs templates in
    "lint mode" where `fail`/`required` only log, so those log lines are captured and treated as errors;
  * both value sets render (real render: `fail` is fatal) and values that must be refused are refused;
  * rendered core-kind manifests pass `kubernetes-validate --strict` for each Kubernetes version in
    KUBE_VERSIONS; the CRD kinds (ServiceMonitor, PrometheusRule, ScaledObject, TriggerAuthentication) have
    no schema there, so they are validated against hand-written subset schemas below (the fields this chart
    emits, with the upstream CRDs' types and patterns, additionalProperties false) -- not the upstream CRDs;
  * the rendered StatefulSet keeps its contract (probes, security context, grace, env, token file, PVC); the
    env must carry every setting named `env = "NAME"` in crates/blinger-worker/src/config.rs (AMQP_URL from the Secret, the token
    as BLINGER_API_TOKEN_FILE, never BLINGER_API_TOKEN);
  * the standalone rules file equals the rendered PrometheusRule spec (default values), and the rendered
    rules of both value sets pass `promtool check rules`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jsonschema
import yaml

try:
    import helm_python
except ImportError:  # pragma: no cover
    sys.exit("deploy_checks: helm-python-sdk is not installed (pip install helm-python-sdk)")

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "blinger-worker"
ALL_VALUES = CHART / "ci" / "all-options-values.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "blinger-worker-dashboard.json"
CHART_DASHBOARD = CHART / "dashboards" / "blinger-worker.json"
RULES = ROOT / "deploy" / "prometheus" / "blinger-worker-rules.yaml"
RELEASE, NAMESPACE = "blinger-worker", "messaging"
KUBE_VERSIONS = os.environ.get("KUBE_VERSIONS", "1.29.0,1.34.0").split(",")
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject", "TriggerAuthentication"}
RULES_HEADER = """\
# Prometheus alerting rules for blinger-worker (plain rule file, for a Prometheus without the operator:
# add it to rule_files in prometheus.yml).
#
# GENERATED from the Helm chart's PrometheusRule (helm/blinger-worker/templates/_helpers.tpl,
# "blinger-worker.ruleGroups") rendered with the chart's default values. Do not edit by hand: change the
# chart, then run `python3 .ci/deploy_checks.py --write-rules`. .ci/deploy-checks.sh fails when they differ.
# Tests: promtool test rules deploy/prometheus/blinger-worker-rules.test.yaml
"""

# Every worker setting the chart must pass (issue 2/5 contract), derived from the worker's own source: each
# `env = "NAME"` in crates/blinger-worker/src/config.rs, so a setting added to the worker but not to the chart fails the check.
# Two are special: AMQP_URL must come from the Secret (secretKeyRef), and the token is given as a file
# (BLINGER_API_TOKEN_FILE), so BLINGER_API_TOKEN must NOT be set as a plain env var.
CONFIG_RS = ROOT / "crates" / "blinger-worker" / "src" / "config.rs"
ENV_FROM_SECRET = "AMQP_URL"
ENV_TOKEN_FILE = "BLINGER_API_TOKEN_FILE"
ENV_FORBIDDEN = {"BLINGER_API_TOKEN"}


def worker_env_names() -> set[str]:
    """Every `env = "NAME"` of crates/blinger-worker/src/config.rs (the clap settings of `blinger-worker run` and the AMQP settings)."""
    names = set(re.findall(r'\benv\s*=\s*"([A-Z][A-Z0-9_]*)"', CONFIG_RS.read_text()))
    if not names:
        sys.exit(f"deploy_checks: no env = \"NAME\" found in {CONFIG_RS.relative_to(ROOT)}")
    missing = {ENV_FROM_SECRET, ENV_TOKEN_FILE} - names
    if missing:
        sys.exit(f"deploy_checks: {CONFIG_RS.relative_to(ROOT)} lacks {sorted(missing)}: update the special cases")
    return names


WORKER_ENV_ALL = worker_env_names()
# What the rendered StatefulSet must set: all of them except the literal token (AMQP_URL included).
WORKER_ENV = WORKER_ENV_ALL - ENV_FORBIDDEN


class CheckFailed(Exception):
    pass


failures: list[str] = []


def step(title: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Run a check, print PASS/FAIL with the reason, keep going so every failure is listed."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except (CheckFailed, helm_python.HelmError, jsonschema.ValidationError, yaml.YAMLError,
                    json.JSONDecodeError, OSError, subprocess.SubprocessError) as err:
                failures.append(f"{title}: {err}")
                print(f"FAIL  {title}\n      {str(err).replace(chr(10), chr(10) + '      ')}", flush=True)
                return None
            print(f"ok    {title}", flush=True)
            return result

        return run

    return wrap


def fail(msg: str) -> None:
    raise CheckFailed(msg)


def load_all_values() -> dict[str, Any]:
    return yaml.safe_load(ALL_VALUES.read_text())


# --------------------------------------------------------------------------------------------- helm
@contextlib.contextmanager
def captured_stderr() -> Any:
    """Capture the process-level stderr (fd 2): the Go library logs lint-mode `fail` calls there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        box: dict[str, str] = {}
        try:
            yield box
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode("utf-8", "replace")


def lint(label: str, values: dict[str, Any]) -> None:
    @step(f"helm lint --strict ({label} values)")
    def run() -> None:
        with captured_stderr() as err:
            report = helm_python.lint(CHART, values, strict=True, namespace=NAMESPACE)
        problems = [f"[{m['path']}] {m['error']}" for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems += [str(e) for e in report.get("errors", [])]
        # Lint mode turns `fail`/`required` into log lines instead of errors: treat them as errors.
        problems += [ln for ln in err.get("text", "").splitlines() if "funcMap" in ln or "level=ERROR" in ln]
        if report.get("total_charts_linted") != 1:
            problems.append(f"linted {report.get('total_charts_linted')} charts, expected 1")
        if problems:
            fail("\n".join(problems))
        infos = [m["error"] for m in report.get("messages", []) if m.get("severity", 0) < 2]
        if infos:
            print(f"      (info: {'; '.join(infos)})")

    run()


def render(values: dict[str, Any]) -> dict[str, str]:
    chart = helm_python.Chart.load(CHART)
    chart.validate_schema(values)
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((template, doc))
    return docs


@step("values.schema.json rejects bad values")
def schema_negative() -> None:
    chart = helm_python.Chart.load(CHART)
    bad = {
        "unknown top-level key (typo)": {"replicas": 2},
        "unknown worker key (typo)": {"worker": {"concurency": 8}},
        "queueType not quorum|classic": {"worker": {"queueType": "stream"}},
        "logFormat not text|json": {"worker": {"logFormat": "xml"}},
        "concurrency 0": {"worker": {"concurrency": 0}},
        "prefetch above 65535": {"worker": {"prefetch": 70000}},
        "requestTimeout not a duration": {"worker": {"requestTimeout": "ten seconds"}},
        "retryDelays not a duration list": {"worker": {"retryDelays": "5s;30s"}},
        "rateLimit not an integer": {"worker": {"rateLimit": "fast"}},
        "receipts not a boolean": {"worker": {"receipts": "yes"}},
        "receiptsExchange empty": {"worker": {"receiptsExchange": ""}},
        "amqpUrl not amqp(s)://": {"auth": {"amqpUrl": "http://rabbitmq:5672"}},
        "alert for not a Prometheus duration": {"prometheusRule": {"paused": {"for": "2 minutes"}}},
        "podAntiAffinityPreset.type unknown": {"podAntiAffinityPreset": {"type": "always"}},
    }
    missed = []
    for what, values in bad.items():
        try:
            chart.validate_schema(values)
        except helm_python.HelmValuesError:
            continue
        missed.append(what)
    if missed:
        fail("schema accepted: " + ", ".join(missed))


@step("render refuses inconsistent values")
def render_negative() -> None:
    chart = helm_python.Chart.load(CHART)
    bad = {
        "terminationGracePeriodSeconds <= shutdown grace": {"terminationGracePeriodSeconds": 25},
        "both minAvailable and maxUnavailable": {"podDisruptionBudget": {"minAvailable": 1, "maxUnavailable": 1}},
        "keda min > max": {"keda": {"enabled": True, "minReplicaCount": 5, "maxReplicaCount": 2}},
    }
    missed = []
    for what, values in bad.items():
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm_python.HelmRenderError:
            continue
        missed.append(what)
    if missed:
        fail("rendered anyway: " + ", ".join(missed))


# ----------------------------------------------------------------------------------- kubernetes-validate
def kubernetes_validate(label: str, rendered: dict[str, str], workdir: Path) -> None:
    @step(f"kubernetes-validate --strict ({label} values; k8s {', '.join(KUBE_VERSIONS)})")
    def run() -> None:
        files, expected_core = [], 0
        for template, text in sorted(rendered.items()):
            if template.endswith("NOTES.txt") or not text.strip():
                continue
            kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
            if not kinds:
                continue
            expected_core += sum(k not in CRD_KINDS for k in kinds)
            path = workdir / f"{label}-{Path(template).name}"
            path.write_text(text)
            files.append(str(path))
        problems = []
        for version in KUBE_VERSIONS:
            proc = subprocess.run(["kubernetes-validate", "--strict", "--kubernetes-version", version, *files],
                                  capture_output=True, text=True)
            lines = (proc.stdout + proc.stderr).splitlines()
            passed = [ln for ln in lines if ln.startswith("INFO") and " passed " in ln]
            for ln in lines:
                if ln.startswith("INFO"):
                    continue
                crd_skip = ln.startswith("WARN") and "Couldn't find schema for kind" in ln and any(
                    f"kind {k} " in ln for k in CRD_KINDS)
                if not crd_skip:
                    problems.append(f"[{version}] {ln}")
            if proc.returncode != 0:
                problems.append(f"[{version}] kubernetes-validate exited {proc.returncode}")
            if len(passed) != expected_core:
                problems.append(f"[{version}] {len(passed)} resources passed, expected {expected_core}")
        if problems:
            fail("\n".join(problems))

    run()


# Subset schemas for the CRD kinds (fields as in the upstream CRDs; additionalProperties false so a
# misspelt field fails). Prometheus Operator v0.7x and KEDA v2.1x field names.
PROM_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
META = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"},
                   "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"},
                   "labels": STR_MAP, "annotations": STR_MAP},
}
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": STR_MAP, "matchExpressions": {"type": "array", "items": {
        "type": "object", "required": ["key", "operator"], "additionalProperties": False,
        "properties": {"key": {"type": "string"}, "operator": {"type": "string"},
                       "values": {"type": "array", "items": {"type": "string"}}}}}},
}
RELABEL = {
    "type": "array", "items": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "sourceLabels": {"type": "array", "items": {"type": "string", "pattern": r"^[a-zA-Z_][a-zA-Z0-9_]*$"}},
            "separator": {"type": "string"}, "targetLabel": {"type": "string"}, "regex": {"type": "string"},
            "modulus": {"type": "integer"}, "replacement": {"type": "string"},
            "action": {"type": "string", "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
                "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase",
                "Uppercase", "keepequal", "KeepEqual", "dropequal", "DropEqual"]}}}}
CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": META, "spec": {
            "type": "object", "required": ["selector", "endpoints"], "additionalProperties": False,
            "properties": {
                "jobLabel": {"type": "string"},
                "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                    "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
                "selector": LABEL_SELECTOR,
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "path": {"type": "string"},
                        "scheme": {"type": "string", "enum": ["http", "https", "HTTP", "HTTPS"]},
                        "interval": {"type": "string", "pattern": PROM_DURATION},
                        "scrapeTimeout": {"type": "string", "pattern": PROM_DURATION},
                        "honorLabels": {"type": "boolean"}, "honorTimestamps": {"type": "boolean"},
                        "relabelings": RELABEL, "metricRelabelings": RELABEL}}}}}}},
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": META, "spec": {
            "type": "object", "additionalProperties": False, "properties": {"groups": {"type": "array", "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "interval": {"type": "string", "pattern": PROM_DURATION},
                    "rules": {"type": "array", "items": {
                        "type": "object", "required": ["expr"], "additionalProperties": False,
                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                        "properties": {
                            "alert": {"type": "string"}, "record": {"type": "string"},
                            "expr": {"type": ["string", "integer"]},
                            "for": {"type": "string", "pattern": PROM_DURATION},
                            "keep_firing_for": {"type": "string", "pattern": PROM_DURATION},
                            "labels": STR_MAP, "annotations": STR_MAP}}}}}}}}}},
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": META, "spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                   "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                                  "name": {"type": "string"},
                                                  "envSourceContainerName": {"type": "string"}}},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "idleReplicaCount": {"type": "integer", "minimum": 0},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                "advanced": {"type": "object", "additionalProperties": False, "properties": {
                    "restoreToOriginalReplicaCount": {"type": "boolean"},
                    "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
                        "name": {"type": "string"},
                        "behavior": {"type": "object", "additionalProperties": False,
                                     "properties": {"scaleUp": {"type": "object"}, "scaleDown": {"type": "object"}}}}}}},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"], "additionalProperties": False,
                    "properties": {
                        "type": {"type": "string"}, "name": {"type": "string"},
                        "metricType": {"type": "string", "enum": ["AverageValue", "Value", "Utilization"]},
                        "useCachedMetrics": {"type": "boolean"},
                        # KEDA's trigger metadata is map[string]string: a bare number is refused by the CRD.
                        "metadata": STR_MAP,
                        "authenticationRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                              "properties": {"name": {"type": "string"},
                                                             "kind": {"type": "string", "enum": [
                                                                 "TriggerAuthentication",
                                                                 "ClusterTriggerAuthentication"]}}}}}}}}}},
    ("keda.sh/v1alpha1", "TriggerAuthentication"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {"apiVersion": {}, "kind": {}, "metadata": META, "spec": {
            "type": "object", "additionalProperties": False, "properties": {"secretTargetRef": {
                "type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["parameter", "name", "key"], "additionalProperties": False,
                    "properties": {"parameter": {"type": "string"}, "name": {"type": "string"},
                                   "key": {"type": "string"}}}}}}}},
}
# Parameters KEDA's rabbitmq scaler reads from trigger metadata (unknown keys are silently ignored by KEDA,
# so a typo would go unnoticed in a cluster).
RABBITMQ_TRIGGER_KEYS = {"host", "hostFromEnv", "protocol", "mode", "value", "activationValue", "queueName",
                         "vhostName", "useRegex", "excludeUnacknowledged", "pageSize", "operation", "timeout",
                         "unsafeSsl"}


def crd_check(label: str, rendered: dict[str, str]) -> None:
    @step(f"CRD kinds against subset schemas ({label} values)")
    def run() -> None:
        problems = []
        seen = set()
        for template, doc in documents(rendered):
            key = (doc.get("apiVersion"), doc.get("kind"))
            if doc.get("kind") not in CRD_KINDS:
                continue
            seen.add(doc["kind"])
            schema = CRD_SCHEMAS.get(key)
            if schema is None:
                problems.append(f"{template}: no subset schema for {key}")
                continue
            for err in jsonschema.Draft7Validator(schema).iter_errors(doc):
                problems.append(f"{template}: {doc['kind']} {'.'.join(map(str, err.absolute_path))}: {err.message}")
            if doc["kind"] == "ScaledObject":
                for trig in doc["spec"]["triggers"]:
                    unknown = set(trig.get("metadata", {})) - RABBITMQ_TRIGGER_KEYS
                    if trig["type"] == "rabbitmq" and unknown:
                        problems.append(f"{template}: unknown rabbitmq trigger metadata {sorted(unknown)}")
        if label == "all-options" and seen != CRD_KINDS:
            problems.append(f"expected all CRD kinds rendered, got {sorted(seen)}")
        if problems:
            fail("\n".join(problems))

    run()


# ----------------------------------------------------------------------------------- rendered contract
def duration_seconds(text: str) -> int:
    """A duration such as 10s, 1500ms or 1m30s, in whole seconds rounded up."""
    parts = re.findall(r"([0-9]+)(ms|s|m)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        fail(f"not a duration: {text!r}")
    ms = sum(int(n) * {"ms": 1, "s": 1000, "m": 60000}[u] for n, u in parts)
    return -(-ms // 1000)


def find(docs: list[tuple[str, dict[str, Any]]], kind: str) -> list[dict[str, Any]]:
    return [d for _, d in docs if d.get("kind") == kind]


def statefulset_contract(label: str, values: dict[str, Any], rendered: dict[str, str]) -> None:
    @step(f"rendered StatefulSet/Service contract ({label} values)")
    def run() -> None:
        merged = helm_python.Chart.load(CHART).merge_values(values)
        docs = documents(rendered)
        problems: list[str] = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        (sts,) = find(docs, "StatefulSet")
        spec, pod = sts["spec"], sts["spec"]["template"]["spec"]
        (ctr,) = pod["containers"]
        grace = int(merged["worker"]["shutdownGraceSeconds"])
        need(pod["terminationGracePeriodSeconds"] > grace,
             f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} not above shutdown grace {grace}")
        if values.get("terminationGracePeriodSeconds") is None:
            # The worker's whole shutdown (crates/blinger-worker/src/runtime/shutdown.rs `budget`): grace + request timeout + 15 s.
            budget = grace + duration_seconds(str(merged["worker"]["requestTimeout"])) + 15
            need(pod["terminationGracePeriodSeconds"] >= budget,
                 f"terminationGracePeriodSeconds {pod['terminationGracePeriodSeconds']} below the worker's "
                 f"shutdown budget {budget} s (grace + request timeout + 15)")
        env = {e["name"]: e for e in ctr["env"]}
        need(WORKER_ENV <= set(env), f"env lacks {sorted(WORKER_ENV - set(env))} (settings in "
                                     f"{CONFIG_RS.relative_to(ROOT)} the chart does not pass)")
        need(env.get("BLINGER_WORKER_SHUTDOWN_GRACE", {}).get("value") == f"{grace}s", "BLINGER_WORKER_SHUTDOWN_GRACE")
        for name in sorted(ENV_FORBIDDEN & set(env)):
            need(False, f"token must come as a file ({ENV_TOKEN_FILE}), not {name}")
        need("secretKeyRef" in env.get(ENV_FROM_SECRET, {}).get("valueFrom", {}),
             f"{ENV_FROM_SECRET} must come from a secretKeyRef")
        need("value" in env.get(ENV_TOKEN_FILE, {}), f"{ENV_TOKEN_FILE} must be set to a path")
        need(env.get("BLINGER_WORKER_RECEIPTS", {}).get("value") == str(bool(merged["worker"]["receipts"])).lower(),
             "BLINGER_WORKER_RECEIPTS != worker.receipts")
        need(env.get("BLINGER_WORKER_RECEIPTS_EXCHANGE", {}).get("value") == merged["worker"]["receiptsExchange"],
             "BLINGER_WORKER_RECEIPTS_EXCHANGE != worker.receiptsExchange")
        need(all("value" in e or "valueFrom" in e for e in ctr["env"]), "an env entry has neither value nor valueFrom")
        need(all(isinstance(e.get("value", ""), str) for e in ctr["env"]), "an env value is not a string")
        need(ctr.get("args") == ["run"], f"args {ctr.get('args')} != ['run']")
        port = int(merged["worker"]["metricsPort"])
        need(ctr["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}], f"ports {ctr['ports']}")
        need(env["BLINGER_WORKER_METRICS_ADDR"]["value"] == f"0.0.0.0:{port}", "metrics addr/port mismatch")
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            need(ctr.get(probe, {}).get("httpGet") == {"path": path, "port": "metrics"}, f"{probe} must GET {path}")
        need(bool(ctr.get("resources", {}).get("requests")), "resources.requests missing")
        sc, psc = ctr["securityContext"], pod["securityContext"]
        need(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem")
        need(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation")
        need(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities.drop ALL")
        need(psc.get("runAsNonRoot") is True and sc.get("runAsNonRoot") is True, "runAsNonRoot")
        need(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile RuntimeDefault")
        need(pod.get("enableServiceLinks") is False, "enableServiceLinks must be false")
        mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
        vols = {v["name"]: v for v in pod["volumes"]}
        need(env["BLINGER_WORKER_DATA_DIR"]["value"] in mounts, "data dir not mounted")
        need("/tmp" in mounts and "emptyDir" in vols.get(mounts.get("/tmp", {}).get("name", ""), {}), "/tmp emptyDir")
        token_dir = os.path.dirname(env["BLINGER_API_TOKEN_FILE"]["value"])
        tm = mounts.get(token_dir, {})
        need(tm.get("readOnly") is True and "subPath" not in tm, "token dir must be a read-only, non-subPath mount")
        tv = vols.get(tm.get("name", ""), {}).get("secret", {})
        need(tv.get("items") == [{"key": merged["auth"]["apiTokenKey"],
                                  "path": os.path.basename(env["BLINGER_API_TOKEN_FILE"]["value"])}],
             "token volume items")
        secret_name = merged["auth"]["existingSecret"] or sts["metadata"]["name"]
        need(tv.get("secretName") == secret_name, f"token secret {tv.get('secretName')} != {secret_name}")
        need(env["AMQP_URL"]["valueFrom"]["secretKeyRef"] == {"name": secret_name, "key": merged["auth"]["amqpUrlKey"]},
             "AMQP_URL secretKeyRef")
        secrets = find(docs, "Secret")
        if merged["auth"]["existingSecret"]:
            need(not secrets, "existingSecret set but the chart renders a Secret")
        else:
            need(len(secrets) == 1 and set(secrets[0]["data"]) == {merged["auth"]["amqpUrlKey"], merged["auth"]["apiTokenKey"]},
                 "chart Secret keys")
            need("checksum/secret" in sts["spec"]["template"]["metadata"].get("annotations", {}), "checksum/secret annotation")
        if merged["persistence"]["enabled"]:
            (vct,) = spec["volumeClaimTemplates"]
            need(vct["metadata"]["name"] == mounts[env["BLINGER_WORKER_DATA_DIR"]["value"]]["name"], "PVC not the data mount")
        need(("replicas" in spec) != bool(merged["keda"]["enabled"]), "replicas must be set unless KEDA owns them")
        services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
        headless = services.get(spec["serviceName"])
        need(headless is not None and headless["spec"].get("clusterIP") == "None", "serviceName is not a headless Service")
        for s in services.values():
            need(s["spec"]["selector"] == spec["selector"]["matchLabels"], f"Service {s['metadata']['name']} selector")
            need(s["spec"].get("publishNotReadyAddresses") is True, f"Service {s['metadata']['name']} publishNotReadyAddresses")
        for sm in find(docs, "ServiceMonitor"):
            picked = [n for n, s in services.items()
                      if all(s["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())]
            need(len(picked) == 1 and picked[0] != spec["serviceName"], f"ServiceMonitor selects {picked}, want the metrics Service only")
        for so in find(docs, "ScaledObject"):
            need(so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": sts["metadata"]["name"]},
                 "ScaledObject target")
            meta = so["spec"]["triggers"][0]["metadata"]
            need(meta.get("mode") == "QueueLength", "KEDA trigger mode")
            queue = merged["worker"]["queue"]
            if merged["worker"].get("partitions", 0) > 0:
                # Partitioned mode: the jobs wait in the router's input and the partition queues; KEDA sums
                # every queue its regex matches (management API, so protocol http).
                waiting = re.compile(meta.get("queueName", "$^"))
                names = [queue, f"{queue}.in", f"{queue}.unrouted", f"{queue}.p.00", f"{queue}.p.15", f"{queue}.p.255"]
                others = [f"{queue}.dead", f"{queue}.retry.5s", f"{queue}.topology", f"{queue}.partitions", f"x{queue}", f"{queue}.p.0a"]
                need(meta.get("useRegex") == "true" and meta.get("operation") == "sum" and meta.get("protocol") == "http",
                     "KEDA trigger in partitioned mode: useRegex, operation sum, protocol http")
                need(all(waiting.search(n) for n in names) and not any(waiting.search(n) for n in others),
                     f"KEDA trigger regex {meta.get('queueName')!r} must match exactly the waiting queues")
            else:
                need(meta.get("queueName") == queue, "KEDA trigger queue")
            auths = {a["metadata"]["name"] for a in find(docs, "TriggerAuthentication")}
            need(so["spec"]["triggers"][0]["authenticationRef"]["name"] in auths, "KEDA authenticationRef not rendered")
        for cm in find(docs, "ConfigMap"):
            need(cm["data"].get("blinger-worker.json") == DASHBOARD.read_text().rstrip("\n"), "dashboard ConfigMap content")
            for k, v in merged["dashboard"]["labels"].items():
                need(cm["metadata"]["labels"].get(k) == v, f"dashboard label {k}")
        if problems:
            fail("\n".join(problems))

    run()


# --------------------------------------------------------------------------------------------- rules
def rendered_rule_text(values: dict[str, Any]) -> str:
    """The PrometheusRule's spec as rule-file text (the template's `spec:` block, dedented)."""
    vals = json.loads(json.dumps(values))
    vals.setdefault("prometheusRule", {})["enabled"] = True
    text = render(vals)["blinger-worker/templates/prometheusrule.yaml"]
    lines = text.splitlines()
    start = lines.index("spec:") + 1
    body = []
    for ln in lines[start:]:
        if ln and not ln.startswith("  "):
            fail(f"unexpected line after the spec block: {ln!r}")
        body.append(ln[2:])
    return "\n".join(body).strip("\n") + "\n"


@step("standalone rules file == rendered PrometheusRule spec (default values)")
def rules_equal(write: bool) -> None:
    text = rendered_rule_text({})
    if write:
        RULES.write_text(RULES_HEADER + text)
        print(f"      wrote {RULES.relative_to(ROOT)}")
    if not RULES.exists():
        fail(f"{RULES.relative_to(ROOT)} missing: run python3 .ci/deploy_checks.py --write-rules")
    standalone = yaml.safe_load(RULES.read_text())
    if standalone != yaml.safe_load(text):
        import difflib
        diff = difflib.unified_diff(yaml.safe_dump(standalone, sort_keys=False).splitlines(),
                                    yaml.safe_dump(yaml.safe_load(text), sort_keys=False).splitlines(),
                                    str(RULES.relative_to(ROOT)), "rendered PrometheusRule spec", lineterm="")
        fail("differ (regenerate with python3 .ci/deploy_checks.py --write-rules):\n" + "\n".join(list(diff)[:80]))


def promtool_check(label: str, text: str, workdir: Path) -> None:
    @step(f"promtool check rules (rendered PrometheusRule, {label} values)")
    def run() -> None:
        path = workdir / f"rules-{label}.yaml"
        path.write_text(text)
        proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            fail((proc.stdout + proc.stderr).strip())

    run()


# --------------------------------------------------------------------------------------------- dashboard
def grafana_vars_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so an expression is plain PromQL (also used by the scrape check)."""
    for var, val in (("$__rate_interval", "1m"), ("$__interval", "1m"), ("$__range", "1h"),
                     ("$job", ".*"), ("$instance", ".*"), ("$queue", "blinger.outbound")):
        expr = expr.replace(var, val)
    if "$" in expr:
        fail(f"unsubstituted variable in {expr!r}")
    return expr


@step("Grafana dashboard: copies identical, valid, every query valid PromQL")
def dashboard_check(workdir: Path) -> None:
    a, b = DASHBOARD.read_bytes(), CHART_DASHBOARD.read_bytes()
    problems = []
    if a != b:
        problems.append(f"{DASHBOARD.relative_to(ROOT)} and {CHART_DASHBOARD.relative_to(ROOT)} differ (keep them "
                        f"identical: cp {DASHBOARD.relative_to(ROOT)} {CHART_DASHBOARD.relative_to(ROOT)})")
        json.loads(b)
    dash = json.loads(a)
    for key in ("title", "uid", "panels", "templating", "schemaVersion"):
        if key not in dash:
            problems.append(f"missing top-level {key}")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    ds = variables.get("DS_PROMETHEUS", {})
    if ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("templating must define DS_PROMETHEUS as a prometheus datasource variable")
    ids, exprs = set(), []
    for p in dash.get("panels", []):
        if p.get("id") in ids:
            problems.append(f"duplicate panel id {p.get('id')}")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
            problems.append(f"panel {p.get('title')!r} datasource is not ${{DS_PROMETHEUS}}")
        if not p.get("targets"):
            problems.append(f"panel {p.get('title')!r} has no targets")
        for t in p.get("targets", []):
            if t.get("datasource", {}).get("uid") != "${DS_PROMETHEUS}":
                problems.append(f"panel {p.get('title')!r} target {t.get('refId')} datasource")
            exprs.append((p["title"], t["expr"]))
        gp = p.get("gridPos", {})
        if not all(k in gp for k in ("x", "y", "w", "h")) or gp.get("x", 0) + gp.get("w", 0) > 24:
            problems.append(f"panel {p.get('title')!r} gridPos {gp}")
    titles = {p.get("title") for p in dash.get("panels", [])}
    for needed in ("Delivery rate by kind", "Dead-letters by reason", "API status codes", "Delivery latency p50 / p99",
                   "In flight by pod", "Rate limited (429)", "Retries by kind", "Broker connection", "Paused on 401/403"):
        if needed not in titles:
            problems.append(f"missing panel {needed!r}")
    # Validate the PromQL of every panel query with promtool: as recording rules of a throwaway file.
    rules = {"groups": [{"name": "dashboard-queries", "rules": [
        {"record": f"dashboard:query_{i}", "expr": grafana_vars_to_promql(e)} for i, (_, e) in enumerate(exprs)]}]}
    path = workdir / "dashboard-queries.rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()
        bad = sorted({int(i) for i in re.findall(r"dashboard:query_(\d+)", out)})
        problems.append("dashboard PromQL: " + out + "".join(
            f"\n  query_{i} = panel {exprs[i][0]!r}: {exprs[i][1]}" for i in bad))
    if problems:
        fail("\n".join(problems))
    print(f"      ({len(exprs)} queries in {sum(p.get('type') != 'row' for p in dash['panels'])} panels)")


@step("packaged chart (.tgz) carries the dashboard and renders")
def packaged_check(workdir: Path) -> None:
    archive = helm_python.package(CHART, destination=workdir)
    chart = helm_python.Chart.load(archive)
    names = {f["name"] for f in chart.files}
    if "dashboards/blinger-worker.json" not in names:
        fail(f"dashboards/blinger-worker.json not in {Path(archive).name} (.helmignore?): {sorted(names)}")
    cm = chart.render({"dashboard": {"enabled": True}}, name=RELEASE, namespace=NAMESPACE)
    doc = yaml.safe_load(cm["blinger-worker/templates/dashboard-configmap.yaml"])
    if json.loads(doc["data"]["blinger-worker.json"]) != json.loads(DASHBOARD.read_text()):
        fail("the packaged chart's dashboard ConfigMap differs from the dashboard file")


# --------------------------------------------------------------------------------------------- main
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-rules", action="store_true", help=f"regenerate {RULES.relative_to(ROOT)} from the chart")
    args = parser.parse_args()
    os.chdir(ROOT)
    print(f"helm-python-sdk {helm_python.__version__} (Helm {helm_python.helm_sdk_version()}), chart {CHART.relative_to(ROOT)}")
    print(f"worker settings from {CONFIG_RS.relative_to(ROOT)} ({len(WORKER_ENV_ALL)}): {', '.join(sorted(WORKER_ENV_ALL))}")
    print(f"      required in the StatefulSet env: {len(WORKER_ENV)} ({ENV_FROM_SECRET} from the Secret, "
          f"{ENV_TOKEN_FILE} a path); must not be set: {', '.join(sorted(ENV_FORBIDDEN))}")
    sets = {"default": {}, "all-options": load_all_values()}
    with tempfile.TemporaryDirectory(prefix="deploy-checks-") as tmp:
        workdir = Path(tmp)
        dashboard_check(workdir)
        step("values.schema.json accepts default and all-options values")(
            lambda: [helm_python.Chart.load(CHART).validate_schema(v) for v in sets.values()])()
        schema_negative()
        for label, values in sets.items():
            lint(label, values)
        render_negative()
        for label, values in sets.items():
            rendered = step(f"helm render ({label} values)")(render)(values)
            if rendered is None:
                continue
            kubernetes_validate(label, rendered, workdir)
            crd_check(label, rendered)
            statefulset_contract(label, values, rendered)
            text = step(f"render PrometheusRule ({label} values)")(rendered_rule_text)(values)
            if text is not None:
                promtool_check(label, text, workdir)
        rules_equal(args.write_rules)
        packaged_check(workdir)
    if failures:
        print(f"\ndeploy checks: {len(failures)} FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  - {f.splitlines()[0]}", file=sys.stderr)
        return 1
    print("\ndeploy checks: all passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
