#!/usr/bin/env bash
# Starts a Redis Cluster (3 masters + 3 replicas) and N broker nodes on
# loopback for trying several nodes by hand, prints how to connect, and
# stops everything it started by pid.
#
#   scripts/local-cluster.sh [start] [N]   # N broker nodes (default 3); Ctrl-C stops all
#   scripts/local-cluster.sh start -d [N]  # the same, returning once everything is up
#   scripts/local-cluster.sh stop          # stops what a detached run started
#
# Node 1 runs the built-in handlers (sync, publish, contacts, tokens) and the
# identity service in-process; nodes 2..N run neither and verify the identity
# service's tokens through node 1's JWKS. Every node has the same JWT_SECRET,
# HANDLER_KEYS, TOKENS_MASTER_KEY and REDIS_URL (the comma-separated list of
# the six Redis nodes, which selects Redis Cluster).
#
# Environment (all optional):
#   BROKER_BIN          the broker binary (default target/release/broker, built if missing)
#   LOCAL_CLUSTER_DIR   state, logs and pids (default ${TMPDIR:-/tmp}/mqgate-local-cluster)
#   REDIS_PORT_BASE     first Redis port; the six nodes use BASE..BASE+5 and their
#                       cluster bus ports BASE+10000.. (default 7000)
#   BROKER_PORT_BASE    node i listens for MQTT over TLS on BASE+i-1 (default 8883)
#   METRICS_PORT_BASE   node i serves /metrics on BASE+i-1 (default 9090)
#   IDP_PORT            the identity service on node 1 (default 8080)

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${LOCAL_CLUSTER_DIR:-${TMPDIR:-/tmp}/mqgate-local-cluster}
PIDS="$DIR/pids"
REDIS_PORT_BASE=${REDIS_PORT_BASE:-7000}
BROKER_PORT_BASE=${BROKER_PORT_BASE:-8883}
METRICS_PORT_BASE=${METRICS_PORT_BASE:-9090}
IDP_PORT=${IDP_PORT:-8080}
REDIS_NODES=6
# Seconds each wait may take before the script gives up (and stops everything).
DEADLINE=60

die() {
    echo "local-cluster: $*" >&2
    exit 1
}

# The pid file holds "<pid> <binary path>" per process this script started.
record() {
    echo "$1 $2" >>"$PIDS"
}

# Whether pid $1 is still the binary $2 (a recycled pid is never signalled).
is_ours() {
    local exe
    exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
    [ "$exe" = "$(readlink -f "$2")" ]
}

stop_all() {
    [ -f "$PIDS" ] || {
        echo "local-cluster: nothing to stop ($PIDS does not exist)"
        return 0
    }
    local pid bin left
    # Brokers first (they drain their sessions), then Redis: newest first.
    while read -r pid bin; do
        if is_ours "$pid" "$bin"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done < <(tac "$PIDS")
    for _ in $(seq 1 $((DEADLINE * 5))); do
        left=0
        while read -r pid bin; do
            if is_ours "$pid" "$bin"; then left=1; fi
        done <"$PIDS"
        [ "$left" = 0 ] && break
        sleep 0.2
    done
    while read -r pid bin; do
        if is_ours "$pid" "$bin"; then
            echo "local-cluster: pid $pid ($bin) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done <"$PIDS"
    rm -f "$PIDS"
    echo "local-cluster: stopped (logs stay in $DIR)"
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Waits until command "$@" succeeds, for at most DEADLINE seconds.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 1 $((DEADLINE * 10))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out waiting until $what (logs: $DIR)"
}

cluster_ok() {
    local port
    for port in "$@"; do
        redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
    done
}

listening() {
    grep -q '^MQTT broker listening: TLS on ' "$1"
}

# HS256 JWT for user $1, valid 24 h, signed with $JWT_SECRET (its raw text).
demo_token() {
    local now header payload signature
    now=$(date +%s)
    b64url() { openssl base64 -A | tr '+/' '-_' | tr -d '='; }
    header=$(printf '{"alg":"HS256","typ":"JWT"}' | b64url)
    payload=$(printf '{"sub":"%s","iat":%d,"exp":%d}' "$1" "$now" $((now + 86400)) | b64url)
    signature=$(printf '%s.%s' "$header" "$payload" |
        openssl dgst -sha256 -hmac "$JWT_SECRET" -binary | b64url)
    printf '%s.%s.%s' "$header" "$payload" "$signature"
}

start() {
    local detach=0 nodes=3
    while [ $# -gt 0 ]; do
        case $1 in
        -d | --detach) detach=1 ;;
        '' | *[!0-9]*) die "unknown argument '$1' (usage: $0 [start] [-d] [N] | stop)" ;;
        *) nodes=$1 ;;
        esac
        shift
    done
    [ "$nodes" -ge 1 ] && [ "$nodes" -le 20 ] || die "N must be 1 to 20 broker nodes"
    local tool
    for tool in redis-server redis-cli openssl; do
        command -v "$tool" >/dev/null ||
            die "$tool is needed: apt-get install -y redis-server redis-tools openssl"
    done
    if [ -f "$PIDS" ]; then
        die "a local cluster already runs from $DIR: run '$0 stop' first"
    fi

    local bin=${BROKER_BIN:-$ROOT/target/release/broker}
    if [ ! -x "$bin" ]; then
        echo "local-cluster: building the broker (cargo build --release --bin broker)"
        (cd "$ROOT" && cargo build --release --bin broker) || die "the build failed"
    fi
    bin=$(readlink -f "$bin")

    local i port
    local ports=()
    for i in $(seq 0 $((REDIS_NODES - 1))); do
        ports+=($((REDIS_PORT_BASE + i)))
    done
    for port in "${ports[@]}"; do
        port_free "$port" || die "port $port is taken: set REDIS_PORT_BASE to a free range"
        port_free $((port + 10000)) ||
            die "port $((port + 10000)) (cluster bus of $port) is taken: set REDIS_PORT_BASE"
    done
    for i in $(seq 1 "$nodes"); do
        port_free $((BROKER_PORT_BASE + i - 1)) ||
            die "port $((BROKER_PORT_BASE + i - 1)) is taken: set BROKER_PORT_BASE"
        port_free $((METRICS_PORT_BASE + i - 1)) ||
            die "port $((METRICS_PORT_BASE + i - 1)) is taken: set METRICS_PORT_BASE"
    done
    port_free "$IDP_PORT" || die "port $IDP_PORT is taken: set IDP_PORT"

    rm -rf "$DIR"
    mkdir -p "$DIR/redis"
    : >"$PIDS"
    # From here on, a failure or Ctrl-C stops whatever was started.
    trap 'stop_all' EXIT
    trap 'exit 130' INT TERM

    local redis_bin
    redis_bin=$(readlink -f "$(command -v redis-server)")
    for port in "${ports[@]}"; do
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$DIR/redis/nodes-$port.conf" \
            --cluster-node-timeout 5000 --dir "$DIR/redis" \
            --save '' --appendonly no --logfile "$DIR/redis/redis-$port.log" \
            </dev/null >/dev/null 2>&1 &
        record $! "$redis_bin"
    done
    for port in "${ports[@]}"; do
        wait_for "Redis on port $port answers" redis-cli -p "$port" ping
    done
    local addrs=()
    for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 1 --cluster-yes \
        >"$DIR/redis/create.log" 2>&1 ||
        die "redis-cli --cluster create failed: see $DIR/redis/create.log"
    wait_for "every Redis node reports cluster_state:ok" cluster_ok "${ports[@]}"

    local urls=()
    for port in "${ports[@]}"; do urls+=("redis://127.0.0.1:$port"); done
    REDIS_URL=$(
        IFS=,
        echo "${urls[*]}"
    )
    JWT_SECRET=$(openssl rand -hex 32)
    HANDLER_KEY=$(openssl rand -hex 32)
    TOKENS_MASTER_KEY=$(openssl rand -hex 32)
    export REDIS_URL JWT_SECRET TOKENS_MASTER_KEY
    export HANDLER_KEYS=$HANDLER_KEY
    cat >"$DIR/env" <<EOF
export REDIS_URL='$REDIS_URL'
export JWT_SECRET='$JWT_SECRET'
export HANDLER_KEYS='$HANDLER_KEY'
export TOKENS_MASTER_KEY='$TOKENS_MASTER_KEY'
EOF
    chmod 600 "$DIR/env"

    local jwks="http://127.0.0.1:$IDP_PORT/.well-known/jwks.json"
    for i in $(seq 1 "$nodes"); do
        mkdir -p "$DIR/node-$i"
        local role=(BROKER_HANDLERS=none IDP_IN_PROCESS=false "JWT_JWKS_URL=$jwks")
        if [ "$i" = 1 ]; then
            role=(BROKER_HANDLERS=all IDP_IN_PROCESS=true "IDP_LISTEN=127.0.0.1:$IDP_PORT"
                "IDP_KEYS_DIR=$DIR/idp-keys")
        fi
        env "${role[@]}" \
            BROKER_NODE_ID="node-$i" \
            BROKER_TLS_LISTEN="127.0.0.1:$((BROKER_PORT_BASE + i - 1))" \
            METRICS_LISTEN="127.0.0.1:$((METRICS_PORT_BASE + i - 1))" \
            BROKER_DEV_DIR="$DIR/dev" \
            DATA_DIR="$DIR/node-$i/data" \
            BROKER_WORKER_THREADS="${BROKER_WORKER_THREADS:-1}" \
            RUST_LOG="${RUST_LOG:-info,mqtt_router=warn}" \
            NO_COLOR=1 \
            "$bin" </dev/null >"$DIR/node-$i/stdout.log" 2>"$DIR/node-$i/broker.log" &
        record $! "$bin"
        # Node 1 makes the development certificate the others reuse.
        wait_for "broker node $i listens (log: $DIR/node-$i/broker.log)" \
            listening "$DIR/node-$i/stdout.log"
    done

    local ca="$DIR/dev/ca.pem" token
    token=$(demo_token demo)
    local last=$((BROKER_PORT_BASE + nodes - 1))
    cat <<EOF

Redis Cluster (3 masters + 3 replicas) on 127.0.0.1:${ports[0]}..${ports[5]}; $nodes broker node(s):
EOF
    for i in $(seq 1 "$nodes"); do
        local what="no handlers"
        [ "$i" = 1 ] && what="built-in handlers + identity service on http://127.0.0.1:$IDP_PORT"
        echo "  node-$i: mqtts://127.0.0.1:$((BROKER_PORT_BASE + i - 1))  metrics http://127.0.0.1:$((METRICS_PORT_BASE + i - 1))/metrics  ($what)"
    done
    cat <<EOF

Logs: $DIR/node-<i>/broker.log, $DIR/redis/; the shared settings: . $DIR/env

Try it: a device subscribed on the last node, a command sent through node 1
(the reply crosses nodes; the handlers run on node 1):
  mosquitto_sub -h localhost -p $last --cafile $ca -V mqttv5 -u JWT -P $token -t demo_contact_list -v
  mosquitto_pub -h localhost -p $BROKER_PORT_BASE --cafile $ca -V mqttv5 -u JWT -P $token -t get_contact_list -m '{}'

Sign up through the identity service (development: the code is written to
node 1's log, not sent), then use the token on any node:
  S=\$(curl -s -X POST http://127.0.0.1:$IDP_PORT/register -H 'Content-Type: application/json' -d '{"msisdn":"+15551234567"}' | sed -n 's/.*"session_token":"\([^"]*\)".*/\1/p')
  curl -s -X POST http://127.0.0.1:$IDP_PORT/sms/verify -H "Authorization: Bearer \$S"
  CODE=\$(grep -o 'code=[0-9]\{6\}' $DIR/node-1/broker.log | tail -1 | cut -d= -f2)
  R=\$(curl -s -X POST http://127.0.0.1:$IDP_PORT/sms/verify_code -H "Authorization: Bearer \$S" -H 'Content-Type: application/json' -d "{\\"code\\":\\"\$CODE\\"}")
  T=\$(echo "\$R" | sed -n 's/.*"token":"\([^"]*\)".*/\1/p'); U=\$(echo "\$R" | sed -n 's/.*"user_id":"\([^"]*\)".*/\1/p')
  mosquitto_sub -h localhost -p $last --cafile $ca -V mqttv5 -u JWT -P "\$T" -t "\${U}_contact_list" -v &
  sleep 2; mosquitto_pub -h localhost -p $BROKER_PORT_BASE --cafile $ca -V mqttv5 -u JWT -P "\$T" -t get_contact_list -m '{}'

Redis: redis-cli -c -p ${ports[0]} cluster nodes
EOF
    if [ "$detach" = 1 ]; then
        trap - EXIT INT TERM
        echo "Stop: $0 stop"
        return 0
    fi
    echo "Ctrl-C (or '$0 stop' from another terminal) stops everything."
    # Until Ctrl-C, or until every broker has ended.
    while [ -f "$PIDS" ]; do
        local alive=0 pid b
        while read -r pid b; do
            if [ "$b" = "$bin" ] && is_ours "$pid" "$b"; then alive=1; fi
        done <"$PIDS"
        [ "$alive" = 1 ] || {
            echo "local-cluster: every broker node has ended (logs: $DIR)" >&2
            break
        }
        sleep 1
    done
}

case ${1:-start} in
start)
    shift || true
    start "$@"
    ;;
stop) stop_all ;;
-h | --help | help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' ;;
[0-9]*) start "$@" ;;
*) die "unknown command '$1' (usage: $0 [start] [-d] [N] | stop)" ;;
esac
