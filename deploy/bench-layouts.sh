#!/usr/bin/env bash
# What TLS and authentication cost: `bench e2e` alternating between the plaintext and the
# secure layout (both brought up), ROUNDS rounds, each run with its own database, Redis
# database and topics; prints every run and the medians per layout (orders/s end to end,
# CPU µs per order in total and per process group, from /proc over the measured span).
#   bash deploy/bench-layouts.sh [ROUNDS] [bench e2e flags, e.g. --orders 100000 --mode stream]
# Needs the release binary: cargo build --release -p stock-bench
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
rounds="${1:-3}"
shift || true
bench="${CARGO_TARGET_DIR:-target}/release/bench"
[[ -x "$bench" ]] || { echo "no $bench: cargo build --release -p stock-bench" >&2; exit 2; }
STACK_LAYOUT=plain bash deploy/stack-up.sh >/dev/null
STACK_LAYOUT=secure bash deploy/stack-up.sh >/dev/null
runs="$(mktemp)"
trap 'rm -f "$runs"' EXIT
for round in $(seq 1 "$rounds"); do
  for layout in plain secure; do
    # A shell of its own per layout: env.sh keeps values already set.
    line="$(env -u DATABASE_URL -u REDIS_URL -u KAFKA_BROKERS STACK_LAYOUT="$layout" RUST_LOG=warn \
      bash -c '. deploy/env.sh && exec "$0" e2e "$@"' "$bench" "$@" | grep '^{' | head -n1)"
    printf '%s %s %s\n' "$layout" "$round" "$line" >>"$runs"
  done
done
python3 - "$runs" <<'EOF'
import json, statistics, sys
rows = {}
for raw in open(sys.argv[1]):
    layout, rnd, text = raw.split(" ", 2)
    f = json.loads(text)
    cpu = f.get("cpu") or {}
    secs = cpu.get("secs", {})
    n = f["orders"]
    per = {g: 1e6 * s / n for g, s in sorted(secs.items())}
    total = sum(per.values())
    print(f"{layout:6} round {rnd}: {f['e2e_rate']:9.0f} orders/s  cpu {total:5.1f} µs/order "
          f"{ {g: round(v, 1) for g, v in per.items()} }  ok={f['ok']}")
    rows.setdefault(layout, []).append((f["e2e_rate"], total, per, f["ok"]))
print()
med = {}
for layout, rs in rows.items():
    rate = statistics.median(r[0] for r in rs)
    cpu = statistics.median(r[1] for r in rs)
    groups = {g: round(statistics.median(r[2].get(g, 0.0) for r in rs), 1) for g in rs[0][2]}
    med[layout] = (rate, cpu)
    print(f"median {layout:6}: {rate:9.0f} orders/s  cpu {cpu:5.1f} µs/order {groups}  "
          f"all ok={all(r[3] for r in rs)}")
if "plain" in med and "secure" in med:
    (pr, pc), (sr, sc) = med["plain"], med["secure"]
    print(f"secure / plain: throughput {sr / pr:.2f}x, cpu per order {sc / pc:.2f}x")
EOF
