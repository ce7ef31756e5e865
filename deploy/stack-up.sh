#!/usr/bin/env bash
# Start the local service stack (PostgreSQL, Redis, Kafka KRaft), installing
# what is missing. Everything listens on 127.0.0.1 only; state lives in
# $STACK_DIR (default /var/tmp/stockpipe). Idempotent: re-running skips what
# is already installed / running and only re-checks that each service answers.
#
# usage: deploy/stack-up.sh [pg] [redis] [kafka]     (no args = all three)
#
# env: STACK_DIR, PGPORT_STACK, REDIS_PORT, REDIS_PASSWORD, KAFKA_PORT,
#      KAFKA_CONTROLLER_PORT, KAFKA_VERSION, KAFKA_HEAP_OPTS, PARTITIONS,
#      ORDERS_TOPIC/DEDUCT_TOPIC/COMPENSATE_TOPIC/RESULTS_TOPIC/DLQ_TOPIC,
#      SKIP_TOPICS=1 (do not create the default topics),
#      *_START_TIMEOUT (seconds: PG_, REDIS_, KAFKA_)
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

usage() { print_usage "${BASH_SOURCE[0]}"; }
parse_services "$@" || { usage; exit 2; }

mkdir -p "$STACK_DIR"
chmod 755 "$STACK_DIR" 2>/dev/null || true
stack_lock   # one stack-up/stack-down at a time

T_ALL=$(now)

# ============================================================================
# install
# ============================================================================
install_packages() {
  local pkgs=()
  [[ $WANT_PG -eq 1 ]] && pkgs+=(postgresql)
  [[ $WANT_REDIS -eq 1 ]] && pkgs+=(redis-server)
  if [[ $WANT_KAFKA -eq 1 ]]; then
    command -v java >/dev/null 2>&1 || pkgs+=(openjdk-17-jre-headless)
    if ! kafka_libs_ok && ! command -v mvn >/dev/null 2>&1; then pkgs+=(maven); fi
  fi
  [[ ${#pkgs[@]} -gt 0 ]] && apt_install "${pkgs[@]}"
  return 0
}

# ============================================================================
# PostgreSQL
# ============================================================================

# The Debian package creates (and, where it can, starts) cluster 15/main on
# port 5432. We run our own cluster, so stop every Debian-managed cluster and
# make it manual-start so it never collides with ours.
pg_disable_debian_clusters() {
  command -v pg_lsclusters >/dev/null 2>&1 || return 0
  local ver name port status _rest
  while read -r ver name port status _rest; do
    [[ -n "$ver" ]] || continue
    if [[ "$status" == online* ]]; then
      log "pg: stopping Debian cluster $ver/$name (port $port)"
      pg_ctlcluster "$ver" "$name" stop -m fast >/dev/null 2>&1 \
        || as_postgres "$(pg_bindir)/pg_ctl" -D "/var/lib/postgresql/$ver/$name" stop -m fast >/dev/null 2>&1 \
        || warn "could not stop Debian cluster $ver/$name"
    fi
    local sc="/etc/postgresql/$ver/$name/start.conf"
    if [[ -f "$sc" ]] && ! grep -qx 'manual' <(grep -v '^#' "$sc" | tr -d ' \t' | grep -v '^$'); then
      printf '# set by deploy/stack-up.sh: our own cluster runs from $STACK_DIR/pg\nmanual\n' >"$sc"
      log "pg: Debian cluster $ver/$name set to manual start"
    fi
  done < <(pg_lsclusters -h 2>/dev/null || true)
}

# write our config snippet + pg_hba.conf; prints "changed" if anything changed
pg_write_config() {
  local conf="$PGDATA_STACK/stockpipe.conf" hba="$PGDATA_STACK/pg_hba.conf" tmp changed=0
  tmp="$(mktemp)"
  cat >"$tmp" <<EOF
# written by deploy/stack-up.sh -- edits are overwritten on the next stack-up
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_SOCKET_DIR'
max_connections = 300
shared_buffers = 256MB
# durability: keep these ON
fsync = on
synchronous_commit = on
full_page_writes = on
password_encryption = scram-sha-256
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
log_min_duration_statement = -1
EOF
  if ! cmp -s "$tmp" "$conf"; then install -o postgres -g postgres -m 600 "$tmp" "$conf"; changed=1; fi
  cat >"$tmp" <<'EOF'
# written by deploy/stack-up.sh -- edits are overwritten on the next stack-up
# TYPE  DATABASE  USER      ADDRESS         METHOD
local   all       postgres                  peer
local   all       all                       scram-sha-256
host    all       all       127.0.0.1/32    scram-sha-256
host    all       all       ::1/128         scram-sha-256
EOF
  if ! cmp -s "$tmp" "$hba"; then install -o postgres -g postgres -m 600 "$tmp" "$hba"; changed=1; fi
  rm -f "$tmp"
  if ! grep -q "^include_if_exists = 'stockpipe.conf'" "$PGDATA_STACK/postgresql.conf"; then
    printf "\n# local stack settings (deploy/stack-up.sh)\ninclude_if_exists = 'stockpipe.conf'\n" >>"$PGDATA_STACK/postgresql.conf"
    changed=1
  fi
  [[ $changed -eq 1 ]] && echo changed
  return 0
}

pg_sql_quote() { local s="${1//\\/\\\\}"; printf "'%s'" "${s//\'/\'\'}"; }

pg_stock_ok() {
  PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" \
    -U "$PG_USER" -d "$PG_DB" -tAc 'select 1' 2>/dev/null | grep -qx 1
}

pg_up() {
  local t0; t0=$(now)
  PGBIN="$(pg_bindir)" || die "PostgreSQL server binaries not found (package postgresql)"
  id postgres >/dev/null 2>&1 || die "OS user 'postgres' missing (package postgresql not installed?)"
  pg_disable_debian_clusters

  mkdir -p "$PG_DIR" "$PG_SOCKET_DIR"
  chown postgres:postgres "$PG_DIR" "$PG_SOCKET_DIR"
  chmod 700 "$PG_DIR"; chmod 2775 "$PG_SOCKET_DIR"

  if [[ ! -s "$PGDATA_STACK/PG_VERSION" ]]; then
    if [[ -d "$PGDATA_STACK" ]] && [[ -n "$(ls -A "$PGDATA_STACK")" ]]; then
      die "pg: $PGDATA_STACK is not empty but has no PG_VERSION; move it away or remove it"
    fi
    local loc=C.UTF-8
    locale -a 2>/dev/null | grep -qix 'c.utf-\?8' || loc=C
    log "pg: initdb $PGDATA_STACK (locale $loc)"
    if ! (cd / && as_postgres "$PGBIN/initdb" -D "$PGDATA_STACK" -E UTF8 --locale="$loc" \
          --auth-local=peer --auth-host=scram-sha-256 --data-checksums) >"$PG_DIR/initdb.log" 2>&1; then
      show_log_tail "$PG_DIR/initdb.log"
      die "pg: initdb failed"
    fi
  fi
  local cfg_changed; cfg_changed="$(pg_write_config)"

  local st=0
  (cd / && as_postgres "$PGBIN/pg_ctl" -D "$PGDATA_STACK" status) >/dev/null 2>&1 || st=$?
  if [[ $st -eq 0 ]]; then
    if [[ -n "$cfg_changed" ]]; then
      log "pg: config changed, reloading (listen/port/memory changes need: stack-down.sh pg && stack-up.sh pg)"
      (cd / && as_postgres "$PGBIN/pg_ctl" -D "$PGDATA_STACK" reload) >/dev/null
    fi
    log "pg: already running"
  else
    if port_open "$PG_PORT"; then
      die "pg: port 127.0.0.1:$PG_PORT is in use by another process ($(port_owner "$PG_PORT")); stop it or set PGPORT_STACK"
    fi
    log "pg: starting on 127.0.0.1:$PG_PORT (log $PG_LOG)"
    if ! (cd / && as_postgres "$PGBIN/pg_ctl" -D "$PGDATA_STACK" -l "$PG_LOG" -w -t "$PG_START_TIMEOUT" start) >/dev/null 2>&1 9>&-; then
      show_log_tail "$PG_LOG"
      die "pg: pg_ctl start failed"
    fi
  fi

  local deadline=$(( $(now) + PG_START_TIMEOUT ))
  until "$PGBIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2; do
    [[ $(now) -ge $deadline ]] && { show_log_tail "$PG_LOG"; die "pg: not ready after ${PG_START_TIMEOUT}s"; }
    sleep 0.5
  done

  if ! pg_stock_ok; then
    log "pg: ensuring role '$PG_USER' and database '$PG_DB'"
    local sqlerr="$PG_DIR/bootstrap.err"
    # password goes through stdin, never argv
    if ! (cd / && as_postgres "$PGBIN/psql" -X -q -h "$PG_SOCKET_DIR" -p "$PG_PORT" -d postgres) >/dev/null 2>"$sqlerr" <<EOF
\set ON_ERROR_STOP on
\set u $(pg_sql_quote "$PG_USER")
\set p $(pg_sql_quote "$PG_PASSWORD")
\set d $(pg_sql_quote "$PG_DB")
SELECT format('CREATE ROLE %I', :'u') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'u') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN CREATEDB PASSWORD %L', :'u', :'p') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'u') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'d') \gexec
EOF
    then
      cat "$sqlerr" >&2
      die "pg: creating role/database failed"
    fi
    pg_stock_ok || die "pg: cannot run a query as '$PG_USER' on 127.0.0.1:$PG_PORT/$PG_DB"
  fi
  log "pg: ready (postgres://$PG_USER:***@127.0.0.1:$PG_PORT/$PG_DB) in $(( $(now) - t0 ))s"
}

# ============================================================================
# Redis
# ============================================================================
redis_write_runtime_conf() {
  local tmp; tmp="$(mktemp)"
  {
    echo "# generated by deploy/stack-up.sh"
    echo "include $DEPLOY_DIR/redis.conf"
    echo "port $REDIS_PORT"
    echo "dir $REDIS_DIR"
    echo "pidfile $REDIS_PIDFILE"
    echo "logfile $REDIS_LOG"
    if [[ -n "${REDIS_PASSWORD:-}" ]]; then
      printf 'requirepass "%s"\n' "$(printf '%s' "$REDIS_PASSWORD" | sed 's/\\/\\\\/g; s/"/\\"/g')"
    fi
  } >"$tmp"
  chmod 600 "$tmp"
  mv -f "$tmp" "$REDIS_RUNTIME_CONF"
}

# Debian's redis-server package may have started its own instance on 6379.
redis_stop_foreign() {
  local pids pid cmd owner
  pids="$(port_owner_pids "$REDIS_PORT")"
  [[ -n "$pids" ]] || return 0
  for pid in $pids; do
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | sed 's/ *$//' || true)"
    owner="$(stat -c %U "/proc/$pid" 2>/dev/null || true)"
    # Debian's instance runs as user 'redis' with /run/redis/redis-server.pid;
    # anything else on the port is not ours to kill.
    if [[ "$cmd" == *redis-server* ]] && { [[ "$owner" == redis ]] || [[ "$(pidfile_pid /run/redis/redis-server.pid)" == "$pid" ]]; }; then
      log "redis: stopping the Debian default redis-server (pid $pid)"
      if [[ -x /etc/init.d/redis-server ]]; then /etc/init.d/redis-server stop >/dev/null 2>&1 || true; fi
      kill -TERM "$pid" 2>/dev/null || true
      wait_pid_exit "$pid" 20 || kill -KILL "$pid" 2>/dev/null || true
    else
      die "redis: port 127.0.0.1:$REDIS_PORT in use by pid $pid ($cmd); stop it or set REDIS_PORT"
    fi
  done
  if command -v update-rc.d >/dev/null 2>&1 && [[ -x /etc/init.d/redis-server ]]; then
    update-rc.d redis-server disable >/dev/null 2>&1 || true
  fi
}

redis_up() {
  local t0; t0=$(now)
  command -v redis-server >/dev/null 2>&1 || die "redis-server not installed"
  mkdir -p "$REDIS_DIR"; chmod 700 "$REDIS_DIR"
  redis_write_runtime_conf

  local pid; pid="$(pidfile_pid "$REDIS_PIDFILE")"
  if pid_alive "$pid" redis-server; then
    log "redis: already running (pid $pid)"
  else
    redis_stop_foreign
    log "redis: starting on 127.0.0.1:$REDIS_PORT (log $REDIS_LOG)"
    rm -f "$REDIS_PIDFILE"
    redis-server "$REDIS_RUNTIME_CONF" >"$REDIS_DIR/start.out" 2>&1 9>&- || {
      cat "$REDIS_DIR/start.out" >&2; show_log_tail "$REDIS_LOG"; die "redis: redis-server failed to start"; }
  fi
  local deadline=$(( $(now) + REDIS_START_TIMEOUT )) out=""
  while :; do
    out="$(redis_cli ping 2>&1 || true)"
    [[ "$out" == PONG ]] && break
    if [[ $(now) -ge $deadline ]]; then
      show_log_tail "$REDIS_LOG"; die "redis: no PONG after ${REDIS_START_TIMEOUT}s (last answer: $out)"
    fi
    sleep 0.2
  done
  log "redis: ready (redis://127.0.0.1:$REDIS_PORT) in $(( $(now) - t0 ))s"
}

# ============================================================================
# Kafka
# ============================================================================
kafka_fetch_libs() {
  kafka_libs_ok && return 0
  command -v mvn >/dev/null 2>&1 || die "kafka: mvn not found (needed once to fetch the Kafka jars)"
  log "kafka: fetching Kafka $KAFKA_VERSION jars from Maven Central into $KAFKA_LIBS"
  local tmp="$KAFKA_LIBS.tmp"
  rm -rf "$tmp"; mkdir -p "$KAFKA_DIR"
  if ! mvn -q -B -f "$DEPLOY_DIR/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" >"$KAFKA_DIR/mvn.log" 2>&1; then
    show_log_tail "$KAFKA_DIR/mvn.log"
    die "kafka: mvn dependency:copy-dependencies failed"
  fi
  compgen -G "$tmp/kafka_2.13-*.jar" >/dev/null || die "kafka: kafka_2.13 jar missing after mvn"
  echo "$KAFKA_VERSION" >"$tmp/.complete"
  rm -rf "$KAFKA_LIBS"; mv "$tmp" "$KAFKA_LIBS"
}

kafka_render_props() {
  local tmp; tmp="$(mktemp)"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@LOG_DIRS@|$KAFKA_DATA|g" "$DEPLOY_DIR/kafka/server.properties" >"$tmp"
  if ! cmp -s "$tmp" "$KAFKA_PROPS"; then mv -f "$tmp" "$KAFKA_PROPS"; else rm -f "$tmp"; fi
}

kafka_format() {
  [[ -f "$KAFKA_DATA/meta.properties" ]] && return 0
  if [[ -d "$KAFKA_DATA" ]] && [[ -n "$(ls -A "$KAFKA_DATA")" ]]; then
    die "kafka: $KAFKA_DATA is not empty but has no meta.properties; remove it to re-format"
  fi
  local cid
  if [[ -s "$KAFKA_CLUSTER_ID_FILE" ]]; then
    cid="$(cat "$KAFKA_CLUSTER_ID_FILE")"
  else
    cid="$(kafka_tool kafka.tools.StorageTool random-uuid 2>"$KAFKA_LOG_DIR/storage-tool.err" | tail -n1)"
    [[ "$cid" =~ ^[A-Za-z0-9_-]{22}$ ]] || { cat "$KAFKA_LOG_DIR/storage-tool.err" >&2; die "kafka: StorageTool random-uuid failed"; }
    echo "$cid" >"$KAFKA_CLUSTER_ID_FILE"
  fi
  log "kafka: formatting storage $KAFKA_DATA (cluster id $cid)"
  if ! kafka_tool kafka.tools.StorageTool format --standalone -t "$cid" -c "$KAFKA_PROPS" \
        >"$KAFKA_LOG_DIR/storage-format.log" 2>&1; then
    show_log_tail "$KAFKA_LOG_DIR/storage-format.log"
    die "kafka: StorageTool format failed"
  fi
}

KAFKA_STARTED_AT=""
KAFKA_READY_LIST=""
kafka_launch() {
  KAFKA_STARTED_AT=$(now)
  command -v java >/dev/null 2>&1 || die "java not found"
  local jv; jv="$(java -XshowSettings:properties -version 2>&1 | awk -F'= ' '/java.specification.version/{print $2}')"
  [[ "${jv%%.*}" -ge 17 ]] 2>/dev/null || die "kafka: Java 17+ required (found ${jv:-unknown})"
  mkdir -p "$KAFKA_DIR" "$KAFKA_LOG_DIR"
  local pid; pid="$(pidfile_pid "$KAFKA_PIDFILE")"
  if pid_alive "$pid" kafka.Kafka; then
    log "kafka: already running (pid $pid)"
    return 0
  fi
  kafka_fetch_libs
  kafka_render_props
  kafka_format
  local p
  for p in "$KAFKA_PORT" "$KAFKA_CONTROLLER_PORT"; do
    port_open "$p" && die "kafka: port 127.0.0.1:$p is in use by another process ($(port_owner "$p"))"
  done
  log "kafka: starting Kafka $KAFKA_VERSION on $KAFKA_BOOTSTRAP (log $KAFKA_LOG_DIR/server.log)"
  # shellcheck disable=SC2086
  nohup setsid java $KAFKA_HEAP_OPTS -server -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -XX:+ExitOnOutOfMemoryError \
    -Djava.awt.headless=true \
    "-Xlog:gc*:file=$KAFKA_LOG_DIR/gc.log:time,tags:filecount=3,filesize=20M" \
    -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
    -Dlog4j2.configurationFile="$DEPLOY_DIR/kafka/log4j2.properties" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$KAFKA_PROPS" \
    >>"$KAFKA_LOG_DIR/kafka.out" 2>&1 </dev/null 9>&- &
  echo $! >"$KAFKA_PIDFILE"
}

kafka_wait() {
  local pid deadline out=""
  pid="$(pidfile_pid "$KAFKA_PIDFILE")"
  deadline=$(( $(now) + KAFKA_START_TIMEOUT ))
  while :; do
    if ! pid_alive "$pid" kafka.Kafka; then
      show_log_tail "$KAFKA_LOG_DIR/kafka.out" 20
      show_log_tail "$KAFKA_LOG_DIR/server.log" 40
      die "kafka: process $pid exited during startup"
    fi
    if port_open "$KAFKA_PORT"; then
      if out="$(KAFKA_TOOL_TIMEOUT=30 kafka_list_topics 2>"$KAFKA_LOG_DIR/ready-probe.err")"; then
        KAFKA_READY_LIST="$out"
        break
      fi
    fi
    if [[ $(now) -ge $deadline ]]; then
      show_log_tail "$KAFKA_LOG_DIR/ready-probe.err" 15
      show_log_tail "$KAFKA_LOG_DIR/server.log" 40
      die "kafka: broker on $KAFKA_BOOTSTRAP did not answer a metadata request within ${KAFKA_START_TIMEOUT}s"
    fi
    sleep 1
  done
  log "kafka: ready ($KAFKA_BOOTSTRAP, pid $pid) in $(( $(now) - KAFKA_STARTED_AT ))s"
}

# ============================================================================
# main
# ============================================================================
install_packages
# Kafka is the slowest: launch its JVM first, start PG/Redis while it boots.
[[ $WANT_KAFKA -eq 1 ]] && kafka_launch
[[ $WANT_PG -eq 1 ]] && pg_up
[[ $WANT_REDIS -eq 1 ]] && redis_up
if [[ $WANT_KAFKA -eq 1 ]]; then
  kafka_wait
  if [[ "${SKIP_TOPICS:-0}" != 1 ]]; then
    # reuse the topic list from the readiness probe (saves one JVM start)
    KAFKA_TOPICS_LISTED="$KAFKA_READY_LIST" "$DEPLOY_DIR/create-topics.sh"
  fi
fi
log "stack up in $(( $(now) - T_ALL ))s (STACK_DIR=$STACK_DIR)"
