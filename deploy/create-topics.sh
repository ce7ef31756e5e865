#!/usr/bin/env bash
# Create the pipeline topics on the local Kafka if they are missing.
#
# usage: deploy/create-topics.sh [prefix]
#   prefix is prepended to every topic name (e.g. "t42." -> t42.orders).
#
# env: PARTITIONS (default 4; 12 on the cluster layout), ORDERS_TOPIC (orders),
#      DEDUCT_TOPIC (stock.deduct), COMPENSATE_TOPIC (stock.compensate),
#      RESULTS_TOPIC (stock.results), DLQ_TOPIC (stock.dlq), KAFKA_PORT (9092), STACK_DIR,
#      STACK_LAYOUT=secure: on the secure broker (localhost:9192, as admin over SASL_SSL),
#      STACK_LAYOUT=cluster: on the three brokers (127.0.0.1:9292..9294).
# Replication factor 1 (single node); 3 on the cluster layout (min.insync.replicas 2).
set -euo pipefail
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"

case "${1:-}" in -h|--help) print_usage "${BASH_SOURCE[0]}"; exit 0 ;; esac
prefix="${1:-}"
if [[ "$STACK_LAYOUT" == cluster ]]; then
  PARTITIONS="${PARTITIONS:-12}" REPLICATION_FACTOR=3
else
  PARTITIONS="${PARTITIONS:-4}" REPLICATION_FACTOR=1
fi
[[ "$PARTITIONS" =~ ^[1-9][0-9]*$ ]] || die "PARTITIONS must be a positive integer (got '$PARTITIONS')"

topics=(
  "${prefix}${ORDERS_TOPIC:-orders}"
  "${prefix}${DEDUCT_TOPIC:-stock.deduct}"
  "${prefix}${COMPENSATE_TOPIC:-stock.compensate}"
  "${prefix}${RESULTS_TOPIC:-stock.results}"
  "${prefix}${DLQ_TOPIC:-stock.dlq}"
)

kafka_libs_ok || die "Kafka jars missing in $KAFKA_LIBS; run $STACK_UP_CMD kafka first"

t0=$(now)
if [[ -n "${KAFKA_TOPICS_LISTED:-}" ]]; then
  existing="$KAFKA_TOPICS_LISTED"   # handed over by stack-up.sh's readiness probe
else
  existing="$(kafka_list_topics 2>"$KAFKA_DIR/create-topics.err")" || {
    cat "$KAFKA_DIR/create-topics.err" >&2
    die "topics: cannot list topics on $KAFKA_BOOTSTRAP (is Kafka up? $STACK_UP_CMD kafka)"
  }
fi

missing=()
for t in "${topics[@]}"; do
  grep -qxF -- "$t" <<<"$existing" || missing+=("$t")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  log "topics: all ${#topics[@]} present (${topics[*]})"
  exit 0
fi

# One JVM per topic (TopicCommand takes a single --topic); run them two at a
# time, which is what a 2-core box can usefully do.
conf="$(kafka_client_conf)"
errdir="$(mktemp -d)"
trap 'rm -rf "$errdir"' EXIT
create_one() {
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP" \
    --command-config "$conf" --create --if-not-exists --topic "$1" \
    --partitions "$PARTITIONS" --replication-factor "$REPLICATION_FACTOR" >"$errdir/$1.out" 2>&1
}
pids=() names=() failed=()
for t in "${missing[@]}"; do
  create_one "$t" & pids+=($!); names+=("$t")
  if [[ ${#pids[@]} -ge ${TOPIC_PARALLELISM:-2} ]]; then
    wait "${pids[0]}" || failed+=("${names[0]}")
    pids=("${pids[@]:1}"); names=("${names[@]:1}")
  fi
done
for i in "${!pids[@]}"; do wait "${pids[$i]}" || failed+=("${names[$i]}"); done

if [[ ${#failed[@]} -gt 0 ]]; then
  for t in "${failed[@]}"; do echo "--- $t:" >&2; cat "$errdir/$t.out" >&2; done
  die "topics: failed to create: ${failed[*]}"
fi
log "topics: created ${missing[*]} ($PARTITIONS partitions, rf $REPLICATION_FACTOR) in $(( $(now) - t0 ))s"
