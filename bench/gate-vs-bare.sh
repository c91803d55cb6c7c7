#!/usr/bin/env bash
# The gate's overhead, side by side: the bare rumqttd router (its own
# listener, no gate), our broker over TCP, and Mosquitto (password
# authentication, when installed), back to back on the same machine,
# DEVICES devices (default 1,000) at RATE round trips/s (default 2,000) for
# 8 s, ROUNDS times. DEVICES=10000 RATE=5000 is the 10,000-device point.
# CPU per round trip on these shared machines varies ~30% from run to run,
# so the ratios of each round, and their mean, are what to read.
# Loopback only; every run bounded by a timeout. Needs release builds:
#   cargo build --release --bin broker --bin loadgen && bench/gate-vs-bare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LG=target/release/loadgen
ROUNDS=${ROUNDS:-3}
RATE=${RATE:-2000}
DEVICES=${DEVICES:-1000}
BROKER=${BROKER:-target/release/broker}
# Past a few thousand devices: connect at a bounded rate, over several source
# addresses (one address has ~28k ephemeral ports, and each run reuses them).
SPREAD=()
if [ "$DEVICES" -gt 2000 ]; then SPREAD=(--connect-rate 2000 --source-addrs 4); fi
DEV_DIR=$(mktemp -d)
trap 'rm -rf "$DEV_DIR"' EXIT
cpu() { grep -E "per round trip" | grep -Eo '[0-9.]+ µs' | head -1 | cut -d' ' -f1; }
# shellcheck source=bench/common.sh
. bench/common.sh
# run_lg ARGS...: one bounded run; prints its broker CPU per round trip, or stops the script.
run_lg() {
  local v
  v=$(timeout 120 "$LG" run --devices "$DEVICES" --rate "$RATE" --duration 8 "${SPREAD[@]}" "$@" 2>&1 | cpu || true)
  if [ -z "$v" ]; then
    echo "a load-generator run reported no CPU figure (broker down or run failed): $*" >&2
    exit 1
  fi
  echo "$v"
}

MOSQ=""
if command -v mosquitto >/dev/null && command -v mosquitto_passwd >/dev/null; then
  MOSQ=1
  touch "$DEV_DIR/passwd"; chmod 600 "$DEV_DIR/passwd"
  mosquitto_passwd -b "$DEV_DIR/passwd" device bench-device-pass
  mosquitto_passwd -b "$DEV_DIR/passwd" handler bench-handler-key-0123
  cat >"$DEV_DIR/mosquitto.conf" <<EOF
per_listener_settings false
user $(id -un)
listener 21902 127.0.0.1
allow_anonymous false
password_file $DEV_DIR/passwd
max_connections -1
set_tcp_nodelay true
max_queued_messages 10000
persistence false
EOF
fi

sum_bare=0; sum_ours=0; sum_mosq=0
for round in $(seq "$ROUNDS"); do
  "$LG" bare-router --v5-listen 127.0.0.1:21884 --v4-listen 127.0.0.1:21883 >/dev/null 2>&1 &
  pid=$!; wait_port 21884
  bare=$(run_lg --addr 127.0.0.1:21884 --uid-in-payload --echo 1 --handler-user '' --broker-pid "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true

  BROKER_HANDLERS=none BROKER_CONN_RATE=0 JWT_SECRET=bench-secret-0123456789abcdef0123456789 HANDLER_KEYS=bench-handler-key-0123 \
  COMMAND_TOPICS=echo BROKER_TCP_LISTEN=127.0.0.1:21900 BROKER_TLS_LISTEN=127.0.0.1:21901 \
  BROKER_DEV_DIR="$DEV_DIR" RUST_LOG=warn "$BROKER" >/dev/null 2>&1 &
  pid=$!; wait_port 21900
  ours=$(run_lg --addr 127.0.0.1:21900 --jwt-secret bench-secret-0123456789abcdef0123456789 --echo 1 \
    --handler-key bench-handler-key-0123 --broker-pid "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true

  line="round $round, $DEVICES devices at $RATE/s: broker CPU per round trip: bare router $bare µs, gate over TCP $ours µs"
  line="$line ($(python3 -c "print(f'{$ours/$bare:.2f}')")× bare)"
  sum_bare=$(python3 -c "print($sum_bare+$bare)"); sum_ours=$(python3 -c "print($sum_ours+$ours)")
  if [ -n "$MOSQ" ]; then
    mosquitto -c "$DEV_DIR/mosquitto.conf" >/dev/null 2>&1 &
    pid=$!; wait_port 21902
    mosq=$(run_lg --addr 127.0.0.1:21902 --username device --password bench-device-pass --uid-in-payload \
      --echo 1 --handler-user handler --handler-key bench-handler-key-0123 --broker-pid "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    line="$line, Mosquitto $mosq µs (gate $(python3 -c "print(f'{$ours/$mosq:.2f}')")× Mosquitto)"
    sum_mosq=$(python3 -c "print($sum_mosq+$mosq)")
  fi
  echo "$line"
done
summary="mean over $ROUNDS rounds: bare $(python3 -c "print(f'{$sum_bare/$ROUNDS:.1f}')") µs, gate $(python3 -c "print(f'{$sum_ours/$ROUNDS:.1f}')") µs ($(python3 -c "print(f'{$sum_ours/$sum_bare:.2f}')")× bare)"
if [ -n "$MOSQ" ]; then
  summary="$summary, Mosquitto $(python3 -c "print(f'{$sum_mosq/$ROUNDS:.1f}')") µs (gate $(python3 -c "print(f'{$sum_ours/$sum_mosq:.2f}')")× Mosquitto)"
fi
echo "$summary"
