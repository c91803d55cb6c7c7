#!/usr/bin/env bash
# One-go benchmark, loopback only and bounded in time: the same loads against
# the bare rumqttd router (its own listener, no gate), our broker over TCP and
# over TLS, and Mosquitto (password authentication); a rate sweep at 1,000
# devices, 10,000 devices with 1,000 new users, and scale curves in devices
# and in subscriptions. Writes JSON per run under bench/results/<stamp>/ and
# regenerates bench/RESULTS.md and bench/latency-vs-rate.svg.
#
#   bench/run.sh                 # full run (about 25 minutes)
#   BENCH_QUICK=1 bench/run.sh   # short smoke run (about 5 minutes)
#   BENCH_ONLY="bare ours-tcp" bench/run.sh   # a subset of brokers
#
# Needs: cargo, mosquitto + mosquitto_passwd (Debian `mosquitto`), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${BENCH_QUICK:-0}
ONLY=${BENCH_ONLY:-"bare ours-tcp ours-tls mosquitto"}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-$ROOT/bench/results/$STAMP}
mkdir -p "$OUT"
# Whole-run budget: every step is also bounded by its own timeout.
BUDGET=${BENCH_BUDGET_SECS:-2700}
START_TS=$(date +%s)

ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if ! command -v mosquitto >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get install -y -qq mosquitto >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq mosquitto; }
  fi
fi

echo "building release binaries..."
cargo build --release -q -p loadgen -p server
LG=$ROOT/target/release/loadgen
BROKER_BIN=$ROOT/target/release/broker

SECRET="bench-jwt-secret-$STAMP"
HKEY="bench-handler-key-$STAMP"
DEVPASS="bench-device-pass-$STAMP"
PORT_BARE_V5=21884
PORT_BARE_V4=21883
PORT_TCP=21885
PORT_TLS=21886
PORT_MOSQ=21887

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //')"
  echo "cores: $(nproc)"
  echo "memory: $(free -g | awk '/Mem:/ {print $2 " GiB"}')"
  echo "kernel: $(uname -r)"
  echo "open files limit: $(ulimit -n)"
  echo "mosquitto: $(mosquitto -h 2>/dev/null | head -1 || true)"
  echo "rustc: $(rustc --version)"
  echo "quick: $QUICK"
} >"$OUT/machine.txt"

BPID=""
cleanup() {
  if [ -n "$BPID" ]; then kill "$BPID" 2>/dev/null || true; wait "$BPID" 2>/dev/null || true; fi
}
trap cleanup EXIT

# shellcheck source=bench/common.sh
. bench/common.sh

over_budget() {
  [ $(( $(date +%s) - START_TS )) -gt "$BUDGET" ]
}

start_broker() {
  case $1 in
    bare)
      "$LG" bare-router --v5-listen 127.0.0.1:$PORT_BARE_V5 --v4-listen 127.0.0.1:$PORT_BARE_V4 \
        >>"$OUT/bare.log" 2>&1 &
      BPID=$!; wait_port $PORT_BARE_V5 ;;
    ours-tcp|ours-tls)
      env ${WORKERS:+BROKER_WORKER_THREADS=$WORKERS} BROKER_TCP_LISTEN=127.0.0.1:$PORT_TCP BROKER_TLS_LISTEN=127.0.0.1:$PORT_TLS \
        BROKER_DEV_DIR="$OUT/certs" JWT_SECRET="$SECRET" HANDLER_KEYS="$HKEY" \
        COMMAND_TOPICS=echo BROKER_HANDLERS=none BROKER_CONN_RATE=0 RUST_LOG=warn \
        "$BROKER_BIN" >>"$OUT/ours.log" 2>&1 &
      BPID=$!; wait_port $PORT_TLS; wait_port $PORT_TCP ;;
    mosquitto)
      local dir="$OUT/mosquitto"
      mkdir -p "$dir"
      rm -f "$dir/passwd"
      touch "$dir/passwd"; chmod 600 "$dir/passwd"
      mosquitto_passwd -b "$dir/passwd" device "$DEVPASS"
      mosquitto_passwd -b "$dir/passwd" handler "$HKEY"
      cat >"$dir/mosquitto.conf" <<EOF
per_listener_settings false
user $(id -un)
listener $PORT_MOSQ 127.0.0.1
allow_anonymous false
password_file $dir/passwd
max_connections -1
set_tcp_nodelay true
max_queued_messages 10000
persistence false
log_dest stderr
log_type error
log_type warning
EOF
      mosquitto -c "$dir/mosquitto.conf" >>"$OUT/mosquitto.log" 2>&1 &
      BPID=$!; wait_port $PORT_MOSQ ;;
  esac
}

stop_broker() {
  if [ -n "$BPID" ]; then kill "$BPID" 2>/dev/null || true; wait "$BPID" 2>/dev/null || true; fi
  BPID=""
  sleep 1
}

# Connection arguments of the devices and of the in-process echo handler.
target_args() {
  case $1 in
    bare) echo "--addr 127.0.0.1:$PORT_BARE_V5 --uid-in-payload --echo 1 --handler-user ''" ;;
    ours-tcp) echo "--addr 127.0.0.1:$PORT_TCP --jwt-secret $SECRET --echo 1 --handler-key $HKEY" ;;
    ours-tls) echo "--addr 127.0.0.1:$PORT_TLS --ca $OUT/certs/ca.pem --jwt-secret $SECRET --echo 1 --handler-key $HKEY" ;;
    mosquitto) echo "--addr 127.0.0.1:$PORT_MOSQ --username device --password $DEVPASS --uid-in-payload --echo 1 --handler-user handler --handler-key $HKEY" ;;
  esac
}

# lg LABEL BROKER TIMEOUT ARGS...: one bounded load-generator run.
lg() {
  local label=$1 broker=$2 limit=$3; shift 3
  if over_budget; then echo "budget spent: skipping $label"; return 0; fi
  echo "=== $label ($broker)"
  # shellcheck disable=SC2046
  eval timeout --kill-after=10 "$limit" "$LG" run --label "$label" --json "$OUT/$label.json" \
    --broker-pid "$BPID" --progress 5 $(target_args "$broker") "$@" \
    >"$OUT/$label.log" 2>&1 || echo "  (run $label ended with status $?)"
  grep -E "devices ready|offered|lost|round trip|new users|CPU per round|memory per" "$OUT/$label.log" | sed 's/^/  /' || true
}

if [ "$QUICK" = 1 ]; then
  SWEEP="2000 10000 25000"; SWEEP_SECS=5; CPU_SECS=8
  NEW_DEVICES=5000; NEW_USERS=500; NEW_SECS=10
  DEVICE_CURVE="2000 5000"; SUB_CURVE="1 6"; SUB_DEVICES=5000
  TLS_BIG=5000
else
  SWEEP="5000 10000 15000 20000 25000 30000"; SWEEP_SECS=8; CPU_SECS=15
  NEW_DEVICES=10000; NEW_USERS=1000; NEW_SECS=20
  DEVICE_CURVE="2000 5000 10000 19000"; SUB_CURVE="1 3 6"; SUB_DEVICES=10000
  TLS_BIG=19000
fi

procs_for() { if [ "$1" -gt 15000 ]; then echo 2; else echo 1; fi; }

for b in $ONLY; do
  # 1. CPU per round trip at 1,000 devices, then a rate sweep (latency vs offered rate).
  start_broker "$b"
  lg "cpu1k__$b" "$b" 120 --devices 1000 --rate 2000 --duration $CPU_SECS --uid-prefix c
  for r in $SWEEP; do
    lg "sweep-${r}__$b" "$b" 120 --devices 1000 --rate "$r" --duration $SWEEP_SECS --uid-prefix c
  done
  stop_broker

  # 2. 10,000 devices at 5,000/s with 1,000 users new to the broker joining.
  start_broker "$b"
  lg "new10k__$b" "$b" 240 --devices $NEW_DEVICES --rate 5000 --duration $NEW_SECS \
    --new-users $NEW_USERS --connect-rate 2000 --source-addrs 4 --uid-prefix n
  stop_broker

  # 3. Scale curve in devices at 5,000/s (fresh broker each, for memory per connection).
  for d in $DEVICE_CURVE; do
    start_broker "$b"
    lg "devices-${d}__$b" "$b" 240 --devices "$d" --rate 5000 --duration 10 --connect-rate 2000 \
      --processes "$(procs_for "$d")" --source-addrs 4 --uid-prefix d
    stop_broker
  done

  # 4. Scale curve in subscriptions per device at 5,000/s.
  for s in $SUB_CURVE; do
    start_broker "$b"
    lg "subs-${s}__$b" "$b" 240 --devices $SUB_DEVICES --subs "$s" --rate 5000 --duration 10 \
      --connect-rate 2000 --source-addrs 4 --uid-prefix s
    stop_broker
  done
done

# 5. The big TLS point: 19,000 TLS devices x 6 subscriptions, 5,000/s.
case " $ONLY " in
  *" ours-tls "*)
    start_broker ours-tls
    lg "tls19k__ours-tls" ours-tls 300 --devices $TLS_BIG --subs 6 --rate 5000 --duration 20 \
      --connect-rate 1500 --processes "$(procs_for $TLS_BIG)" --source-addrs 2 --uid-prefix t
    stop_broker
    # 6. 1,000 TLS devices at 25,000/s with two async workers (the default on
    #    two cores is one: least CPU per message; two: lower latency at the top).
    WORKERS=2 start_broker ours-tls
    lg "tls25k2w__ours-tls" ours-tls 120 --devices 1000 --rate 25000 --duration $SWEEP_SECS --uid-prefix w
    stop_broker ;;
esac

echo "results in $OUT"
python3 "$ROOT/bench/report.py" "$OUT" "$ROOT/bench/RESULTS.md" "$ROOT/bench/latency-vs-rate.svg"
echo "wrote bench/RESULTS.md and bench/latency-vs-rate.svg (took $(( $(date +%s) - START_TS )) s)"
