#!/usr/bin/env bash
# Before/after: two broker binaries under the same loads, alternating, in one
# run (so the machine's noise hits both alike). Reports broker CPU per round
# trip (1,000 devices at 2,000 round trips/s, QoS 0, TCP) and memory per
# connection (5,000 devices over TCP). AB_TLS=1 adds memory per connection
# over TLS at 5,000 devices; AB_BIG=1 adds the big point, 19,000 TLS devices
# with 6 subscriptions each (once per round; two load processes).
# Loopback only; every run bounded by a timeout.
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
  local addr=127.0.0.1:21900 tls=()
  if [ "${1:-}" = tls ]; then addr=127.0.0.1:21901; tls=(--ca "$DEV_DIR/ca.pem"); shift; fi
  timeout 300 "$LG" run --addr "$addr" "${tls[@]}" --jwt-secret "$SECRET" --echo 1 --handler-key "$HKEY" \
    --broker-pid "$pid" "$@" 2>&1 || true
  kill "$pid"; wait "$pid" 2>/dev/null || true
}
num() { grep -E "$1" | grep -Eo '[0-9.]+ (µs|KiB)' | head -1 | cut -d' ' -f1; }
cpu_b=0; cpu_a=0; mem_b=0; mem_a=0; tls_b=0; tls_a=0; big_b=0; big_a=0
for round in $(seq "$ROUNDS"); do
  b=$(measure "$BEFORE" --devices 1000 --rate 2000 --duration 8 | num "CPU per round trip")
  a=$(measure "$AFTER" --devices 1000 --rate 2000 --duration 8 | num "CPU per round trip")
  mb=$(measure "$BEFORE" --devices 5000 --rate 5000 --duration 3 --connect-rate 2000 --source-addrs 4 | num "memory per")
  ma=$(measure "$AFTER" --devices 5000 --rate 5000 --duration 3 --connect-rate 2000 --source-addrs 4 | num "memory per")
  if [ -z "$b" ] || [ -z "$a" ] || [ -z "$mb" ] || [ -z "$ma" ]; then
    echo "round $round: a run reported no figure (broker down or run failed)" >&2; exit 1
  fi
  echo "round $round: CPU/rt before $b µs, after $a µs; memory/conn before $mb KiB, after $ma KiB"
  if [ "${AB_TLS:-0}" = 1 ]; then
    tb=$(measure "$BEFORE" tls --devices 5000 --rate 5000 --duration 3 --connect-rate 1500 --source-addrs 4 | num "memory per")
    ta=$(measure "$AFTER" tls --devices 5000 --rate 5000 --duration 3 --connect-rate 1500 --source-addrs 4 | num "memory per")
    echo "round $round: TLS memory/conn at 5,000 before $tb KiB, after $ta KiB"
    tls_b=$(python3 -c "print($tls_b+${tb:-0})"); tls_a=$(python3 -c "print($tls_a+${ta:-0})")
  fi
  if [ "${AB_BIG:-0}" = 1 ]; then
    big=(--devices 19000 --subs 6 --rate 5000 --duration 10 --connect-rate 1500 --processes 2 --source-addrs 2)
    bb=$(measure "$BEFORE" tls "${big[@]}" | num "memory per")
    ba=$(measure "$AFTER" tls "${big[@]}" | num "memory per")
    echo "round $round: 19,000 TLS x 6 subs memory/conn before $bb KiB, after $ba KiB"
    big_b=$(python3 -c "print($big_b+${bb:-0})"); big_a=$(python3 -c "print($big_a+${ba:-0})")
  fi
  cpu_b=$(python3 -c "print($cpu_b+$b)"); cpu_a=$(python3 -c "print($cpu_a+$a)")
  mem_b=$(python3 -c "print($mem_b+$mb)"); mem_a=$(python3 -c "print($mem_a+$ma)")
done
python3 -c "print(f'mean over $ROUNDS rounds: CPU/rt {$cpu_a/$cpu_b:.2f}x before ({$cpu_b/$ROUNDS:.1f} -> {$cpu_a/$ROUNDS:.1f} µs), memory/conn {$mem_a/$mem_b:.2f}x before ({$mem_b/$ROUNDS:.1f} -> {$mem_a/$ROUNDS:.1f} KiB)')"
if [ "${AB_TLS:-0}" = 1 ]; then
  python3 -c "print(f'mean over $ROUNDS rounds: TLS memory/conn at 5,000 {$tls_b/$ROUNDS:.1f} -> {$tls_a/$ROUNDS:.1f} KiB')"
fi
if [ "${AB_BIG:-0}" = 1 ]; then
  python3 -c "print(f'mean over $ROUNDS rounds: 19,000 TLS x 6 subs memory/conn {$big_b/$ROUNDS:.1f} -> {$big_a/$ROUNDS:.1f} KiB')"
fi
