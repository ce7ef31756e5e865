#!/usr/bin/env bash
# Faults on the cluster layout (STACK_LAYOUT=cluster deploy/stack-up.sh), for tests and
# the nemesis. Each command waits for its outcome up to CLUSTER_FAULT_TIMEOUT seconds
# (default 60; broker starts: CLUSTER_KAFKA_START_TIMEOUT, 180) and otherwise fails
# (exit 1, with log tails). Progress goes to stderr; stdout holds only the result named
# below. Re-running a command on a node already in the wanted state only waits again.
# Always acts on the cluster layout, whatever STACK_LAYOUT says.
#
# usage: deploy/cluster-fault.sh COMMAND [ARGS]
#   kill-redis-master [PORT]  kill -9 the Redis master on PORT (default: the first master,
#            by port, with a live replica). Waits until a replica has taken over its slots:
#            every surviving node reports cluster_state:ok with 16384 slots ok, and none
#            of them still gives the slots to the killed node. stdout: the killed port.
#            Refuses a master without a live replica (its slots would stay unserved).
#   start-redis PORT  start a stopped node with its data (a node whose nodes.conf is gone
#            is added as a replica). Waits until no node flags it failing, every live node
#            is ok, and, if it is a replica, its replication link is up: a killed master
#            whose replica was promoted comes back as that replica's replica.
#            stdout: "master" or "replica <port of its master>".
#   restart-redis-empty PORT  kill -9 the node, delete its data (appendonlydir/, dump.rdb;
#            nodes.conf is kept) and start it at once (back in ~0.1 s, well within the 2 s
#            node timeout). Observed with a master (Redis 7.0): nobody notices the outage,
#            so no failover: it is the master of the same slots again, with no keys, and
#            serves them (GET of an old key: nil). Its replica's partial resync is refused
#            (new replication id); it keeps its old copy until the full resync starts
#            (~5 s, repl-diskless-sync-delay), then flushes it: the shard's data is gone on
#            both. (A replica restarted empty simply resyncs from its master.) Waits as
#            start-redis, then until its replicas have resynced from it. stdout: as start-redis.
#   kill-redis-shard PORT  kill -9 the replicas of the master on PORT, then the master: no
#            failover can happen, its slots are served by nobody (the other masters keep
#            serving theirs: cluster-require-full-coverage no). Does not wait. stdout: the
#            killed ports, master first. Bring it back with start-redis (master first).
#   kill-broker ID   kill -9 Kafka broker ID (1..3). Waits until the metadata no longer
#            lists it (the controller fenced it after broker.session.timeout.ms, 4 s, and
#            took it out of every ISR). stdout: the id.
#   start-broker ID  start broker ID with its data. Waits until the metadata lists it
#            again, then until no partition is under-replicated (it caught up), then
#            elects the preferred leaders (it leads its share of partitions again).
#   reshard FROM_PORT TO_PORT SLOTS  move SLOTS slots, live, from master FROM to master TO
#            (redis-cli --cluster reshard ... --cluster-yes), then redis-cli --cluster check;
#            waits until every node is ok. stdout: the slot counts "FROM:n TO:m" after.
#   wait     wait until the whole layout is healthy (six Redis nodes ok, replicas linked,
#            three brokers in the metadata)
#   status   the layout's status (STACK_LAYOUT=cluster deploy/stack-status.sh), on stdout
#
# env: STACK_DIR, CLUSTER_FAULT_TIMEOUT, CLUSTER_REDIS_PORT, CLUSTER_KAFKA_PORT,
#      CLUSTER_KAFKA_CONTROLLER_PORT (as stack-up.sh)
set -euo pipefail
export STACK_LAYOUT=cluster
# shellcheck source=deploy/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib.sh"
# shellcheck source=deploy/lib-cluster.sh
source "$DEPLOY_DIR/lib-cluster.sh"

# fd 3: the result (stdout); everything else to stderr
exec 3>&1 1>&2
result() { printf '%s\n' "$*" >&3; }

need_cluster() {
  [[ -d "$CLUSTER_DIR" ]] || die "no cluster layout in $CLUSTER_DIR (run $STACK_UP_CMD)"
}

# redis_role PORT -> "master" or "replica <master port>" (from its own INFO replication)
redis_role() {
  local role
  role="$(cr_repl "$1" role)"
  if [[ "$role" == slave ]]; then echo "replica $(cr_repl "$1" master_port)"; else echo "${role:-unknown}"; fi
}

# redis_settled_why PORT -> 0 when the node is settled in the cluster, else 1 and why
redis_settled_why() {
  local p="$1" myid q view flags why
  myid="$(credis "$p" cluster myid 2>/dev/null | tr -d '\r')" || { echo "node $p does not answer"; return 1; }
  [[ -n "$myid" ]] || { echo "node $p has no node id"; return 1; }
  for q in $(cr_live_ports); do
    [[ "$q" == "$p" ]] && continue
    view="$(cr_view "$q")" || { echo "node $q does not answer CLUSTER NODES"; return 1; }
    flags="$(awk -v id="$myid" '$1 == id { print $3 }' <<<"$view")"
    [[ -n "$flags" ]] || { echo "node $q does not know node $p ($myid) yet"; return 1; }
    case ",$flags," in
      *,fail,*|*,fail\?,*|*,handshake,*|*,noaddr,*) echo "node $q sees node $p as $flags"; return 1 ;;
    esac
  done
  if [[ "$(cr_repl "$p" role)" == slave && "$(cr_repl "$p" master_link_status)" != up ]]; then
    echo "replica $p: link to its master not up yet"; return 1
  fi
  why="$(cr_not_ready survivors)" || { echo "$why"; return 1; }
  return 0
}

redis_wait_settled() {
  local p="$1" deadline why=""
  deadline=$(( $(now) + CLUSTER_FAULT_TIMEOUT ))
  while ! why="$(redis_settled_why "$p")"; do
    if [[ $(now) -ge $deadline ]]; then
      show_log_tail "$(cr_log "$p")" 25
      die "redis: node $p not settled in the cluster after ${CLUSTER_FAULT_TIMEOUT}s ($why)"
    fi
    sleep 0.2
  done
}

# redis_start_node PORT -- start (if stopped) and make sure it is part of the cluster
redis_start_node() {
  local p="$1" member="" q
  cr_write_conf "$p" >/dev/null
  if cr_alive "$p"; then
    log "redis: node $p already running (pid $(cr_pid "$p"))"
  else
    cr_start "$p"
  fi
  cr_wait_pong "$p" $(( $(now) + REDIS_START_TIMEOUT ))
  cr_ci "$p" || die "redis: node $p does not answer CLUSTER INFO"
  if [[ "$CI_KNOWN" -le 1 && "$CI_ASSIGNED" -eq 0 ]]; then
    for q in $(cr_live_ports); do
      [[ "$q" != "$p" ]] && cr_ci "$q" && [[ "$CI_KNOWN" -gt 1 ]] && { member="$q"; break; }
    done
    [[ -n "$member" ]] || die "redis: node $p has no cluster state and no other node runs a cluster to join"
    cr_join_blank "$p" "$member"
  fi
}

# ---------------------------------------------------------------------------
cmd_kill_redis_shard() {
  local port="${1:-}" view id flags slots p pid reps=()
  need_cluster
  cr_valid_port "$port"
  view="$(cr_any_view)" || die "redis: no cluster node answers (run $STACK_UP_CMD redis)"
  read -r id _ flags _ _ _ slots <<<"$(cr_node "$port" "$view")"
  [[ -n "$id" ]] || die "redis: node $port is not in the cluster view"
  [[ "$flags" == *master* ]] || die "redis: node $port is not a master"
  for p in $(cr_replicas_of "$id" "$view"); do reps+=("$p"); done
  # the replicas first: a replica alive when its master dies would take over
  for p in "${reps[@]}" "$port"; do
    cr_alive "$p" || continue
    pid="$(cr_pid "$p")"
    kill -KILL "$pid"
    wait_pid_exit "$pid" 10 || die "redis: pid $pid of node $p survived SIGKILL"
    log "redis: killed node 127.0.0.1:$p (pid $pid, kill -9)"
  done
  log "redis: shard of master $port down (slots $slots; replicas ${reps[*]:-none})"
  echo "$port ${reps[*]}"
}

cmd_kill_redis_master() {
  local port="${1:-}" view p id flags slots master_id live_repl=() r pid t0 promoted="" deadline why=""
  need_cluster
  view="$(cr_any_view)" || die "redis: no cluster node answers (run $STACK_UP_CMD redis)"
  if [[ -z "$port" ]]; then
    for p in "${CLUSTER_REDIS_PORTS[@]}"; do
      cr_alive "$p" || continue
      read -r id _ flags _ _ _ slots <<<"$(cr_node "$p" "$view")"
      [[ "$flags" == *master* && "$slots" != - ]] || continue
      for r in $(cr_replicas_of "$id" "$view"); do cr_alive "$r" && { port="$p"; break 2; }; done
    done
    [[ -n "$port" ]] || die "redis: no live master with a live replica to fail over to"
  else
    cr_valid_port "$port"
  fi
  read -r id _ flags master_id _ _ slots <<<"$(cr_node "$port" "$view")"
  [[ -n "$id" ]] || die "redis: node $port is not in the cluster view"
  if cr_alive "$port"; then
    [[ "$flags" == *master* ]] || die "redis: node $port is a replica (of $(cr_port_of_id "$master_id" "$view")), not a master"
    for r in $(cr_replicas_of "$id" "$view"); do cr_alive "$r" && live_repl+=("$r"); done
    [[ ${#live_repl[@]} -gt 0 ]] || die "redis: master $port has no live replica: its slots ($slots) would stay unserved; start one first (cluster-fault.sh start-redis PORT)"
    pid="$(cr_pid "$port")"
    t0=$(now_ms)
    kill -KILL "$pid"
    wait_pid_exit "$pid" 10 || die "redis: pid $pid of node $port survived SIGKILL"
    log "redis: killed master 127.0.0.1:$port (pid $pid, kill -9; slots $slots, replica(s) ${live_repl[*]})"
  else
    t0=$(now_ms)
    log "redis: node $port not running already; waiting for its slots to be served by another node"
  fi
  # done when every survivor is ok with all slots served and none gives a slot to the
  # killed node any more (right after the kill they still do: failure detection takes
  # the node timeout)
  deadline=$(( $(now) + CLUSTER_FAULT_TIMEOUT ))
  while :; do
    why=""
    if why="$(cr_not_ready survivors)"; then
      for p in $(cr_live_ports); do
        view="$(cr_view "$p")" || { why="node $p does not answer CLUSTER NODES"; break; }
        if [[ "$(awk -v id="$id" '$1 == id { print $7 }' <<<"$view")" != - ]]; then
          why="node $p still maps slots to the killed node"; break
        fi
      done
      [[ -z "$why" ]] && break
    fi
    if [[ $(now) -ge $deadline ]]; then
      for p in $(cr_live_ports); do show_log_tail "$(cr_log "$p")" 8; done
      die "redis: no failover of master $port within ${CLUSTER_FAULT_TIMEOUT}s ($why)"
    fi
    sleep 0.1
  done
  if [[ "$slots" != - ]]; then
    local first="${slots%%[-,]*}"
    view="$(cr_any_view)"
    promoted="$(awk -v s="$first" '$3 ~ /master/ && $3 !~ /fail/ {
        n = split($7, r, ","); for (i = 1; i <= n; i++) { m = split(r[i], b, "-"); lo = b[1]; hi = (m == 2 ? b[2] : b[1]);
          if (s + 0 >= lo + 0 && s + 0 <= hi + 0) { print $2; exit } } }' <<<"$view")"
  fi
  if [[ "$slots" == - ]]; then
    log "redis: node $port is down and serves no slots; cluster_state:ok on every survivor"
  else
    log "redis: failover done $(secs_since "$t0")s after the kill: slots $slots now served by 127.0.0.1:${promoted:-?}; cluster_state:ok on every survivor"
  fi
  result "$port"
}

cmd_start_redis() {
  local port="${1:-}" t0 role
  [[ -n "$port" ]] || die "usage: cluster-fault.sh start-redis PORT"
  need_cluster; cr_valid_port "$port"
  t0=$(now_ms)
  redis_start_node "$port"
  redis_wait_settled "$port"
  role="$(redis_role "$port")"
  log "redis: node $port up as $role$([[ "$role" == replica* ]] && echo " (link $(cr_repl "$port" master_link_status))"), $(credis "$port" dbsize | tr -d '\r') keys, settled in $(secs_since "$t0")s"
  result "$role"
}

cmd_restart_redis_empty() {
  local port="${1:-}" view id flags slots role_before keys_before pid t0 down_ms r replicas=() rk_before=() deadline why mrid rrid
  [[ -n "$port" ]] || die "usage: cluster-fault.sh restart-redis-empty PORT"
  need_cluster; cr_valid_port "$port"
  view="$(cr_any_view)" || die "redis: no cluster node answers (run $STACK_UP_CMD redis)"
  read -r id _ flags _ _ _ slots <<<"$(cr_node "$port" "$view")"
  [[ -n "$id" ]] || die "redis: node $port is not in the cluster view"
  for r in $(cr_replicas_of "$id" "$view"); do
    cr_alive "$r" && { replicas+=("$r"); rk_before+=("$(credis "$r" dbsize | tr -d '\r')"); }
  done
  if cr_alive "$port"; then
    role_before="$(redis_role "$port")"; keys_before="$(credis "$port" dbsize | tr -d '\r')"
    pid="$(cr_pid "$port")"
    t0=$(now_ms)
    kill -KILL "$pid"
    wait_pid_exit "$pid" 10 || die "redis: pid $pid of node $port survived SIGKILL"
  else
    role_before="stopped ($flags)"; keys_before="?"; t0=$(now_ms)
  fi
  rm -rf "$(cr_dir "$port")/appendonlydir" "$(cr_dir "$port")/dump.rdb"
  cr_start "$port"
  cr_wait_pong "$port" $(( $(now) + REDIS_START_TIMEOUT ))
  down_ms=$(( $(now_ms) - t0 ))
  log "redis: node $port ($role_before, slots $slots, $keys_before keys) killed, data deleted (nodes.conf kept), answering again after ${down_ms} ms"
  redis_wait_settled "$port"
  # its replicas: wait until they replicate the restarted node's new history
  if [[ "$(cr_repl "$port" role)" == master && ${#replicas[@]} -gt 0 ]]; then
    deadline=$(( $(now) + CLUSTER_FAULT_TIMEOUT ))
    mrid="$(cr_repl "$port" master_replid)"
    for r in "${replicas[@]}"; do
      while :; do
        rrid="$(cr_repl "$r" master_replid)"
        why="replica $r: link $(cr_repl "$r" master_link_status), replid $rrid vs the master's $mrid"
        [[ "$(cr_repl "$r" master_port)" == "$port" && "$(cr_repl "$r" master_link_status)" == up && "$rrid" == "$mrid" ]] && break
        if [[ "$(cr_repl "$r" role)" != slave || "$(cr_repl "$r" master_port)" != "$port" ]]; then why=""; break; fi
        [[ $(now) -ge $deadline ]] && die "redis: $why after ${CLUSTER_FAULT_TIMEOUT}s"
        sleep 0.2
      done
    done
  fi
  local i after=()
  for i in "${!replicas[@]}"; do
    r="${replicas[$i]}"
    after+=("replica $r: $(redis_role "$r"), ${rk_before[$i]} -> $(credis "$r" dbsize | tr -d '\r') keys")
  done
  log "redis: node $port is now $(redis_role "$port") with $(credis "$port" dbsize | tr -d '\r') keys (was $keys_before); ${after[*]:-no live replica}; after $(secs_since "$t0")s"
  result "$(redis_role "$port")"
}

cmd_kill_broker() {
  local id="${1:-}" pid t0 deadline reg=""
  [[ -n "$id" ]] || die "usage: cluster-fault.sh kill-broker ID"
  need_cluster; ck_valid_id "$id"
  t0=$(now_ms)
  if pid="$(ck_pid "$id")"; then
    ck_stop "$id" KILL
    log "kafka: killed broker $id (pid $pid, kill -9)"
  else
    log "kafka: broker $id not running already"
  fi
  deadline=$(( $(now) + CLUSTER_FAULT_TIMEOUT ))
  while :; do
    if reg="$(ck_registered)" && [[ -n "$reg" ]] && ! grep -qx "$id" <<<"$reg"; then break; fi
    if [[ $(now) -ge $deadline ]]; then
      die "kafka: broker $id still in the metadata ${CLUSTER_FAULT_TIMEOUT}s after the kill (live: $(paste -sd' ' <<<"$reg"))"
    fi
    sleep 0.5
  done
  log "kafka: broker $id fenced, $(secs_since "$t0")s after the kill (live brokers: $(paste -sd' ' <<<"$reg"))"
  result "$id"
}

cmd_start_broker() {
  local id="${1:-}" t0
  [[ -n "$id" ]] || die "usage: cluster-fault.sh start-broker ID"
  need_cluster; ck_valid_id "$id"
  t0=$(now_ms)
  kafka_cluster_launch "$id"
  kafka_cluster_wait "$KAFKA_START_TIMEOUT" "$id"
  log "kafka: broker $id in the metadata $(secs_since "$t0")s after the start"
  ck_balance_leaders "$CLUSTER_FAULT_TIMEOUT"
  log "kafka: broker $id back, caught up and leading its preferred partitions $(secs_since "$t0")s after the start"
}

cmd_reshard() {
  local from="${1:-}" to="${2:-}" n="${3:-}" view fid tid fflags tflags fslots tslots t0 logf why
  [[ -n "$from" && -n "$to" && -n "$n" ]] || die "usage: cluster-fault.sh reshard FROM_PORT TO_PORT SLOTS"
  need_cluster; cr_valid_port "$from"; cr_valid_port "$to"
  [[ "$from" != "$to" ]] || die "redis: FROM and TO are the same node"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "redis: SLOTS must be a positive integer (got '$n')"
  cr_alive "$from" || die "redis: node $from is not running"
  cr_alive "$to" || die "redis: node $to is not running"
  why="$(cr_not_ready survivors)" || die "redis: cluster not healthy, not resharding ($why)"
  view="$(cr_view "$from")"
  read -r fid _ fflags _ _ _ fslots <<<"$(cr_node "$from" "$view")"
  read -r tid _ tflags _ _ _ tslots <<<"$(cr_node "$to" "$view")"
  [[ "$fflags" == *master* ]] || die "redis: node $from is not a master ($fflags)"
  [[ "$tflags" == *master* ]] || die "redis: node $to is not a master ($tflags)"
  [[ "$(cr_slot_count "$fslots")" -ge "$n" ]] || die "redis: master $from has only $(cr_slot_count "$fslots") slots, cannot move $n"
  logf="$REDIS_DIR/reshard.log"
  log "redis: moving $n slots from $from ($(cr_slot_count "$fslots") slots) to $to ($(cr_slot_count "$tslots") slots): redis-cli --cluster reshard (log $logf)"
  t0=$(now_ms)
  if ! timeout 600 redis-cli --cluster reshard "127.0.0.1:$from" --cluster-from "$fid" --cluster-to "$tid" \
        --cluster-slots "$n" --cluster-yes >"$logf" 2>&1; then
    show_log_tail "$logf" 30; die "redis: redis-cli --cluster reshard failed (redis-cli --cluster fix 127.0.0.1:$from may repair open slots)"
  fi
  log "redis: slots moved in $(secs_since "$t0")s; redis-cli --cluster check until every node agrees"
  # right after the move some nodes still hold the old owners ("Nodes don't agree about
  # configuration") until gossip spreads the new configuration
  local deadline tries=0 checkf="$REDIS_DIR/reshard-check.log"
  deadline=$(( $(now) + CLUSTER_FAULT_TIMEOUT ))
  until timeout 60 redis-cli --cluster check "127.0.0.1:$from" >"$checkf" 2>&1; do
    tries=$((tries + 1))
    if [[ $(now) -ge $deadline ]]; then
      show_log_tail "$checkf" 30; die "redis: redis-cli --cluster check still fails ${CLUSTER_FAULT_TIMEOUT}s after the reshard"
    fi
    sleep 0.5
  done
  cr_wait_ready survivors "$CLUSTER_FAULT_TIMEOUT" "after the reshard"
  view="$(cr_view "$from")"
  read -r _ _ _ _ _ _ fslots <<<"$(cr_node "$from" "$view")"
  read -r _ _ _ _ _ _ tslots <<<"$(cr_node "$to" "$view")"
  log "redis: resharded in $(secs_since "$t0")s, check OK (after $tries failed check(s) while the configuration spread): $from has slots $fslots ($(cr_slot_count "$fslots")), $to has $tslots ($(cr_slot_count "$tslots"))"
  result "$from:$(cr_slot_count "$fslots") $to:$(cr_slot_count "$tslots")"
}

cmd_wait() {
  local t0; t0=$(now)
  need_cluster
  cr_wait_ready all "$CLUSTER_FAULT_TIMEOUT" "cluster"
  kafka_cluster_wait "$KAFKA_START_TIMEOUT"
  log "cluster layout healthy (6 Redis nodes, 3 brokers) after $(( $(now) - t0 ))s"
}

# locked CMD ARGS... -- one change of the layout at a time (shares stack-up/down's lock)
locked() { need_cluster; stack_lock; "$@"; }

cmd="${1:-}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  kill-redis-master)   locked cmd_kill_redis_master "$@" ;;
  kill-redis-shard)    locked cmd_kill_redis_shard "$@" ;;
  start-redis)         locked cmd_start_redis "$@" ;;
  restart-redis-empty) locked cmd_restart_redis_empty "$@" ;;
  kill-broker)         locked cmd_kill_broker "$@" ;;
  start-broker)        locked cmd_start_broker "$@" ;;
  reshard)             locked cmd_reshard "$@" ;;
  wait)                cmd_wait ;;
  status)              WANT_PG=1 WANT_REDIS=1 WANT_KAFKA=1; rc=0; cluster_status >&3 || rc=1; exit $rc ;;
  -h|--help|help)      print_usage "${BASH_SOURCE[0]}" >&3 ;;
  *)                   print_usage "${BASH_SOURCE[0]}"; die "unknown command '$cmd'" ;;
esac
