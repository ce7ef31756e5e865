#!/usr/bin/env bash
# One line per service: process running/stopped and whether it answers.
# Exit 0 if every (selected) service is up and answering, 1 otherwise.
#
# usage: deploy/stack-status.sh [pg] [redis] [kafka]   (no args = all three)
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

parse_services "$@" || { print_usage "${BASH_SOURCE[0]}"; exit 2; }
rc=0

line() { printf '%-9s %-8s %s\n' "$1" "$2" "$3"; }

if [[ $WANT_PG -eq 1 ]]; then
  pid="" PGBIN="$(pg_bindir 2>/dev/null || true)"
  [[ -s "$PGDATA_STACK/postmaster.pid" ]] && pid="$(head -n1 "$PGDATA_STACK/postmaster.pid" | tr -dc '0-9')"
  if pid_alive "$pid" postgres; then
    if [[ -n "$PGBIN" ]] && PGPASSWORD="$PG_PASSWORD" PGCONNECT_TIMEOUT=3 "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PG_PORT" \
         -U "$PG_USER" -d "$PG_DB" -tAc 'select 1' 2>/dev/null | grep -qx 1; then
      line postgres running "pid $pid, answers as $PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
    else
      line postgres running "pid $pid, NOT answering a query as $PG_USER on 127.0.0.1:$PG_PORT"; rc=1
    fi
  else
    line postgres stopped "(data $PGDATA_STACK)"; rc=1
  fi
fi

if [[ $WANT_REDIS -eq 1 ]]; then
  pid="$(pidfile_pid "$REDIS_PIDFILE")"
  if pid_alive "$pid" redis-server; then
    if [[ "$(redis_cli ping 2>/dev/null || true)" == PONG ]]; then
      line redis running "pid $pid, PONG on 127.0.0.1:$REDIS_PORT"
    else
      line redis running "pid $pid, NOT answering PING on 127.0.0.1:$REDIS_PORT"; rc=1
    fi
  else
    line redis stopped "(dir $REDIS_DIR)"; rc=1
  fi
fi

if [[ $WANT_KAFKA -eq 1 ]]; then
  pid="$(pidfile_pid "$KAFKA_PIDFILE")"
  if pid_alive "$pid" kafka.Kafka; then
    if port_open "$KAFKA_PORT" && kafka_libs_ok \
       && topics="$(KAFKA_TOOL_TIMEOUT=20 kafka_list_topics 2>/dev/null)"; then
      line kafka running "pid $pid, metadata OK on $KAFKA_BOOTSTRAP, $(grep -c . <<<"$topics" || true) topics"
    else
      line kafka running "pid $pid, NOT answering on $KAFKA_BOOTSTRAP"; rc=1
    fi
  else
    line kafka stopped "(data $KAFKA_DATA)"; rc=1
  fi
fi
exit $rc
