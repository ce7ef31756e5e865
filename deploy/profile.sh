#!/usr/bin/env bash
# Where the CPU of an order goes: runs a bench command (default `e2e --orders 300000 --mode
# stream`) on the plain layout and, once its worker processes run, samples them and the
# services with `perf record` (call stacks unwound from DWARF) for SECONDS. Writes to OUT
# (default bench-out/profile-<time>/):
#   <part>.folded   collapsed stacks (inferno-collapse-perf) of each part: producer,
#                   consumer, redis, postgres (every backend), kafka (its JVM frames
#                   resolved by async-profiler, loaded into the broker with jcmd and fetched
#                   once from Maven Central with mvn; without jcmd or mvn, perf as for the
#                   others, and the JVM frames are not resolved)
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
# The plain layout's settings: STACK_DIR, its Redis and Kafka pid files.
STACK_LAYOUT=plain
# shellcheck source=deploy/lib.sh
source "$here/lib.sh"
secs="${1:-8}"
shift || true
[[ $# -gt 0 ]] || set -- e2e --orders 300000 --mode stream
bench="${CARGO_TARGET_DIR:-target}/release/bench"
[[ -x "$bench" ]] || { echo "no $bench: cargo build --release -p stock-bench -p stock-producer -p stock-consumer" >&2; exit 2; }
command -v perf >/dev/null || { echo "no perf: apt-get install linux-perf" >&2; exit 2; }
command -v inferno-collapse-perf >/dev/null || { echo "no inferno: cargo install inferno" >&2; exit 2; }
out="${OUT:-bench-out/profile-$(date +%Y%m%d-%H%M%S)}"
# async_profiler_lib -> the path of async-profiler's agent (ASYNC_PROFILER_VERSION, default
# 4.1), fetched once into $STACK_DIR/tools; fails without jcmd or mvn
async_profiler_lib() {
  local v="${ASYNC_PROFILER_VERSION:-4.1}" dir so
  dir="$STACK_DIR/tools/async-profiler-$v"
  so="$dir/linux-x64/libasyncProfiler.so"
  command -v jcmd >/dev/null || return 1
  if [[ ! -s "$so" ]]; then
    command -v mvn >/dev/null || return 1
    mkdir -p "$dir"
    (cd "$dir" && mvn -q -B dependency:copy -DoutputDirectory="$dir" \
      -Dartifact="tools.profiler:async-profiler:$v:jar:linux-x64") >"$dir/mvn.log" 2>&1 || return 1
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$dir/async-profiler-$v-linux-x64.jar" "$dir" || return 1
  fi
  echo "$so"
}
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
  [redis]="$(live_pidfile_pid "$REDIS_PIDFILE" redis-server)"
  [postgres]="$(pids -x postgres)"
  [kafka]="$(live_pidfile_pid "$KAFKA_PIDFILE" kafka.Kafka)"
)
recs=()
# The broker with async-profiler (its Java frames by name): started and stopped with jcmd.
ap_so="$(async_profiler_lib || true)"
if [[ -n "$ap_so" && -n "${parts[kafka]}" ]] &&
  jcmd "${parts[kafka]}" JVMTI.agent_load "$ap_so" '"start,event=cpu,interval=2ms"' >"$out/kafka.ap.err" 2>&1; then
  kafka_ap="${parts[kafka]}"
  unset 'parts[kafka]'
fi
for part in "${!parts[@]}"; do
  [[ -n "${parts[$part]}" ]] || { echo "no $part process: skipped" >&2; continue; }
  perf record -q -F 499 --call-graph dwarf,16384 -p "${parts[$part]}" -o "$out/$part.data" \
    -- sleep "$secs" 2>"$out/$part.perf.err" &
  recs+=($!)
done
wait "${recs[@]}" || true
if [[ -n "${kafka_ap:-}" ]]; then
  # jcmd parses key=value itself: the agent's options go quoted, as one value.
  jcmd "$kafka_ap" JVMTI.agent_load "$ap_so" "\"stop,file=$out/kafka.folded\"" >>"$out/kafka.ap.err" 2>&1 ||
    echo "async-profiler did not stop: $out/kafka.ap.err" >&2
  [[ -s "$out/kafka.folded" ]] ||
    echo "no Kafka profile: async-profiler's messages are in the broker's kafka.out" >&2
fi
wait "$bench_pid" || echo "the bench failed: $out/bench.txt" >&2
# top_of DATA KEY N -- the N first lines of perf's self-time report sorted by KEY (head
# closing the pipe early is not an error)
top_of() {
  { perf report -i "$1" --no-children --sort "$2" --stdio -g none 2>/dev/null || true; } |
    grep -E '^ +[0-9]' | head -"$3" || true
}
: >"$out/top.txt"
if [[ -s "$out/kafka.folded" ]]; then
  inferno-flamegraph --title "kafka (async-profiler): $* ($secs s)" <"$out/kafka.folded" >"$out/kafka.svg"
  {
    echo "== kafka (async-profiler): hottest frames (self), share of its samples"
    awk '{ n = $NF; sub(/ [0-9]+$/, ""); k = split($0, f, ";"); self[f[k]] += n; all += n }
      END { for (s in self) printf "%8.2f%%  %s\n", 100 * self[s] / all, s }' "$out/kafka.folded" |
      sort -rn | head -25 || true
    echo
  } >>"$out/top.txt"
fi
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
