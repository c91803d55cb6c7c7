#!/usr/bin/env bash
# MQTT over WebSocket over TLS beside MQTT over TLS, one broker binary, in one
# run, alternating (so the machine's noise hits both alike): broker CPU per
# round trip (DEVICES devices, default 1,000, at RATE round trips/s, default
# 2,000, QoS 0, 8 s; the echo handler on the same transport as the devices)
# and broker memory per connection (MEM_DEVICES devices, default 5,000).
# A fresh broker for each measurement, ROUNDS rounds (default 3); prints each
# round and the means with the WSS/TLS ratios.
# Loopback only; every run bounded by a timeout. Needs release builds:
#   cargo build --release --bin broker --bin loadgen && bench/ws-vs-tls.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BROKER=${BROKER:-target/release/broker}
LG=target/release/loadgen
ROUNDS=${ROUNDS:-3}
DEVICES=${DEVICES:-1000}
RATE=${RATE:-2000}
MEM_DEVICES=${MEM_DEVICES:-5000}
DEV_DIR=$(mktemp -d)
trap 'rm -rf "$DEV_DIR"' EXIT
# shellcheck source=bench/common.sh
. bench/common.sh
SECRET=bench-secret-0123456789abcdef0123456789
HKEY=bench-handler-key-0123
# measure tls|wss ARGS...: one bounded load-generator run against a fresh broker; prints its summary.
measure() {
  local transport=$1; shift
  BROKER_HANDLERS=none BROKER_CONN_RATE=0 IDP_IN_PROCESS=false JWT_SECRET=$SECRET HANDLER_KEYS=$HKEY \
    COMMAND_TOPICS=echo BROKER_TLS_LISTEN=127.0.0.1:21901 BROKER_WSS_LISTEN=127.0.0.1:21903 \
    BROKER_DEV_DIR="$DEV_DIR" RUST_LOG=warn "$BROKER" >/dev/null 2>&1 &
  local pid=$!
  wait_port 21901
  wait_port 21903
  local target=(--addr 127.0.0.1:21901 --ca "$DEV_DIR/ca.pem")
  if [ "$transport" = wss ]; then target=(--addr 127.0.0.1:21903 --ca "$DEV_DIR/ca.pem" --ws); fi
  timeout 300 "$LG" run "${target[@]}" --jwt-secret "$SECRET" --echo 1 --handler-key "$HKEY" \
    --broker-pid "$pid" "$@" 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
num() { grep -E "$1" | grep -Eo '[0-9.]+ (µs|KiB)' | head -1 | cut -d' ' -f1; }
add() { python3 -c "print($1+$2)"; }
cpu_t=0; cpu_w=0; mem_t=0; mem_w=0
for round in $(seq "$ROUNDS"); do
  load=(--devices "$DEVICES" --rate "$RATE" --duration 8)
  many=(--devices "$MEM_DEVICES" --rate 2000 --duration 3 --connect-rate 1500 --source-addrs 4)
  ct=$(measure tls "${load[@]}" | num "CPU per round trip")
  cw=$(measure wss "${load[@]}" | num "CPU per round trip")
  mt=$(measure tls "${many[@]}" | num "memory per")
  mw=$(measure wss "${many[@]}" | num "memory per")
  if [ -z "$ct" ] || [ -z "$cw" ] || [ -z "$mt" ] || [ -z "$mw" ]; then
    echo "round $round: a run reported no figure (broker down or run failed)" >&2; exit 1
  fi
  echo "round $round: CPU/rt TLS $ct µs, WSS $cw µs ($(python3 -c "print(f'{$cw/$ct:.2f}')")x); memory/conn at $MEM_DEVICES TLS $mt KiB, WSS $mw KiB (+$(python3 -c "print(f'{$mw-$mt:.1f}')") KiB)"
  cpu_t=$(add "$cpu_t" "$ct"); cpu_w=$(add "$cpu_w" "$cw"); mem_t=$(add "$mem_t" "$mt"); mem_w=$(add "$mem_w" "$mw")
done
python3 -c "print(f'mean over $ROUNDS rounds: CPU/rt WSS {$cpu_w/$cpu_t:.2f}x TLS ({$cpu_t/$ROUNDS:.1f} -> {$cpu_w/$ROUNDS:.1f} µs); memory/conn WSS {$mem_w/$mem_t:.2f}x TLS ({$mem_t/$ROUNDS:.1f} -> {$mem_w/$ROUNDS:.1f} KiB, +{($mem_w-$mem_t)/$ROUNDS:.2f} KiB)')"
