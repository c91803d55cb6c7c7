#!/usr/bin/env bash
# Where the broker's CPU goes at one load point: starts our broker over TCP,
# drives DEVICES devices at RATE round trips/s through the load generator's
# echo handler, records the broker with `perf` (DWARF call graphs) for 4 s in
# the middle of the run, and prints the split kernel / broker / libc and the
# heaviest symbols, inclusive and self. Loopback only, bounded in time.
#   cargo build --release --bin broker --bin loadgen && bench/profile.sh
#   RATE=25000 bench/profile.sh
#   DEVICES=10000 RATE=5000 bench/profile.sh   (the 10,000-device point)
# Needs `perf` (Debian `linux-perf`) and permission to trace the broker.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench/common.sh
. bench/common.sh
RATE=${RATE:-2000}
DEVICES=${DEVICES:-1000}
BROKER=${BROKER:-target/release/broker}
# Many devices: connect at a bounded rate over several source addresses, and
# start recording once they are all connected and sending.
SPREAD=(); WARMUP=5
if [ "$DEVICES" -gt 2000 ]; then SPREAD=(--connect-rate 2000 --source-addrs 4); WARMUP=$((5 + DEVICES / 2000)); fi
OUT=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$OUT"' EXIT
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 2; }

BROKER_HANDLERS=none BROKER_CONN_RATE=0 JWT_SECRET=bench-secret-0123456789abcdef0123456789 HANDLER_KEYS=bench-handler-key-0123 \
COMMAND_TOPICS=echo BROKER_TCP_LISTEN=127.0.0.1:21910 BROKER_TLS_LISTEN=127.0.0.1:21911 \
BROKER_DEV_DIR="$OUT" RUST_LOG=warn "$BROKER" >"$OUT/broker.log" 2>&1 &
pid=$!
wait_port 21910

timeout 120 target/release/loadgen run --addr 127.0.0.1:21910 --jwt-secret bench-secret-0123456789abcdef0123456789 --echo 1 \
  --handler-key bench-handler-key-0123 --devices "$DEVICES" --rate "$RATE" --duration 12 "${SPREAD[@]}" \
  --broker-pid "$pid" >"$OUT/loadgen.log" 2>&1 &
lg=$!
sleep "$WARMUP"
perf record -q -F 1500 --call-graph dwarf,16384 -p "$pid" -o "$OUT/perf.data" -- sleep 4 2>/dev/null
wait "$lg" || true
grep -E "round trip|lost" "$OUT/loadgen.log"
echo "--- share of broker CPU by object"
perf report -i "$OUT/perf.data" --no-children --sort dso -g none 2>/dev/null | grep "%" | head -6 | cut -c1-120
echo "--- heaviest symbols, inclusive (children)"
perf report -i "$OUT/perf.data" --children --sort symbol -g none --percent-limit 5 2>/dev/null \
  | grep "%" | grep -v "inlined\|catch_unwind\|call_once\|harness\|Harness\|RawTask\|LocalKey" | head -30 | cut -c1-140
echo "--- heaviest symbols, self"
perf report -i "$OUT/perf.data" --no-children --sort symbol -g none 2>/dev/null | grep "%" | head -20 | cut -c1-140
