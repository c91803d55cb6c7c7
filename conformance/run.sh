#!/usr/bin/env bash
# Generates the MQTT conformance matrix, docs/CONFORMANCE.md (and
# docs/conformance.json): builds this broker, starts it and Mosquitto on free
# loopback ports, runs conformance/suite.py against both at once, and writes
# the table. Installs Mosquitto and paho-mqtt 2.x when missing (Debian, as
# root or with sudo). Takes about 2 minutes after the build.
#
#   conformance/run.sh                 # debug build, or release if target/release/broker exists
#   CONFORMANCE_PROFILE=release conformance/run.sh
#   conformance/run.sh --only retain   # a subset, printed, docs not written
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
fi
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    echo "==> installing mosquitto (apt-get install -y mosquitto)" >&2
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y mosquitto
fi
if ! python3 -c 'import sys, paho.mqtt; sys.exit(0 if int(paho.mqtt.__version__.split(".")[0]) >= 2 else 1)' 2>/dev/null; then
    echo "==> installing paho-mqtt 2.x (python3 -m pip install 'paho-mqtt>=2')" >&2
    python3 -m pip install --upgrade 'paho-mqtt>=2' ||
        python3 -m pip install --upgrade --break-system-packages 'paho-mqtt>=2'
fi

profile="${CONFORMANCE_PROFILE:-}"
if [ -z "$profile" ]; then
    if [ -x target/release/broker ]; then profile=release; else profile=debug; fi
fi
if [ "$profile" = release ]; then
    cargo build --release --bin broker
else
    cargo build --bin broker
fi

exec timeout 900 python3 conformance/run.py --broker "target/$profile/broker" "$@"
