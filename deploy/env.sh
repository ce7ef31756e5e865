# shellcheck shell=bash
# Defaults the workers and tests use to reach the local stack (deploy/stack-up.sh).
# Source it:  . deploy/env.sh      -- values already in your environment win.
export STACK_DIR="${STACK_DIR:-/var/tmp/stockpipe}"
export DATABASE_URL="${DATABASE_URL:-postgres://stock:stock@127.0.0.1:${PGPORT_STACK:-5432}/stock}"
export REDIS_URL="${REDIS_URL:-redis://${REDIS_PASSWORD:+:$REDIS_PASSWORD@}127.0.0.1:${REDIS_PORT:-6379}/0}"
export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:${KAFKA_PORT:-9092}}"
