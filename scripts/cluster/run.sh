#!/usr/bin/env bash
# Scale-out on a real cluster: `sagaflow bench` over a 3-node RabbitMQ cluster with quorum
# queues, and the node that leads most of the deployment's queues killed (kill -9) mid-run.
# Passes when the run goes on and finishes on the two survivors with every saga final and the
# bench's invariant check (ledgers exact: nothing lost, nothing doubled) clean.
#
#   bash scripts/cluster/run.sh [ORDERS]        # default 8000
#
# Not part of CI (it takes 2-3 minutes and starts three extra RabbitMQ nodes). Needs what the
# tests need: rabbitmq-server (3.8+, quorum queues), PostgreSQL on 127.0.0.1:5432 (user
# postgres, trust), python3, and target/release/sagaflow. Knobs, all optional:
#   SAGAFLOW_BIN        the binary (default target/release/sagaflow)
#   CLUSTER_PORT        the balancer's port; the nodes take the next three (default 5680:
#                       nodes on 5681-5683, Erlang distribution on 25681-25683)
#   CLUSTER_FAIL        business failures passed to the workers (default coupon=0.05, so
#                       some sagas compensate); empty for none
#   CLUSTER_KILL_AT     kill when this fraction of the orders is final (default 0.33), or
#                       later if rabbitmqctl has not answered who leads yet (it takes 10-20 s
#                       on a busy 2-core machine)
#   CLUSTER_KEEP=DIR    copy every log (bench's processes, nodes, balancer) to DIR at the end
#
# Design: every sagaflow process takes ONE --amqp-url and cannot fail over by itself, so all of
# them (the bench, its engine and its four workers) connect through balancer.py, a small TCP
# balancer next to this script: new connections go round robin to the nodes, skipping a node
# that refuses. When a node dies its connections drop, the processes reconnect (their own
# backoff) and land on a survivor. The node killed is the one that leads most of the
# deployment's quorum queues (the leader `rabbitmqctl list_queues name leader` shows, read
# from the queue records, asked once the first sagas are final).
#
# It leaves nothing behind, even when interrupted: the three nodes are stopped (killed if
# they do not stop), the balancer and the bench's process group are killed, the temp dir and
# the two databases are removed. The machine's own RabbitMQ node (rabbit@…, port 5672) is
# never touched: the three nodes have their own names, ports, cookie, data, logs and config.
set -euo pipefail

ORDERS="${1:-8000}"
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SAGAFLOW="${SAGAFLOW_BIN:-$ROOT/target/release/sagaflow}"
LB_PORT="${CLUSTER_PORT:-5680}"
FAIL="${CLUSTER_FAIL-coupon=0.05}"
KILL_AT="${CLUSTER_KILL_AT:-0.33}"
PREFIX=sagaflow-cluster
DB=sagaflow_cluster # the bench makes ${DB}_workers itself
PG="postgres://postgres@127.0.0.1:5432"
NODES=(sagaflow-c1@localhost sagaflow-c2@localhost sagaflow-c3@localhost)
RMQ_BIN=/usr/lib/rabbitmq/bin # the scripts themselves: /usr/sbin's wrappers switch to the rabbitmq user

say() { printf '== %s\n' "$*"; }
die() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ "$ORDERS" =~ ^[0-9]+$ && "$ORDERS" -ge 30 ]] || die "ORDERS must be a number >= 30 (got '$ORDERS')"
[[ -x "$SAGAFLOW" ]] || die "no sagaflow binary at $SAGAFLOW (cargo build --release --bin sagaflow)"
[[ -x "$RMQ_BIN/rabbitmq-server" ]] || RMQ_BIN="$(dirname "$(command -v rabbitmq-server || echo /none/x)")"
[[ -x "$RMQ_BIN/rabbitmq-server" ]] || die "rabbitmq-server not found"
command -v psql >/dev/null || die "psql not found"
command -v python3 >/dev/null || die "python3 not found"
pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null || die "PostgreSQL does not answer on 127.0.0.1:5432"
for p in "$LB_PORT" $((LB_PORT + 1)) $((LB_PORT + 2)) $((LB_PORT + 3)) \
  $((LB_PORT + 20001)) $((LB_PORT + 20002)) $((LB_PORT + 20003)); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
    die "port $p is taken (another run still going? set CLUSTER_PORT)"
  fi
done

WORK="$(mktemp -d /tmp/sagaflow-cluster.XXXXXX)"
declare -A NODE_GROUP=() # node -> process group of its rabbitmq-server (setsid)
declare -A BEAM_PID=()   # node -> OS pid of its Erlang VM
BENCH_PGID="" LB_PID="" MONITOR_DONE=""

export PGOPTIONS='-c client_min_messages=warning' # no NOTICE for a database that is not there
psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres -d postgres "$@"; }
# One number from the engine's database (empty while its tables do not exist yet).
sql_engine() { psql -X -Atq -h 127.0.0.1 -U postgres -d "$DB" -c "$1" 2>/dev/null || true; }

# The RabbitMQ tools with this run's environment: own cookie (HOME), own env file (so the
# machine's /etc/rabbitmq/rabbitmq-env.conf, which names the node rabbit@localhost, is not
# read), and a CLI distribution port range apart from the default one the tests' rabbitmqctl use.
RMQ_ENV=(HOME="$WORK" RABBITMQ_CONF_ENV_FILE="$WORK/rabbitmq-env.conf"
  RABBITMQ_CTL_DIST_PORT_MIN=$((LB_PORT + 30010)) RABBITMQ_CTL_DIST_PORT_MAX=$((LB_PORT + 30029)))
# (nice -n -10: the CLI boots an Erlang VM, slow on a busy machine; root may raise its priority)
ctl() { local node="$1"; shift; env "${RMQ_ENV[@]}" nice -n -10 timeout 60 "$RMQ_BIN/rabbitmqctl" -q -n "$node" "$@"; }

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  say "cleaning up"
  if [[ -n "$BENCH_PGID" ]] && kill -0 -- "-$BENCH_PGID" 2>/dev/null; then
    kill -TERM -- "-$BENCH_PGID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 -- "-$BENCH_PGID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$BENCH_PGID" 2>/dev/null
  fi
  if [[ -n "$CLUSTER_KEEP_DIR" ]]; then
    mkdir -p "$CLUSTER_KEEP_DIR" && cp -r "$WORK/logs" "$WORK"/*.log "$WORK"/*.out "$WORK"/*-before "$WORK"/*-after \
      "$WORK/samples" "$CLUSTER_KEEP_DIR/" 2>/dev/null
    for node in "${NODES[@]}"; do cp -r "$WORK/$node/log" "$CLUSTER_KEEP_DIR/$node-log" 2>/dev/null; done
    echo "logs kept in $CLUSTER_KEEP_DIR"
  fi
  for node in "${NODES[@]}"; do
    local group="${NODE_GROUP[$node]:-}"
    [[ -n "$group" ]] || continue
    if kill -0 -- "-$group" 2>/dev/null; then
      ctl "$node" stop >/dev/null 2>&1 # graceful; the kill below is for a node that hangs
      for _ in $(seq 1 50); do kill -0 -- "-$group" 2>/dev/null || break; sleep 0.1; done
      kill -KILL -- "-$group" 2>/dev/null
    fi
  done
  [[ -n "$LB_PID" ]] && kill "$LB_PID" 2>/dev/null
  wait 2>/dev/null # and for a CLI call still running in the background (timeout 60 s)
  psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${DB}_workers WITH (FORCE)" >/dev/null 2>&1
  rm -rf "$WORK"
  exit "$rc"
}
CLUSTER_KEEP_DIR="${CLUSTER_KEEP:-}"
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. Three RabbitMQ nodes, own names, ports, cookie, data and logs --------------------------
say "starting 3 RabbitMQ nodes (${NODES[*]}) on ports $((LB_PORT + 1))-$((LB_PORT + 3)) in $WORK"
head -c 32 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$WORK/.erlang.cookie"
chmod 400 "$WORK/.erlang.cookie"
: >"$WORK/rabbitmq-env.conf"
echo '[].' >"$WORK/enabled_plugins" # no plugins: no management listener to clash with
start_node() { # node index (0-based)
  local i="$1" node="${NODES[$1]}" port=$((LB_PORT + 1 + $1))
  mkdir -p "$WORK/$node"
  # The guest user may connect from localhost only (RabbitMQ's default): the balancer is local.
  printf 'listeners.tcp.1 = 127.0.0.1:%s\nloopback_users.guest = true\n' "$port" >"$WORK/$node/rabbitmq.conf"
  # One simple command in the background, so that $! is the process setsid turns into the
  # leader of a new process group: the node's shell script, its Erlang VM and their helpers.
  env "${RMQ_ENV[@]}" RABBITMQ_NODENAME="$node" RABBITMQ_NODE_PORT="$port" RABBITMQ_DIST_PORT=$((port + 20000)) \
    RABBITMQ_MNESIA_BASE="$WORK/$node/mnesia" RABBITMQ_LOG_BASE="$WORK/$node/log" \
    RABBITMQ_CONFIG_FILE="$WORK/$node/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$WORK/enabled_plugins" \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}' \
    setsid "$RMQ_BIN/rabbitmq-server" >>"$WORK/node-c$((i + 1)).out" 2>&1 &
  NODE_GROUP[$node]=$!
}
await_node() { # the node answers, then its VM's OS pid
  local node="$1"
  for _ in $(seq 1 60); do
    ctl "$node" await_startup >/dev/null 2>&1 && break
    kill -0 -- "-${NODE_GROUP[$node]}" 2>/dev/null || die "$node exited at start; see $WORK/node-*.out"
    sleep 1
  done
  ctl "$node" await_startup >/dev/null || die "$node did not start within 60 s"
  BEAM_PID[$node]="$(ctl "$node" eval 'os:getpid().' | tr -d '"')"
  NODE_GROUP[$node]="$(ps -o pgid= -p "${BEAM_PID[$node]}" | tr -d ' ')" # the VM's group, to be sure
}
for i in 0 1 2; do start_node "$i"; done
for node in "${NODES[@]}"; do await_node "$node"; done

say "joining ${NODES[1]} and ${NODES[2]} to ${NODES[0]} (rabbitmqctl join_cluster)"
for node in "${NODES[1]}" "${NODES[2]}"; do
  ctl "$node" stop_app >/dev/null
  ctl "$node" join_cluster "${NODES[0]}" >>"$WORK/ctl.err" 2>&1 # its stderr: harmless start-up noise
  ctl "$node" start_app >/dev/null
done
running="$(ctl "${NODES[0]}" eval 'length(rabbit_nodes:all_running()).')"
[[ "$running" == 3 ]] || die "the cluster has $running running nodes, not 3"
for node in "${NODES[@]}"; do echo "   $node: OS pid ${BEAM_PID[$node]}"; done

# --- 2. The balancer every process connects through --------------------------------------------
python3 -u "$HERE/balancer.py" "$LB_PORT" $((LB_PORT + 1)) $((LB_PORT + 2)) $((LB_PORT + 3)) >"$WORK/balancer.log" 2>&1 &
LB_PID=$!
for _ in $(seq 1 50); do (exec 3<>"/dev/tcp/127.0.0.1/$LB_PORT") 2>/dev/null && break; sleep 0.1; done
AMQP="amqp://guest:guest@127.0.0.1:$LB_PORT/%2f"
say "design: every process's --amqp-url is the balancer amqp://guest:***@127.0.0.1:$LB_PORT (round robin over the 3 nodes, skipping dead ones)"

# --- 3. The bench: 1 engine + 4 workers, quorum queues, through the balancer -------------------
psql_admin -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "DROP DATABASE IF EXISTS ${DB}_workers WITH (FORCE)" \
  -c "CREATE DATABASE $DB" >/dev/null
bench_args=(bench --orders "$ORDERS" --queue-type quorum --prefix "$PREFIX" --logs "$WORK/logs" --stall-timeout 60s)
[[ -n "$FAIL" ]] && bench_args+=(--fail "$FAIL")
say "sagaflow ${bench_args[*]}  (database $DB, workers' ${DB}_workers)"
SAGAFLOW_DATABASE_URL="$PG/$DB" SAGAFLOW_AMQP_URL="$AMQP" setsid "$SAGAFLOW" "${bench_args[@]}" >"$WORK/bench.out" 2>&1 &
BENCH_PGID=$!

# --- 4. Watch the run, kill -9 the leading node at KILL_AT of the orders ----------------------
# One sample every 200 ms: seconds since the epoch, sagas final, sagas started.
kill_after=$(python3 -c "import math; print(max(1, math.ceil($ORDERS * $KILL_AT)))")
killed="" killed_at="" final_at_kill="" SURVEY_PID=""
: >"$WORK/samples"
# Each queue's leader as its queue record names it: what `list_queues name leader` shows, read
# in one call (list_queues asks every quorum queue's Raft members, and takes 15 s and more
# on this busy 2-core machine, by which time the run may be over).
LEADERS_EVAL='lists:foreach(fun(Q) -> {resource, _, queue, Name} = amqqueue:get_name(Q),
  Leader = case amqqueue:get_pid(Q) of {_, N} -> N; P when is_pid(P) -> node(P); _ -> none end,
  io:format("~ts ~s~n", [Name, Leader]) end, rabbit_amqqueue:list()).'
leaders() { # "count node" lines for the deployment's queues, most first, asked of a live node
  ctl "$1" eval "$LEADERS_EVAL" 2>>"$WORK/ctl.err" |
    awk -v p="$PREFIX." 'index($1, p) == 1 { n[$2]++ } END { for (l in n) print n[l], l }' | sort -rn
}
stuck_queues() { # the queues that kept messages, and their consumers (active or waiting)
  local node="$1"
  ctl "$node" list_queues name messages_ready messages_unacknowledged consumers leader --no-table-headers 2>>"$WORK/ctl.err" |
    awk -v p="$PREFIX." 'index($1, p) == 1 && ($2 != 0 || $3 != 0)' >"$WORK/stuck-queues" || true
  sed 's/^/     queue (ready, unacked, consumers, leader): /' "$WORK/stuck-queues"
  [[ -s "$WORK/stuck-queues" ]] || return 0
  ctl "$node" list_consumers queue_name channel_pid active activity_status --no-table-headers 2>>"$WORK/ctl.err" |
    grep -F -f <(awk '{ print $1 }' "$WORK/stuck-queues") | sed 's/^/     consumer (queue, channel, active, status): /' || true
}
connections() { # "node process" lines: which sagaflow process is connected to which node
  # list_connections covers the whole cluster; a connection's Erlang pid names its node.
  ctl "$1" list_connections pid client_properties --no-table-headers 2>>"$WORK/ctl.err" |
    grep "\\[$PREFIX\\]" |
    sed -n "s/^<\\([^.]*\\)\\..*\\(sagaflow [a-z ]*(pid [0-9]*)\\) \\[.*/\\1 \\2/p"
}
LEADERS_PID="" asked_at="" last_final="" last_change="$SECONDS" hung=""
while kill -0 "$BENCH_PGID" 2>/dev/null; do
  row="$(sql_engine "SELECT COUNT(finished_at) || ' ' || COUNT(*) FROM sagas")"
  [[ -n "$row" ]] && echo "$(date +%s.%N) $row" >>"$WORK/samples"
  final="${row%% *}"
  [[ "$final" != "$last_final" ]] && { last_final="$final"; last_change="$SECONDS"; }
  # The bench gives up after its --stall-timeout (60 s) and stops its processes with SIGTERM;
  # a process that does not stop keeps it waiting for ever. Two minutes more and we stop it.
  if (( SECONDS - last_change > 180 )); then
    hung=1
    say "no saga final for 180 s and the bench has not ended: showing the stuck queues, then killing it"
    for node in "${NODES[@]}"; do [[ "$node" != "$killed" ]] && { stuck_queues "$node"; break; }; done
    ps -o pid=,args= --ppid "$BENCH_PGID" | sed 's/^/   still running: /'
    kill -KILL -- "-$BENCH_PGID" 2>/dev/null
    break
  fi
  # The CLI takes 5-20 s to answer on this busy machine, so it runs in the background and the
  # samples go on meanwhile. Once sagas finish, every process is connected and every queue
  # declared: ask then who leads the queues and who is connected where. (Leaders move only
  # when a member fails, so the answer still holds at the kill; its age is reported.)
  if [[ -z "$LEADERS_PID" && -n "$final" && "$final" -gt 0 ]]; then
    asked_at="$(date +%s.%N)"
    leaders "${NODES[0]}" >"$WORK/leaders-before" &
    LEADERS_PID=$!
    connections "${NODES[0]}" >"$WORK/connections-before" &
    SURVEY_PID=$!
  fi
  # At KILL_AT of the orders (or as soon as the answer is there, if later), kill -9 the leader.
  if [[ -z "$killed" && -n "$LEADERS_PID" && "$final" -ge "$kill_after" ]] && ! kill -0 "$LEADERS_PID" 2>/dev/null; then
    read -r lead_count killed <"$WORK/leaders-before" || die "no leader found for the $PREFIX.* queues (see $WORK/ctl.err)"
    [[ -n "${BEAM_PID[$killed]:-}" ]] || die "the leader $killed is not one of this run's nodes"
    total_queues="$(awk '{ s += $1 } END { print s }' "$WORK/leaders-before")"
    wait "$SURVEY_PID" 2>/dev/null || true
    final_at_kill="$(sql_engine "SELECT COUNT(finished_at) FROM sagas")"
    kill -KILL "${BEAM_PID[$killed]}"
    killed_at="$(date +%s.%N)"
    echo "$killed_at $final_at_kill $(sql_engine "SELECT COUNT(*) FROM sagas")" >>"$WORK/samples"
    say "kill -9 $killed (OS pid ${BEAM_PID[$killed]}) with $final_at_kill of $ORDERS sagas final: it led $lead_count of the $total_queues $PREFIX.* quorum queues (as asked $(python3 -c "print(f'{$killed_at - $asked_at:.1f}')") s before)"
    sed 's/^/   leaders before the kill: /' "$WORK/leaders-before"
    echo "   connected to the killed node: $(grep "^$killed " "$WORK/connections-before" | cut -d' ' -f2- | paste -sd, | sed 's/,/, /g')"
    echo "   connected to the others:      $(grep -v "^$killed " "$WORK/connections-before" | paste -sd, | sed 's/,/, /g')"
  fi
  sleep 0.2
done
bench_rc=0
wait "$BENCH_PGID" || bench_rc=$?
BENCH_PGID=""
end_row="$(sql_engine "SELECT COUNT(finished_at) || ' ' || COUNT(*) FROM sagas")"
[[ -n "$end_row" ]] && echo "$(date +%s.%N) $end_row" >>"$WORK/samples"

say "bench output (exit status $bench_rc)"
sed 's/^/   /' "$WORK/bench.out"

# --- 5. Checks of our own, on the engine's database and the surviving nodes -------------------
failures=()
[[ "$bench_rc" == 0 ]] || failures+=("the bench exited with status $bench_rc")
[[ -z "$hung" ]] || failures+=("the bench hung (a process it stopped with SIGTERM did not exit) and was killed")
grep -q 'invariants: *OK' "$WORK/bench.out" || failures+=("the bench's invariant check did not say OK")
[[ -n "$killed" ]] || failures+=("no node was killed (the run ended before $kill_after sagas were final)")
[[ -n "$killed" && "$final_at_kill" -ge "$ORDERS" ]] && failures+=("the node was killed only after every saga was final: the kill proved nothing (try more ORDERS)")
survivor=""
for node in "${NODES[@]}"; do [[ "$node" != "$killed" ]] && { survivor="$node"; break; }; done
sagas="$(sql_engine "SELECT COUNT(*) FROM sagas")"
distinct="$(sql_engine "SELECT COUNT(DISTINCT sequence_key) FROM sagas")"
unfinished="$(sql_engine "SELECT COUNT(*) FROM sagas WHERE finished_at IS NULL")"
by_status="$(sql_engine "SELECT string_agg(n || ' ' || status, ', ' ORDER BY status) FROM (SELECT status, COUNT(*) AS n FROM sagas GROUP BY status) s")"
unsent="$(sql_engine "SELECT COUNT(*) FROM outbox")" # a row is deleted once the broker confirmed it
failed="$(sql_engine "SELECT COUNT(*) FROM sagas WHERE status = 'failed'")"
[[ "$sagas" == "$ORDERS" ]] || failures+=("${sagas:-no} sagas in the database, not $ORDERS")
[[ "$distinct" == "$ORDERS" ]] || failures+=("${distinct:-no} orders have a saga, not $ORDERS (one saga per order)")
[[ "$unfinished" == 0 ]] || failures+=("${unfinished:-?} sagas are not final")
[[ "$failed" == 0 ]] || failures+=("${failed:-?} sagas ended failed")
[[ "$unsent" == 0 ]] || failures+=("${unsent:-?} outbox rows were never sent")
# The queues: all quorum, all empty, the dead letters too (asked of a survivor).
ctl "$survivor" list_queues name type messages leader members --no-table-headers 2>/dev/null |
  awk -v p="$PREFIX." 'index($1, p) == 1' >"$WORK/queues-after" || true
queues_after="$(wc -l <"$WORK/queues-after")"
not_quorum="$(awk '$2 != "quorum"' "$WORK/queues-after" | wc -l)"
not_empty="$(awk '$3 != 0 { print $1 "=" $3 }' "$WORK/queues-after" | tr '\n' ' ')"
[[ "$queues_after" -gt 0 ]] || failures+=("cannot list the $PREFIX.* queues on $survivor")
[[ "$not_quorum" == 0 ]] || failures+=("$not_quorum $PREFIX.* queues are not quorum queues")
[[ -z "$not_empty" ]] || failures+=("queues not empty at the end: $not_empty")
[[ -n "$killed" ]] && grep -q "$killed" <(awk '{ print $4 }' "$WORK/queues-after") &&
  failures+=("a queue still names the killed node as its leader")

# --- 6. The figures, from the samples -----------------------------------------------------------
figures="$(python3 - "$WORK/samples" "${killed_at:-0}" "$ORDERS" <<'PY'
import sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1]) if l.strip()]
kill, orders = float(sys.argv[2]), int(sys.argv[3])
started = [t for t, f, n in rows if n > 0]
done = [t for t, f, n in rows if f >= orders]
if not started or not done or not kill:
    print("   (not enough samples for figures)"); sys.exit()
t0, t1 = started[0], done[0]
at_kill = max(f for t, f, n in rows if t <= kill)
# The longest stretch with no saga becoming final, among those overlapping the kill or after it.
stall, last_t, last_f = 0.0, kill, at_kill
for t, f, n in rows:
    if t <= kill:
        continue
    if f > last_f:
        stall, last_t, last_f = max(stall, t - last_t), t, f
first_after = next((t - kill for t, f, n in rows if t > kill and f > at_kill), float("nan"))
print(f"   run:            {orders} sagas final in {t1 - t0:.1f} s (first start to last final), {orders / (t1 - t0):.0f} sagas/s overall")
print(f"   before the kill: {at_kill:.0f} final in {kill - t0:.1f} s = {at_kill / max(kill - t0, 1e-9):.0f} sagas/s")
print(f"   after the kill:  {orders - at_kill:.0f} final in {t1 - kill:.1f} s = {(orders - at_kill) / max(t1 - kill, 1e-9):.0f} sagas/s (stall included)")
print(f"   stall:           first saga final {first_after:.1f} s after the kill; longest time with none final {stall:.1f} s (200 ms samples)")
# Sagas final per second around the kill, so the dip and the recovery show.
line, sec = [], int(t0)
def final_by(t):
    return max([f for tt, f, n in rows if tt <= t] or [0])
start = max(t0, kill - 3)
t = start
while t < min(t1, kill + 20):
    line.append(f"{int(final_by(t + 1) - final_by(t))}")
    t += 1
print(f"   per second from {start - kill:+.0f} s: " + " ".join(line))
PY
)"

echo
say "figures (design: TCP balancer $LB_PORT -> nodes $((LB_PORT + 1))-$((LB_PORT + 3)); killed: ${killed:-none})"
echo "$figures"
echo "   sagas:          ${by_status:-?} (${sagas:-?} sagas, ${distinct:-?} orders, ${unfinished:-?} unfinished, ${unsent:-?} unsent outbox rows)"
echo "   queues:         $queues_after $PREFIX.* queues on the survivors, $not_quorum not quorum, non-empty: ${not_empty:-none}"
reconnects="$(cat "$WORK"/logs/*.log 2>/dev/null | grep -c -i 'reconnect\|retrying' || true)"
echo "   process logs:   $reconnects reconnect/retry lines (in $WORK/logs, kept with CLUSTER_KEEP=DIR)"

if [[ -n "$not_empty" || "${unfinished:-1}" != 0 ]]; then
  echo "   stuck, as seen from $survivor with $killed still down:"
  stuck_queues "$survivor"
fi

# --- 7. The killed node comes back and rejoins --------------------------------------------------
if [[ -n "$killed" ]]; then
  for i in 0 1 2; do [[ "${NODES[$i]}" == "$killed" ]] && idx=$i; done
  wait "${NODE_GROUP[$killed]}" 2>/dev/null || true # its rabbitmq-server script, done since the kill
  start_node "$idx"
  if await_node "$killed" 2>/dev/null; then
    sleep 2
    running="$(ctl "$survivor" eval 'length(rabbit_nodes:all_running()).')"
    online="$(ctl "$survivor" list_queues name online --no-table-headers 2>/dev/null |
      awk -v p="$PREFIX." -v n="$killed" 'index($1, p) == 1 && index($0, n) { c++ } END { print c + 0 }')"
    echo "   rejoin:         $killed restarted (OS pid ${BEAM_PID[$killed]}): $running nodes running; it is an online member of $online of the $queues_after queues"
    [[ "$running" == 3 ]] || failures+=("$killed did not rejoin the cluster")
    if [[ -n "$not_empty" ]]; then
      sleep 5
      echo "   stuck, 5 s after $killed rejoined:"
      stuck_queues "$survivor"
    fi
  else
    failures+=("$killed did not start again")
  fi
fi

echo
if [[ ${#failures[@]} -eq 0 ]]; then
  echo "PASS: $ORDERS sagas over a 3-node RabbitMQ cluster (quorum queues); $killed was killed with kill -9 after $final_at_kill were final; every saga final (${by_status}), ledgers exact, no message left in any queue"
else
  echo "FAIL:"
  printf '  - %s\n' "${failures[@]}"
  echo "  (bench's process logs: rerun with CLUSTER_KEEP=DIR to keep them)"
  exit 1
fi
