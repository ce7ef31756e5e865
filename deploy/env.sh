# shellcheck shell=bash
# Defaults the workers and tests use to reach the local stack (deploy/stack-up.sh).
# Source it:  . deploy/env.sh      -- values already in your environment win.
# STACK_LAYOUT=secure . deploy/env.sh -- the secure layout (TLS, SCRAM, ACL users): only
# file paths, never a password (the *_PASSWORD_FILE files hold them). stack-up.sh writes
# the same secure variables to $STACK_DIR/secure/env. Environment wins there too: do not
# source the plain layout's values into the same shell first.
# STACK_LAYOUT=cluster . deploy/env.sh -- the cluster layout (Redis Cluster 7001..7006,
# Kafka brokers 9292..9294, the plain layout's PostgreSQL); stack-up.sh writes the same
# to $STACK_DIR/cluster/env. REDIS_URL is one node (a cluster client discovers the rest),
# REDIS_CLUSTER_NODES all six (comma-separated URLs).
export STACK_DIR="${STACK_DIR:-/var/tmp/stockpipe}"
if [[ "${STACK_LAYOUT:-plain}" == secure ]]; then
  export STACK_LAYOUT=secure
  export KAFKA_BROKERS="${KAFKA_BROKERS:-localhost:${SECURE_KAFKA_PORT:-9192}}"
  export KAFKA_SECURITY_PROTOCOL="${KAFKA_SECURITY_PROTOCOL:-sasl_ssl}"
  export KAFKA_SASL_MECHANISM="${KAFKA_SASL_MECHANISM:-SCRAM-SHA-512}"
  export KAFKA_CA_FILE="${KAFKA_CA_FILE:-$STACK_DIR/secure/tls/ca.crt}"
  export KAFKA_USERNAME="${KAFKA_USERNAME:-stockpipe}"
  export KAFKA_PASSWORD_FILE="${KAFKA_PASSWORD_FILE:-$STACK_DIR/secure/secrets/kafka-worker.password}"
  export KAFKA_ADMIN_USERNAME="${KAFKA_ADMIN_USERNAME:-admin}"
  export KAFKA_ADMIN_PASSWORD_FILE="${KAFKA_ADMIN_PASSWORD_FILE:-$STACK_DIR/secure/secrets/kafka-admin.password}"
  export REDIS_URL="${REDIS_URL:-rediss://localhost:${SECURE_REDIS_PORT:-6380}/0}"
  export REDIS_CA_FILE="${REDIS_CA_FILE:-$STACK_DIR/secure/tls/ca.crt}"
  export REDIS_CERT_FILE="${REDIS_CERT_FILE:-$STACK_DIR/secure/tls/client.crt}"
  export REDIS_KEY_FILE="${REDIS_KEY_FILE:-$STACK_DIR/secure/tls/client.key}"
  export REDIS_USERNAME="${REDIS_USERNAME:-stockpipe-producer}"
  export REDIS_PASSWORD_FILE="${REDIS_PASSWORD_FILE:-$STACK_DIR/secure/secrets/redis-producer.password}"
  export REDIS_ADMIN_USERNAME="${REDIS_ADMIN_USERNAME:-stockpipe-admin}"
  export REDIS_ADMIN_PASSWORD_FILE="${REDIS_ADMIN_PASSWORD_FILE:-$STACK_DIR/secure/secrets/redis-admin.password}"
  export DATABASE_URL="${DATABASE_URL:-postgres://stock_consumer@localhost:${SECURE_PG_PORT:-5433}/stock?sslmode=verify-full}"
  export DATABASE_CA_FILE="${DATABASE_CA_FILE:-$STACK_DIR/secure/tls/ca.crt}"
  export DATABASE_PASSWORD_FILE="${DATABASE_PASSWORD_FILE:-$STACK_DIR/secure/secrets/pg-consumer.password}"
  export DATABASE_ADMIN_URL="${DATABASE_ADMIN_URL:-postgres://stock_migrator@localhost:${SECURE_PG_PORT:-5433}/stock?sslmode=verify-full}"
  export DATABASE_ADMIN_PASSWORD_FILE="${DATABASE_ADMIN_PASSWORD_FILE:-$STACK_DIR/secure/secrets/pg-migrator.password}"
  export TLS_OTHER_CA_FILE="${TLS_OTHER_CA_FILE:-$STACK_DIR/secure/tls/other-ca.crt}"
elif [[ "${STACK_LAYOUT:-plain}" == cluster ]]; then
  export STACK_LAYOUT=cluster
  _stack_k="${CLUSTER_KAFKA_PORT:-9292}" _stack_r="${CLUSTER_REDIS_PORT:-7001}"
  export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:$_stack_k,127.0.0.1:$((_stack_k + 1)),127.0.0.1:$((_stack_k + 2))}"
  export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:$_stack_r/0}"
  export REDIS_CLUSTER_NODES="${REDIS_CLUSTER_NODES:-redis://127.0.0.1:$_stack_r,redis://127.0.0.1:$((_stack_r + 1)),redis://127.0.0.1:$((_stack_r + 2)),redis://127.0.0.1:$((_stack_r + 3)),redis://127.0.0.1:$((_stack_r + 4)),redis://127.0.0.1:$((_stack_r + 5))}"
  export DATABASE_URL="${DATABASE_URL:-postgres://stock:stock@127.0.0.1:${PGPORT_STACK:-5432}/stock}"
  unset _stack_k _stack_r
else
  export DATABASE_URL="${DATABASE_URL:-postgres://stock:stock@127.0.0.1:${PGPORT_STACK:-5432}/stock}"
  export REDIS_URL="${REDIS_URL:-redis://${REDIS_PASSWORD:+:$REDIS_PASSWORD@}127.0.0.1:${REDIS_PORT:-6379}/0}"
  export KAFKA_BROKERS="${KAFKA_BROKERS:-127.0.0.1:${KAFKA_PORT:-9092}}"
fi
