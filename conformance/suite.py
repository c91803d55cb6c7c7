#!/usr/bin/env python3
"""MQTT 5.0 and 3.1.1 conformance checks, written from the OASIS specifications'
normative statements, run with paho-mqtt 2.x (a client this project did not
write) against one broker.

Every check names the statements it tests (e.g. MQTT-3.8.3-3) and runs in two
roles where it applies:

  handler  username `handler`, password = a handler key: full rights, and the
           other party of every exchange is a handler too;
  device   username `JWT`, password = a JWT for a fresh uid U (or, on a broker
           emulating the role with a password file and an ACL, username U): it
           may publish only command topics and subscribe only to literal `U_...`
           reply topics, so a handler is the other party (the device publishes
           a command a handler receives; a handler publishes `U_x`, the device
           receives).

A check that cannot apply to a role is 'n/a' with the reason. Every check has a
hard deadline. Results are written as JSON (see --json); `run.py` runs this
suite against this broker and Mosquitto and writes docs/CONFORMANCE.md.

Exit status: 0 when the suite ran (whatever the results), 2 on bad arguments,
3 when paho-mqtt 2.x is missing.
"""

import argparse
import base64
import hashlib
import hmac
import json
import queue
import socket
import sys
import threading
import time

try:
    import paho.mqtt
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError as err:  # pragma: no cover - only on machines without paho
    sys.stderr.write(f"paho-mqtt 2.x is required: {err}\n")
    sys.exit(3)

if int(paho.mqtt.__version__.split(".")[0]) < 2:
    sys.stderr.write(f"paho-mqtt 2.x is required, found {paho.mqtt.__version__}\n")
    sys.exit(3)

# Seconds a positive expectation may take, and the window in which an
# expected silence is watched. Both far above loopback latency.
WAIT = 4.0
QUIET = 0.8
# The hard deadline of one check (the longest, a will delay, needs ~6 s).
CHECK_DEADLINE = 25.0
# The keep-alive a normal client asks for: below any cap under test.
NORMAL_KEEPALIVE = 20
# Command topics a device publishes in the device role are `<key>c<k>`,
# reply topics `<uid>_t<k>`, k in 1..TOPICS_PER_CHECK.
TOPICS_PER_CHECK = 3


class CheckFailed(Exception):
    """A normative expectation was not met (the message says which)."""


class NotApplicable(Exception):
    """The check cannot apply to this role (the message says why)."""


def require(condition, message):
    if not condition:
        raise CheckFailed(message)


def rc_value(code):
    """The number of a paho ReasonCode (or an int)."""
    return getattr(code, "value", code)


# ---------------------------------------------------------------------------
# Target: one broker and how each role logs in.
# ---------------------------------------------------------------------------


class Target:
    def __init__(self, args):
        self.name = args.target_name
        self.host = args.host
        self.port = args.port
        self.cafile = args.cafile
        self.handler_key = args.handler_key
        self.jwt_secret = args.jwt_secret
        self.device_password = args.device_password
        self.keepalive_cap = args.keepalive_cap

    def device_login(self, uid):
        if self.jwt_secret is not None:
            return "JWT", mint_hs256(uid, self.jwt_secret)
        return uid, self.device_password


def _b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def mint_hs256(uid, secret, ttl=3600):
    """A compact HS256 JWS for `uid` (claims sub, iat, exp), stdlib only."""
    now = int(time.time())
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = _b64url(json.dumps({"sub": uid, "iat": now, "exp": now + ttl}, separators=(",", ":")).encode())
    signing_input = f"{header}.{claims}".encode("ascii")
    signature = hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()
    return f"{header}.{claims}.{_b64url(signature)}"


# ---------------------------------------------------------------------------
# Peer: one paho client with its own network loop (no automatic reconnect, so
# a connection the broker ends stays ended), recording what it observes.
# ---------------------------------------------------------------------------


class Peer:
    def __init__(self, ctx, client_id, username, password, proto=5, clean=True, keepalive=NORMAL_KEEPALIVE,
                 session_expiry=None, will=None, connect_props=None, manual_ack=False):
        self.ctx = ctx
        self.client_id = client_id
        self.proto = proto
        self.keepalive = keepalive
        self.v5 = proto == 5
        if self.v5:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                 reconnect_on_failure=False)
        else:
            self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                 clean_session=clean, reconnect_on_failure=False)
        self.clean = clean
        self.c.username_pw_set(username, password)
        if ctx.target.cafile:
            self.c.tls_set(ca_certs=ctx.target.cafile)
        self.c.connect_timeout = WAIT
        if manual_ack:
            self.c.manual_ack_set(True)
        if will is not None:
            self.c.will_set(will["topic"], will.get("payload", "will"), qos=will.get("qos", 0),
                            retain=will.get("retain", False), properties=will.get("properties"))
        self.session_expiry = session_expiry
        self.connect_props = connect_props or {}
        self.messages = queue.Queue()
        self.all_messages = []
        self.connacks = queue.Queue()
        self.subacks = queue.Queue()
        self.unsubacks = queue.Queue()
        self.disconnects = queue.Queue()
        self.aliases = {}
        self.alias_seen = []
        self.lock = threading.Lock()
        self.inflight = 0
        self.max_inflight = 0
        self.unacked = []
        self.closed = threading.Event()
        self.looping = False
        self.c.on_connect = self._on_connect
        self.c.on_message = self._on_message
        self.c.on_subscribe = self._on_subscribe
        self.c.on_unsubscribe = self._on_unsubscribe
        self.c.on_disconnect = self._on_disconnect
        self.manual_ack = manual_ack
        ctx.peers.append(self)

    # -- callbacks (paho's network thread) --
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connacks.put({"rc": rc_value(reason_code), "session_present": bool(flags.session_present),
                           "properties": properties})

    def _on_message(self, client, userdata, msg):
        props = msg.properties if self.v5 else None
        topic = msg.topic
        alias = getattr(props, "TopicAlias", None) if props is not None else None
        if alias is not None:
            # paho does not resolve server aliases: a non-empty topic sets the
            # mapping, an empty one uses it (MQTT 5 §3.3.2.3.4).
            self.alias_seen.append(alias)
            if topic:
                self.aliases[alias] = topic
            else:
                topic = self.aliases.get(alias, "")
        record = {
            "topic": topic,
            "payload": bytes(msg.payload),
            "qos": msg.qos,
            "retain": bool(msg.retain),
            "props": props,
            "mid": msg.mid,
            "at": time.monotonic(),
        }
        if self.manual_ack and msg.qos > 0:
            with self.lock:
                self.inflight += 1
                self.max_inflight = max(self.max_inflight, self.inflight)
                self.unacked.append((msg.mid, msg.qos))
        self.all_messages.append(record)
        self.messages.put(record)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        self.subacks.put([rc_value(code) for code in reason_codes])

    def _on_unsubscribe(self, client, userdata, mid, reason_codes, properties):
        self.unsubacks.put([rc_value(code) for code in reason_codes] if reason_codes else [])

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects.put({"rc": rc_value(reason_code),
                              "from_server": bool(getattr(flags, "is_disconnect_packet_from_server", False)),
                              "at": time.monotonic()})
        self.closed.set()

    # -- actions (the check's thread) --
    def connect(self, clean_start=True, expect_rc=0):
        """Connects and returns the CONNACK as a dict (rc, session_present, properties)."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if self.session_expiry is not None:
                props.SessionExpiryInterval = self.session_expiry
            for name, value in self.connect_props.items():
                setattr(props, name, value)
            self.c.connect(self.ctx.target.host, self.ctx.target.port, keepalive=self.keepalive,
                           clean_start=clean_start, properties=props)
        else:
            self.c.connect(self.ctx.target.host, self.ctx.target.port, keepalive=self.keepalive)
        self.closed.clear()
        # paho's own network thread; with it running, paho writes only from
        # that thread (a TLS socket must not be written and read from two
        # threads at once), and reconnect_on_failure=False keeps a connection
        # the broker ended ended.
        self.c.loop_start()
        self.looping = True
        try:
            connack = self.connacks.get(timeout=WAIT)
        except queue.Empty:
            raise CheckFailed(f"{self.client_id}: no CONNACK within {WAIT} s")
        if expect_rc is not None:
            require(connack["rc"] == expect_rc,
                    f"{self.client_id}: CONNACK refused with {connack['rc']:#x}")
        return connack

    def subscribe(self, filters, sub_id=None):
        """filters: [(filter, qos or SubscribeOptions)]; returns the SUBACK codes."""
        if self.v5:
            entries = [(f, o if isinstance(o, SubscribeOptions) else SubscribeOptions(qos=o)) for f, o in filters]
            props = None
            if sub_id is not None:
                props = Properties(PacketTypes.SUBSCRIBE)
                props.SubscriptionIdentifier = sub_id
            self.c.subscribe(entries, properties=props)
        else:
            self.c.subscribe([(f, o) for f, o in filters])
        try:
            return self.subacks.get(timeout=WAIT)
        except queue.Empty:
            raise CheckFailed(f"{self.client_id}: no SUBACK within {WAIT} s")

    def subscribe_ok(self, filters, sub_id=None):
        codes = self.subscribe(filters, sub_id=sub_id)
        require(all(code < 0x80 for code in codes),
                f"{self.client_id}: subscription to {[f for f, _ in filters]} refused: {[hex(c) for c in codes]}")
        return codes

    def unsubscribe(self, filters):
        self.c.unsubscribe(filters)
        try:
            return self.unsubacks.get(timeout=WAIT)
        except queue.Empty:
            raise CheckFailed(f"{self.client_id}: no UNSUBACK within {WAIT} s")

    def publish(self, topic, payload, qos=0, retain=False, props=None, wait=True):
        info = self.c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if wait and qos > 0:
            deadline = time.monotonic() + WAIT
            while not info.is_published():
                if time.monotonic() > deadline:
                    raise CheckFailed(f"{self.client_id}: QoS {qos} publish to {topic} not acknowledged in {WAIT} s")
                time.sleep(0.01)
        return info

    def expect(self, what, pred=lambda m: True, timeout=WAIT):
        """The next message matching `pred` (others are skipped), or a failure."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise CheckFailed(f"{self.client_id}: {what} did not arrive within {timeout} s")
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if pred(message):
                return message

    def expect_none(self, what, pred=lambda m: True, window=QUIET):
        deadline = time.monotonic() + window
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                message = self.messages.get(timeout=left)
            except queue.Empty:
                return
            if pred(message):
                raise CheckFailed(f"{self.client_id}: {what} arrived ({describe(message)})")

    def ack_all(self):
        with self.lock:
            pending, self.unacked = self.unacked, []
            self.inflight -= len(pending)
        for mid, qos in pending:
            self.c.ack(mid, qos)

    def disconnect(self):
        """A normal DISCONNECT (reason 0x00), then waits for the close."""
        if not self.looping or self.closed.is_set():
            return
        self.c.disconnect()
        self.closed.wait(WAIT)
        self.go_silent()

    def go_silent(self):
        """Stops sending anything (no PINGREQ) while keeping the socket open."""
        if self.looping:
            self.looping = False
            # loop_stop joins paho's thread without a deadline; bound it.
            stopper = threading.Thread(target=self.c.loop_stop, daemon=True)
            stopper.start()
            stopper.join(WAIT)

    def drop(self):
        """Closes the network connection without DISCONNECT (an abnormal close)."""
        self.go_silent()
        sock = self.c.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    def wait_closed(self, timeout):
        return self.closed.wait(timeout)

    def close(self):
        """Cleanup at the end of a check, whatever state the peer is in."""
        try:
            if self.looping and not self.closed.is_set():
                self.c.disconnect()
                self.closed.wait(1.0)
            self.go_silent()
        except Exception:  # noqa: BLE001 - cleanup must not mask the result
            pass
        try:
            sock = self.c.socket()
            if sock is not None:
                sock.close()
        except Exception:  # noqa: BLE001
            pass


def describe(message):
    payload = message["payload"]
    shown = payload[:40].decode("utf-8", "replace") + ("..." if len(payload) > 40 else "")
    return f"topic={message['topic']!r} payload={shown!r} qos={message['qos']} retain={message['retain']}"


def prop(message, name, default=None):
    props = message.get("props")
    return getattr(props, name, default) if props is not None else default


# ---------------------------------------------------------------------------
# Check context: names, parties and cleanup for one check in one role.
# ---------------------------------------------------------------------------


class Ctx:
    def __init__(self, target, role, key):
        self.target = target
        self.role = role
        self.key = key
        self.uid = key  # the device uid of this check (letters and digits only)
        self.peers = []
        self.notes = []

    def note(self, text):
        self.notes.append(text)

    def sub_topic(self, k):
        """A topic the client under test may subscribe to (a reply topic for a device)."""
        return f"{self.uid}_t{k}" if self.role == "device" else f"conf/{self.key}/t{k}"

    def cmd_topic(self, k):
        """A topic the client under test may publish to (a command for a device)."""
        return f"{self.key}c{k}" if self.role == "device" else f"conf/{self.key}/c{k}"

    def peer_topic_for_will(self, k):
        return self.cmd_topic(k)

    def handler(self, name, proto=5, **kw):
        """A handler: the other party (or the client under test in the handler role)."""
        return Peer(self, f"{self.key}-{name}", "handler", self.target.handler_key, proto=proto, **kw)

    def under_test(self, name, proto=5, **kw):
        """The client under test, in this check's role."""
        if self.role == "handler":
            return self.handler(name, proto=proto, **kw)
        username, password = self.target.device_login(self.uid)
        return Peer(self, f"{self.key}-{name}", username, password, proto=proto, **kw)

    def other(self, name, proto=5, **kw):
        """The other party: a handler. In the device role it is MQTT 5 (a 3.1.1
        handler would receive device commands wrapped, a deliberate difference
        outside the protocol under test)."""
        if self.role == "device":
            proto = 5
        return self.handler(name, proto=proto, **kw)

    def cleanup(self):
        for peer in self.peers:
            peer.close()


# ---------------------------------------------------------------------------
# The checks.
# ---------------------------------------------------------------------------

CHECKS = []
BOTH = ("handler", "device")


def check(area_id, title, spec, proto, roles=BOTH, na=None):
    """Registers a check. `na` maps a role to why the check cannot apply to it."""
    def register(fn):
        CHECKS.append({"id": area_id, "title": title, "spec": spec, "proto": proto, "roles": roles,
                       "na": na or {}, "fn": fn})
        return fn
    return register


DEVICE_NO_LOCAL = ("a device publishes only command topics and subscribes only to its own reply "
                   "topics, so it is never subscribed to a topic it publishes to")
DEVICE_LITERAL = ("a device subscribes only to literal reply topics, so two of its subscriptions "
                  "never overlap")


def sub_opts(qos, **kw):
    return SubscribeOptions(qos=qos, **kw)


def qos_min_check(ctx, proto):
    sub = ctx.under_test("sub", proto=proto)
    sub.connect()
    pub = ctx.other("pub", proto=proto)
    pub.connect()
    t1, t2 = ctx.sub_topic(1), ctx.sub_topic(2)
    granted = sub.subscribe_ok([(t1, 1), (t2, 2)])
    for publish_qos in (0, 1, 2):
        for topic, g in ((t1, granted[0]), (t2, granted[1])):
            pub.publish(topic, f"q{publish_qos}", qos=publish_qos)
            got = sub.expect(f"the QoS {publish_qos} publish on {topic}",
                             lambda m, t=topic, p=publish_qos: m["topic"] == t and m["payload"] == f"q{p}".encode())
            want = min(publish_qos, g)
            require(got["qos"] == want,
                    f"a QoS {publish_qos} publish to a subscription granted QoS {g} arrived at QoS {got['qos']}, "
                    f"not {want}")
    if ctx.role == "device":
        # The other direction: a device's command reaches a handler at the
        # lower of the publish QoS and the handler's granted QoS.
        handler = ctx.other("cmdsub")
        handler.connect()
        command = ctx.cmd_topic(1)
        g = handler.subscribe_ok([(command, 2)])[0]
        for publish_qos in (0, 1, 2):
            sub.publish(command, f"c{publish_qos}", qos=publish_qos)
            got = handler.expect(f"the device's QoS {publish_qos} command",
                                 lambda m, p=publish_qos: m["payload"] == f"c{p}".encode())
            want = min(publish_qos, g)
            require(got["qos"] == want,
                    f"a device's QoS {publish_qos} command reached a handler granted QoS {g} at QoS "
                    f"{got['qos']}, not {want}")


@check("v5.qos-min", "Delivered QoS = min(publish QoS, granted QoS)", "MQTT-3.8.4-8", 5)
def v5_qos_min(ctx):
    qos_min_check(ctx, 5)


@check("v311.qos-min", "Delivered QoS = min(publish QoS, granted QoS)", "MQTT-3.8.4-6 (3.1.1)", 311)
def v311_qos_min(ctx):
    qos_min_check(ctx, 311)


def overlap_check(ctx, proto):
    sub = ctx.under_test("sub", proto=proto)
    sub.connect()
    pub = ctx.other("pub", proto=proto)
    pub.connect()
    topic = f"conf/{ctx.key}/o/x"
    granted = sub.subscribe_ok([(f"conf/{ctx.key}/o/#", 0), (f"conf/{ctx.key}/o/+", 2)])
    pub.publish(topic, "overlap", qos=2)
    sub.expect("the message", lambda m: m["payload"] == b"overlap")
    time.sleep(QUIET)  # further copies, one per subscription, are allowed in MQTT 5
    copies = [m for m in sub.all_messages if m["payload"] == b"overlap"]
    want = min(2, max(granted))
    require(any(m["qos"] == want for m in copies),
            f"subscriptions granted QoS {granted} match; copies arrived at QoS {[m['qos'] for m in copies]}, "
            f"none at the maximum, {want}")
    # Neither version forbids a copy per subscription outright (MQTT 5 allows
    # it explicitly); the count is reported.
    ctx.note(f"{len(copies)} cop{'y' if len(copies) == 1 else 'ies'} at QoS {[m['qos'] for m in copies]}")


@check("v5.qos-overlap", "Overlapping subscriptions deliver at the maximum granted QoS", "MQTT-3.3.4-2", 5,
       na={"device": DEVICE_LITERAL})
def v5_overlap(ctx):
    overlap_check(ctx, 5)


@check("v311.qos-overlap", "Overlapping subscriptions deliver at the maximum granted QoS",
       "MQTT-3.3.5-1 (3.1.1)", 311, na={"device": DEVICE_LITERAL})
def v311_overlap(ctx):
    overlap_check(ctx, 311)


@check("v5.session-offline-queue", "Persistent session (Session Expiry > 0) queues QoS 1/2 while offline",
       "MQTT-3.1.2-23, MQTT-3.1.2-5 (§4.1)", 5)
def v5_offline_queue(ctx):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("sub", session_expiry=60)
    sub.connect(clean_start=True)
    sub.subscribe_ok([(topic, 2)])
    sub.disconnect()
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(topic, "away-1", qos=1)
    pub.publish(topic, "away-2", qos=2)
    again = ctx.under_test("sub", session_expiry=60)
    again.connect(clean_start=False)
    for payload, qos in ((b"away-1", 1), (b"away-2", 2)):
        again.expect(f"the QoS {qos} message published while the session was offline",
                     lambda m, p=payload: m["payload"] == p)


@check("v5.session-present", "CONNACK Session Present reflects a resumed session", "MQTT-3.2.2-2, MQTT-3.2.2-3", 5)
def v5_session_present(ctx):
    first = ctx.under_test("sp", session_expiry=60)
    connack = first.connect(clean_start=True)
    require(not connack["session_present"], "Clean Start 1: Session Present was 1 [MQTT-3.2.2-2]")
    first.subscribe_ok([(ctx.sub_topic(1), 1)])
    first.disconnect()
    second = ctx.under_test("sp", session_expiry=60)
    connack = second.connect(clean_start=False)
    require(connack["session_present"], "Clean Start 0 with a stored session: Session Present was 0 [MQTT-3.2.2-3]")
    second.disconnect()
    third = ctx.under_test("sp", session_expiry=0)
    connack = third.connect(clean_start=True)
    require(not connack["session_present"], "Clean Start 1 after a stored session: Session Present was 1")


def keepalive_will_check(ctx, proto):
    will_topic = ctx.cmd_topic(1)
    watcher = ctx.other("watch", proto=proto)
    watcher.connect()
    watcher.subscribe_ok([(will_topic, 1)])
    keepalive = 2
    silent = ctx.under_test("silent", proto=proto, keepalive=keepalive,
                            will={"topic": will_topic, "payload": "keepalive-will", "qos": 1})
    silent.connect()
    start = time.monotonic()
    silent.go_silent()
    limit = 1.5 * keepalive + 2.5
    will = watcher.expect("the will of a client silent past 1.5 x its keep-alive",
                          lambda m: m["payload"] == b"keepalive-will", timeout=limit + 6.0)
    elapsed = will["at"] - start
    require(elapsed <= limit, f"the will arrived {elapsed:.1f} s after the client fell silent (keep-alive "
                              f"{keepalive} s; the limit is 1.5 x keep-alive, with {limit - 1.5 * keepalive} s slack)")
    require(elapsed >= keepalive - 0.3, f"the client was cut off {elapsed:.1f} s after its last packet, "
                                        f"within its keep-alive of {keepalive} s")
    ctx.note(f"will after {elapsed:.1f} s")


@check("v5.keepalive-will", "Silent past 1.5 x keep-alive: disconnected, will published",
       "MQTT-3.1.2-22, MQTT-3.1.2-8", 5)
def v5_keepalive(ctx):
    keepalive_will_check(ctx, 5)


@check("v311.keepalive-will", "Silent past 1.5 x keep-alive: disconnected, will published",
       "MQTT-3.1.2-24, MQTT-3.1.2-8 (3.1.1)", 311)
def v311_keepalive(ctx):
    keepalive_will_check(ctx, 311)


def will_props(delay):
    props = Properties(PacketTypes.WILLMESSAGE)
    props.WillDelayInterval = delay
    return props


@check("v5.will-delay", "Will Delay Interval: will published after the delay, not before",
       "MQTT-3.1.2-8, §3.1.3.2.2", 5)
def v5_will_delay(ctx):
    will_topic = ctx.cmd_topic(1)
    watcher = ctx.other("watch")
    watcher.connect()
    watcher.subscribe_ok([(will_topic, 1)])
    delay = 2
    client = ctx.under_test("delayed", session_expiry=30,
                            will={"topic": will_topic, "payload": "delayed-will", "qos": 1,
                                  "properties": will_props(delay)})
    client.connect()
    start = time.monotonic()
    client.drop()
    # The statement bounds the will from below (not before the delay); the
    # wait above it only has to be generous.
    will = watcher.expect("the delayed will", lambda m: m["payload"] == b"delayed-will", timeout=delay + 6.0)
    elapsed = will["at"] - start
    require(elapsed >= delay - 0.3, f"a will with a {delay} s delay arrived {elapsed:.1f} s after the close")
    ctx.note(f"will after {elapsed:.1f} s")


@check("v5.will-delay-reconnect", "Reconnecting within the will delay cancels the will", "MQTT-3.1.3-9", 5)
def v5_will_delay_cancel(ctx):
    will_topic = ctx.cmd_topic(1)
    watcher = ctx.other("watch")
    watcher.connect()
    watcher.subscribe_ok([(will_topic, 1)])
    delay = 3
    client = ctx.under_test("delayed", session_expiry=30,
                            will={"topic": will_topic, "payload": "cancelled-will", "qos": 1,
                                  "properties": will_props(delay)})
    client.connect()
    client.drop()
    time.sleep(0.5)
    back = ctx.under_test("delayed", session_expiry=30)
    back.connect(clean_start=False)
    watcher.expect_none("the will of a session that reconnected within its will delay",
                        lambda m: m["payload"] == b"cancelled-will", window=delay + 1.0)
    back.disconnect()


@check("v5.will-qos2", "A QoS 2 will is delivered (at min(2, granted))", "MQTT-3.1.2-8, MQTT-3.8.4-8", 5)
def v5_will_qos2(ctx):
    will_topic = ctx.cmd_topic(1)
    watcher = ctx.other("watch")
    watcher.connect()
    granted = watcher.subscribe_ok([(will_topic, 2)])[0]
    client = ctx.under_test("q2will", will={"topic": will_topic, "payload": "qos2-will", "qos": 2})
    client.connect()
    client.drop()
    will = watcher.expect("the QoS 2 will", lambda m: m["payload"] == b"qos2-will")
    require(will["qos"] == min(2, granted), f"the QoS 2 will arrived at QoS {will['qos']}, granted {granted}")


def expiry_props(seconds):
    props = Properties(PacketTypes.PUBLISH)
    props.MessageExpiryInterval = seconds
    return props


@check("v5.expiry-queued", "Message expiry on queued messages: expired dropped, remaining time forwarded",
       "MQTT-3.3.2-5, MQTT-3.3.2-6", 5)
def v5_expiry_queued(ctx):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("sub", session_expiry=60)
    sub.connect(clean_start=True)
    sub.subscribe_ok([(topic, 1)])
    sub.disconnect()
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(topic, "short", qos=1, props=expiry_props(1))
    pub.publish(topic, "long", qos=1, props=expiry_props(60))
    pub.publish(topic, "forever", qos=1)
    waited_from = time.monotonic()
    time.sleep(2.2)
    again = ctx.under_test("sub", session_expiry=60)
    again.connect(clean_start=False)
    long_msg = again.expect("the queued message with 60 s expiry", lambda m: m["payload"] == b"long")
    again.expect("the queued message without expiry", lambda m: m["payload"] == b"forever")
    waited = long_msg["at"] - waited_from
    interval = prop(long_msg, "MessageExpiryInterval")
    require(interval is not None, "the queued message lost its Message Expiry Interval [MQTT-3.3.2-6]")
    require(interval <= 60 - int(waited) + 1 and interval <= 58,
            f"Message Expiry Interval {interval} after waiting {waited:.1f} s in the server: not counted down "
            f"[MQTT-3.3.2-6]")
    require(interval >= 50, f"Message Expiry Interval {interval} after {waited:.1f} s: counted down too far")
    late = [m for m in again.all_messages if m["payload"] == b"short"]
    require(not late, "a queued message was delivered after its 1 s expiry [MQTT-3.3.2-5]")
    again.expect_none("the expired queued message", lambda m: m["payload"] == b"short")


@check("v5.expiry-retained", "Message expiry on retained messages: expired dropped, remaining time forwarded",
       "MQTT-3.3.2-5, MQTT-3.3.2-6", 5)
def v5_expiry_retained(ctx):
    t1, t2 = ctx.sub_topic(1), ctx.sub_topic(2)
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(t1, "short", qos=1, retain=True, props=expiry_props(1))
    pub.publish(t2, "long", qos=1, retain=True, props=expiry_props(60))
    start = time.monotonic()
    time.sleep(2.2)
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(t1, 1), (t2, 1)])
    got = sub.expect("the retained message with 60 s expiry", lambda m: m["payload"] == b"long")
    waited = got["at"] - start
    interval = prop(got, "MessageExpiryInterval")
    require(interval is not None, "the retained message lost its Message Expiry Interval [MQTT-3.3.2-6]")
    require(interval <= 58, f"Message Expiry Interval {interval} after {waited:.1f} s retained: not counted down "
                            f"[MQTT-3.3.2-6]")
    require(interval >= 50, f"Message Expiry Interval {interval} after {waited:.1f} s: counted down too far")
    sub.expect_none("the retained message whose 1 s expiry passed", lambda m: m["payload"] == b"short")
    for topic in (t1, t2):
        pub.publish(topic, b"", qos=1, retain=True)


@check("v5.expiry-forwarded", "Message Expiry Interval forwarded on live delivery", "MQTT-3.3.2-6", 5)
def v5_expiry_live(ctx):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(topic, 1)])
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(topic, "live", qos=1, props=expiry_props(30))
    got = sub.expect("the message", lambda m: m["payload"] == b"live")
    interval = prop(got, "MessageExpiryInterval")
    require(interval is not None, "the Message Expiry Interval was not forwarded")
    require(28 <= interval <= 30, f"Message Expiry Interval 30 arrived as {interval}")


@check("v5.no-local", "No Local: own publishes not delivered back", "MQTT-3.8.3-3", 5,
       na={"device": DEVICE_NO_LOCAL})
def v5_no_local(ctx):
    topic = ctx.sub_topic(1)
    me = ctx.under_test("me")
    me.connect()
    me.subscribe_ok([(topic, sub_opts(1, noLocal=True))])
    control = ctx.other("control")
    control.connect()
    control.subscribe_ok([(topic, 1)])
    me.publish(topic, "mine", qos=1)
    control.expect("the No Local subscriber's own publish (at another client)", lambda m: m["payload"] == b"mine")
    control.publish(topic, "theirs", qos=1)
    me.expect("another client's publish", lambda m: m["payload"] == b"theirs")
    require(not [m for m in me.all_messages if m["payload"] == b"mine"],
            "a No Local subscriber received its own publish")
    me.expect_none("its own publish", lambda m: m["payload"] == b"mine")


@check("v5.retain-as-published", "Retain As Published keeps the RETAIN flag; 0 clears it",
       "MQTT-3.3.1-12, MQTT-3.3.1-13", 5)
def v5_rap(ctx):
    t1, t2 = ctx.sub_topic(1), ctx.sub_topic(2)
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(t1, sub_opts(1, retainAsPublished=True)), (t2, sub_opts(1, retainAsPublished=False))])
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(t1, "rap1", qos=1, retain=True)
    pub.publish(t2, "rap0", qos=1, retain=True)
    got1 = sub.expect("the retained publish (Retain As Published 1)", lambda m: m["payload"] == b"rap1")
    got0 = sub.expect("the retained publish (Retain As Published 0)", lambda m: m["payload"] == b"rap0")
    require(got1["retain"], "Retain As Published 1: RETAIN arrived 0 [MQTT-3.3.1-13]")
    require(not got0["retain"], "Retain As Published 0: RETAIN arrived 1 [MQTT-3.3.1-12]")
    for topic in (t1, t2):
        pub.publish(topic, b"", qos=1, retain=True)


def retained_setup(ctx, payload):
    topic = ctx.sub_topic(1)
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(topic, payload, qos=1, retain=True)
    return topic, pub


@check("v5.retain-handling-0", "Retain Handling 0: retained sent at every subscribe", "MQTT-3.3.1-9", 5)
def v5_rh0(ctx):
    topic, pub = retained_setup(ctx, "rh0")
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(topic, sub_opts(1, retainHandling=0))])
    got = sub.expect("the retained message", lambda m: m["payload"] == b"rh0")
    require(got["retain"], "a retained message sent for a new subscription arrived with RETAIN 0 [MQTT-3.3.1-6]")
    sub.subscribe_ok([(topic, sub_opts(1, retainHandling=0))])
    sub.expect("the retained message again on re-subscribe", lambda m: m["payload"] == b"rh0")
    pub.publish(topic, b"", qos=1, retain=True)


@check("v5.retain-handling-1", "Retain Handling 1: retained sent only for a new subscription", "MQTT-3.3.1-10", 5)
def v5_rh1(ctx):
    topic, pub = retained_setup(ctx, "rh1")
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(topic, sub_opts(1, retainHandling=1))])
    sub.expect("the retained message for the new subscription", lambda m: m["payload"] == b"rh1")
    sub.subscribe_ok([(topic, sub_opts(1, retainHandling=1))])
    sub.expect_none("the retained message on re-subscribing an existing subscription",
                    lambda m: m["payload"] == b"rh1")
    pub.publish(topic, b"", qos=1, retain=True)


@check("v5.retain-handling-2", "Retain Handling 2: retained never sent", "MQTT-3.3.1-11", 5)
def v5_rh2(ctx):
    topic, pub = retained_setup(ctx, "rh2")
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(topic, sub_opts(1, retainHandling=2))])
    sub.expect_none("a retained message for a Retain Handling 2 subscription", lambda m: m["payload"] == b"rh2")
    pub.publish(topic, "after", qos=1)
    sub.expect("a live message on the subscription", lambda m: m["payload"] == b"after")
    pub.publish(topic, b"", qos=1, retain=True)


@check("v5.subscription-identifier", "Subscription Identifiers sent with matching publishes",
       "MQTT-3.3.4-3, MQTT-3.3.4-4", 5)
def v5_sub_id(ctx):
    t1, t2 = ctx.sub_topic(1), ctx.sub_topic(2)
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(t1, 1)], sub_id=7)
    sub.subscribe_ok([(t2, 1)])
    wildcard = None
    if ctx.role == "handler":
        wildcard = f"conf/{ctx.key}/w/x"
        sub.subscribe_ok([(f"conf/{ctx.key}/w/+", 1)], sub_id=300)
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(t1, "with-id", qos=1)
    pub.publish(t2, "without-id", qos=1)
    got = sub.expect("the message for the identified subscription", lambda m: m["payload"] == b"with-id")
    ids = prop(got, "SubscriptionIdentifier")
    require(ids == [7], f"Subscription Identifier 7 arrived as {ids}")
    got = sub.expect("the message for the subscription without identifier", lambda m: m["payload"] == b"without-id")
    ids = prop(got, "SubscriptionIdentifier")
    require(not ids, f"a subscription without identifier got identifiers {ids}")
    if wildcard:
        pub.publish(wildcard, "wild", qos=1)
        got = sub.expect("the message for the identified wildcard subscription", lambda m: m["payload"] == b"wild")
        ids = prop(got, "SubscriptionIdentifier")
        require(ids == [300], f"Subscription Identifier 300 (a wildcard subscription) arrived as {ids}")


@check("v5.maximum-packet-size", "Client Maximum Packet Size: larger packets dropped for that client",
       "MQTT-3.1.2-24, MQTT-3.1.2-25", 5)
def v5_max_packet(ctx):
    topic = ctx.sub_topic(1)
    limit = 512
    sub = ctx.under_test("small", connect_props={"MaximumPacketSize": limit})
    sub.connect()
    sub.subscribe_ok([(topic, 1)])
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(topic, b"B" * 2000, qos=1)
    pub.publish(topic, "fits", qos=1)
    sub.expect("the message that fits (after one that does not)", lambda m: m["payload"] == b"fits")
    require(not sub.closed.is_set(), "the connection closed")
    big = [m for m in sub.all_messages if len(m["payload"]) >= 2000]
    require(not big, f"a 2000-byte payload was sent to a client whose Maximum Packet Size is {limit} bytes")
    sub.expect_none("the oversized message", lambda m: len(m["payload"]) >= 2000)


@check("v5.topic-alias-unset", "Client publish with a never-set Topic Alias: DISCONNECT 0x82",
       "§3.3.2.3.4, MQTT-4.13.1-1", 5)
def v5_alias_unset(ctx):
    client = ctx.under_test("alias")
    connack = client.connect()
    server_max = getattr(connack["properties"], "TopicAliasMaximum", 0) or 0
    props = Properties(PacketTypes.PUBLISH)
    props.TopicAlias = 1
    client.publish("", "no-topic", qos=0, props=props, wait=False)
    require(client.wait_closed(WAIT), "the connection stayed open after a PUBLISH with an unknown Topic Alias")
    try:
        ended = client.disconnects.get(timeout=1.0)
    except queue.Empty:
        ended = {"rc": None, "from_server": False}
    # An alias the server allows but that was never set: Protocol Error
    # (0x82). With a Topic Alias Maximum of 0 any alias is also over the
    # maximum, for which 0x94 (Topic Alias invalid) is the specific code.
    allowed = {0x82} if server_max >= 1 else {0x82, 0x94}
    require(ended["from_server"], "the connection was closed without a DISCONNECT packet")
    require(ended["rc"] in allowed, f"DISCONNECT reason {ended['rc']!r}, expected one of "
                                    f"{sorted(hex(c) for c in allowed)} (server Topic Alias Maximum {server_max})")
    ctx.note(f"DISCONNECT {ended['rc']:#x}")
    ctx.note(f"server Topic Alias Maximum {server_max}")


@check("v5.topic-alias-server", "Server-to-client Topic Aliases within the client's maximum (reported)",
       "MQTT-3.3.2-11", 5)
def v5_alias_server(ctx):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("aliased", connect_props={"TopicAliasMaximum": 5})
    sub.connect()
    sub.subscribe_ok([(topic, 0)])
    pub = ctx.other("pub")
    pub.connect()
    for n in range(4):
        pub.publish(topic, f"a{n}", qos=1)
    for n in range(4):
        got = sub.expect(f"message {n}", lambda m, n=n: m["payload"] == f"a{n}".encode())
        require(got["topic"] == topic, f"message {n} arrived on {got['topic']!r}, published on {topic!r}")
    require(all(1 <= a <= 5 for a in sub.alias_seen), f"aliases {sub.alias_seen} exceed the client's maximum 5")
    ctx.note("sends topic aliases" if sub.alias_seen else "sends no topic aliases (allowed)")


@check("v5.server-keep-alive", "Capped keep-alive announced in CONNACK Server Keep Alive", "MQTT-3.2.2-22", 5)
def v5_server_keepalive(ctx):
    cap = ctx.target.keepalive_cap
    if cap is None:
        raise NotApplicable("the broker was started without a keep-alive cap")
    client = ctx.under_test("ka", keepalive=cap * 2)
    connack = client.connect()
    announced = getattr(connack["properties"], "ServerKeepAlive", None)
    require(announced is not None, f"keep-alive {cap * 2} s asked, capped at {cap} s, and CONNACK has no "
                                   f"Server Keep Alive: the server must then use the client's value")
    require(announced <= cap, f"Server Keep Alive {announced} exceeds the configured cap {cap}")
    ctx.note(f"Server Keep Alive {announced}")


FORWARDED_USER_PROPS = [("b", "2"), ("a", "1"), ("b", "3"), ("k\u00e9y", "v\u00e4lue")]
IDENTITY_KEYS = {"user_id", "client_id", "token_iat"}


def rich_props(response_topic):
    props = Properties(PacketTypes.PUBLISH)
    props.PayloadFormatIndicator = 1
    props.ContentType = "application/json; charset=utf-8"
    props.ResponseTopic = response_topic
    props.CorrelationData = b"\x00\x01corr\xff"
    for pair in FORWARDED_USER_PROPS:
        props.UserProperty = pair
    return props


def assert_forwarded(got, response_topic, who, identity_stamped):
    require(prop(got, "PayloadFormatIndicator") == 1, f"{who}: Payload Format Indicator not forwarded [MQTT-3.3.2-4]")
    require(prop(got, "ContentType") == "application/json; charset=utf-8",
            f"{who}: Content Type arrived as {prop(got, 'ContentType')!r} [MQTT-3.3.2-20]")
    require(prop(got, "ResponseTopic") == response_topic,
            f"{who}: Response Topic arrived as {prop(got, 'ResponseTopic')!r} [MQTT-3.3.2-15]")
    require(prop(got, "CorrelationData") == b"\x00\x01corr\xff",
            f"{who}: Correlation Data arrived as {prop(got, 'CorrelationData')!r} [MQTT-3.3.2-16]")
    users = [tuple(p) for p in (prop(got, "UserProperty") or [])]
    if identity_stamped:
        users = [p for p in users if p[0] not in IDENTITY_KEYS]
    require(users == FORWARDED_USER_PROPS,
            f"{who}: User Properties {FORWARDED_USER_PROPS} arrived as {users} [MQTT-3.3.2-17, MQTT-3.3.2-18]")
    require(got["payload"] == b'{"x":1}', f"{who}: payload altered")


@check("v5.properties-forwarded", "PFI, Content Type, Response Topic, Correlation Data, User Properties "
       "forwarded unaltered and in order",
       "MQTT-3.3.2-4, -15, -16, -17, -18, -20", 5)
def v5_properties(ctx):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("sub")
    sub.connect()
    sub.subscribe_ok([(topic, 1)])
    pub = ctx.other("pub")
    pub.connect()
    pub.publish(topic, b'{"x":1}', qos=1, props=rich_props("conf/reply/here"))
    got = sub.expect("the message with properties", lambda m: m["payload"] == b'{"x":1}')
    assert_forwarded(got, "conf/reply/here", "to the client", identity_stamped=False)
    if ctx.role == "device":
        handler = ctx.other("cmdsub")
        handler.connect()
        command = ctx.cmd_topic(1)
        handler.subscribe_ok([(command, 1)])
        sub.publish(command, b'{"x":1}', qos=1, props=rich_props(ctx.sub_topic(2)))
        got = handler.expect("the device's command with properties", lambda m: m["payload"] == b'{"x":1}')
        # The broker may stamp the device's identity (user_id, client_id):
        # those are outside the properties the device sent.
        assert_forwarded(got, ctx.sub_topic(2), "from the device", identity_stamped=True)


@check("v5.receive-maximum", "Receive Maximum toward the client: in-flight QoS 1/2 never above it",
       "MQTT-3.3.4-9", 5)
def v5_receive_maximum(ctx):
    topic = ctx.sub_topic(1)
    limit, total = 2, 6
    sub = ctx.under_test("slow", connect_props={"ReceiveMaximum": limit}, manual_ack=True)
    sub.connect()
    sub.subscribe_ok([(topic, 1)])
    pub = ctx.other("pub")
    pub.connect()
    for n in range(total):
        pub.publish(topic, f"m{n}", qos=1)
    deadline = time.monotonic() + 3 * WAIT
    while len(sub.all_messages) < total and time.monotonic() < deadline:
        before = len(sub.all_messages)
        time.sleep(0.5)
        if len(sub.all_messages) == before:
            require(sub.max_inflight <= limit,
                    f"{sub.max_inflight} QoS 1 messages in flight to a client with Receive Maximum {limit}")
            sub.ack_all()
    require(sub.max_inflight <= limit,
            f"{sub.max_inflight} QoS 1 messages in flight to a client with Receive Maximum {limit}")
    got = sorted({m["payload"] for m in sub.all_messages})
    require(len(got) == total, f"{len(got)} of {total} messages arrived as the client acknowledged them")
    sub.ack_all()


# ---- MQTT 3.1.1 areas ------------------------------------------------------


@check("v311.retained", "Retained: stored, sent to new subscribers with RETAIN 1, live with RETAIN 0, "
       "cleared by an empty payload",
       "MQTT-3.3.1-5, -6, -8, -9, -10 (3.1.1)", 311)
def v311_retained(ctx):
    topic = ctx.sub_topic(1)
    pub = ctx.other("pub", proto=311)
    pub.connect()
    pub.publish(topic, "kept", qos=1, retain=True)
    sub = ctx.under_test("sub", proto=311)
    sub.connect()
    sub.subscribe_ok([(topic, 1)])
    got = sub.expect("the retained message", lambda m: m["payload"] == b"kept")
    require(got["retain"], "a retained message for a new subscription arrived with RETAIN 0 [MQTT-3.3.1-8]")
    pub.publish(topic, "live", qos=1, retain=True)
    got = sub.expect("a live retained publish", lambda m: m["payload"] == b"live")
    require(not got["retain"], "a publish for an established subscription arrived with RETAIN 1 [MQTT-3.3.1-9]")
    pub.publish(topic, b"", qos=1, retain=True)
    sub.expect("the empty retained publish (forwarded as normal)", lambda m: m["payload"] == b"")
    fresh = ctx.under_test("fresh", proto=311)
    fresh.connect()
    fresh.subscribe_ok([(topic, 1)])
    fresh.expect_none("a retained message after it was cleared [MQTT-3.3.1-10]", lambda m: m["topic"] == topic)


@check("v311.will", "Will published on an abnormal close, not after DISCONNECT", "MQTT-3.1.2-8, MQTT-3.1.2-10 (3.1.1)",
       311)
def v311_will(ctx):
    will_topic = ctx.cmd_topic(1)
    watcher = ctx.other("watch", proto=311)
    watcher.connect()
    watcher.subscribe_ok([(will_topic, 1)])
    dropped = ctx.under_test("dropped", proto=311, will={"topic": will_topic, "payload": "abnormal", "qos": 1})
    dropped.connect()
    dropped.drop()
    watcher.expect("the will after an abnormal close", lambda m: m["payload"] == b"abnormal")
    polite = ctx.under_test("polite", proto=311, will={"topic": will_topic, "payload": "polite", "qos": 1})
    polite.connect()
    polite.disconnect()
    watcher.expect_none("the will after a DISCONNECT", lambda m: m["payload"] == b"polite")


@check("v311.persistent-session", "clean_session=0: Session Present, QoS 1/2 queued while offline",
       "MQTT-3.1.2-4, MQTT-3.1.2-5, MQTT-3.2.2-2 (3.1.1)", 311)
def v311_persistent(ctx):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("sub", proto=311, clean=False)
    sub.connect()
    sub.subscribe_ok([(topic, 2)])
    sub.disconnect()
    pub = ctx.other("pub", proto=311)
    pub.connect()
    pub.publish(topic, "away-1", qos=1)
    pub.publish(topic, "away-2", qos=2)
    again = ctx.under_test("sub", proto=311, clean=False)
    connack = again.connect()
    require(connack["session_present"], "resumed session: Session Present 0 [MQTT-3.2.2-2]")
    for payload in (b"away-1", b"away-2"):
        again.expect(f"the message {payload.decode()!r}, published while the session was offline",
                     lambda m, p=payload: m["payload"] == p)
    again.disconnect()


@check("v311.clean-session", "clean_session=1 discards the previous session", "MQTT-3.1.2-6, MQTT-3.2.2-1 (3.1.1)",
       311)
def v311_clean(ctx):
    topic = ctx.sub_topic(1)
    first = ctx.under_test("sub", proto=311, clean=False)
    first.connect()
    first.subscribe_ok([(topic, 1)])
    first.disconnect()
    clean = ctx.under_test("sub", proto=311, clean=True)
    connack = clean.connect()
    require(not connack["session_present"], "clean_session=1: Session Present 1 [MQTT-3.2.2-1]")
    pub = ctx.other("pub", proto=311)
    pub.connect()
    pub.publish(topic, "old-subscription", qos=1)
    clean.expect_none("a message for the discarded session's subscription",
                      lambda m: m["payload"] == b"old-subscription")
    clean.disconnect()
    after = ctx.under_test("sub", proto=311, clean=False)
    connack = after.connect()
    require(not connack["session_present"], "after a clean session ended, Session Present 1 [MQTT-3.1.2-6]")
    after.disconnect()


def unsubscribe_check(ctx, proto):
    topic = ctx.sub_topic(1)
    sub = ctx.under_test("sub", proto=proto)
    sub.connect()
    sub.subscribe_ok([(topic, 1)])
    pub = ctx.other("pub", proto=proto)
    pub.connect()
    pub.publish(topic, "before", qos=1)
    sub.expect("a message before unsubscribing", lambda m: m["payload"] == b"before")
    sub.unsubscribe([topic])
    pub.publish(topic, "after", qos=1)
    sub.expect_none("a message after UNSUBACK", lambda m: m["payload"] == b"after")


@check("v311.unsubscribe", "UNSUBSCRIBE answered with UNSUBACK; no new messages after it",
       "MQTT-3.10.4-2, MQTT-3.10.4-4 (3.1.1)", 311)
def v311_unsubscribe(ctx):
    unsubscribe_check(ctx, 311)


# ---------------------------------------------------------------------------
# Runner.
# ---------------------------------------------------------------------------


def check_key(index, role):
    """The per-check, per-role key: device uid, topic and client id prefix."""
    return f"cf{index:02d}{role[0]}"


def device_topics():
    """Every (uid, reply topics, command topics) the device role uses, so that
    a broker emulating the role with an ACL can allow exactly these."""
    out = []
    for index, spec in enumerate(CHECKS):
        if "device" in spec["roles"] and "device" not in spec["na"]:
            key = check_key(index, "device")
            out.append((key, [f"{key}_t{k}" for k in range(1, TOPICS_PER_CHECK + 1)],
                        [f"{key}c{k}" for k in range(1, TOPICS_PER_CHECK + 1)]))
    return out


def run_one(target, index, spec, role):
    row = {"id": spec["id"], "title": spec["title"], "spec": spec["spec"],
           "protocol": "5" if spec["proto"] == 5 else "3.1.1", "role": role}
    if role in spec["na"]:
        row.update(status="n/a", detail=spec["na"][role], seconds=0.0)
        return row
    ctx = Ctx(target, role, check_key(index, role))
    outcome = {}

    def body():
        try:
            spec["fn"](ctx)
            outcome["status"] = "pass"
            outcome["detail"] = "; ".join(ctx.notes)
        except NotApplicable as err:
            outcome["status"] = "n/a"
            outcome["detail"] = str(err)
        except CheckFailed as err:
            outcome["status"] = "fail"
            outcome["detail"] = str(err)
        except Exception as err:  # noqa: BLE001 - a client error is a failed check, reported
            outcome["status"] = "fail"
            outcome["detail"] = f"{type(err).__name__}: {err}"

    start = time.monotonic()
    worker = threading.Thread(target=body, daemon=True)
    worker.start()
    worker.join(CHECK_DEADLINE)
    if worker.is_alive():
        outcome = {"status": "fail", "detail": f"deadline of {CHECK_DEADLINE} s exceeded"}
    ctx.cleanup()
    row.update(status=outcome["status"], detail=outcome["detail"], seconds=round(time.monotonic() - start, 1))
    return row


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-name", default="broker", help="label of the broker in the results")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cafile", help="CA to verify the server with (TLS); unset = plain MQTT")
    parser.add_argument("--handler-key", required=True, help="password of username `handler`")
    device = parser.add_mutually_exclusive_group(required=True)
    device.add_argument("--jwt-secret", help="HMAC secret to mint device JWTs (username `JWT`)")
    device.add_argument("--device-password", help="password of every device uid (username = uid)")
    parser.add_argument("--keepalive-cap", type=int, help="the broker's keep-alive cap in seconds, when it has one")
    parser.add_argument("--only", help="run only checks whose id contains this text")
    parser.add_argument("--role", choices=BOTH, help="run only this role")
    parser.add_argument("--json", help="write the results here (JSON)")
    parser.add_argument("--print-device-topics", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    target = Target(args)
    rows = []
    started = time.monotonic()
    for index, spec in enumerate(CHECKS):
        if args.only and args.only not in spec["id"]:
            continue
        for role in BOTH:
            if args.role and role != args.role:
                continue
            if role not in spec["roles"]:
                continue
            row = run_one(target, index, spec, role)
            rows.append(row)
            sys.stderr.write(f"[{target.name}] {row['id']:<28} {role:<7} {row['status']:<4} "
                             f"{row['seconds']:>5.1f}s {row['detail']}\n")
            sys.stderr.flush()
    result = {"target": target.name, "paho_mqtt": paho.mqtt.__version__,
              "seconds": round(time.monotonic() - started, 1), "rows": rows}
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            out.write(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
