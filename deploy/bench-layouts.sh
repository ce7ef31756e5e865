#!/usr/bin/env bash
# `bench e2e` alternating between layouts (default: the plaintext and the secure one, what
# TLS and authentication cost), ROUNDS rounds, each run with its own database, Redis
# database and topics; prints every run and the medians per layout (orders/s end to end,
# CPU µs per order in total and per process group, from /proc over the measured span).
# The cluster layout (Redis Cluster, three Kafka brokers) adds, per run and as medians, each
# Redis master's share of the commands (INFO commandstats over the span) and CPU µs per
# order of each Redis node and Kafka broker.
#   BENCH_LAYOUTS="plain cluster" bash deploy/bench-layouts.sh [ROUNDS] [bench e2e flags,
#     e.g. --orders 100000 --mode stream --producers 2 --consumers 2]
# BENCH_LAYOUTS: layouts to alternate, among plain, secure and cluster (default "plain
# secure"). plain and secure are brought up (deploy/stack-up.sh) as before; the cluster
# layout is only checked (STACK_LAYOUT=cluster deploy/stack-status.sh): bring it up
# yourself. A run on the cluster empties it (FLUSHALL on every master): each cluster step
# holds the lock $STOCKPIPE_CLUSTER_LOCK (default /tmp/stockpipe-cluster.lock, the lock of
# everything that uses the cluster) for its own duration; do not run this script under it.
# Needs the release binary: cargo build --release -p stock-bench
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here/.."
rounds="${1:-3}"
shift || true
layouts="${BENCH_LAYOUTS:-plain secure}"
lock="${STOCKPIPE_CLUSTER_LOCK:-/tmp/stockpipe-cluster.lock}"
bench="${CARGO_TARGET_DIR:-target}/release/bench"
[[ -x "$bench" ]] || { echo "no $bench: cargo build --release -p stock-bench" >&2; exit 2; }
for layout in $layouts; do
  case "$layout" in
    plain|secure) STACK_LAYOUT="$layout" bash deploy/stack-up.sh >/dev/null ;;
    cluster)
      flock "$lock" env STACK_LAYOUT=cluster bash deploy/stack-status.sh >/dev/null || {
        echo "the cluster layout is not (fully) up: STACK_LAYOUT=cluster bash deploy/stack-status.sh" >&2; exit 2; } ;;
    *) echo "BENCH_LAYOUTS: unknown layout '$layout' (plain, secure, cluster)" >&2; exit 2 ;;
  esac
done
runs="$(mktemp)"
trap 'rm -f "$runs"' EXIT
for round in $(seq 1 "$rounds"); do
  for layout in $layouts; do
    # A shell of its own per layout: env.sh keeps values already set.
    # shellcheck disable=SC2016 # $0 and $@ are the inner shell's
    run=(env -u DATABASE_URL -u REDIS_URL -u REDIS_CLUSTER_NODES -u KAFKA_BROKERS
      STACK_LAYOUT="$layout" RUST_LOG=warn
      bash -c '. deploy/env.sh && exec "$0" e2e "$@"' "$bench" "$@")
    [[ "$layout" == cluster ]] && run=(flock "$lock" "${run[@]}")
    line="$("${run[@]}" | grep '^{' | head -n1)"
    [[ -n "$line" ]] || { echo "$layout round $round: no figures (bench failed?)" >&2; exit 1; }
    printf '%s %s %s\n' "$layout" "$round" "$line" >>"$runs"
  done
done
python3 - "$runs" <<'EOF'
import json, statistics, sys
rows = {}
def node_cpu(f, n):
    """CPU µs/order of each node of the cluster layout: redis:<port> (M/R), kafka:<port>."""
    c, nodes = f.get("cluster"), (f.get("cpu") or {}).get("nodes", {})
    if not c:
        return {}
    out = {}
    for port, role in c.get("redis_nodes", []):
        out[f"redis:{port} {'M' if role == 'master' else 'R'}"] = 1e6 * nodes.get(f"redis:{port}", 0.0) / n
    for port in c.get("kafka_ports", []):
        out[f"kafka:{port}"] = 1e6 * nodes.get(f"kafka:{port}", 0.0) / n
    return out
def masters(f):
    """Per master port: (calls share, usec share, calls, evalsha calls)."""
    return {str(m["port"]): (m["calls_share"], m["usec_share"], m["calls"], m["evalsha_calls"])
            for m in (f.get("cluster") or {}).get("masters", [])}
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
    nc, ms = node_cpu(f, n), masters(f)
    if nc:
        print(f"{'':6}   per node µs/order: " + ", ".join(f"{k} {v:.1f}" for k, v in nc.items()))
    if ms:
        print(f"{'':6}   per master calls (share; usec share): " + " / ".join(
            f"{p} {c} ({100 * cs:.0f}%; {100 * us:.0f}%)" for p, (cs, us, c, _) in ms.items()))
    rows.setdefault(layout, []).append((f["e2e_rate"], total, per, f["ok"], nc, ms))
print()
med = {}
for layout, rs in rows.items():
    rate = statistics.median(r[0] for r in rs)
    cpu = statistics.median(r[1] for r in rs)
    groups = {g: round(statistics.median(r[2].get(g, 0.0) for r in rs), 1) for g in rs[0][2]}
    med[layout] = (rate, cpu)
    print(f"median {layout:6}: {rate:9.0f} orders/s  cpu {cpu:5.1f} µs/order {groups}  "
          f"all ok={all(r[3] for r in rs)}")
    # Nodes and masters by port, over the runs where each was one (a failover between
    # runs changes which ports are masters).
    nodes = sorted({k for r in rs for k in r[4]})
    if nodes:
        print(f"{'':15}per node µs/order: " + ", ".join(
            f"{k} {statistics.median(r[4][k] for r in rs if k in r[4]):.1f}" for k in nodes))
    ports = sorted({p for r in rs for p in r[5]})
    if ports:
        print(f"{'':15}per master share of calls / usec: " + " / ".join(
            f"{p} {100 * statistics.median(r[5][p][0] for r in rs if p in r[5]):.0f}%"
            f" / {100 * statistics.median(r[5][p][1] for r in rs if p in r[5]):.0f}%"
            f" (in {sum(p in r[5] for r in rs)} runs)" for p in ports))
if "plain" in med and "secure" in med:
    (pr, pc), (sr, sc) = med["plain"], med["secure"]
    print(f"secure / plain: throughput {sr / pr:.2f}x, cpu per order {sc / pc:.2f}x")
if "plain" in med and "cluster" in med:
    (pr, pc), (cr, cc) = med["plain"], med["cluster"]
    print(f"cluster / plain: throughput {cr / pr:.2f}x, cpu per order {cc / pc:.2f}x")
EOF
