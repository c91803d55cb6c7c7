#!/usr/bin/env bash
# What the revocation sweep costs Redis: broker binaries (one or two, e.g. a
# before and an after) each on a fresh redis-server, 2,000 devices connected,
# BROKER_REVOCATION_POLL_SECS=1; counts the GET/MGET Redis executed over 10 s
# (INFO commandstats: calls and the microseconds Redis spent in them, which
# leave out each command's I/O) and Redis's CPU over the same 10 s (the
# 50 round trips/s of traffic are the same in every run). Loopback only; bounded by timeouts.
#   cargo build --bin broker --bin loadgen      (debug is enough: it counts commands)
#   bench/revocation-sweep.sh /tmp/before/target/debug/broker target/debug/broker
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: bench/revocation-sweep.sh BROKER [BROKER...]" >&2; exit 2; }
LG=${LG:-target/debug/loadgen}
DEVICES=${DEVICES:-2000}
SECRET=bench-secret-0123456789abcdef0123456789
HKEY=bench-handler-key-0123
# Redis's CPU seconds so far (user + sys, all threads).
redis_cpu() {
  redis-cli -p "$1" INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ {s += $2} END {print s}'
}
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
for bin in "$@"; do
  dir=$(mktemp -d)
  rport=$(free_port); tport=$(free_port)
  timeout 120 redis-server --port "$rport" --save '' --appendonly no >"$dir/redis.log" 2>&1 &
  rpid=$!
  sleep 0.5
  REDIS_URL=redis://127.0.0.1:$rport BROKER_TCP_LISTEN=127.0.0.1:$tport BROKER_TLS_LISTEN=127.0.0.1:0 \
    BROKER_DEV_DIR="$dir/dev" DATA_DIR="$dir/data" JWT_SECRET=$SECRET HANDLER_KEYS=$HKEY \
    COMMAND_TOPICS=echo BROKER_HANDLERS=none IDP_IN_PROCESS=false BROKER_CONN_RATE=0 \
    BROKER_MAX_PENDING_PER_ADDR=0 BROKER_REVOCATION_POLL_SECS=1 BROKER_SHUTDOWN_GRACE_SECS=1 \
    RUST_LOG=warn timeout 120 "$bin" >"$dir/broker.log" 2>&1 &
  bpid=$!
  sleep 2
  timeout 90 "$LG" run --addr "127.0.0.1:$tport" --jwt-secret "$SECRET" --handler-key "$HKEY" \
    --echo 1 --devices "$DEVICES" --subs 1 --rate 50 --connect-rate 2000 --duration 25 \
    >"$dir/loadgen.log" 2>&1 &
  lpid=$!
  sleep 12
  redis-cli -p "$rport" CONFIG RESETSTAT >/dev/null
  cpu_before=$(redis_cpu "$rport")
  sleep 10
  cpu_after=$(redis_cpu "$rport")
  echo "$bin: $DEVICES devices, poll 1 s, over 10 s:"
  redis-cli -p "$rport" INFO commandstats | grep -E 'cmdstat_(get|mget):' | sed 's/^/  /' || echo "  no GET or MGET"
  python3 -c "print(f'  Redis CPU (user+sys): {($cpu_after - $cpu_before) * 1000:.0f} ms')"
  wait "$lpid" || true
  grep -E 'devices ready' "$dir/loadgen.log" | sed 's/^/  /' || true
  kill "$bpid" 2>/dev/null || true; wait "$bpid" 2>/dev/null || true
  kill "$rpid" 2>/dev/null || true; wait "$rpid" 2>/dev/null || true
  rm -rf "$dir"
done
