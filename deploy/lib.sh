# shellcheck shell=bash
# Shared helpers for deploy/stack-*.sh and deploy/create-topics.sh.
# Sourced, never executed. Callers have `set -euo pipefail`.

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# --- settings (environment wins) -------------------------------------------
STACK_DIR="${STACK_DIR:-/var/tmp/stockpipe}"

PG_PORT="${PGPORT_STACK:-5432}"
PG_USER="${PG_STACK_USER:-stock}"
PG_PASSWORD="${PG_STACK_PASSWORD:-stock}"
PG_DB="${PG_STACK_DB:-stock}"
PG_DIR="$STACK_DIR/pg"
PGDATA_STACK="$PG_DIR/data"
PG_LOG="$PG_DIR/postgres.log"
PG_SOCKET_DIR="${PG_SOCKET_DIR:-/var/run/postgresql}"
PG_START_TIMEOUT="${PG_START_TIMEOUT:-60}"

REDIS_PORT="${REDIS_PORT:-6379}"
REDIS_DIR="$STACK_DIR/redis"
REDIS_PIDFILE="$REDIS_DIR/redis.pid"
REDIS_LOG="$REDIS_DIR/redis.log"
REDIS_RUNTIME_CONF="$REDIS_DIR/redis.runtime.conf"
REDIS_START_TIMEOUT="${REDIS_START_TIMEOUT:-30}"
# the longest a starting Redis may spend loading its data (its AOF) before it answers
REDIS_LOAD_TIMEOUT="${REDIS_LOAD_TIMEOUT:-1800}"

KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${KAFKA_CONTROLLER_PORT:-9093}"
KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT"
KAFKA_DIR="$STACK_DIR/kafka"
KAFKA_LIBS="$KAFKA_DIR/libs"
KAFKA_DATA="$KAFKA_DIR/data"
KAFKA_LOG_DIR="$KAFKA_DIR/logs"
KAFKA_PIDFILE="$KAFKA_DIR/kafka.pid"
KAFKA_PROPS="$KAFKA_DIR/server.properties"
KAFKA_CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
KAFKA_START_TIMEOUT="${KAFKA_START_TIMEOUT:-90}"
KAFKA_STOP_TIMEOUT="${KAFKA_STOP_TIMEOUT:-60}"
KAFKA_HEAP_OPTS="${KAFKA_HEAP_OPTS:--Xmx1g -Xms1g}"
# The brokers' collector. Parallel, not Kafka's usual G1 with a 20-ms pause goal: on this
# 1-GB heap G1 collected 4-5 times as often for pauses of the same length (p50 19-20 ms
# against 21-25), and the broker took 27.0 -> 24.3 us/order at 12,000 orders/s with
# Parallel (medians of 4 windows, alternating soaks, issue 12 session 18).
KAFKA_GC_OPTS="${KAFKA_GC_OPTS:--XX:+UseParallelGC}"
KAFKA_LIBS_LOCK="$STACK_DIR/.kafka-libs.lock"   # shared by both layouts' stack-up.sh
# Short-lived CLI JVMs (TopicCommand, StorageTool): start fast, small heap.
KAFKA_TOOL_JVM_OPTS="${KAFKA_TOOL_JVM_OPTS:--Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto}"

# --- layout -------------------------------------------------------------------
# STACK_LAYOUT=plain (default): the settings above. STACK_LAYOUT=secure: a second,
# independent set of processes beside the plain ones (TLS everywhere, passwords from
# files, least-privilege users), state under $STACK_DIR/secure. STACK_LAYOUT=cluster: a
# third one (Redis Cluster of 6 nodes, 3 Kafka brokers; PostgreSQL shared with plain),
# state under $STACK_DIR/cluster. The variables below re-point the plain names (PG_*,
# REDIS_*, KAFKA_*) so the helpers serve any layout; the secure and cluster ports have
# their own overrides (SECURE_*, CLUSTER_*), never the plain ones.
STACK_LAYOUT="${STACK_LAYOUT:-plain}"
SECURE_DIR="$STACK_DIR/secure"
CLUSTER_DIR="$STACK_DIR/cluster"
TLS_DIR="$SECURE_DIR/tls"
SECRETS_DIR="$SECURE_DIR/secrets"
# shellcheck disable=SC2034  # used by the scripts that source this file
if [[ "$STACK_LAYOUT" == secure ]]; then
  STACK_CTL_DIR="$SECURE_DIR"
  PG_PORT="${SECURE_PG_PORT:-5433}"
  PG_USER=stock_migrator              # owns database stock; the scripts' TCP identity
  PG_PASSWORD=""                      # never held here: read from PG_PASSWORD_FILE
  PG_PASSWORD_FILE="$SECRETS_DIR/pg-migrator.password"
  PG_CONSUMER_USER=stock_consumer
  PG_CONSUMER_PASSWORD_FILE="$SECRETS_DIR/pg-consumer.password"
  PG_DB=stock
  PG_HOST=localhost                   # verify-full checks the certificate against it
  PG_DIR="$SECURE_DIR/pg"
  PGDATA_STACK="$PG_DIR/data"
  PG_LOG="$PG_DIR/postgres.log"
  PG_SOCKET_DIR="$PG_DIR/run"

  REDIS_PORT="${SECURE_REDIS_PORT:-6380}"   # the TLS port (plaintext port is 0: off)
  REDIS_DIR="$SECURE_DIR/redis"
  REDIS_PIDFILE="$REDIS_DIR/redis.pid"
  REDIS_LOG="$REDIS_DIR/redis.log"
  REDIS_RUNTIME_CONF="$REDIS_DIR/redis.runtime.conf"
  REDIS_ACLFILE="$REDIS_DIR/users.acl"
  REDIS_ADMIN_USER=stockpipe-admin
  REDIS_ADMIN_PASSWORD_FILE="$SECRETS_DIR/redis-admin.password"

  KAFKA_PORT="${SECURE_KAFKA_PORT:-9192}"
  KAFKA_CONTROLLER_PORT="${SECURE_KAFKA_CONTROLLER_PORT:-9193}"
  KAFKA_BOOTSTRAP="localhost:$KAFKA_PORT"
  KAFKA_DIR="$SECURE_DIR/kafka"       # the jars stay shared: $STACK_DIR/kafka/libs
  KAFKA_DATA="$KAFKA_DIR/data"
  KAFKA_LOG_DIR="$KAFKA_DIR/logs"
  KAFKA_PIDFILE="$KAFKA_DIR/kafka.pid"
  KAFKA_PROPS="$KAFKA_DIR/server.properties"
  KAFKA_CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
  KAFKA_ADMIN_CONF="$KAFKA_DIR/admin-client.properties"
  KAFKA_WORKER_CONF="$KAFKA_DIR/worker-client.properties"
  KAFKA_HEAP_OPTS="${SECURE_KAFKA_HEAP_OPTS:--Xmx512m -Xms512m}"
elif [[ "$STACK_LAYOUT" == cluster ]]; then
  # STACK_LAYOUT=cluster: a Redis Cluster (3 masters + 3 replicas) and three Kafka
  # brokers (KRaft, each broker+controller), plaintext on 127.0.0.1, state under
  # $STACK_DIR/cluster, beside the other layouts. PostgreSQL is the plain layout's
  # (PG_* above): the cluster layout starts it through the plain stack-up.sh and never
  # stops it. The per-node names (ports, dirs) are in deploy/lib-cluster.sh.
  STACK_CTL_DIR="$CLUSTER_DIR"
  PG_HOST=127.0.0.1
  # Redis nodes: ports CLUSTER_REDIS_PORT .. +5 (cluster bus: port + 10000)
  REDIS_PORT="${CLUSTER_REDIS_PORT:-7001}"  # the first node: redis_cli talks to it
  REDIS_DIR="$CLUSTER_DIR/redis"            # one directory per node: $REDIS_DIR/<port>/
  REDIS_PIDFILE="" REDIS_LOG="" REDIS_RUNTIME_CONF=""   # per node, see lib-cluster.sh
  REDIS_START_TIMEOUT="${CLUSTER_REDIS_START_TIMEOUT:-60}"
  # Kafka brokers 1..3: client ports CLUSTER_KAFKA_PORT + id - 1, controller ports
  # CLUSTER_KAFKA_CONTROLLER_PORT + id - 1
  KAFKA_PORT="${CLUSTER_KAFKA_PORT:-9292}"
  KAFKA_CONTROLLER_PORT="${CLUSTER_KAFKA_CONTROLLER_PORT:-9393}"
  KAFKA_BOOTSTRAP="127.0.0.1:$KAFKA_PORT,127.0.0.1:$((KAFKA_PORT + 1)),127.0.0.1:$((KAFKA_PORT + 2))"
  KAFKA_DIR="$CLUSTER_DIR/kafka"            # one directory per broker: $KAFKA_DIR/<id>/; jars shared
  KAFKA_LOG_DIR="$KAFKA_DIR/logs"           # the tools' logs; each broker logs to $KAFKA_DIR/<id>/logs
  KAFKA_DATA="" KAFKA_PIDFILE="" KAFKA_PROPS=""   # per broker, see lib-cluster.sh
  KAFKA_CLUSTER_ID_FILE="$KAFKA_DIR/cluster.id"
  KAFKA_HEAP_OPTS="${CLUSTER_KAFKA_HEAP_OPTS:--Xmx384m -Xms384m}"
  KAFKA_START_TIMEOUT="${CLUSTER_KAFKA_START_TIMEOUT:-180}"
else
  STACK_CTL_DIR="$STACK_DIR"
  PG_HOST=127.0.0.1
fi
# how the scripts name the layout in hints ("run ... stack-up.sh kafka first")
case "$STACK_LAYOUT" in
  secure)  STACK_UP_CMD="STACK_LAYOUT=secure deploy/stack-up.sh" ;;
  cluster) STACK_UP_CMD="STACK_LAYOUT=cluster deploy/stack-up.sh" ;;
  *)       STACK_UP_CMD="deploy/stack-up.sh" ;;
esac

# --- output ----------------------------------------------------------------
_ts() { date +%H:%M:%S; }
log()  { printf '[%s] %s\n' "$(_ts)" "$*"; }
warn() { printf '[%s] WARN: %s\n' "$(_ts)" "$*" >&2; }
die()  { printf '[%s] ERROR: %s\n' "$(_ts)" "$*" >&2; exit 1; }
now()  { date +%s; }

case "$STACK_LAYOUT" in
  plain|secure|cluster) ;;
  *) die "STACK_LAYOUT must be 'plain', 'secure' or 'cluster' (got '$STACK_LAYOUT')" ;;
esac

# read_secret FILE -> prints the secret (no newline). Use as VAR="$(read_secret F)":
# the value never reaches a command line. Never echo it.
read_secret() {
  [[ -s "$1" ]] || die "secret file $1 is missing or empty (run $STACK_UP_CMD)"
  tr -d '\r\n' <"$1"
}

# show_log_tail FILE [N] -- dump the tail of a log to stderr (for failures)
show_log_tail() {
  local f="$1" n="${2:-40}"
  if [[ -f "$f" ]]; then
    printf -- '----- last %s lines of %s -----\n' "$n" "$f" >&2
    tail -n "$n" "$f" >&2 || true
    printf -- '----- end of %s -----\n' "$f" >&2
  else
    printf -- '(no log file %s)\n' "$f" >&2
  fi
}

# print_usage SCRIPT -- the script's leading comment block
print_usage() { awk 'NR>1 && /^#/ {sub(/^# ?/, ""); print; next} NR>1 {exit}' "$1"; }

# --- services selection ------------------------------------------------------
# parse_services ARGS... -> sets WANT_PG / WANT_REDIS / WANT_KAFKA (0/1)
parse_services() {
  WANT_PG=0 WANT_REDIS=0 WANT_KAFKA=0
  if [[ $# -eq 0 ]]; then WANT_PG=1 WANT_REDIS=1 WANT_KAFKA=1; return 0; fi
  local s
  for s in "$@"; do
    case "$s" in
      pg|postgres|postgresql) WANT_PG=1 ;;
      redis)                  WANT_REDIS=1 ;;
      kafka)                  WANT_KAFKA=1 ;;
      all)                    WANT_PG=1 WANT_REDIS=1 WANT_KAFKA=1 ;;
      -h|--help) return 2 ;;
      *) die "unknown service '$s' (expected: pg redis kafka)" ;;
    esac
  done
}

# --- process / port helpers --------------------------------------------------
# is_zombie PID -- exited but not yet reaped (our daemons are re-parented to
# PID 1, which in containers may reap late): counts as stopped.
is_zombie() {
  local st
  st="$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1 || true)"
  [[ "$st" == Z ]]
}

# pid_alive PID [CMDLINE_SUBSTRING]
pid_alive() {
  local pid="$1" want="${2:-}"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  is_zombie "$pid" && return 1
  if [[ -n "$want" ]]; then
    proc_cmdline "$pid" | grep -qF -- "$want" || return 1
  fi
  return 0
}

# proc_cmdline PID -- the process's command line, its arguments joined by spaces (empty
# if it is gone). A process in the middle of an exec (nohup -> setsid -> java) shows an
# empty command line for a moment: it is read again (up to 1 s) before that counts, or a
# broker being started looks dead (kafka_cluster.rs failed on it once in CI)
proc_cmdline() {
  local cmd="" _
  for _ in 1 2 3 4 5; do
    cmd="$(tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true)"
    [[ -n "$cmd" ]] && break
    kill -0 "$1" 2>/dev/null || break
    sleep 0.2
  done
  printf '%s' "$cmd"
}

# pidfile_pid FILE -> prints pid (first line) or nothing
pidfile_pid() { [[ -s "$1" ]] && head -n1 "$1" | tr -dc '0-9' || true; }

# live_pidfile_pid FILE WHAT -> the pid in FILE if that process runs and its command line
# holds WHAT, or nothing (a pid file left by a stopped service can name a reused pid)
live_pidfile_pid() {
  local pid
  pid="$(pidfile_pid "$1")"
  if [[ -n "$pid" ]] && pid_alive "$pid" "$2"; then echo "$pid"; fi
}

# port_open PORT [HOST] -- TCP connect succeeds
port_open() {
  local port="$1" host="${2:-127.0.0.1}"
  (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null
}

# port_owner_pids PORT -> pids listening on PORT (needs ss from iproute2)
port_owner_pids() {
  command -v ss >/dev/null 2>&1 || return 0
  ss -H -ltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true
}

# port_owner PORT -> human readable "pid N: cmdline" of the listener(s)
port_owner() {
  local pids pid out=""
  pids="$(port_owner_pids "$1")"
  for pid in $pids; do
    out+="pid $pid: $(proc_cmdline "$pid" | cut -c1-120) "
  done
  echo "${out:-unknown process}"
}

# pid_exited PID -- gone, or a zombie with no thread left (see wait_pid_exit)
pid_exited() {
  kill -0 "$1" 2>/dev/null || return 0
  is_zombie "$1" || return 1
  local tasks=(/proc/"$1"/task/*)
  [[ ${#tasks[@]} -le 1 ]]
}

# wait_pid_exit PID TIMEOUT -> 0 if exited in time.
# A zombie counts as exited only once its last thread is gone: the main thread of a killed
# multi-threaded daemon (redis-server, java) is a zombie while its other threads are still
# exiting, and its files (the listening socket) close only with the last of them. Taking the
# zombie for gone, cluster-fault.sh restarted a Redis node onto its still-held port once in CI
# (tests/stack_scripts.rs).
wait_pid_exit() {
  local pid="$1" timeout="$2" deadline
  deadline=$(( $(now) + timeout ))
  while ! pid_exited "$pid"; do
    [[ $(now) -ge $deadline ]] && return 1
    sleep 0.2
  done
  return 0
}

# stack_lock -- serialize stack-up/stack-down runs on fd 9. Daemons must be
# started with `9>&-` so they do not inherit (and hold) the lock forever.
# Each layout has its own lock ($STACK_CTL_DIR): a secure stack-up never waits for a
# plain one and the other way round.
stack_lock() {
  local f="$STACK_CTL_DIR/.stack-ctl.lock"
  exec 9>"$f"
  if ! flock -n 9; then
    log "waiting for another stack-up/stack-down ($f)"
    flock -w "${STACK_LOCK_TIMEOUT:-300}" 9 || die "another stack-up/stack-down still holds $f"
  fi
}

need_root() {
  [[ $(id -u) -eq 0 ]] || die "$1 needs root (run as root or with sudo)"
}

# as_postgres CMD... -- run a command as the postgres OS user
as_postgres() {
  if [[ $(id -u) -eq 0 ]]; then
    runuser -u postgres -- "$@"
  elif [[ "$(id -un)" == postgres ]]; then
    "$@"
  else
    die "PostgreSQL commands must run as root or as the postgres user"
  fi
}

# --- apt ----------------------------------------------------------------------
pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# apt_install PKG... -- install missing packages without letting the package
# scripts start services (policy-rc.d 101). Handles containers where
# invoke-rc.d fails by forcing that policy for the duration of the install.
apt_install() {
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  need_root "installing ${missing[*]}"
  log "apt: installing ${missing[*]}"
  local policy=/usr/sbin/policy-rc.d policy_backup="" rc=0
  if [[ -e "$policy" ]]; then
    policy_backup="$(mktemp)"; cp -p "$policy" "$policy_backup"
  fi
  printf '#!/bin/sh\n# temporary (deploy/lib.sh): do not start services from package scripts\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  export DEBIAN_FRONTEND=noninteractive
  local aptopts=(-y -q -o Dpkg::Options::=--force-confold -o Dpkg::Options::=--force-confdef --no-install-recommends)
  mkdir -p "$STACK_DIR"
  if ! apt-get install "${aptopts[@]}" "${missing[@]}" >"$STACK_DIR/apt.log" 2>&1; then
    log "apt: install failed, running apt-get update and retrying"
    apt-get update -q >>"$STACK_DIR/apt.log" 2>&1 || true
    dpkg --configure -a >>"$STACK_DIR/apt.log" 2>&1 || true
    apt-get install "${aptopts[@]}" "${missing[@]}" >>"$STACK_DIR/apt.log" 2>&1 || rc=$?
  fi
  if [[ -n "$policy_backup" ]]; then mv -f "$policy_backup" "$policy"; else rm -f "$policy"; fi
  if [[ $rc -ne 0 ]]; then
    show_log_tail "$STACK_DIR/apt.log" 30
    die "apt-get install ${missing[*]} failed (exit $rc), see $STACK_DIR/apt.log"
  fi
  for p in "${missing[@]}"; do pkg_installed "$p" || die "package $p still not installed after apt-get"; done
}

# --- PostgreSQL binaries -----------------------------------------------------
pg_bindir() {
  if [[ -n "${PGBIN:-}" ]]; then echo "$PGBIN"; return; fi
  local d
  for d in /usr/lib/postgresql/15/bin $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
    [[ -x "$d/pg_ctl" ]] && { echo "$d"; return; }
  done
  return 1
}

# pg_tls_query USER PASSWORD_FILE SQL -- (secure layout) run SQL over TLS, verify-full
# against our CA, as USER; prints the unaligned result. Password via env, never argv.
pg_tls_query() {
  local pw bin
  pw="$(read_secret "$2")"
  bin="${PGBIN:-$(pg_bindir)}" || die "PostgreSQL binaries not found"
  PGPASSWORD="$pw" PGSSLMODE=verify-full PGSSLROOTCERT="$TLS_DIR/ca.crt" PGCONNECT_TIMEOUT=5 \
    "$bin/psql" -X -q -h "$PG_HOST" -p "$PG_PORT" -U "$1" -d "$PG_DB" -tAc "$3"
}

# --- Redis -----------------------------------------------------------------
# redis_cli ARGS... -- password (if any) passed via env, never on argv.
# Secure layout: TLS with the client certificate, as the admin user.
redis_cli() {
  if [[ "$STACK_LAYOUT" == secure ]]; then
    local pw; pw="$(read_secret "$REDIS_ADMIN_PASSWORD_FILE")"
    REDISCLI_AUTH="$pw" redis-cli --tls --cacert "$TLS_DIR/ca.crt" --cert "$TLS_DIR/client.crt" \
      --key "$TLS_DIR/client.key" -h localhost -p "$REDIS_PORT" --user "$REDIS_ADMIN_USER" "$@"
  elif [[ -n "${REDIS_PASSWORD:-}" ]]; then
    REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  else
    redis-cli -h 127.0.0.1 -p "$REDIS_PORT" "$@"
  fi
}

# redis_wait_pong LABEL LOG DEADLINE ALIVE CLI... -- waits until `CLI... ping` answers PONG
# from a Redis just started (or found running), or dies before DEADLINE (epoch seconds)
# with LOG's tail. A LOADING answer is progress, not a hang (an AOF being replayed: a long
# benchmark leaves gigabytes of it): logged every 15 s with its percentage, bounded by
# REDIS_LOAD_TIMEOUT, and the start timeout (REDIS_START_TIMEOUT) counts again from the
# end of the load. ALIVE is a command line (split on spaces) that fails once the server
# has exited ("": none).
redis_wait_pong() {
  local label="$1" logf="$2" deadline="$3" alive="$4"; shift 4
  local t0 out="" said=0
  t0=$(now)
  while :; do
    out="$("$@" ping 2>&1 || true)"
    [[ "$out" == PONG ]] && return 0
    if [[ "$out" == LOADING* ]]; then
      if (( $(now) - t0 >= REDIS_LOAD_TIMEOUT )); then
        show_log_tail "$logf"; die "$label: still loading its data after ${REDIS_LOAD_TIMEOUT}s (REDIS_LOAD_TIMEOUT)"
      fi
      deadline=$(( $(now) + REDIS_START_TIMEOUT ))
      if (( $(now) - said >= 15 )); then
        said=$(now)
        log "$label: loading its data: $("$@" info persistence 2>/dev/null | tr -d '\r' | sed -n 's/^loading_loaded_perc://p')% after $(( $(now) - t0 ))s"
      fi
    elif [[ -n "$alive" ]] && ! $alive; then  # word-split on purpose: a command line
      show_log_tail "$logf"; die "$label: exited during startup"
    fi
    if [[ $(now) -ge $deadline ]]; then
      show_log_tail "$logf"; die "$label: no PONG after ${REDIS_START_TIMEOUT}s (last answer: $out)"
    fi
    sleep 0.2
  done
}

# --- Kafka -----------------------------------------------------------------
kafka_libs_ok() {
  [[ -f "$KAFKA_LIBS/.complete" ]] && [[ "$(cat "$KAFKA_LIBS/.complete")" == "$KAFKA_VERSION" ]] \
    && compgen -G "$KAFKA_LIBS/kafka_2.13-*.jar" >/dev/null
}

# kafka_tool CLASS ARGS... -- run a Kafka CLI class with a fast-start JVM
kafka_tool() {
  local cls="$1"; shift
  # shellcheck disable=SC2086
  timeout -k 5 "${KAFKA_TOOL_TIMEOUT:-60}" java $KAFKA_TOOL_JVM_OPTS \
    -Dlog4j2.configurationFile="$DEPLOY_DIR/kafka/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$cls" "$@"
}

# kafka_tool_secret CLASS ARGS... -- kafka_tool for arguments that hold a password
# (StorageTool --add-scram, ConfigCommand SCRAM users): the class and its arguments go
# through a java @argfile (mode 600, deleted afterwards), so no password is on argv.
kafka_tool_secret() {
  local af a rc=0
  mkdir -p "$KAFKA_DIR"
  af="$(mktemp "$KAFKA_DIR/.java-args.XXXXXX")"   # mktemp: mode 600
  for a in "$@"; do a="${a//\\/\\\\}"; printf '"%s"\n' "${a//\"/\\\"}"; done >"$af"
  # shellcheck disable=SC2086
  timeout -k 5 "${KAFKA_TOOL_TIMEOUT:-60}" java $KAFKA_TOOL_JVM_OPTS \
    -Dlog4j2.configurationFile="$DEPLOY_DIR/kafka/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "@$af" || rc=$?
  rm -f "$af"
  return $rc
}

# Admin client settings for the CLI tools: fail fast instead of 60 s retries.
# Secure layout: the admin client file (SASL_SSL as admin, mode 600) written by stack-up.sh.
kafka_client_conf() {
  if [[ "$STACK_LAYOUT" == secure ]]; then
    [[ -s "$KAFKA_ADMIN_CONF" ]] || die "kafka: $KAFKA_ADMIN_CONF missing (run $STACK_UP_CMD kafka)"
    echo "$KAFKA_ADMIN_CONF"; return 0
  fi
  local f="$KAFKA_DIR/tools-client.properties"
  if [[ ! -f "$f" ]]; then
    mkdir -p "$KAFKA_DIR"
    printf '%s\n' 'request.timeout.ms=5000' 'default.api.timeout.ms=10000' \
      'retries=2' 'retry.backoff.ms=200' 'reconnect.backoff.max.ms=1000' >"$f"
  fi
  echo "$f"
}

# kafka_list_topics -> prints topic names; non-zero if broker does not answer
kafka_list_topics() {
  local conf; conf="$(kafka_client_conf)" || return 1
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --command-config "$conf" --list
}

# kafka_delete_topics REGEX -- deletes the topics whose whole name matches REGEX (none is fine)
kafka_delete_topics() {
  local names conf
  names="$(kafka_list_topics)" || return 1
  conf="$(kafka_client_conf)" || return 1
  if grep -Eq "^($1)\$" <<<"$names"; then
    KAFKA_TOOL_TIMEOUT=300 kafka_tool org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "$KAFKA_BOOTSTRAP" --command-config "$conf" \
      --delete --topic "$1" >/dev/null
  fi
}

# layout_env_lines LAYOUT [NAME ...] -- the variables `STACK_LAYOUT=LAYOUT . env.sh` exports,
# as KEY=value lines, computed in a clean environment (what stack-up started, not what the
# caller's shell holds) that keeps only the settings NAME... of the caller (e.g. its ports).
# Used by the secure and cluster layouts to write $STACK_DIR/<layout>/env.
layout_env_lines() {
  local layout="$1" names n keep=()
  shift
  for n in "$@"; do [[ -n "${!n:-}" ]] && keep+=("$n=${!n}"); done
  names="$(sed -n 's/^[[:space:]]*export \([A-Z_][A-Z0-9_]*\)=.*/\1/p' "$DEPLOY_DIR/env.sh" | awk '!seen[$0]++' | tr '\n' ' ')"
  # shellcheck disable=SC2016,SC2086
  env -i PATH="$PATH" STACK_DIR="$STACK_DIR" STACK_LAYOUT="$layout" "${keep[@]}" \
    bash -c '. "$1"; shift
      for n in "$@"; do
        [[ -n "${!n+set}" ]] || continue   # set by another layout only
        v="${!n}"
        if [[ "$v" =~ ^[A-Za-z0-9_./:@?=+,%-]*$ ]]; then printf "%s=%s\n" "$n" "$v"
        else printf "%s=%q\n" "$n" "$v"; fi
      done' _ "$DEPLOY_DIR/env.sh" $names
}

# replace_if_changed TMP FILE -- TMP (mode 644) becomes FILE unless FILE already holds the same
replace_if_changed() {
  chmod 644 "$1"
  if cmp -s "$1" "$2"; then rm -f "$1"; else mv -f "$1" "$2"; log "env: wrote $2"; fi
}
