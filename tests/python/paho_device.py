#!/usr/bin/env python3
"""A paho-mqtt (2.x) client for the end-to-end tests.

Connects over TLS (or MQTT over WebSocket with --transport websockets, over
TLS or, with --no-tls, plain), optionally subscribes to some topics in one SUBSCRIBE,
optionally publishes one message, optionally waits for some messages, and
prints one JSON object per line for everything it observes:

  {"event": "connack", "protocol": "5", "reason_code": 0, "raw_rc": 0, ...}
  {"event": "suback", "reason_codes": [1, 135, 135], "reasons": [...]}
  {"event": "puback", "topic": "sync", "reason_code": 0, "reason": "Success"}
  {"event": "message", "topic": "...", "payload": "...", "user_properties": [["k", "v"]]}
  {"event": "done"}

Exit status: 0 when every requested step completed, 1 when the connection
was refused or closed, or a step timed out; 3 when paho-mqtt is missing.
The tests read the lines as they come (a "suback" line means the
subscription is in place), so every line is flushed at once.
"""

import argparse
import json
import queue
import re
import sys
import threading
import time

_print_lock = threading.Lock()


def emit(**fields):
    with _print_lock:
        sys.stdout.write(json.dumps(fields, sort_keys=True) + "\n")
        sys.stdout.flush()


try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError as err:  # pragma: no cover - exercised only on broken machines
    emit(event="error", error=f"paho-mqtt is not installed: {err}")
    sys.exit(3)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", help="CA certificate the server certificate is checked against")
    parser.add_argument("--no-tls", action="store_true", help="plain (ws://); only with --transport websockets")
    parser.add_argument(
        "--transport", choices=["tcp", "websockets"], default="tcp", help="websockets: MQTT over WebSocket"
    )
    parser.add_argument("--ws-path", default="/mqtt", help="the WebSocket path (with --transport websockets)")
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--client-id", default="", help="empty = let the library or broker choose")
    parser.add_argument("--protocol", choices=["5", "311"], default="5")
    parser.add_argument("--topics", nargs="*", default=[], help="filters to subscribe to, in one SUBSCRIBE")
    parser.add_argument("--qos", type=int, choices=[0, 1, 2], default=1, help="QoS for subscribe and publish")
    parser.add_argument("--publish", nargs=2, metavar=("TOPIC", "PAYLOAD"), help="publish one message")
    parser.add_argument(
        "--user-property",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="MQTT 5 user property on the publish (repeatable)",
    )
    parser.add_argument("--expect", type=int, default=0, help="wait for this many messages")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds allowed for each step")
    return parser.parse_args()


def reason_value(code):
    """The numeric value of a paho ReasonCode (or an int)."""
    return getattr(code, "value", code)


def main():
    args = parse_args()
    v5 = args.protocol == "5"
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        reconnect_on_failure=False,
        transport=args.transport,
    )
    client.username_pw_set(args.username, args.password)
    if args.transport == "websockets":
        client.ws_set_options(path=args.ws_path)
    if args.no_tls:
        if args.transport != "websockets":
            emit(event="error", step="args", error="--no-tls is for --transport websockets only")
            return 1
    elif args.cafile is None:
        emit(event="error", step="args", error="--cafile is required over TLS")
        return 1
    else:
        client.tls_set(ca_certs=args.cafile)

    connected = threading.Event()
    closed = threading.Event()
    state = {"connack": None, "raw_rc": None}
    subacks = queue.Queue()
    pubacks = queue.Queue()
    messages = queue.Queue()

    def on_log(_client, _userdata, _level, text):
        # paho 2.x hands on_connect a ReasonCode even for MQTT 3.1.1 (rc 4
        # becomes 134); the raw 3.1.1 return code is only in its debug log.
        found = re.match(r"Received CONNACK \((\d+), (\d+)\)", text)
        if found:
            state["raw_rc"] = int(found.group(2))

    def on_connect(_client, _userdata, flags, reason_code, properties):
        reason_string = None
        assigned = None
        if properties is not None:
            reason_string = getattr(properties, "ReasonString", None)
            assigned = getattr(properties, "AssignedClientIdentifier", None)
        state["connack"] = dict(
            event="connack",
            protocol=args.protocol,
            reason_code=reason_value(reason_code),
            raw_rc=state["raw_rc"] if not v5 else reason_value(reason_code),
            reason=str(reason_code),
            reason_string=reason_string,
            assigned_client_id=assigned,
            session_present=bool(flags.session_present),
        )
        connected.set()

    def on_disconnect(_client, _userdata, _flags, reason_code, _properties):
        closed.set()
        connected.set()  # wake a waiter when the broker closed before CONNACK

    def on_subscribe(_client, _userdata, _mid, reason_codes, _properties):
        subacks.put(reason_codes)

    def on_publish(_client, _userdata, _mid, reason_code, _properties):
        pubacks.put(reason_code)

    def on_message(_client, _userdata, message):
        user_properties = []
        properties = getattr(message, "properties", None)
        if properties is not None and hasattr(properties, "UserProperty"):
            user_properties = [[k, v] for (k, v) in properties.UserProperty]
        emit(
            event="message",
            topic=message.topic,
            payload=message.payload.decode("utf-8", "replace"),
            qos=message.qos,
            retain=bool(message.retain),
            user_properties=user_properties,
        )
        messages.put(message.topic)

    client.on_log = on_log
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message

    try:
        client.connect(args.host, args.port, keepalive=30)
    except Exception as err:  # TLS or socket failure
        emit(event="error", step="connect", error=f"{type(err).__name__}: {err}")
        return 1
    client.loop_start()
    try:
        return run(args, client, connected, closed, state, subacks, pubacks, messages, v5)
    finally:
        if not closed.is_set():
            client.disconnect()
        client.loop_stop()


def run(args, client, connected, closed, state, subacks, pubacks, messages, v5):
    if not connected.wait(args.timeout):
        emit(event="error", step="connect", error="timed out waiting for CONNACK")
        return 1
    if state["connack"] is None:
        emit(event="error", step="connect", error="connection closed without CONNACK")
        return 1
    emit(**state["connack"])
    if state["connack"]["reason_code"] != 0:
        return 1

    if args.topics:
        client.subscribe([(topic, args.qos) for topic in args.topics])
        try:
            codes = subacks.get(timeout=args.timeout)
        except queue.Empty:
            emit(event="error", step="subscribe", error="timed out waiting for SUBACK")
            return 1
        emit(event="suback", reason_codes=[reason_value(c) for c in codes], reasons=[str(c) for c in codes])

    if args.publish:
        topic, payload = args.publish
        properties = None
        if v5 and args.user_property:
            properties = Properties(PacketTypes.PUBLISH)
            for key, value in args.user_property:
                properties.UserProperty = (key, value)
        client.publish(topic, payload.encode("utf-8"), qos=args.qos, properties=properties)
        if args.qos > 0:
            try:
                code = pubacks.get(timeout=args.timeout)
            except queue.Empty:
                emit(event="error", step="publish", error="timed out waiting for PUBACK")
                return 1
            emit(event="puback", topic=topic, reason_code=reason_value(code), reason=str(code))

    deadline = time.monotonic() + args.timeout
    for _ in range(args.expect):
        remaining = deadline - time.monotonic()
        try:
            messages.get(timeout=max(remaining, 0.0))
        except queue.Empty:
            emit(event="error", step="receive", error="timed out waiting for messages")
            return 1

    if closed.is_set():
        emit(event="error", step="done", error="connection closed by the broker")
        return 1
    emit(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
