#!/usr/bin/env bash
# The whole test suite: brings the local stack up (idempotent), checks formatting and lints,
# builds the worker binaries (the crash tests run them as processes), runs every test.
#   bash deploy/test.sh [extra cargo test args]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
STACK_LAYOUT=plain bash deploy/stack-up.sh
# The secure layout runs beside the plain one (TLS, SCRAM, ACL users; its own ports).
STACK_LAYOUT=secure bash deploy/stack-up.sh
# And the cluster layout (Redis Cluster 3+3, three Kafka brokers): tests/kafka_cluster.rs
# runs the workers over its brokers.
STACK_LAYOUT=cluster bash deploy/stack-up.sh
# shellcheck source=deploy/env.sh
. deploy/env.sh
# Topics of earlier test runs that were cut short (a finished test deletes its own): a
# broker holding thousands of them takes minutes to restart, and the nemesis test restarts it.
# On every layout's brokers; the JVM tools run side by side.
delete_test_topics() {  # LAYOUT
  STACK_LAYOUT="$1" bash -c 'set -euo pipefail; . deploy/lib.sh; kafka_delete_topics "t-[0-9a-f]{12}\..*"' \
    || echo "test.sh: could not delete leftover test topics ($1 layout)" >&2
}
delete_test_topics plain &
plain_cleanup=$!
delete_test_topics cluster &
cluster_cleanup=$!
delete_test_topics secure
wait "$plain_cleanup" "$cluster_cleanup"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo build --workspace --bins --quiet
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
# Every test binary runs even after one fails, so that one failure hides no other.
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
# The core end-to-end tests again on the secure layout (TLS, SCRAM, ACL users, the
# consumer's least-privilege role), in a shell of their own: env.sh keeps values already set.
secure_tests=(--test pipeline --test crash --test limits)
env -u DATABASE_URL -u REDIS_URL -u KAFKA_BROKERS STACK_LAYOUT=secure \
  bash -c '. deploy/env.sh && exec cargo test -p stock-e2e "$@"' secure "${secure_tests[@]}" "$@" \
  2>&1 | tee -a "$log" || status=$?
# One closing line for the whole run (cargo prints one summary per test binary).
grep -E '^test result' "$log" | awk '{p += $4; f += $6; i += $8} END {printf "tests: %d passed, %d failed, %d skipped\n", p, f, i}'
exit "$status"
