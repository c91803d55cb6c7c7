#!/usr/bin/env bash
# The gate's overhead, side by side: the bare rumqttd router (its own
# listener, no gate) and our broker over TCP, back to back on the same
# machine, 1,000 devices at 2,000 round trips/s for 8 s, ROUNDS times.
# Loopback only; every run bounded by a timeout. Needs release builds:
#   cargo build --release --bin broker --bin loadgen && bench/gate-vs-bare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LG=target/release/loadgen
ROUNDS=${ROUNDS:-3}
DEV_DIR=$(mktemp -d)
trap 'rm -rf "$DEV_DIR"' EXIT
cpu() { grep -E "per round trip" | grep -Eo '[0-9.]+ µs' | head -1; }
for round in $(seq "$ROUNDS"); do
  "$LG" bare-router --v5-listen 127.0.0.1:21884 --v4-listen 127.0.0.1:21883 >/dev/null 2>&1 &
  pid=$!; sleep 1
  bare=$(timeout 60 "$LG" run --addr 127.0.0.1:21884 --uid-in-payload --echo 1 --handler-user '' \
    --devices 1000 --rate 2000 --duration 8 --broker-pid "$pid" 2>&1 | cpu)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  BROKER_HANDLERS=none BROKER_CONN_RATE=0 JWT_SECRET=bench-secret HANDLER_KEYS=bench-handler-key-0123 \
  BROKER_TCP_LISTEN=127.0.0.1:21900 BROKER_TLS_LISTEN=127.0.0.1:21901 BROKER_DEV_DIR="$DEV_DIR" RUST_LOG=warn \
    target/release/broker >/dev/null 2>&1 &
  pid=$!; sleep 1
  ours=$(timeout 60 "$LG" run --addr 127.0.0.1:21900 --jwt-secret bench-secret --echo 1 \
    --handler-key bench-handler-key-0123 --devices 1000 --rate 2000 --duration 8 --broker-pid "$pid" 2>&1 | cpu)
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "round $round: broker CPU per round trip: bare router $bare, gate over TCP $ours"
done
