#!/usr/bin/env bash
# Start the local service stack (PostgreSQL, Redis, Kafka KRaft), installing
# what is missing. Everything listens on 127.0.0.1 only; state lives in
# $STACK_DIR (default /var/tmp/stockpipe). Idempotent: re-running skips what
# is already installed / running and only re-checks that each service answers.
#
# usage: deploy/stack-up.sh [pg] [redis] [kafka]     (no args = all three)
#
# env: STACK_DIR, PGPORT_STACK, REDIS_PORT, REDIS_PASSWORD, KAFKA_PORT,
#      KAFKA_CONTROLLER_PORT, KAFKA_VERSION, KAFKA_HEAP_OPTS, KAFKA_GC_OPTS (default -XX:+UseParallelGC), PARTITIONS,
#      ORDERS_TOPIC/DEDUCT_TOPIC/COMPENSATE_TOPIC/RESULTS_TOPIC/DLQ_TOPIC,
#      SKIP_TOPICS=1 (do not create the default topics),
#      *_START_TIMEOUT (seconds: PG_, REDIS_, KAFKA_), REDIS_LOAD_TIMEOUT (seconds a
#      starting Redis may spend loading its AOF, 1800)
#
# Secure layout: STACK_LAYOUT=secure deploy/stack-up.sh [pg] [redis] [kafka]
#   A second, separate set of processes beside the plain one (both can run at once),
#   state in $STACK_DIR/secure/ (pg/ redis/ kafka/ tls/ secrets/):
#   - Kafka  localhost:9192 SASL_SSL, SCRAM-SHA-512 users admin (super user) and
#            stockpipe (ACLs: read/write/describe topics prefixed orders stock. t- bench- demo-,
#            read any group, idempotent write); controller 127.0.0.1:9193 (mutual TLS);
#            admin tools: --command-config $STACK_DIR/secure/kafka/admin-client.properties
#   - Redis  localhost:6380 TLS only (port 0), client certificate required; ACL users
#            stockpipe-admin (all) and stockpipe-producer (deploy/redis-users.acl), default off (nobody can be it)
#   - PostgreSQL localhost:5433 TLS only (hostssl scram-sha-256; plain TCP rejected);
#            roles stock_migrator (owns database stock, CREATEDB) and stock_consumer (LOGIN)
#   - tls/: private CA ca.crt, server.crt (SAN localhost, 127.0.0.1), client.crt
#            (CN stockpipe-client), other-ca.crt (an unrelated CA, for negative tests)
#   - secrets/: one random password per file (mode 600), made once, never printed
#   Certificates, keys and passwords are generated only when missing. Variables for the
#   programs: STACK_LAYOUT=secure . deploy/env.sh, or the file $STACK_DIR/secure/env.
#   env: SECURE_KAFKA_PORT, SECURE_KAFKA_CONTROLLER_PORT, SECURE_REDIS_PORT,
#        SECURE_PG_PORT, SECURE_KAFKA_HEAP_OPTS (default -Xmx512m -Xms512m)
#
# Cluster layout: STACK_LAYOUT=cluster deploy/stack-up.sh [pg] [redis] [kafka]
#   A third set of processes beside the other two, plaintext on 127.0.0.1, state in
#   $STACK_DIR/cluster/ (helpers: deploy/lib-cluster.sh; faults: deploy/cluster-fault.sh):
#   - Redis Cluster  6 nodes 127.0.0.1:7001..7006 (bus ports +10000), 3 masters + 3
#            replicas (made once with redis-cli --cluster create --cluster-replicas 1; a
#            re-run only starts stopped nodes), node timeout 2 s, AOF fsync always,
#            full coverage not required; node N in redis/N/ (redis.conf, nodes.conf, data)
#   - Kafka  3 brokers (ids 1 2 3, each broker+controller, static KRaft quorum
#            controller.quorum.voters=1@127.0.0.1:9393,2@...:9394,3@...:9395), clients on
#            127.0.0.1:9292 9293 9294; replication factor 3, min.insync.replicas 2,
#            12 partitions per topic; broker N in kafka/N/ (server.properties, data/, logs/)
#   - PostgreSQL  none of its own: the plain layout's (127.0.0.1:5432), made sure of with
#            the plain `deploy/stack-up.sh pg` (nothing else of the plain layout starts)
#   - the default topics with 12 partitions, replication factor 3
#   Variables for the programs: STACK_LAYOUT=cluster . deploy/env.sh, or the file
#   $STACK_DIR/cluster/env (KAFKA_BROKERS, REDIS_URL, REDIS_CLUSTER_NODES, DATABASE_URL).
#   env: CLUSTER_REDIS_PORT (first node, 7001), CLUSTER_KAFKA_PORT (broker 1, 9292),
#        CLUSTER_KAFKA_CONTROLLER_PORT (controller 1, 9393), CLUSTER_KAFKA_HEAP_OPTS
#        (default -Xmx384m -Xms384m per broker), CLUSTER_REDIS_START_TIMEOUT (60),
#        CLUSTER_KAFKA_START_TIMEOUT (180)
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
if [[ "$STACK_LAYOUT" == cluster ]]; then
  # shellcheck source=deploy/lib-cluster.sh
  source "$DEPLOY_DIR/lib-cluster.sh"
fi

usage() { print_usage "${BASH_SOURCE[0]}"; }
parse_services "$@" || { usage; exit 2; }

mkdir -p "$STACK_DIR"
chmod 755 "$STACK_DIR" 2>/dev/null || true
if [[ "$STACK_LAYOUT" == secure ]]; then
  mkdir -p "$SECURE_DIR"
  chmod 755 "$SECURE_DIR"   # postgres must traverse it to reach its data directory
fi
[[ "$STACK_LAYOUT" == cluster ]] && mkdir -p "$CLUSTER_DIR"
stack_lock   # one stack-up/stack-down at a time

T_ALL=$(now)

# ============================================================================
# install
# ============================================================================
install_packages() {
  local pkgs=()
  [[ $WANT_PG -eq 1 ]] && pkgs+=(postgresql)
  [[ $WANT_REDIS -eq 1 ]] && pkgs+=(redis-server)
  if [[ "$STACK_LAYOUT" == secure ]]; then
    command -v openssl >/dev/null 2>&1 || pkgs+=(openssl)
    if [[ $WANT_REDIS -eq 1 ]] && ! command -v redis-cli >/dev/null 2>&1; then pkgs+=(redis-tools); fi
  fi
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
  {
  cat <<EOF
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
# an autovacuum round every 10 s instead of every minute: the ledger's insert vacuums
# (migration 0010: every 100,000 orders) stay small and mostly within the checkpoint that
# wrote their pages, so they log few full-page images (docs/DESIGN.md, "PostgreSQL's
# background work")
autovacuum_naptime = 10s
EOF
  if [[ "$STACK_LAYOUT" == secure ]]; then
    # server.crt/server.key: copies of $TLS_DIR's, owned by postgres (pg_install_tls)
    cat <<'EOF'
# secure layout: TLS only (pg_hba.conf refuses every connection without it)
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
ssl_min_protocol_version = 'TLSv1.2'
EOF
  fi
  } >"$tmp"
  if ! cmp -s "$tmp" "$conf"; then install -o postgres -g postgres -m 600 "$tmp" "$conf"; changed=1; fi
  if [[ "$STACK_LAYOUT" == secure ]]; then
    cat >"$tmp" <<'EOF'
# written by deploy/stack-up.sh (STACK_LAYOUT=secure) -- edits are overwritten on the next stack-up
# Administration through the unix socket as postgres; TCP only with TLS and a SCRAM
# password; any other TCP connection is rejected ("... no encryption").
# TYPE  DATABASE  USER      ADDRESS         METHOD
local   all       postgres                  peer
hostssl all       all       127.0.0.1/32    scram-sha-256
host    all       all       0.0.0.0/0       reject
host    all       all       ::/0            reject
EOF
  else
    cat >"$tmp" <<'EOF'
# written by deploy/stack-up.sh -- edits are overwritten on the next stack-up
# TYPE  DATABASE  USER      ADDRESS         METHOD
local   all       postgres                  peer
local   all       all                       scram-sha-256
host    all       all       127.0.0.1/32    scram-sha-256
host    all       all       ::1/128         scram-sha-256
EOF
  fi
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

# secure layout: the server certificate and key, copied into the data directory owned by
# postgres (PostgreSQL wants its key owned by the server user, mode 0600). Prints
# "changed" if a copy was refreshed (PostgreSQL reloads them on SIGHUP).
pg_install_tls() {
  local changed=0
  if ! cmp -s "$TLS_DIR/server.crt" "$PGDATA_STACK/server.crt"; then
    install -o postgres -g postgres -m 644 "$TLS_DIR/server.crt" "$PGDATA_STACK/server.crt"; changed=1
  fi
  if ! cmp -s "$TLS_DIR/server.key" "$PGDATA_STACK/server.key"; then
    install -o postgres -g postgres -m 600 "$TLS_DIR/server.key" "$PGDATA_STACK/server.key"; changed=1
  fi
  [[ $changed -eq 1 ]] && echo changed
  return 0
}

# secure layout: both roles log in over TLS (verify-full) and stock_migrator owns stock
pg_secure_ok() {
  [[ "$(pg_tls_query "$PG_USER" "$PG_PASSWORD_FILE" \
        "select pg_get_userbyid(datdba) from pg_database where datname = current_database()" 2>/dev/null)" == "$PG_USER" ]] \
    && [[ "$(pg_tls_query "$PG_CONSUMER_USER" "$PG_CONSUMER_PASSWORD_FILE" 'select 1' 2>/dev/null)" == 1 ]]
}

# secure layout: roles stock_migrator (LOGIN CREATEDB, owns stock) and stock_consumer
# (LOGIN only: its table grants come from the application's migrations). Passwords go
# through stdin, never argv.
pg_secure_bootstrap() {
  local sqlerr="$PG_DIR/bootstrap.err" mpw cpw
  mpw="$(read_secret "$PG_PASSWORD_FILE")"
  cpw="$(read_secret "$PG_CONSUMER_PASSWORD_FILE")"
  log "pg: ensuring roles '$PG_USER', '$PG_CONSUMER_USER' and database '$PG_DB'"
  if ! (cd / && as_postgres "$PGBIN/psql" -X -q -h "$PG_SOCKET_DIR" -p "$PG_PORT" -d postgres) >/dev/null 2>"$sqlerr" <<EOF
\set ON_ERROR_STOP on
\set m $(pg_sql_quote "$PG_USER")
\set mp $(pg_sql_quote "$mpw")
\set c $(pg_sql_quote "$PG_CONSUMER_USER")
\set cp $(pg_sql_quote "$cpw")
\set d $(pg_sql_quote "$PG_DB")
SELECT format('CREATE ROLE %I', :'m') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'m') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN CREATEDB NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L', :'m', :'mp') \gexec
SELECT format('CREATE ROLE %I', :'c') WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'c') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOCREATEDB NOSUPERUSER NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD %L', :'c', :'cp') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'d', :'m') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'d') \gexec
SELECT format('ALTER DATABASE %I OWNER TO %I', :'d', :'m') \gexec
\c :d
-- PostgreSQL 15's default already; stated so that no template can differ
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
EOF
  then
    cat "$sqlerr" >&2
    die "pg: creating roles/database failed"
  fi
  pg_secure_ok || die "pg: cannot run a query over TLS as '$PG_USER' and '$PG_CONSUMER_USER' on $PG_HOST:$PG_PORT/$PG_DB"
}

pg_stock_ok() {
  PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=5 "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" \
    -U "$PG_USER" -d "$PG_DB" -tAc 'select 1' 2>/dev/null | grep -qx 1
}

pg_up() {
  local t0; t0=$(now)
  PGBIN="$(pg_bindir)" || die "PostgreSQL server binaries not found (package postgresql)"
  id postgres >/dev/null 2>&1 || die "OS user 'postgres' missing (package postgresql not installed?)"
  # the plain layout deals with the Debian clusters (they would sit on its port)
  [[ "$STACK_LAYOUT" == secure ]] || pg_disable_debian_clusters

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
  [[ "$STACK_LAYOUT" == secure ]] && cfg_changed+="$(pg_install_tls)"

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
      die "pg: port 127.0.0.1:$PG_PORT is in use by another process ($(port_owner "$PG_PORT")); stop it or set $([[ "$STACK_LAYOUT" == secure ]] && echo SECURE_PG_PORT || echo PGPORT_STACK)"
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

  if [[ "$STACK_LAYOUT" == secure ]]; then
    pg_secure_ok || pg_secure_bootstrap
    log "pg: ready (TLS only: postgres://{$PG_USER,$PG_CONSUMER_USER}@$PG_HOST:$PG_PORT/$PG_DB?sslmode=verify-full) in $(( $(now) - t0 ))s"
    return 0
  fi
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
# secure layout: $REDIS_ACLFILE from the template deploy/redis-users.acl (comment lines
# dropped, password placeholders -> SHA-256 of the secrets). Prints "changed" if rewritten.
redis_write_aclfile() {
  local tpl admin_sha producer_sha ver tmp
  tpl="$(grep -v '^#' "$DEPLOY_DIR/redis-users.acl")"
  admin_sha="$(read_secret "$REDIS_ADMIN_PASSWORD_FILE" | openssl dgst -sha256 -r | cut -d' ' -f1)"
  producer_sha="$(read_secret "$SECRETS_DIR/redis-producer.password" | openssl dgst -sha256 -r | cut -d' ' -f1)"
  [[ "$admin_sha" =~ ^[0-9a-f]{64}$ && "$producer_sha" =~ ^[0-9a-f]{64}$ ]] || die "redis: could not hash the ACL passwords"
  tpl="${tpl//@ADMIN_PASSWORD_SHA256@/$admin_sha}"
  tpl="${tpl//@PRODUCER_PASSWORD_SHA256@/$producer_sha}"
  # CLIENT SETINFO is Redis 7.2+: an unknown subcommand makes the whole aclfile fail to load
  ver="$(redis-server --version | sed -n 's/.* v=\([0-9]*\.[0-9]*\).*/\1/p')"
  if [[ -n "$ver" && "$ver" != 7.2 ]] && printf '%s\n%s\n' "$ver" 7.2 | sort -V -C; then
    tpl="${tpl// +client|setinfo/}"
  fi
  tmp="$(mktemp "$REDIS_DIR/.users.acl.XXXXXX")"
  printf '%s\n' "$tpl" >"$tmp"
  if cmp -s "$tmp" "$REDIS_ACLFILE"; then rm -f "$tmp"; return 0; fi
  mv -f "$tmp" "$REDIS_ACLFILE"
  echo changed
}

redis_write_runtime_conf() {
  local tmp; tmp="$(mktemp)"
  if [[ "$STACK_LAYOUT" == secure ]]; then
    {
      echo "# generated by deploy/stack-up.sh (STACK_LAYOUT=secure)"
      echo "include $DEPLOY_DIR/redis.conf"
      echo "# TLS only: no plaintext port; every client shows a certificate signed by our CA"
      echo "port 0"
      echo "bind 127.0.0.1"
      echo "tls-port $REDIS_PORT"
      echo "tls-cert-file $TLS_DIR/server.crt"
      echo "tls-key-file $TLS_DIR/server.key"
      echo "tls-ca-cert-file $TLS_DIR/ca.crt"
      echo "tls-auth-clients yes"
      echo 'tls-protocols "TLSv1.2 TLSv1.3"'
      echo "# users (default off, stockpipe-admin, stockpipe-producer): deploy/redis-users.acl"
      echo "aclfile $REDIS_ACLFILE"
      echo "dir $REDIS_DIR"
      echo "pidfile $REDIS_PIDFILE"
      echo "logfile $REDIS_LOG"
    } >"$tmp"
    chmod 600 "$tmp"
    mv -f "$tmp" "$REDIS_RUNTIME_CONF"
    return 0
  fi
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
    cmd="$(proc_cmdline "$pid" | sed 's/ *$//')"
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
  local acl_changed=""
  [[ "$STACK_LAYOUT" == secure ]] && acl_changed="$(redis_write_aclfile)"

  local pid; pid="$(pidfile_pid "$REDIS_PIDFILE")"
  if pid_alive "$pid" redis-server; then
    log "redis: already running (pid $pid)"
    if [[ -n "$acl_changed" ]]; then
      log "redis: $REDIS_ACLFILE changed, ACL LOAD"
      local out; out="$(redis_cli ACL LOAD 2>&1 || true)"
      [[ "$out" == OK ]] || die "redis: ACL LOAD failed ($out); restart it: STACK_LAYOUT=secure deploy/stack-down.sh redis && STACK_LAYOUT=secure deploy/stack-up.sh redis"
    fi
  else
    if [[ "$STACK_LAYOUT" == secure ]]; then
      if port_open "$REDIS_PORT"; then
        die "redis: port 127.0.0.1:$REDIS_PORT is in use by another process ($(port_owner "$REDIS_PORT")); stop it or set SECURE_REDIS_PORT"
      fi
    else
      redis_stop_foreign
    fi
    log "redis: starting on 127.0.0.1:$REDIS_PORT$([[ "$STACK_LAYOUT" == secure ]] && echo ' (TLS only)') (log $REDIS_LOG)"
    rm -f "$REDIS_PIDFILE"
    redis-server "$REDIS_RUNTIME_CONF" >"$REDIS_DIR/start.out" 2>&1 9>&- || {
      cat "$REDIS_DIR/start.out" >&2; show_log_tail "$REDIS_LOG"; die "redis: redis-server failed to start"; }
  fi
  redis_wait_pong redis "$REDIS_LOG" $(( $(now) + REDIS_START_TIMEOUT )) "" redis_cli
  if [[ "$STACK_LAYOUT" == secure ]]; then
    log "redis: ready (rediss://localhost:$REDIS_PORT, client certificate + ACL users) in $(( $(now) - t0 ))s"
  else
    log "redis: ready (redis://127.0.0.1:$REDIS_PORT) in $(( $(now) - t0 ))s"
  fi
}

# ============================================================================
# Kafka
# ============================================================================
kafka_fetch_libs() {
  kafka_libs_ok && return 0
  # both layouts share the jars: one fetch at a time (fd 8, closed when done)
  exec 8>"$KAFKA_LIBS_LOCK"
  flock -w 600 8 || die "kafka: another stack-up still fetches the Kafka jars ($KAFKA_LIBS_LOCK)"
  if kafka_libs_ok; then exec 8>&-; return 0; fi
  command -v mvn >/dev/null 2>&1 || die "kafka: mvn not found (needed once to fetch the Kafka jars)"
  mkdir -p "$(dirname "$KAFKA_LIBS")"
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
  exec 8>&-
}

kafka_render_props() {
  local tmp; tmp="$(mktemp)"
  sed -e "s|@KAFKA_PORT@|$KAFKA_PORT|g" -e "s|@CONTROLLER_PORT@|$KAFKA_CONTROLLER_PORT|g" \
      -e "s|@LOG_DIRS@|$KAFKA_DATA|g" "$DEPLOY_DIR/kafka/server.properties" >"$tmp"
  if [[ "$STACK_LAYOUT" == secure ]]; then
    # the plain file minus the keys the overlay sets, then the overlay. Passwords are
    # substituted by bash (never on a command line); the result is mode 600.
    local overlay keys admin_pw ks_pw base
    overlay="$(cat "$DEPLOY_DIR/kafka/server-secure.properties")"
    keys="$(grep -oE '^[a-z][a-zA-Z0-9._-]*=' "$DEPLOY_DIR/kafka/server-secure.properties" | tr -d '=' | tr '\n' ' ')"
    base="$(awk -v keys="$keys" 'BEGIN { n = split(keys, k, " "); for (i = 1; i <= n; i++) drop[k[i]] = 1 }
      { key = $0; sub(/=.*/, "", key) } !(key in drop)' "$tmp")"
    admin_pw="$(read_secret "$SECRETS_DIR/kafka-admin.password")"
    ks_pw="$(read_secret "$SECRETS_DIR/kafka-keystore.password")"
    overlay="${overlay//@KAFKA_PORT@/$KAFKA_PORT}"
    overlay="${overlay//@CONTROLLER_PORT@/$KAFKA_CONTROLLER_PORT}"
    overlay="${overlay//@LOG_DIRS@/$KAFKA_DATA}"
    overlay="${overlay//@TLS_DIR@/$TLS_DIR}"
    overlay="${overlay//@KEYSTORE_PASSWORD@/$ks_pw}"
    overlay="${overlay//@ADMIN_PASSWORD@/$admin_pw}"
    printf '%s\n\n%s\n' "$base" "$overlay" >"$tmp"
  fi
  chmod 600 "$tmp"
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
  if [[ "$STACK_LAYOUT" == secure ]]; then
    # the SCRAM users go into the bootstrap metadata (through an @argfile: no password on argv)
    local admin_pw worker_pw
    admin_pw="$(read_secret "$SECRETS_DIR/kafka-admin.password")"
    worker_pw="$(read_secret "$SECRETS_DIR/kafka-worker.password")"
    if ! kafka_tool_secret kafka.tools.StorageTool format --standalone -t "$cid" -c "$KAFKA_PROPS" \
          --add-scram "SCRAM-SHA-512=[name=admin,password=$admin_pw]" \
          --add-scram "SCRAM-SHA-512=[name=stockpipe,password=$worker_pw]" \
          >"$KAFKA_LOG_DIR/storage-format.log" 2>&1; then
      show_log_tail "$KAFKA_LOG_DIR/storage-format.log"
      die "kafka: StorageTool format failed"
    fi
    kafka_scram_stamp admin >"$KAFKA_DIR/scram-admin.applied"
    kafka_scram_stamp stockpipe >"$KAFKA_DIR/scram-stockpipe.applied"
    rm -f "$KAFKA_DIR/acls.applied"
    return 0
  fi
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
  log "kafka: starting Kafka $KAFKA_VERSION on $KAFKA_BOOTSTRAP$([[ "$STACK_LAYOUT" == secure ]] && echo ' (SASL_SSL)') (log $KAFKA_LOG_DIR/server.log)"
  # shellcheck disable=SC2086
  nohup setsid java $KAFKA_HEAP_OPTS $KAFKA_GC_OPTS -server -XX:+ExitOnOutOfMemoryError \
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
# secure layout (STACK_LAYOUT=secure): secrets, certificates, Kafka users and ACLs
# ============================================================================
SECRET_NAMES=(kafka-admin kafka-worker kafka-keystore redis-admin redis-producer pg-migrator pg-consumer)

# secrets_ensure -- one random password per file in $SECRETS_DIR (mode 600), made once
secrets_ensure() {
  mkdir -p "$SECRETS_DIR"; chmod 700 "$SECRETS_DIR"
  local n f tmp made=()
  for n in "${SECRET_NAMES[@]}"; do
    f="$SECRETS_DIR/$n.password"
    if [[ ! -s "$f" ]]; then
      tmp="$(mktemp "$SECRETS_DIR/.$n.XXXXXX")"   # mode 600
      openssl rand -hex 16 | tr -d '\n' >"$tmp"
      [[ "$(wc -c <"$tmp")" -eq 32 ]] || { rm -f "$tmp"; die "secrets: openssl rand failed for $n"; }
      mv -f "$tmp" "$f"; made+=("$n")
    fi
    chmod 600 "$f"
  done
  [[ ${#made[@]} -gt 0 ]] && log "secrets: generated ${made[*]} in $SECRETS_DIR"
  return 0
}

TLS_DAYS="${TLS_DAYS:-3650}"
# tls_openssl_conf FILE -- the extensions of our certificates (no system defaults)
tls_openssl_conf() {
  cat >"$1" <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
# clientAuth too: the Kafka broker shows this certificate to its controller listener
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
}

# tls_run LOG CMD... -- run openssl quietly, die with its output on failure
tls_run() {
  local out="$1"; shift
  "$@" >"$out" 2>&1 || { cat "$out" >&2; die "tls: $* failed"; }
}

# tls_ca NAME CN -- self-signed CA NAME.crt/NAME.key, if missing
tls_ca() {
  local name="$1" cn="$2" w="$TLS_WORK"
  [[ -s "$TLS_DIR/$name.crt" && -s "$TLS_DIR/$name.key" ]] && return 0
  log "tls: creating CA $TLS_DIR/$name.crt ($cn)"
  tls_run "$w/openssl.out" openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$w/$name.key"
  tls_run "$w/openssl.out" openssl req -new -x509 -config "$w/openssl.cnf" -extensions ca_ext -sha256 \
    -days "$TLS_DAYS" -subj "/CN=$cn" -key "$w/$name.key" -out "$w/$name.crt"
  chmod 600 "$w/$name.key"; chmod 644 "$w/$name.crt"
  mv -f "$w/$name.key" "$TLS_DIR/$name.key"; mv -f "$w/$name.crt" "$TLS_DIR/$name.crt"
}

# tls_leaf NAME CN EXTENSIONS -- NAME.crt/NAME.key signed by ca, if missing or not
# (any more) signed by ca.crt or not matching its key
tls_leaf() {
  local name="$1" cn="$2" ext="$3" w="$TLS_WORK" crt="$TLS_DIR/$1.crt" key="$TLS_DIR/$1.key"
  if [[ -s "$crt" && -s "$key" ]] \
     && openssl verify -CAfile "$TLS_DIR/ca.crt" "$crt" >/dev/null 2>&1 \
     && [[ "$(openssl x509 -in "$crt" -noout -pubkey 2>/dev/null)" == "$(openssl pkey -in "$key" -pubout 2>/dev/null)" ]]; then
    return 0
  fi
  log "tls: issuing $crt (CN $cn)"
  tls_run "$w/openssl.out" openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$w/$name.key"
  tls_run "$w/openssl.out" openssl req -new -config "$w/openssl.cnf" -subj "/CN=$cn" \
    -key "$w/$name.key" -out "$w/$name.csr"
  tls_run "$w/openssl.out" openssl x509 -req -in "$w/$name.csr" -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" \
    -CAserial "$TLS_DIR/ca.srl" -CAcreateserial -sha256 -days "$TLS_DAYS" \
    -extfile "$w/openssl.cnf" -extensions "$ext" -out "$w/$name.crt"
  chmod 600 "$w/$name.key"; chmod 644 "$w/$name.crt"
  mv -f "$w/$name.key" "$key"; mv -f "$w/$name.crt" "$crt"
}

# tls_ensure -- $TLS_DIR: private CA, server (SAN localhost, 127.0.0.1) and client
# certificates, an unrelated CA for negative tests. Keys: PEM PKCS#8, unencrypted, 600.
tls_ensure() {
  mkdir -p "$TLS_DIR"; chmod 755 "$TLS_DIR"
  TLS_WORK="$(mktemp -d)"   # mode 700
  # shellcheck disable=SC2064
  trap "rm -rf '$TLS_WORK'" EXIT
  tls_openssl_conf "$TLS_WORK/openssl.cnf"
  tls_ca ca "stockpipe local CA"
  tls_leaf server localhost server_ext
  tls_leaf client stockpipe-client client_ext
  # other-ca: signs nothing any server trusts; tests show that a client trusting it is refused
  tls_ca other-ca "stockpipe other CA (trusted by no server)"
  chmod 600 "$TLS_DIR"/*.key
  chmod 644 "$TLS_DIR"/*.crt
  rm -rf "$TLS_WORK"; trap - EXIT
}

# kafka_write_client_conf FILE USER PASSWORD_FILE -- SASL_SSL client settings (mode 600)
kafka_write_client_conf() {
  local f="$1" user="$2" pw tmp
  pw="$(read_secret "$3")"
  tmp="$(mktemp "$KAFKA_DIR/.client.XXXXXX")"   # mode 600
  {
    echo "# written by deploy/stack-up.sh (STACK_LAYOUT=secure): Kafka client settings of user $user"
    echo "# holds a password: keep it mode 600. Use: --command-config $f"
    echo "security.protocol=SASL_SSL"
    echo "sasl.mechanism=SCRAM-SHA-512"
    printf 'sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="%s" password="%s";\n' "$user" "$pw"
    echo "ssl.truststore.type=PEM"
    echo "ssl.truststore.location=$TLS_DIR/ca.crt"
    echo "ssl.endpoint.identification.algorithm=https"
    echo "# CLI tools: fail fast instead of 60 s retries"
    echo "request.timeout.ms=5000"
    echo "default.api.timeout.ms=10000"
    echo "retries=2"
    echo "retry.backoff.ms=200"
    echo "reconnect.backoff.max.ms=1000"
  } >"$tmp"
  if cmp -s "$tmp" "$f"; then rm -f "$tmp"; else mv -f "$tmp" "$f"; fi
}

# kafka_secure_files -- the broker's PKCS12 keystore (from server.crt/key; the truststore
# is ca.crt itself, type PEM) and the admin / worker client settings
kafka_secure_files() {
  mkdir -p "$KAFKA_DIR" "$KAFKA_LOG_DIR"; chmod 700 "$KAFKA_DIR"
  local p12="$TLS_DIR/kafka-server.p12" pwf="$SECRETS_DIR/kafka-keystore.password" tmp
  if [[ ! -s "$p12" || "$TLS_DIR/server.crt" -nt "$p12" || "$TLS_DIR/server.key" -nt "$p12" || "$pwf" -nt "$p12" ]]; then
    log "tls: writing the Kafka keystore $p12"
    tmp="$(mktemp "$TLS_DIR/.p12.XXXXXX")"
    tls_run "$KAFKA_LOG_DIR/keystore.out" openssl pkcs12 -export -name kafka-server \
      -in "$TLS_DIR/server.crt" -inkey "$TLS_DIR/server.key" -certfile "$TLS_DIR/ca.crt" \
      -passout "file:$pwf" -out "$tmp"
    chmod 600 "$tmp"; mv -f "$tmp" "$p12"
  fi
  kafka_write_client_conf "$KAFKA_ADMIN_CONF" admin "$SECRETS_DIR/kafka-admin.password"
  kafka_write_client_conf "$KAFKA_WORKER_CONF" stockpipe "$SECRETS_DIR/kafka-worker.password"
}

# kafka_scram_stamp USER -> a hash of the user's current password (the stamp files
# remember which password the broker has; a hash of a random secret reveals nothing)
kafka_scram_stamp() {
  local f="$SECRETS_DIR/kafka-worker.password"
  [[ "$1" == admin ]] && f="$SECRETS_DIR/kafka-admin.password"
  { echo "$1"; read_secret "$f"; } | openssl dgst -sha256 -r | cut -d' ' -f1
}

# The broker logs in to itself as admin: a regenerated admin password cannot be
# fixed from outside (the old one is needed to change it).
kafka_secure_check_admin() {
  local f="$KAFKA_DIR/scram-admin.applied"
  if [[ ! -s "$f" ]]; then kafka_scram_stamp admin >"$f"; return 0; fi
  [[ "$(cat "$f")" == "$(kafka_scram_stamp admin)" ]] && return 0
  die "kafka: $SECRETS_DIR/kafka-admin.password differs from the one $KAFKA_DATA was formatted with; restore it, or remove $KAFKA_DATA (the secure topics are lost) and re-run"
}

# Least privilege of the workers' user stockpipe, in one place. Only added (never
# removed) by kafka_secure_grants; the StandardAuthorizer keeps them in the metadata log.
KAFKA_WORKER_TOPIC_PREFIXES=(orders stock. t- bench- demo-)
kafka_worker_acl_specs() {
  local p topics=()
  for p in "${KAFKA_WORKER_TOPIC_PREFIXES[@]}"; do topics+=(--topic "$p"); done
  # topics: read, write (idempotent produce needs it), describe -- no create/delete/alter
  echo "--operation Read --operation Write --operation Describe --resource-pattern-type prefixed ${topics[*]}"
  # consumer groups: any name
  echo "--operation Read --group *"
  echo "--operation IdempotentWrite --cluster"
}

# after the broker answers: the worker's SCRAM password (if its secret was regenerated)
# and the ACLs (once per formatted storage); both remembered in stamp files
kafka_secure_grants() {
  local t0 stamp want spec pw
  t0=$(now)
  want="$(kafka_scram_stamp stockpipe)"
  if [[ "$(cat "$KAFKA_DIR/scram-stockpipe.applied" 2>/dev/null || true)" != "$want" ]]; then
    log "kafka: setting the SCRAM-SHA-512 credential of user stockpipe"
    pw="$(read_secret "$SECRETS_DIR/kafka-worker.password")"
    if ! kafka_tool_secret org.apache.kafka.tools.ConfigCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
          --command-config "$KAFKA_ADMIN_CONF" --alter --entity-type users --entity-name stockpipe \
          --add-config "SCRAM-SHA-512=[iterations=4096,password=$pw]" >"$KAFKA_LOG_DIR/scram.log" 2>&1; then
      show_log_tail "$KAFKA_LOG_DIR/scram.log" 20
      die "kafka: could not set the password of user stockpipe"
    fi
    echo "$want" >"$KAFKA_DIR/scram-stockpipe.applied"
  fi
  stamp="$KAFKA_DIR/acls.applied"
  want="$( { cat "$KAFKA_DATA/meta.properties"; kafka_worker_acl_specs; } | openssl dgst -sha256 -r | cut -d' ' -f1)"
  if [[ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]]; then
    log "kafka: adding the ACLs of User:stockpipe"
    : >"$KAFKA_LOG_DIR/acls.log"
    while read -r spec; do
      # shellcheck disable=SC2086  # spec: options split on spaces; set -f keeps the '*' literal
      if ! (set -f; kafka_tool org.apache.kafka.tools.AclCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
            --command-config "$KAFKA_ADMIN_CONF" --add --allow-principal User:stockpipe $spec) \
            >>"$KAFKA_LOG_DIR/acls.log" 2>&1; then
        show_log_tail "$KAFKA_LOG_DIR/acls.log" 30
        die "kafka: AclCommand --add $spec failed"
      fi
    done < <(kafka_worker_acl_specs)
    echo "$want" >"$stamp"
    log "kafka: ACLs of User:stockpipe in place in $(( $(now) - t0 ))s"
  fi
}

# secure_write_env -- $SECURE_DIR/env: the variables of `STACK_LAYOUT=secure . env.sh`
# (paths, never a password) as KEY=value lines, for programs and `set -a; . file`
secure_write_env() {
  local f="$SECURE_DIR/env" tmp n
  tmp="$(mktemp "$SECURE_DIR/.env.XXXXXX")"
  {
    echo "# written by deploy/stack-up.sh (STACK_LAYOUT=secure): the secure layout's settings,"
    echo "# as in 'STACK_LAYOUT=secure . deploy/env.sh'. File paths only: the passwords are in"
    echo "# the *_PASSWORD_FILE files. Shell: set -a; . $f; set +a"
    layout_env_lines secure SECURE_KAFKA_PORT SECURE_REDIS_PORT SECURE_PG_PORT
  } >"$tmp" || { rm -f "$tmp"; die "could not write $f"; }
  for n in "${SECRET_NAMES[@]}"; do   # -f: the secret is a pattern file, not an argument
    if grep -qF -f "$SECRETS_DIR/$n.password" "$tmp"; then rm -f "$tmp"; die "refusing to write a password into $f"; fi
  done
  replace_if_changed "$tmp" "$f"
}

secure_prepare() {
  # the broker's storage was formatted with the admin password: never make a new one
  if [[ -f "$KAFKA_DATA/meta.properties" && ! -s "$SECRETS_DIR/kafka-admin.password" ]]; then
    die "secrets: $SECRETS_DIR/kafka-admin.password is missing but $KAFKA_DATA was formatted with it; restore it, or remove $KAFKA_DATA (the secure topics are lost) and re-run"
  fi
  secrets_ensure
  [[ -f "$KAFKA_DATA/meta.properties" ]] && kafka_secure_check_admin
  tls_ensure
  if [[ $WANT_KAFKA -eq 1 ]]; then kafka_secure_files; fi
  return 0
}

# ============================================================================
# cluster layout (STACK_LAYOUT=cluster; helpers in lib-cluster.sh)
# ============================================================================
# The plain layout's PostgreSQL, through the plain script (its own lock; idempotent).
cluster_pg_up() {
  log "pg: the cluster layout uses the plain layout's PostgreSQL (127.0.0.1:$PG_PORT): STACK_LAYOUT=plain deploy/stack-up.sh pg"
  # (its closing "stack up in Ns" line would read as if the plain stack had been brought up)
  STACK_LAYOUT=plain bash "$DEPLOY_DIR/stack-up.sh" pg 9>&- | sed -u '/\] stack up in [0-9]*s /d' \
    || die "pg: the plain layout's stack-up.sh pg failed"
}

cluster_main() {
  local t0
  install_packages
  # Kafka is the slowest: launch the three JVMs first, PG and Redis while they boot.
  if [[ $WANT_KAFKA -eq 1 ]]; then
    t0=$(now)
    kafka_fetch_libs
    kafka_cluster_launch "${CLUSTER_KAFKA_IDS[@]}"
  fi
  [[ $WANT_PG -eq 1 ]] && cluster_pg_up
  [[ $WANT_REDIS -eq 1 ]] && redis_cluster_up
  if [[ $WANT_KAFKA -eq 1 ]]; then
    kafka_cluster_wait "$KAFKA_START_TIMEOUT"
    log "kafka: brokers ${CLUSTER_KAFKA_IDS[*]} in the metadata ($KAFKA_BOOTSTRAP) in $(( $(now) - t0 ))s"
    if [[ "${SKIP_TOPICS:-0}" != 1 ]]; then "$DEPLOY_DIR/create-topics.sh"; fi
    # brokers started now: the first one up leads everything until leaders are rebalanced
    [[ ${#CK_LAUNCHED[@]} -gt 0 ]] && ck_balance_leaders "$KAFKA_START_TIMEOUT"
  fi
  cluster_write_env
  log "cluster stack up in $(( $(now) - T_ALL ))s (state in $CLUSTER_DIR; settings: STACK_LAYOUT=cluster . deploy/env.sh or $CLUSTER_DIR/env)"
}

# ============================================================================
# main
# ============================================================================
if [[ "$STACK_LAYOUT" == cluster ]]; then cluster_main; exit 0; fi
install_packages
[[ "$STACK_LAYOUT" == secure ]] && secure_prepare
# Kafka is the slowest: launch its JVM first, start PG/Redis while it boots.
[[ $WANT_KAFKA -eq 1 ]] && kafka_launch
[[ $WANT_PG -eq 1 ]] && pg_up
[[ $WANT_REDIS -eq 1 ]] && redis_up
if [[ $WANT_KAFKA -eq 1 ]]; then
  kafka_wait
  [[ "$STACK_LAYOUT" == secure ]] && kafka_secure_grants
  if [[ "${SKIP_TOPICS:-0}" != 1 ]]; then
    # reuse the topic list from the readiness probe (saves one JVM start)
    KAFKA_TOPICS_LISTED="$KAFKA_READY_LIST" "$DEPLOY_DIR/create-topics.sh"
  fi
fi
if [[ "$STACK_LAYOUT" == secure ]]; then
  secure_write_env
  log "secure stack up in $(( $(now) - T_ALL ))s (STACK_DIR=$STACK_DIR, state in $SECURE_DIR; settings: STACK_LAYOUT=secure . deploy/env.sh)"
else
  log "stack up in $(( $(now) - T_ALL ))s (STACK_DIR=$STACK_DIR)"
fi
