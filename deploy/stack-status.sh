#!/usr/bin/env bash
# One line per service: process running/stopped and whether it answers.
# Exit 0 if every (selected) service is up and answering, 1 otherwise.
#
# usage: deploy/stack-status.sh [pg] [redis] [kafka]   (no args = all three)
#        STACK_LAYOUT=secure deploy/stack-status.sh [...]  the secure layout: every check
#        goes through TLS with the layout's admin users (and a tls line: certificates)
#        STACK_LAYOUT=cluster deploy/stack-status.sh [...]  the cluster layout, one line
#        per node: Redis role (master: slot ranges, keys, replicas; replica: the master it
#        follows, link state), the cluster state; each Kafka broker (process, in the
#        metadata, controller quorum role: which one is the active controller), the
#        partition leaders per broker; PostgreSQL is the plain layout's
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

parse_services "$@" || { print_usage "${BASH_SOURCE[0]}"; exit 2; }
rc=0

if [[ "$STACK_LAYOUT" == cluster ]]; then
  # shellcheck source=deploy/lib-cluster.sh
  source "$DEPLOY_DIR/lib-cluster.sh"
  cluster_status || rc=1
  exit $rc
fi

line() { printf '%-9s %-8s %s\n' "$1" "$2" "$3"; }

if [[ "$STACK_LAYOUT" == secure ]]; then
  if [[ -s "$TLS_DIR/ca.crt" && -s "$TLS_DIR/server.crt" ]] \
     && openssl verify -CAfile "$TLS_DIR/ca.crt" "$TLS_DIR/server.crt" "$TLS_DIR/client.crt" >/dev/null 2>&1; then
    if openssl x509 -in "$TLS_DIR/server.crt" -noout -checkend 86400 >/dev/null; then
      line tls ok "$TLS_DIR: server/client certificates signed by ca.crt, server valid until $(openssl x509 -in "$TLS_DIR/server.crt" -noout -enddate | cut -d= -f2)"
    else
      line tls expiring "$TLS_DIR/server.crt expires within a day (remove it and re-run $STACK_UP_CMD)"; rc=1
    fi
  else
    line tls missing "(no valid certificates in $TLS_DIR: run $STACK_UP_CMD)"; rc=1
  fi
fi

if [[ $WANT_PG -eq 1 ]]; then
  pid="" PGBIN="$(pg_bindir 2>/dev/null || true)"
  [[ -s "$PGDATA_STACK/postmaster.pid" ]] && pid="$(head -n1 "$PGDATA_STACK/postmaster.pid" | tr -dc '0-9')"
  if pid_alive "$pid" postgres && [[ "$STACK_LAYOUT" == secure ]]; then
    if [[ -n "$PGBIN" ]] && [[ "$(pg_tls_query "$PG_USER" "$PG_PASSWORD_FILE" 'select 1' 2>/dev/null || true)" == 1 ]] \
       && [[ "$(pg_tls_query "$PG_CONSUMER_USER" "$PG_CONSUMER_PASSWORD_FILE" 'select 1' 2>/dev/null || true)" == 1 ]]; then
      line postgres running "pid $pid, answers over TLS (verify-full) as $PG_USER and $PG_CONSUMER_USER on $PG_HOST:$PG_PORT/$PG_DB"
    else
      line postgres running "pid $pid, NOT answering a TLS query as $PG_USER/$PG_CONSUMER_USER on $PG_HOST:$PG_PORT"; rc=1
    fi
  elif pid_alive "$pid" postgres; then
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
      if [[ "$STACK_LAYOUT" == secure ]]; then
        line redis running "pid $pid, PONG over TLS (client certificate, user $REDIS_ADMIN_USER) on localhost:$REDIS_PORT"
      else
        line redis running "pid $pid, PONG on 127.0.0.1:$REDIS_PORT"
      fi
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
      line kafka running "pid $pid, metadata OK on $KAFKA_BOOTSTRAP$([[ "$STACK_LAYOUT" == secure ]] && echo ' (SASL_SSL as admin)'), $(grep -c . <<<"$topics" || true) topics"
    else
      line kafka running "pid $pid, NOT answering on $KAFKA_BOOTSTRAP"; rc=1
    fi
  else
    line kafka stopped "(data $KAFKA_DATA)"; rc=1
  fi
fi
exit $rc
