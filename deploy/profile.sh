#!/usr/bin/env bash
# Where the CPU of an order goes: runs a bench command (default `e2e --orders 300000 --mode
# stream`) on the plain layout and, once its worker processes run, samples them and the
# services with `perf record` (call stacks unwound from DWARF) for SECONDS. Writes to OUT
# (default bench-out/profile-<time>/):
#   <part>.folded   collapsed stacks (inferno-collapse-perf) of each part: producer,
#                   consumer, redis, postgres (every backend), kafka (JVM frames are not
#                   resolved: its figure is the share of each native library)
#   <part>.svg      a flame graph of each (inferno-flamegraph)
#   top.txt         each part's 25 hottest functions by self time, and its share of the
#                   samples by shared object (which library, the kernel)
#   bench.txt       the bench's own output (its per-process CPU figures)
# The workers are found as the children of the bench process named producer and consumer.
#   bash deploy/profile.sh [SECONDS] [bench args ...]
# Needs perf (linux-perf), the release binaries (cargo build --release -p stock-bench -p
# stock-producer -p stock-consumer) and inferno (cargo install inferno), run as root.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
secs="${1:-8}"
shift || true
[[ $# -gt 0 ]] || set -- e2e --orders 300000 --mode stream
bench="${CARGO_TARGET_DIR:-target}/release/bench"
[[ -x "$bench" ]] || { echo "no $bench: cargo build --release -p stock-bench -p stock-producer -p stock-consumer" >&2; exit 2; }
command -v perf >/dev/null || { echo "no perf: apt-get install linux-perf" >&2; exit 2; }
command -v inferno-collapse-perf >/dev/null || { echo "no inferno: cargo install inferno" >&2; exit 2; }
out="${OUT:-bench-out/profile-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
STACK_LAYOUT=plain bash deploy/stack-up.sh >/dev/null
env -u DATABASE_URL -u REDIS_URL -u REDIS_CLUSTER_NODES -u KAFKA_BROKERS STACK_LAYOUT=plain \
  RUST_LOG=warn bash -c '. deploy/env.sh && exec "$0" "$@"' "$bench" "$@" >"$out/bench.txt" 2>&1 &
bench_pid=$!
# Wait for the workers (children of the bench), then for the orders to flow.
deadline=$((SECONDS + 120))
while :; do
  prod="$(pgrep -P "$bench_pid" -x producer || true)"
  cons="$(pgrep -P "$bench_pid" -x consumer || true)"
  [[ -n "$prod" && -n "$cons" ]] && break
  kill -0 "$bench_pid" 2>/dev/null || { echo "the bench ended before its workers ran: $out/bench.txt" >&2; exit 1; }
  ((SECONDS < deadline)) || { echo "no worker processes after 120 s" >&2; kill "$bench_pid"; exit 1; }
  sleep 0.2
done
sleep 3
pids() { pgrep -d, "$@" || true; }
declare -A parts=(
  [producer]="$(tr '\n' , <<<"$prod" | sed 's/,$//')"
  [consumer]="$(tr '\n' , <<<"$cons" | sed 's/,$//')"
  [redis]="$(pids -x redis-server)"
  [postgres]="$(pids -x postgres)"
  [kafka]="$(pids -f kafka.Kafka)"
)
recs=()
for part in "${!parts[@]}"; do
  [[ -n "${parts[$part]}" ]] || { echo "no $part process: skipped" >&2; continue; }
  perf record -q -F 499 --call-graph dwarf,16384 -p "${parts[$part]}" -o "$out/$part.data" \
    -- sleep "$secs" 2>"$out/$part.perf.err" &
  recs+=($!)
done
wait "${recs[@]}" || true
wait "$bench_pid" || echo "the bench failed: $out/bench.txt" >&2
# top_of DATA KEY N -- the N first lines of perf's self-time report sorted by KEY (head
# closing the pipe early is not an error)
top_of() {
  { perf report -i "$1" --no-children --sort "$2" --stdio -g none 2>/dev/null || true; } |
    grep -E '^ +[0-9]' | head -"$3" || true
}
: >"$out/top.txt"
for part in producer consumer redis postgres kafka; do
  [[ -s "$out/$part.data" ]] || continue
  perf script -i "$out/$part.data" 2>/dev/null | inferno-collapse-perf >"$out/$part.folded"
  inferno-flamegraph --title "$part: $* ($secs s)" <"$out/$part.folded" >"$out/$part.svg"
  {
    echo "== $part: samples by shared object"
    top_of "$out/$part.data" dso 8
    echo "== $part: hottest functions (self)"
    top_of "$out/$part.data" sym 25
    echo
  } >>"$out/top.txt"
  rm -f "$out/$part.data"
done
echo "profile: $out (top.txt, <part>.svg)"
