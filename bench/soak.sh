#!/usr/bin/env bash
# Soak: normal and hostile clients mixed against one broker for SOAK_SECS
# (default 1,800 s). Normal clients: `loadgen run` (DEVICES devices, RATE
# echo round trips/s through one in-process echo handler). Hostile clients:
# bench/hostile.py (malformed packets, bad tokens, oversized and abusive
# sessions, QoS 2 abuse, slow readers, takeovers, ...), looping the whole time.
# Broker RSS is sampled every 10 s into a CSV. Passes when every normal reply
# came back, the broker log has no `panicked` line, the broker is alive at the
# end, and RSS at the end is at most 1.25 × RSS after warm-up (2 minutes, or
# a fifth of a shorter run). Loopback only; every step bounded by a timeout.
# SOAK_ONLY=kind,kind runs only those hostile kinds, SOAK_SKIP=kind,kind
# leaves them out (to find which one breaks what). Not in CI (it takes half an hour):
#   cargo build --release --bin broker --bin loadgen && bench/soak.sh
# Against debug builds, short:
#   SOAK_SECS=120 BROKER=target/debug/broker LOADGEN=target/debug/loadgen bench/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SOAK_SECS=${SOAK_SECS:-1800}
BROKER=${BROKER:-target/release/broker}
LOADGEN=${LOADGEN:-target/release/loadgen}
DEVICES=${DEVICES:-500}
RATE=${RATE:-500}
TCP_PORT=${SOAK_TCP_PORT:-21910}
TLS_PORT=${SOAK_TLS_PORT:-21911}
METRICS_PORT=${SOAK_METRICS_PORT:-21912}
OUT=${SOAK_OUT:-$(mktemp -d /tmp/soak.XXXXXX)}
# Warm-up: the command topic's router log (`echo`) keeps 4 MiB of payload,
# about 58,000 small commands and ~50 MB of memory when full (broker/src/router.rs);
# it fills in about 70,000/RATE seconds, and RSS grows until then by design.
# So the warm-up is at least 2 minutes and at least that long, and the memory
# check is judged only when the run lasts twice the warm-up.
rate_int=${RATE%.*}
[ "${rate_int:-0}" -ge 1 ] 2>/dev/null || rate_int=1
WARMUP=${SOAK_WARMUP_SECS:-$(( 120 > 70000 / rate_int ? 120 : 70000 / rate_int ))}
JUDGE_RSS=yes
if [ "$SOAK_SECS" -lt $((2 * WARMUP)) ]; then
  JUDGE_RSS=no
  WARMUP=$((SOAK_SECS / 5))
fi
RSS_LIMIT=${SOAK_RSS_LIMIT:-1.25}

for bin in "$BROKER" "$LOADGEN"; do
  [ -x "$bin" ] || { echo "missing $bin: cargo build --release --bin broker --bin loadgen" >&2; exit 1; }
done
python3 -c 'import paho.mqtt, sys; sys.exit(0 if paho.mqtt.__version__ >= "2" else 1)' 2>/dev/null || {
  echo "bench/hostile.py needs paho-mqtt 2.x: pip3 install 'paho-mqtt>=2,<3'" >&2; exit 1; }
# shellcheck source=bench/common.sh
. bench/common.sh

mkdir -p "$OUT/dev"
SECRET=$(openssl rand -hex 32)
HKEY=$(openssl rand -hex 24)
BROKER_PID=""; HOSTILE_PID=""; SAMPLER_PID=""
cleanup() {
  for p in "$SAMPLER_PID" "$HOSTILE_PID" "$BROKER_PID"; do
    [ -n "$p" ] && kill "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT

echo "soak: ${SOAK_SECS} s, $DEVICES devices at $RATE round trips/s, output in $OUT"
# BROKER_CONN_RATE=0 and a high BROKER_MAX_PENDING_PER_ADDR: every client here
# shares 127.0.0.1, and the per-address limits are not what is soaked. An env
# var the broker does not know is ignored.
BROKER_HANDLERS=none BROKER_CONN_RATE=0 BROKER_MAX_PENDING_PER_ADDR=100000 \
JWT_SECRET="$SECRET" HANDLER_KEYS="$HKEY" COMMAND_TOPICS=echo,soak \
BROKER_TCP_LISTEN=127.0.0.1:$TCP_PORT BROKER_TLS_LISTEN=127.0.0.1:$TLS_PORT \
METRICS_LISTEN=127.0.0.1:$METRICS_PORT BROKER_DEV_DIR="$OUT/dev" RUST_LOG=info NO_COLOR=1 \
RUST_BACKTRACE=${SOAK_BACKTRACE:-0} LIBC_FATAL_STDERR_=1 \
  timeout $((SOAK_SECS + 300)) "$BROKER" >"$OUT/broker.log" 2>&1 &
BROKER_PID=$!
wait_port "$TCP_PORT"
wait_port "$TLS_PORT"
# `timeout` is the parent; the broker is its child.
BPID=$(pgrep -P "$BROKER_PID" | head -1 || true)
BPID=${BPID:-$BROKER_PID}

# RSS every 10 s: seconds since start, VmRSS in KiB.
echo "secs,rss_kib" >"$OUT/rss.csv"
(
  t0=$(date +%s)
  while [ -r "/proc/$BPID/status" ]; do
    rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$BPID/status" 2>/dev/null || true)
    [ -n "$rss" ] && echo "$(( $(date +%s) - t0 )),$rss" >>"$OUT/rss.csv"
    sleep 10
  done
) &
SAMPLER_PID=$!

SOAK_JWT_SECRET="$SECRET" SOAK_HANDLER_KEY="$HKEY" \
  timeout $((SOAK_SECS + 120)) python3 bench/hostile.py --port "$TCP_PORT" --tls-port "$TLS_PORT" \
  --ca "$OUT/dev/ca.pem" --duration "$SOAK_SECS" ${SOAK_ONLY:+--only "$SOAK_ONLY"} ${SOAK_SKIP:+--skip "$SOAK_SKIP"} --json "$OUT/hostile.json" >"$OUT/hostile.out" 2>&1 &
HOSTILE_PID=$!

lg_rc=0
LOADGEN_JWT_SECRET="$SECRET" LOADGEN_HANDLER_KEY="$HKEY" \
  timeout $((SOAK_SECS + 180)) "$LOADGEN" run --addr "127.0.0.1:$TCP_PORT" --devices "$DEVICES" \
  --rate "$RATE" --duration "$SOAK_SECS" --echo 1 --broker-pid "$BPID" --drain 10 \
  --progress 60 --label soak --json "$OUT/loadgen.json" >"$OUT/loadgen.out" 2>&1 || lg_rc=$?

hostile_rc=0
wait "$HOSTILE_PID" || hostile_rc=$?
HOSTILE_PID=""

alive=no
kill -0 "$BPID" 2>/dev/null && alive=yes
if [ "$alive" = no ]; then
  # How it ended: timeout(1) passes on the broker's exit status (128+N: signal N).
  wait "$BROKER_PID" 2>/dev/null && broker_rc=0 || broker_rc=$?
  BROKER_PID=""
  echo "broker exit status: $broker_rc" >>"$OUT/broker.log"
fi
# One more sample at the very end.
if [ "$alive" = yes ]; then
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$BPID/status")
  echo "end,$rss" >>"$OUT/rss.csv"
fi
kill "$SAMPLER_PID" 2>/dev/null || true
SAMPLER_PID=""
panics=$(grep -c 'panicked' "$OUT/broker.log" || true)
if [ "$alive" = yes ]; then
  timeout 10 curl -sf "http://127.0.0.1:$METRICS_PORT/metrics" >"$OUT/metrics.txt" || true
fi

python3 - "$OUT" "$WARMUP" "$RSS_LIMIT" "$panics" "$alive" "$lg_rc" "$hostile_rc" "$JUDGE_RSS" <<'EOF'
import json, sys
out, warmup, limit, panics, alive, lg_rc, hostile_rc, judge_rss = sys.argv[1:]
warmup, limit, panics = int(warmup), float(limit), int(panics)
rows = [l.strip().split(",") for l in open(f"{out}/rss.csv")][1:]
timed = [(int(t), int(r)) for t, r in rows if t != "end"]
end = [int(r) for t, r in rows if t == "end"]
fail = []
if timed:
    after = [r for t, r in timed if t >= warmup]
    warm = after[0] if after else timed[-1][1]
    last = end[0] if end else timed[-1][1]
    peak = max([r for _, r in timed] + end)
    ratio = last / warm
    print(f"broker RSS: after warm-up ({warmup} s) {warm/1024:.1f} MiB, end {last/1024:.1f} MiB, "
          f"max {peak/1024:.1f} MiB; end/warm-up {ratio:.2f} (limit {limit}), max/warm-up {peak/warm:.2f}"
          f" [{len(timed)} samples in {out}/rss.csv]")
    if judge_rss != "yes":
        print("  (run shorter than twice the warm-up: the command log is still filling, memory not judged)")
    elif ratio > limit:
        fail.append(f"RSS grew {ratio:.2f}x after warm-up")
else:
    print("broker RSS: no samples")
    fail.append("no RSS samples")
print(f"panicked lines in the broker log: {panics}")
if panics:
    fail.append(f"{panics} panics")
    for line in [l for l in open(f"{out}/broker.log", errors="replace") if "panicked" in l][:5]:
        print("  " + line.rstrip()[:400])
print(f"broker alive at the end: {alive}")
if alive != "yes":
    fail.append("broker died")
    print("  last lines of the broker log:")
    for line in open(f"{out}/broker.log", errors="replace").readlines()[-5:]:
        print("  " + line.rstrip()[:400])
try:
    m = [l.rstrip() for l in open(f"{out}/metrics.txt") if l.startswith("broker_") and not l.startswith("#")]
    wanted = ("panic", "refus", "denied", "disconnect", "connections", "sessions")
    shown = [l for l in m if any(w in l.split(" ")[0] for w in wanted)]
    if shown:
        print("broker counters at the end (" + f"{out}/metrics.txt" + "):")
        for l in shown[:40]:
            print("  " + l)
except OSError:
    pass
try:
    r = json.load(open(f"{out}/loadgen.json"))
    lat = r.get("latency", {})
    print(f"normal clients (loadgen, exit {lg_rc}): devices ready {r['devices_ready']}/{r['devices_target']}, "
          f"sent {r['sent']}, received {r['received']}, lost {r['lost']}, duplicated {r['duplicated']}, "
          f"dropped connections {r['dropped_connections']}, p50 {lat.get('p50_ms', 0):.2f} ms, "
          f"p99 {lat.get('p99_ms', 0):.2f} ms, max {lat.get('max_ms', 0):.2f} ms")
    if r["lost"] > 0:
        fail.append(f"{r['lost']} normal replies lost")
    if r["devices_ready"] < r["devices_target"]:
        fail.append("not every normal device connected")
    if r["sent"] == 0:
        fail.append("loadgen sent nothing")
except (OSError, ValueError, KeyError) as e:
    print(f"normal clients: no loadgen report ({e}); see {out}/loadgen.out")
    progress = [l.rstrip() for l in open(f"{out}/loadgen.out", errors="replace") if l.startswith("[")]
    if progress:
        print("  last progress line: " + progress[-1])
    fail.append("no loadgen report")
try:
    h = json.load(open(f"{out}/hostile.json"))
    print(f"hostile clients (exit {hostile_rc}): {sum(h['attempts'].values())} attempts")
    for kind, n in h["attempts"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in h["outcomes"][kind].items())
        print(f"  {kind:<30} {n:>6}  {outcomes}")
    if h.get("stopped_early"):
        print(f"  stopped early: {h['stopped_early']}")
    if h.get("stuck"):
        print(f"  still running at the end (bounded attempts overran): {', '.join(h['stuck'])}")
except (OSError, ValueError, KeyError) as e:
    print(f"hostile clients: no report ({e}); see {out}/hostile.out")
    fail.append("no hostile report")
if fail:
    print("SOAK FAILED: " + "; ".join(fail))
    sys.exit(1)
print("SOAK PASSED")
EOF
