#!/usr/bin/env bash
# Stop the local service stack started by deploy/stack-up.sh. Data is kept.
# Safe to run when (some) services are already stopped.
#
# usage: deploy/stack-down.sh [pg] [redis] [kafka]     (no args = all three)
#        STACK_LAYOUT=secure deploy/stack-down.sh [...]  stops the secure layout's
#        processes only (the plain ones keep running), keeps its data, certificates
#        and passwords
#        STACK_LAYOUT=cluster deploy/stack-down.sh [redis] [kafka]  stops the cluster
#        layout's six Redis nodes (replicas first, then the masters) and three brokers
#        (SIGTERM, together); keeps their data. Never PostgreSQL: it is the plain
#        layout's (`pg` is accepted and does nothing).
#
# env: STACK_DIR, KAFKA_STOP_TIMEOUT (default 60 s before SIGKILL),
#      REDIS_PASSWORD (if Redis was started with one)
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
if [[ "$STACK_LAYOUT" == cluster ]]; then
  # shellcheck source=deploy/lib-cluster.sh
  source "$DEPLOY_DIR/lib-cluster.sh"
fi

usage() { print_usage "${BASH_SOURCE[0]}"; }
parse_services "$@" || { usage; exit 2; }

rc=0
if [[ -d "$STACK_CTL_DIR" ]]; then
  stack_lock
fi

kafka_down() {
  local pid t0; t0=$(now)
  pid="$(pidfile_pid "$KAFKA_PIDFILE")"
  if ! pid_alive "$pid" kafka.Kafka; then
    log "kafka: not running"; rm -f "$KAFKA_PIDFILE"; return 0
  fi
  log "kafka: stopping (pid $pid, SIGTERM)"
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_pid_exit "$pid" "$KAFKA_STOP_TIMEOUT"; then
    warn "kafka: still running after ${KAFKA_STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" 10 || { warn "kafka: pid $pid survived SIGKILL"; return 1; }
  fi
  rm -f "$KAFKA_PIDFILE"
  log "kafka: stopped in $(( $(now) - t0 ))s"
}

redis_down() {
  local pid t0; t0=$(now)
  pid="$(pidfile_pid "$REDIS_PIDFILE")"
  if ! pid_alive "$pid" redis-server; then
    log "redis: not running"; return 0
  fi
  log "redis: stopping (pid $pid, SHUTDOWN SAVE)"
  # SHUTDOWN fsyncs the AOF; SAVE also writes dump.rdb. The connection is
  # closed by the server, so redis-cli's exit status is not meaningful.
  redis_cli shutdown save >/dev/null 2>&1 || true
  if ! wait_pid_exit "$pid" 30; then
    warn "redis: still running after 30s, sending SIGTERM (redis saves on SIGTERM too)"
    kill -TERM "$pid" 2>/dev/null || true
    wait_pid_exit "$pid" 30 || { kill -KILL "$pid" 2>/dev/null || true; warn "redis: killed"; }
  fi
  log "redis: stopped in $(( $(now) - t0 ))s"
}

pg_down() {
  local t0 st=0 PGBIN; t0=$(now)
  if [[ ! -s "$PGDATA_STACK/PG_VERSION" ]]; then log "pg: not running (no cluster)"; return 0; fi
  PGBIN="$(pg_bindir)" || die "PostgreSQL binaries not found"
  (cd / && as_postgres "$PGBIN/pg_ctl" -D "$PGDATA_STACK" status) >/dev/null 2>&1 || st=$?
  if [[ $st -ne 0 ]]; then log "pg: not running"; return 0; fi
  log "pg: stopping (pg_ctl stop -m fast)"
  if ! (cd / && as_postgres "$PGBIN/pg_ctl" -D "$PGDATA_STACK" stop -m fast -w -t 60) >/dev/null 2>&1; then
    warn "pg: fast shutdown did not finish in 60s, trying immediate"
    (cd / && as_postgres "$PGBIN/pg_ctl" -D "$PGDATA_STACK" stop -m immediate -w -t 30) >/dev/null 2>&1 \
      || { warn "pg: could not stop"; return 1; }
  fi
  log "pg: stopped in $(( $(now) - t0 ))s"
}

if [[ "$STACK_LAYOUT" == cluster ]]; then
  [[ $WANT_KAFKA -eq 1 ]] && { kafka_cluster_down || rc=1; }
  [[ $WANT_REDIS -eq 1 ]] && { redis_cluster_down || rc=1; }
  [[ $WANT_PG -eq 1 ]] && log "pg: not stopped (the plain layout's PostgreSQL: deploy/stack-down.sh pg)"
  exit $rc
fi

# reverse start order: Kafka first (clients of nothing), then Redis, then PG
[[ $WANT_KAFKA -eq 1 ]] && { kafka_down || rc=1; }
[[ $WANT_REDIS -eq 1 ]] && { redis_down || rc=1; }
[[ $WANT_PG -eq 1 ]] && { pg_down || rc=1; }
exit $rc
