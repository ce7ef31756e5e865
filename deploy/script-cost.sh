#!/usr/bin/env bash
# The reserve script's cost in instructions: runs `bench redis` against a Redis of its own
# under valgrind's callgrind and counts the instructions Redis executes over the
# `reserve_many` phase alone (counters zeroed when the bench announces that phase, dumped
# when it ends). Prints one line per bench binary:
#   <label> products=P orders=N instructions=I per_order=I/N
# An instruction count does not swing with the machine as time does (the same build
# repeats within about 1%, where `INFO commandstats` of the script swung ±15% on the shared
# box), so it compares two versions of a script on any machine, in one run.
#   bash deploy/script-cost.sh [--products P] [--orders N] [--keep DIR] LABEL=BENCH ...
# e.g. with the bench of the main branch copied to /tmp/base/bench before a change:
#   bash deploy/script-cost.sh base=/tmp/base/bench new=target/release/bench
# --keep DIR keeps each callgrind profile as DIR/<label>.callgrind (callgrind_annotate
# names Redis's functions when REDIS_SERVER is a build with symbols; Debian's is stripped).
# Needs valgrind (apt-get install valgrind) and redis-server (REDIS_SERVER, default the one
# on PATH); SCRIPT_COST_PORT (default 6391) is the port of the Redis it starts (4096
# databases: the bench picks one of its own).
set -euo pipefail
products=1000 orders=20000 keep=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --products) products="$2"; shift 2 ;;
    --orders) orders="$2"; shift 2 ;;
    --keep) keep="$2"; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
done
[[ $# -gt 0 ]] || { sed -n '2,17p' "$0" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "no valgrind: apt-get install valgrind" >&2; exit 2; }
server="${REDIS_SERVER:-redis-server}"
port="${SCRIPT_COST_PORT:-6391}"
work="$(mktemp -d)"
vg_pid=""
cleanup() {
  [[ -n "$vg_pid" ]] && kill "$vg_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && { echo "port $port is in use: set SCRIPT_COST_PORT" >&2; exit 1; }
valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$server" --port "$port" \
  --bind 127.0.0.1 --appendonly no --save "" --databases 4096 >"$work/valgrind.log" 2>&1 &
vg_pid=$!
for _ in $(seq 1 300); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  kill -0 "$vg_pid" 2>/dev/null || { cat "$work/valgrind.log" >&2; exit 1; }
  sleep 0.1
done
[[ -n "$keep" ]] && mkdir -p "$keep"
for spec in "$@"; do
  label="${spec%%=*}" bench="${spec#*=}"
  [[ -x "$bench" ]] || { echo "$label: no bench at $bench" >&2; exit 2; }
  redis-cli -p "$port" flushall >/dev/null
  log="$work/$label.log"
  REDIS_URL="redis://127.0.0.1:$port/0" "$bench" redis --orders "$orders" --orders-per-call 100 \
    --products "$products" --sold-out false >"$work/$label.out" 2>"$log" &
  bench_pid=$!
  until grep -q 'reserve_many' "$log"; do
    kill -0 "$bench_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.05
  done
  callgrind_control -z "$vg_pid" >/dev/null 2>&1
  wait "$bench_pid" || { cat "$log" >&2; exit 1; }
  rm -f "$work"/cg.out.*
  callgrind_control -d "$vg_pid" >/dev/null 2>&1
  dump="$(ls -t "$work"/cg.out.* | head -1)"
  ir="$(awk '/^(summary|totals):/ { print $2; exit }' "$dump")"
  [[ -n "$keep" ]] && cp "$dump" "$keep/$label.callgrind"
  echo "$label products=$products orders=$orders instructions=$ir per_order=$((ir / orders))"
done
