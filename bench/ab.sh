#!/usr/bin/env bash
# Before/after: two broker binaries under the same loads, alternating, in one
# run (so the machine's noise hits both alike). Reports broker CPU per round
# trip (1,000 devices at 2,000 round trips/s, QoS 0, TCP) and memory per
# connection (5,000 devices). Loopback only; every run bounded by a timeout.
#   git worktree add /tmp/before <rev> && (cd /tmp/before && cargo build --release --bin broker)
#   cargo build --release --bin broker --bin loadgen
#   bench/ab.sh /tmp/before/target/release/broker target/release/broker
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE=${1:?usage: bench/ab.sh BEFORE_BROKER AFTER_BROKER}
AFTER=${2:?usage: bench/ab.sh BEFORE_BROKER AFTER_BROKER}
ROUNDS=${ROUNDS:-5}
LG=target/release/loadgen
DEV_DIR=$(mktemp -d)
trap 'rm -rf "$DEV_DIR"' EXIT
# shellcheck source=bench/common.sh
. bench/common.sh
SECRET=bench-secret-0123456789abcdef0123456789
HKEY=bench-handler-key-0123
# measure BINARY ARGS...: one bounded load-generator run against a fresh broker; prints its summary lines.
measure() {
  local bin=$1; shift
  BROKER_HANDLERS=none BROKER_CONN_RATE=0 IDP_IN_PROCESS=false JWT_SECRET=$SECRET HANDLER_KEYS=$HKEY \
    COMMAND_TOPICS=echo BROKER_TCP_LISTEN=127.0.0.1:21900 BROKER_TLS_LISTEN=127.0.0.1:21901 \
    BROKER_DEV_DIR="$DEV_DIR" RUST_LOG=warn "$bin" >/dev/null 2>&1 &
  local pid=$!
  wait_port 21900
  timeout 120 "$LG" run --addr 127.0.0.1:21900 --jwt-secret "$SECRET" --echo 1 --handler-key "$HKEY" \
    --broker-pid "$pid" "$@" 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
num() { grep -E "$1" | grep -Eo '[0-9.]+ (µs|KiB)' | head -1 | cut -d' ' -f1; }
cpu_b=0; cpu_a=0; mem_b=0; mem_a=0
for round in $(seq "$ROUNDS"); do
  b=$(measure "$BEFORE" --devices 1000 --rate 2000 --duration 8 | num "CPU per round trip")
  a=$(measure "$AFTER" --devices 1000 --rate 2000 --duration 8 | num "CPU per round trip")
  mb=$(measure "$BEFORE" --devices 5000 --rate 5000 --duration 3 --connect-rate 2000 --source-addrs 4 | num "memory per")
  ma=$(measure "$AFTER" --devices 5000 --rate 5000 --duration 3 --connect-rate 2000 --source-addrs 4 | num "memory per")
  if [ -z "$b" ] || [ -z "$a" ] || [ -z "$mb" ] || [ -z "$ma" ]; then
    echo "round $round: a run reported no figure (broker down or run failed)" >&2; exit 1
  fi
  echo "round $round: CPU/rt before $b µs, after $a µs; memory/conn before $mb KiB, after $ma KiB"
  cpu_b=$(python3 -c "print($cpu_b+$b)"); cpu_a=$(python3 -c "print($cpu_a+$a)")
  mem_b=$(python3 -c "print($mem_b+$mb)"); mem_a=$(python3 -c "print($mem_a+$ma)")
done
python3 -c "print(f'mean over $ROUNDS rounds: CPU/rt {$cpu_a/$cpu_b:.2f}x before ({$cpu_b/$ROUNDS:.1f} -> {$cpu_a/$ROUNDS:.1f} µs), memory/conn {$mem_a/$mem_b:.2f}x before ({$mem_b/$ROUNDS:.1f} -> {$mem_a/$ROUNDS:.1f} KiB)')"
