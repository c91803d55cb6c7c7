#!/usr/bin/env bash
# Many nodes, side by side in one run: one node without Redis ("single"),
# one node on Redis ("redis", one REDIS_URL) and three nodes on that one
# Redis ("three"; devices spread round-robin over the nodes, the echo
# handler on the first, so two devices in three are served across nodes) and
# three nodes on a Redis Cluster of 3 masters + 3 replicas ("cluster";
# REDIS_URL lists the six nodes). Also: "cluster1" (one node on that Redis
# Cluster), and any Redis variant with the suffix "_wait<n>" (e.g.
# "cluster_wait1"): its nodes run with BROKER_CLUSTER_WAIT_REPLICAS=<n>, so
# WAIT's cost is measured beside the same variant without it.
# The variants alternate within each round, so the machine's noise (other
# builds on the same two cores) hits them alike; read the ratios.
#
# Each round, for each variant (fresh nodes and a fresh redis-server each):
#   - latency and CPU: 1,000 TCP devices at 2,000 round trips/s. Round trip
#     p50/p99, CPU per round trip of the nodes plus Redis (user + system from
#     /proc/<pid>/stat over sending and draining; on the Cluster all six
#     redis-servers summed), and Redis calls per message (INFO commandstats
#     difference from "every device ready" to the end, summed over the
#     Cluster's masters, divided by messages; a round trip is two messages).
#   - throughput: 1,000 TCP devices at rising offered rates; the highest rate
#     carried with nothing lost, at least 95% of it achieved, p99 <= 100 ms.
# Then, with CLUSTER_BIG=1, the big point once: 3 nodes x 15,000 TLS devices
# (CLUSTER_BIG_PER_NODE), 2 subscriptions each, 5,000 round trips/s.
#
#   bench/cluster.sh                      # quick: 2 rounds, about 4-5 minutes
#   CLUSTER_FULL=1 bench/cluster.sh       # 3 rounds, longer runs, about 14 minutes
#   CLUSTER_BIG=1 bench/cluster.sh        # also the 45,000-device TLS point (about 2 more minutes)
#   CLUSTER_SMOKE=1 CLUSTER_NO_BUILD=1 CLUSTER_BIN_DIR=target/debug bench/cluster.sh   # checks the script only
#   CLUSTER_VARIANTS="redis three" bench/cluster.sh
#   CLUSTER_NODE_ENV="BROKER_CLUSTER_WAIT_REPLICAS=1" bench/cluster.sh   # extra env for every node
#                        # (space-separated VAR=VALUE words, no spaces inside a value)
#   CLUSTER_NO_BUILD=1 CLUSTER_SWEEP=none ROUNDS=3 \
#     CLUSTER_VARIANTS="cluster1 cluster1_wait1 cluster cluster_wait1" bench/cluster.sh
#                        # what WAIT 1 costs: latency and CPU only (about 5 minutes), then
#                        # python3 bench/cluster_wait.py bench/results/cluster-<stamp>
#   CLUSTER_BIG_FROM=bench/results/cluster-<stamp> bench/cluster.sh   # report shows that run's big point
#   CLUSTER_METRICS=1 CLUSTER_VARIANTS="cluster redis" CLUSTER_SWEEP="15000 20000" CLUSTER_LAT=0 ROUNDS=1 \
#     bench/cluster.sh   # where replies are lost: each node gets METRICS_LISTEN; its /metrics is read
#                        # before and after each point (<label>.metrics-{before,after}-<node>.txt) and
#                        # the counters that grew printed (<label>.drops.txt), with the router's
#                        # "Read cursor start jumped" lines the point added to the node logs
#
# CLUSTER_SWEEP=none skips the throughput points.
# CLUSTER_SWEEP or CLUSTER_LAT=0 make a partial run: its report is written in
# the results directory only, not over bench/cluster-results.md and RESULTS.md.
#
# Loopback only; every step bounded by a timeout; everything started here is
# stopped by its pid. Needs redis-server 7, redis-cli and python3; builds the release
# binaries (server, loadgen). Results: bench/results/cluster-<stamp>/ and the
# section "Many nodes" of bench/RESULTS.md (bench/cluster-results.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

FULL=${CLUSTER_FULL:-0}
BIG=${CLUSTER_BIG:-0}
VARIANTS=${CLUSTER_VARIANTS:-"single redis three cluster"}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${CLUSTER_OUT:-$ROOT/bench/results/cluster-$STAMP}
mkdir -p "$OUT"
BUDGET=${CLUSTER_BUDGET_SECS:-3000}
START_TS=$(date +%s)

if [ "${CLUSTER_SMOKE:-0}" = 1 ]; then
  # Checks the script itself (any build, e.g. CLUSTER_BIN_DIR=target/debug): 1 round, tiny runs.
  ROUNDS=1; LAT_SECS=2; SWEEP="500"; SWEEP_SECS=2
elif [ "$FULL" = 1 ]; then
  ROUNDS=${ROUNDS:-3}; LAT_SECS=15; SWEEP="5000 10000 15000 20000 25000"; SWEEP_SECS=6
else
  ROUNDS=${ROUNDS:-2}; LAT_SECS=8; SWEEP="5000 10000 15000 20000"; SWEEP_SECS=4
fi
SWEEP=${CLUSTER_SWEEP:-$SWEEP}
if [ "$SWEEP" = none ]; then SWEEP=""; fi
NODE_ENV=${CLUSTER_NODE_ENV:-}
NODE_ENV_NOW=$NODE_ENV # the running variant's: NODE_ENV plus its _wait<n>
for word in $NODE_ENV; do
  case $word in
    [A-Z_]*=*) ;;
    *) echo "CLUSTER_NODE_ENV: '$word' is not VAR=VALUE (space-separated words, no spaces in a value)" >&2; exit 1 ;;
  esac
done
LAT=${CLUSTER_LAT:-1}
METRICS=${CLUSTER_METRICS:-0}
PARTIAL=0
if [ -n "${CLUSTER_SWEEP:-}" ] || [ "$LAT" = 0 ]; then PARTIAL=1; fi
BIG_PER_NODE=${CLUSTER_BIG_PER_NODE:-15000}

# The nodes and the load generator hold tens of thousands of sockets.
ulimit -n 200000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "needs $tool (Debian: redis-server, redis-tools)" >&2; exit 1; }
done

if [ "${CLUSTER_NO_BUILD:-0}" != 1 ]; then
  echo "building release binaries..."
  cargo build --release -q -p loadgen -p server
fi
BIN_DIR=${CLUSTER_BIN_DIR:-$ROOT/target/release}
LG=$BIN_DIR/loadgen
BROKER_BIN=$BIN_DIR/broker

SECRET="bench-cluster-secret-$STAMP-0123456789abcdef"
HKEY="bench-cluster-handler-key-$STAMP"
DEV_DIR=$OUT/certs

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "cores: $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
  echo "open files limit: $(ulimit -n)"
  echo "redis: $(redis-server --version)"
  echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "rounds: $ROUNDS, full: $FULL, big: $BIG"
  echo "variants: $VARIANTS"
  echo "node env: ${NODE_ENV:-(none)}"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} >"$OUT/machine.txt"

# shellcheck source=bench/common.sh
. bench/common.sh

PIDS=()        # everything running now, stopped by pid
NODE_PIDS=()
NODE_TCP=()
NODE_TLS=()
NODE_METRICS=() # NAME=127.0.0.1:PORT of each node's METRICS_LISTEN (CLUSTER_METRICS=1)
REDIS_PIDS=()  # every redis-server of the variant: their CPU is summed
REDIS_STATS=() # the Redis (or the Cluster's masters) whose INFO commandstats is summed
REDIS_URL_NOW=""

stop_all() {
  local p
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=(); NODE_PIDS=(); NODE_TCP=(); NODE_TLS=(); NODE_METRICS=(); REDIS_PIDS=(); REDIS_STATS=(); REDIS_URL_NOW=""
}
trap stop_all EXIT

over_budget() { [ $(( $(date +%s) - START_TS )) -gt "$BUDGET" ]; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

start_redis() {
  local port dir
  port=$(free_port)
  dir=$OUT/redis-$port
  mkdir -p "$dir"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --maxclients 10000 --logfile "$dir/redis.log" &
  REDIS_PIDS+=("$!"); PIDS+=("$!")
  wait_port "$port"
  REDIS_STATS=("redis://127.0.0.1:$port")
  REDIS_URL_NOW="redis://127.0.0.1:$port"
}

cluster_ok() {
  local port
  for port in "$@"; do
    redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
  done
}

# A Redis Cluster of six redis-servers (3 masters + 3 replicas) on free
# loopback ports, each with its own free cluster-bus port.
start_redis_cluster() {
  local ports=() urls=() taken=" " port bus dir i
  for i in 1 2 3 4 5 6; do
    for _ in 1 2 3 4 5 6 7 8 9 10; do
      port=$(free_port); bus=$(free_port)
      case $taken in *" $port "*|*" $bus "*) continue ;; esac
      [ "$port" != "$bus" ] && break
    done
    taken="$taken$port $bus "
    dir=$OUT/redis-$port
    mkdir -p "$dir"
    redis-server --port "$port" --cluster-port "$bus" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/nodes.conf" --cluster-node-timeout 5000 --save '' \
      --appendonly no --dir "$dir" --maxclients 10000 --logfile "$dir/redis.log" </dev/null &
    REDIS_PIDS+=("$!"); PIDS+=("$!")
    ports+=("$port"); urls+=("redis://127.0.0.1:$port")
  done
  for port in "${ports[@]}"; do wait_port "$port"; done
  local addrs=()
  for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
  timeout 60 redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
    </dev/null >"$OUT/redis-cluster-create-${ports[0]}.log" 2>&1 ||
    { echo "redis-cli --cluster create failed: see $OUT/redis-cluster-create-${ports[0]}.log" >&2; exit 1; }
  for _ in $(seq 1 300); do cluster_ok "${ports[@]}" && break; sleep 0.1; done
  cluster_ok "${ports[@]}" || { echo "the Redis Cluster did not reach cluster_state:ok in 30 s" >&2; exit 1; }
  REDIS_STATS=()
  for port in "${ports[@]}"; do
    if [ "$(redis-cli -p "$port" role | head -1)" = master ]; then REDIS_STATS+=("redis://127.0.0.1:$port"); fi
  done
  [ "${#REDIS_STATS[@]}" = 3 ] || { echo "expected 3 masters, found ${#REDIS_STATS[@]}" >&2; exit 1; }
  # Each replica's first sync (diskless: it starts repl-diskless-sync-delay,
  # 5 s, after the replica asked) must be done before the nodes start:
  # until then WAIT n times out on every batch (bench/cluster-notes.md).
  local online=0 url
  for _ in $(seq 1 300); do
    online=0
    for url in "${REDIS_STATS[@]}"; do
      if redis-cli -p "${url##*:}" info replication | grep -q 'state=online'; then online=$((online + 1)); fi
    done
    [ "$online" = 3 ] && break
    sleep 0.1
  done
  [ "$online" = 3 ] || { echo "the Cluster's replicas were not in sync within 30 s" >&2; exit 1; }
  REDIS_URL_NOW=$(join "${urls[@]}")
}

# start_node NAME [REDIS_URL]: a broker node on fresh loopback ports.
start_node() {
  local name=$1 redis=${2:-} tcp tls metrics=""
  tcp=$(free_port); tls=$(free_port)
  if [ "$METRICS" = 1 ]; then metrics=127.0.0.1:$(free_port); fi
  mkdir -p "$OUT/data-$name-$tcp"
  # shellcheck disable=SC2086 # NODE_ENV_NOW is VAR=VALUE words
  env -i PATH="$PATH" HOME="${HOME:-/root}" RUST_LOG=warn $NODE_ENV_NOW \
    ${redis:+REDIS_URL=$redis} ${metrics:+METRICS_LISTEN=$metrics} BROKER_NODE_ID="$name" \
    BROKER_TCP_LISTEN=127.0.0.1:$tcp BROKER_TLS_LISTEN=127.0.0.1:$tls \
    BROKER_DEV_DIR="$DEV_DIR" DATA_DIR="$OUT/data-$name-$tcp" \
    JWT_SECRET="$SECRET" HANDLER_KEYS="$HKEY" COMMAND_TOPICS=echo \
    BROKER_HANDLERS=none IDP_IN_PROCESS=false BROKER_CONN_RATE=0 \
    BROKER_MAX_PENDING_PER_ADDR=0 BROKER_SHUTDOWN_GRACE_SECS=1 \
    "$BROKER_BIN" >>"$OUT/$name.log" 2>&1 &
  local pid=$!
  PIDS+=("$pid"); NODE_PIDS+=("$pid")
  wait_port "$tls"; wait_port "$tcp"
  NODE_TCP+=("127.0.0.1:$tcp"); NODE_TLS+=("127.0.0.1:$tls")
  if [ -n "$metrics" ]; then wait_port "${metrics##*:}"; NODE_METRICS+=("$name=$metrics"); fi
}

# The nodes' names (n1 n2 ...) of NODE_METRICS.
metric_names() { local m; for m in "${NODE_METRICS[@]}"; do printf '%s ' "${m%%=*}"; done; }

# jumped_lines: the router's "Read cursor start jumped" warnings in the node logs so far.
jumped_lines() { cat "$OUT"/n*.log 2>/dev/null | grep -c 'Read cursor start jumped' || true; }

start_variant() {
  local base=${1%%_wait*}
  NODE_ENV_NOW=$NODE_ENV
  case $1 in
    *_wait*)
      [ "$base" != single ] || { echo "variant $1: WAIT needs Redis" >&2; exit 1; }
      NODE_ENV_NOW="$NODE_ENV BROKER_CLUSTER_WAIT_REPLICAS=${1##*_wait}" ;;
  esac
  case $base in
    single) start_node n1 ;;
    redis) start_redis; start_node n1 "$REDIS_URL_NOW" ;;
    cluster1) start_redis_cluster; start_node n1 "$REDIS_URL_NOW" ;;
    three|cluster)
      if [ "$base" = three ]; then start_redis; else start_redis_cluster; fi
      # The first node makes the development certificate; the others reuse it.
      start_node n1 "$REDIS_URL_NOW"
      start_node n2 "$REDIS_URL_NOW"
      start_node n3 "$REDIS_URL_NOW" ;;
    *) echo "unknown variant $1" >&2; exit 1 ;;
  esac
}

join() { local IFS=,; echo "$*"; }

# lg LABEL LIMIT tcp|tls ARGS...: one bounded load-generator run against the
# nodes running now (devices round-robin, echo handler on the first node).
lg() {
  local label=$1 limit=$2 proto=$3; shift 3
  if over_budget; then echo "budget spent: skipping $label"; return 0; fi
  local addrs tls=() redis=() pids
  if [ "$proto" = tls ]; then
    addrs=$(join "${NODE_TLS[@]}"); tls=(--ca "$DEV_DIR/ca.pem")
  else
    addrs=$(join "${NODE_TCP[@]}")
  fi
  # The nodes first, then every redis-server (cluster_report.py splits them by variant).
  pids=$(join "${NODE_PIDS[@]}" "${REDIS_PIDS[@]}")
  if [ "${#REDIS_STATS[@]}" -gt 0 ]; then redis=(--redis-stats "$(join "${REDIS_STATS[@]}")"); fi
  echo "=== $label (nodes ${#NODE_PIDS[@]}, redis-servers ${#REDIS_PIDS[@]})"
  local jumped_before=0
  if [ "${#NODE_METRICS[@]}" -gt 0 ]; then
    python3 "$ROOT/bench/cluster_metrics.py" fetch "$OUT/$label.metrics-before" "${NODE_METRICS[@]}"
    jumped_before=$(jumped_lines)
  fi
  timeout --kill-after=10 "$limit" "$LG" run --label "$label" --json "$OUT/$label.json" \
    --addr "$addrs" "${tls[@]}" --jwt-secret "$SECRET" --echo 1 --handler-key "$HKEY" \
    --broker-pid "$pids" "${redis[@]}" --progress 5 "$@" \
    >"$OUT/$label.log" 2>&1 || echo "  (run $label ended with status $?)"
  grep -E "devices ready|offered|lost|round trip p|CPU per round|Redis calls per|echo handler:" "$OUT/$label.log" | sed 's/^/  /' || true
  if [ "${#NODE_METRICS[@]}" -gt 0 ]; then
    python3 "$ROOT/bench/cluster_metrics.py" fetch "$OUT/$label.metrics-after" "${NODE_METRICS[@]}"
    # shellcheck disable=SC2046 # the names are single words
    {
      echo "counters that grew over $label (from the nodes' /metrics):"
      python3 "$ROOT/bench/cluster_metrics.py" diff "$OUT/$label.metrics-before" "$OUT/$label.metrics-after" $(metric_names)
      echo "  router \"Read cursor start jumped\" warnings added to the node logs: $(( $(jumped_lines) - jumped_before ))"
    } | tee "$OUT/$label.drops.txt"
  fi
}

for round in $(seq "$ROUNDS"); do
  for v in $VARIANTS; do
    start_variant "$v"
    [ "$LAT" = 0 ] || lg "lat-r${round}__$v" 120 tcp --devices 1000 --rate 2000 --duration "$LAT_SECS" --uid-prefix "l${round}x"
    for r in $SWEEP; do
      lg "tput-${r}-r${round}__$v" 90 tcp --devices 1000 --rate "$r" --duration "$SWEEP_SECS" --drain 3 \
        --uid-prefix "t${r}x${round}x"
    done
    stop_all
  done
done

if [ "$BIG" = 1 ]; then
  start_variant three
  total=$(( BIG_PER_NODE * 3 ))
  procs=$(( (total + 14999) / 15000 ))
  lg "big-${BIG_PER_NODE}x3__three" 600 tls --devices "$total" --subs 2 --rate 5000 --duration 20 \
    --connect-rate 1500 --processes "$procs" --source-addrs 4 --connect-timeout 60 --uid-prefix b
  stop_all
fi

# Keep the reports and logs; the development CA's key and the nodes' stores are not results.
rm -rf "$OUT/certs" "$OUT"/data-* "$OUT"/redis-*/dump.rdb "$OUT"/redis-*/nodes.conf
echo "results in $OUT (took $(( $(date +%s) - START_TS )) s)"
if [ "${CLUSTER_SMOKE:-0}" = 1 ] || [ "$PARTIAL" = 1 ]; then
  # A smoke or partial run does not replace the published results.
  python3 "$ROOT/bench/cluster_report.py" "$OUT" "$OUT/cluster-results.md" "$OUT/RESULTS.md" ||
    echo "no report for this partial run (the points' logs and .drops.txt are in $OUT)"
else
  python3 "$ROOT/bench/cluster_report.py" "$OUT" "$ROOT/bench/cluster-results.md" "$ROOT/bench/RESULTS.md" \
    ${CLUSTER_BIG_FROM:+"$CLUSTER_BIG_FROM"}
fi
