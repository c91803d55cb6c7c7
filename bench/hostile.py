#!/usr/bin/env python3
"""Hostile MQTT clients for the soak (bench/soak.sh): one thread per kind of
attack, each looping until --duration ends, every attack bounded by socket
timeouts. Prints, at the end, one JSON object: attempts per kind and what the
broker answered (counts of outcomes), so a run can be read afterwards.

Raw sockets carry the malformed and protocol-abusing packets; paho-mqtt 2.x
plays the well-formed handlers and the MQTT 3.1.1 device. Device tokens are
HS256, signed here with hmac/hashlib (no extra packages).

Loopback only: the broker address must be 127.0.0.1 or ::1.
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import socket
import ssl
import sys
import threading
import time
from collections import Counter, defaultdict

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

# ---------------------------------------------------------------- tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt(header: dict, claims: dict, secret: bytes | None, bad_sig=False) -> str:
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    c = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing = f"{h}.{c}".encode()
    if secret is None:
        return f"{h}.{c}."
    sig = hmac.new(secret, signing, hashlib.sha256).digest()
    if bad_sig:
        sig = bytes([sig[0] ^ 1]) + sig[1:]
    return f"{h}.{c}.{b64url(sig)}"


def good_token(secret: bytes, uid: str, ttl=3600) -> str:
    return jwt({"alg": "HS256", "typ": "JWT"}, {"sub": uid, "exp": int(time.time()) + ttl}, secret)


def bad_tokens(secret: bytes, uid: str) -> dict:
    now = int(time.time())
    return {
        "alg_none": jwt({"alg": "none", "typ": "JWT"}, {"sub": uid, "exp": now + 3600}, None),
        "wrong_signature": jwt({"alg": "HS256"}, {"sub": uid, "exp": now + 3600}, secret, bad_sig=True),
        "expired": jwt({"alg": "HS256"}, {"sub": uid, "exp": now - 3600}, secret),
        "crit_header": jwt({"alg": "HS256", "crit": ["x-unknown"], "x-unknown": 1},
                           {"sub": uid, "exp": now + 3600}, secret),
        "exp_1e19": jwt({"alg": "HS256"}, {"sub": uid, "exp": 10**19}, secret),
        "exp_u64_max": jwt({"alg": "HS256"}, {"sub": uid, "exp": 2**64 - 1}, secret),
        "bad_uid": jwt({"alg": "HS256"}, {"sub": "a_b/#", "exp": now + 3600}, secret),
        "not_a_jwt": "x" * 300,
    }


# ---------------------------------------------------------------- raw MQTT


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def s(x) -> bytes:
    if isinstance(x, str):
        x = x.encode()
    return len(x).to_bytes(2, "big") + x


def props(*items: bytes) -> bytes:
    body = b"".join(items)
    return varint(len(body)) + body


def p_u32(pid: int, v: int) -> bytes:
    return bytes([pid]) + v.to_bytes(4, "big")


def p_u16(pid: int, v: int) -> bytes:
    return bytes([pid]) + v.to_bytes(2, "big")


def p_str(pid: int, v: str) -> bytes:
    return bytes([pid]) + s(v)


def p_user(k: str, v: str) -> bytes:
    return b"\x26" + s(k) + s(v)


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect5(client_id, username=None, password=None, clean=True, keep_alive=30,
             properties=b"") -> bytes:
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if username is not None:
        flags |= 0x80
        payload += s(username)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    body = s("MQTT") + bytes([5, flags]) + keep_alive.to_bytes(2, "big") + props(properties) + payload
    return packet(0x10, body)


def publish5(topic, payload=b"", qos=0, pid=1, dup=False, retain=False, properties=b"") -> bytes:
    first = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    body = s(topic) + (pid.to_bytes(2, "big") if qos else b"") + props(properties) + payload
    return packet(first, body)


def subscribe5(pid, filters, qos=0) -> bytes:
    body = pid.to_bytes(2, "big") + props(b"") + b"".join(s(f) + bytes([qos]) for f in filters)
    return packet(0x82, body)


class Raw:
    """One raw connection; every call is bounded by the socket timeout."""

    def __init__(self, host, port, timeout=5.0, tls_ca=None, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            # Before connecting, so that the advertised TCP window is small too.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        if tls_ca:
            ctx = ssl.create_default_context(cafile=tls_ca)
            self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def read_packet(self):
        """Returns (type nibble, flags, body), raises EOFError on close."""
        self._fill(2)
        first = self.buf[0]
        mult, length, i = 1, 0, 1
        while True:
            self._fill(i + 1)
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        self._fill(i + length)
        body = self.buf[i:i + length]
        self.buf = self.buf[i + length:]
        return first >> 4, first & 0x0F, body

    def connack(self):
        """Reads until a CONNACK; returns its reason code (or None on close/timeout)."""
        try:
            t, _, body = self.read_packet()
        except (EOFError, OSError):
            return None
        if t == 2 and len(body) >= 2:
            return body[1]
        return None

    def outcome(self, wait=3.0):
        """How the broker ended or kept this connection within `wait` seconds:
        'disconnect_0xNN' (DISCONNECT with reason), 'closed', or 'open'."""
        end = time.monotonic() + wait
        try:
            while time.monotonic() < end:
                self.sock.settimeout(max(0.05, end - time.monotonic()))
                t, _, body = self.read_packet()
                if t == 14:
                    return f"disconnect_0x{body[0]:02x}" if body else "disconnect_0x00"
        except (EOFError, ConnectionError):
            return "closed"
        except (socket.timeout, TimeoutError):
            return "open"
        except OSError:
            return "closed"
        return "open"

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------- attacks


class Soak:
    def __init__(self, a):
        self.host, self.port = a.host, a.port
        self.tls_port, self.ca = a.tls_port, a.ca
        self.secret = a.jwt_secret.encode()
        self.hkey = a.handler_key
        self.deadline = time.monotonic() + a.duration
        self.attempts = Counter()
        self.outcomes = defaultdict(Counter)
        self.lock = threading.Lock()
        self.rng = random.Random(a.seed)
        self.only = [k for k in (a.only or "").split(",") if k]
        self.skip = [k for k in (a.skip or "").split(",") if k]
        self.refused_in_row = 0
        self.stopped_early = None

    def live(self):
        return time.monotonic() < self.deadline

    def note(self, kind, outcome):
        with self.lock:
            self.attempts[kind] += 1
            self.outcomes[kind][outcome] += 1

    def raw(self, timeout=5.0, tls=False):
        if tls:
            return Raw(self.host, self.tls_port, timeout, self.ca)
        return Raw(self.host, self.port, timeout)

    def device(self, uid, client_id=None, clean=True, properties=b"", keep_alive=30, tls=False,
               rcvbuf=None):
        """A raw MQTT 5 device, connected; returns (conn, connack reason)."""
        r = Raw(self.host, self.port, 5.0, rcvbuf=rcvbuf) if rcvbuf else self.raw(tls=tls)
        r.send(connect5(client_id if client_id is not None else uid, "JWT",
                        good_token(self.secret, uid), clean, keep_alive, properties))
        return r, r.connack()

    def handler_raw(self, client_id, clean=True, properties=b""):
        r = self.raw()
        r.send(connect5(client_id, "handler", self.hkey, clean, 30, properties))
        return r, r.connack()

    def paho(self, client_id, username, password, protocol=mqtt.MQTTv5, **kw):
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kw)
        c.username_pw_set(username, password)
        return c

    # Each attack: one bounded attempt, returning its outcome label.

    def garbage(self, n):
        tls = n % 2 == 1
        r = self.raw(tls=tls)
        try:
            r.send(os.urandom(self.rng.randint(1, 4096)))
            return ("tls_" if tls else "") + r.outcome(3)
        finally:
            r.close()

    def garbage_plaintext_to_tls_port(self, n):
        r = Raw(self.host, self.tls_port, 5)
        try:
            r.send(os.urandom(self.rng.randint(1, 2048)))
            return r.outcome(3)
        finally:
            r.close()

    def random_after_connect(self, n):
        r, rc = self.device(f"hrnd{n % 8}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            r.send(os.urandom(self.rng.randint(1, 4096)))
            return r.outcome(3)
        finally:
            r.close()

    def oversized(self, n):
        r, rc = self.device(f"hbig{n % 8}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            if n % 2:
                # Announce 200 MB and send a first slice of it.
                r.send(bytes([0x30]) + varint(200 * 1024 * 1024) + s("soak") + b"\0" + os.urandom(60000))
            else:
                r.send(publish5("soak", os.urandom(1024 * 1024)))
            return r.outcome(3)
        except (BrokenPipeError, ConnectionResetError):
            return "closed"
        finally:
            r.close()

    def connect_then_silence(self, n):
        # Half the time a full CONNECT then nothing (keep-alive 5 s), half the
        # time half a CONNECT (the connect timeout must end it).
        r = self.raw(timeout=30)
        try:
            pkt = connect5(f"hsil{n % 8}", "JWT", good_token(self.secret, f"hsil{n % 8}"), True, 5)
            if n % 2:
                r.send(pkt[: len(pkt) // 2])
                return "half_connect_" + r.outcome(25)
            r.send(pkt)
            if r.connack() != 0:
                return "refused"
            return "after_connack_" + r.outcome(20)
        finally:
            r.close()

    def bad_token(self, n):
        toks = bad_tokens(self.secret, f"hbad{n % 8}")
        name = sorted(toks)[n % len(toks)]
        r = self.raw()
        try:
            r.send(connect5(f"hbad{n % 8}", "JWT", toks[name]))
            rc = r.connack()
            return f"{name}:connack_{rc}" if rc is not None else f"{name}:closed"
        finally:
            r.close()

    def long_client_id(self, n):
        cid = "c" + "".join(self.rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=64999))
        r, rc = self.device(f"hlong{n % 4}", client_id=cid, clean=False,
                            properties=p_u32(0x11, 7 * 24 * 3600))
        try:
            return f"connack_{rc}" if rc is not None else "closed"
        finally:
            r.close()

    def many_filters(self, n):
        uid = f"hsubs{n % 4}"
        r, rc = self.device(uid)
        try:
            if rc != 0:
                return f"connack_{rc}"
            # Fresh filter names each round: a router that never frees per-filter
            # state after the session ends grows here.
            filters = [f"{uid}_r{n}f{i}" for i in range(5000)]
            r.send(subscribe5(1, filters))
            t0 = time.monotonic()
            try:
                t, _, body = r.read_packet()
            except (EOFError, OSError):
                return "closed"
            took = time.monotonic() - t0
            if t == 9:
                granted = sum(1 for c in body[3:] if c < 0x80) if len(body) > 3 else 0
                return f"suback_granted_{'all' if granted == 5000 else 'some' if granted else 'none'}" + (
                    "_slow" if took > 1 else "")
            if t == 14:
                return f"disconnect_0x{body[0]:02x}" if body else "disconnect_0x00"
            return f"packet_{t}"
        finally:
            r.close()

    def qos2_dup_unreleased(self, n):
        r, rc = self.device(f"hdup{n % 4}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            for pid in range(1, 11):
                msg = publish5("soak", b"dup", qos=2, pid=pid)
                r.send(msg)
                r.send(publish5("soak", b"dup", qos=2, pid=pid, dup=True))
                r.send(publish5("soak", b"dup", qos=2, pid=pid, dup=True))
            recs = 0
            try:
                r.sock.settimeout(2)
                while recs < 30:
                    t, _, _ = r.read_packet()
                    if t == 5:
                        recs += 1
                    elif t == 14:
                        return "disconnected"
            except (socket.timeout, TimeoutError):
                pass
            except (EOFError, OSError):
                return "closed"
            return f"pubrec_{'30' if recs == 30 else 'other'}"  # never released
        finally:
            r.close()

    def receive_maximum(self, n):
        r, rc = self.device(f"hrmax{n % 4}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            burst = b"".join(publish5("soak", b"x", qos=2 if i % 2 else 1, pid=i + 1) for i in range(400))
            try:
                r.send(burst)
            except (BrokenPipeError, ConnectionResetError):
                return "closed_during_send"
            end = time.monotonic() + 5
            try:
                while time.monotonic() < end:
                    r.sock.settimeout(max(0.05, end - time.monotonic()))
                    t, _, body = r.read_packet()
                    if t == 14:
                        return f"disconnect_0x{body[0]:02x}" if body else "disconnect_0x00"
            except (EOFError, ConnectionError):
                return "closed"
            except (socket.timeout, TimeoutError):
                return "open"
            except OSError:
                return "closed"
            return "open"
        finally:
            r.close()

    def server_only_packets(self, n):
        kinds = {
            "connack": packet(0x20, b"\x00\x00\x00"),
            "suback": packet(0x90, b"\x00\x01\x00\x00"),
            "unsuback": packet(0xB0, b"\x00\x01\x00\x00"),
        }
        name = sorted(kinds)[n % 3]
        handler = (n // 3) % 2 == 1
        if handler:
            r, rc = self.handler_raw(f"hsrv{n % 6}")
        else:
            r, rc = self.device(f"hsrv{n % 6}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            r.send(kinds[name])
            return f"{'handler' if handler else 'device'}_{name}:{r.outcome(3)}"
        finally:
            r.close()

    def v311_device_v5_reply(self, n):
        uid = f"hv311d{n % 4}"
        got = threading.Event()
        dev = self.paho(f"{uid}-c", "JWT", good_token(self.secret, uid), protocol=mqtt.MQTTv311)
        dev.on_message = lambda c, u, m: got.set()
        subscribed = threading.Event()
        dev.on_subscribe = lambda *a: subscribed.set()
        dev.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{uid}_reply", 1)
        h = self.paho(f"hv311h{n % 4}", "handler", self.hkey)
        try:
            dev.connect(self.host, self.port, 30)
            dev.loop_start()
            if not subscribed.wait(5):
                return "device_not_subscribed"
            h.connect(self.host, self.port, 30)
            h.loop_start()
            pr = Properties(PacketTypes.PUBLISH)
            pr.ContentType = "application/json"
            pr.UserProperty = [("user_id", uid), ("client_id", "x"), ("trace", "soak")]
            pr.MessageExpiryInterval = 60
            for _ in range(3):
                h.publish(f"{uid}_reply", b'{"status":200}', qos=1, properties=pr)
            if not got.wait(5):
                return "not_delivered"
            return "delivered" if dev.is_connected() else "delivered_then_dropped"
        except OSError:
            return "connect_failed"
        finally:
            for c in (dev, h):
                c.disconnect()
                c.loop_stop()

    def stop_reading(self, n):
        uid = f"hslow{n % 4}"
        r, rc = self.device(uid, rcvbuf=4096)
        if rc != 0:
            r.close()
            return f"connack_{rc}"
        r.send(subscribe5(1, [f"{uid}_flood"]))
        h = self.paho(f"hflood{n % 4}", "handler", self.hkey)
        try:
            h.connect(self.host, self.port, 30)
            h.loop_start()
            blob = os.urandom(16 * 1024)
            end = time.monotonic() + 20
            while time.monotonic() < end and self.live():
                for _ in range(20):
                    h.publish(f"{uid}_flood", blob, qos=0)
                time.sleep(0.05)
            # Now read: the broker should have cut the connection (write deadline).
            return r.outcome(1 if not self.live() else 5).replace("open", "still_open")
        except OSError:
            return "handler_connect_failed"
        finally:
            h.disconnect()
            h.loop_stop()
            r.close()

    def stop_reading_property_heavy(self, n):
        """A QoS 0 subscriber that stops reading while a handler sends it
        replies whose properties (user properties, correlation data) are as
        large as their payload: the session's inbox must count them."""
        uid = f"hslowp{n % 4}"
        r, rc = self.device(uid, rcvbuf=4096)
        if rc != 0:
            r.close()
            return f"connack_{rc}"
        r.send(subscribe5(1, [f"{uid}_flood"]))
        h = self.paho(f"hfloodp{n % 4}", "handler", self.hkey)
        try:
            h.connect(self.host, self.port, 30)
            h.loop_start()
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [("k" + str(i), "v" * 1000) for i in range(8)]
            props.CorrelationData = os.urandom(8 * 1024)
            blob = os.urandom(1024)
            end = time.monotonic() + 20
            while time.monotonic() < end and self.live():
                for _ in range(20):
                    h.publish(f"{uid}_flood", blob, qos=0, properties=props)
                time.sleep(0.05)
            return r.outcome(1 if not self.live() else 5).replace("open", "still_open")
        except OSError:
            return "handler_connect_failed"
        finally:
            h.disconnect()
            h.loop_stop()
            r.close()

    def property_heavy_commands(self, n):
        """Commands whose user properties and correlation data dwarf their
        (empty) payloads: at the device caps they are accepted and go to the
        command log, which must count them; over the caps a QoS 1 command is
        refused with PUBACK 0x83 and a QoS 0 one dropped."""
        r, rc = self.device(f"hprop{n % 8}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            # Just under the default caps (README "Limits"): 4 KiB of user
            # properties, 256 bytes of correlation data.
            under = (b"".join(p_user(f"k{i}", "v" * 500) for i in range(7))
                     + b"\x09" + (200).to_bytes(2, "big") + os.urandom(200))
            over = b"".join(p_user(f"k{i}", "v" * 1000) for i in range(64))
            burst = b"".join(publish5("soak", b"", qos=0, properties=under) for _ in range(40))
            burst += publish5("soak", b"", qos=1, pid=7, properties=under)
            burst += publish5("soak", b"", qos=1, pid=8, properties=over)
            burst += publish5("soak", b"", qos=0, properties=over)
            r.send(burst)
            acks = {}
            r.sock.settimeout(3)
            try:
                while len(acks) < 2:
                    t, _, body = r.read_packet()
                    if t == 4 and len(body) >= 2:
                        pid = int.from_bytes(body[:2], "big")
                        acks[pid] = body[2] if len(body) > 2 else 0
                    elif t == 14:
                        return f"disconnect_0x{body[0]:02x}" if body else "disconnect_0x00"
            except (socket.timeout, TimeoutError):
                return "no_puback"
            except (EOFError, OSError):
                return "closed"
            return f"under_0x{acks.get(7, 0xff):02x}:over_0x{acks.get(8, 0xff):02x}"
        finally:
            r.close()

    def property_heavy_reader(self, n):
        """The `$share` handler that reads the property-heavy commands: a log
        every reader has read must be freed."""
        r, rc = self.handler_raw(f"hpropreader{n % 2}")
        try:
            if rc != 0:
                return f"connack_{rc}"
            r.send(subscribe5(1, ["$share/hprop/soak"]))
            got = 0
            end = time.monotonic() + 10
            r.sock.settimeout(1)
            while time.monotonic() < end and self.live():
                try:
                    t, _, _ = r.read_packet()
                    got += t == 3
                except (socket.timeout, TimeoutError):
                    pass
            return "read_some" if got else "read_none"
        except (EOFError, OSError):
            return "closed"
        finally:
            r.close()

    def reconnecting_qos2_hoarder(self, n):
        """One persistent session that publishes QoS 2 commands it never
        releases, reconnecting between bursts: the gate's count is the
        session's, so a later connection is cut with 0x93 instead of the
        router holding another Receive Maximum's worth per reconnect."""
        cid = f"hhoard{n % 2}"
        outcome = "never_cut"
        pid = 1
        for round_ in range(5):
            r, rc = self.device(f"hhoard{n % 2}", client_id=cid, clean=round_ == 0,
                                properties=p_u32(0x11, 300))
            try:
                if rc != 0:
                    return f"round{round_}_connack_{rc}"
                burst = b""
                for _ in range(60):
                    burst += publish5("soak", b"h", qos=2, pid=pid)
                    pid = pid % 65535 + 1
                try:
                    r.send(burst)
                except (BrokenPipeError, ConnectionResetError):
                    return f"round{round_}_closed_during_send"
                got = r.outcome(2)
                if got.startswith("disconnect_"):
                    outcome = f"round{round_}_{got}"
                    break
            finally:
                r.close()
        # End the session so the next attempt starts from nothing.
        r, _ = self.device(f"hhoard{n % 2}", client_id=cid, clean=True)
        r.close()
        return outcome

    def disconnect_expiry_after_zero(self, n):
        """A session that connected with Session Expiry 0 and a delayed will,
        then sets an expiry at DISCONNECT (MQTT-3.14.2-2): a protocol error,
        the will must not be parked for days."""
        will = (props(p_u32(0x18, 3600)) + s("soak") + s("will"))
        r = self.raw()
        try:
            body = (s("MQTT") + bytes([5, 0x02 | 0x04 | 0x80 | 0x40]) + (30).to_bytes(2, "big")
                    + props(b"") + s(f"hdexp{n % 4}") + will + s("JWT")
                    + s(good_token(self.secret, f"hdexp{n % 4}")))
            r.send(packet(0x10, body))
            rc = r.connack()
            if rc != 0:
                return f"connack_{rc}"
            r.send(packet(0xE0, bytes([0x00]) + props(p_u32(0x11, 600000))))
            return r.outcome(3)
        finally:
            r.close()

    def retained_multibyte(self, n):
        got = Counter()
        sub = self.paho(f"hwild{n % 2}", "handler", self.hkey)
        sub.on_message = lambda c, u, m: got.update([m.topic])
        pub = self.paho(f"hret{n % 2}", "handler", self.hkey)
        try:
            pub.connect(self.host, self.port, 30)
            pub.loop_start()
            for t in ("é/x", "ü€/x", "日本/x"):
                pub.publish(t, b"retained", qos=1, retain=True).wait_for_publish(5)
            sub.connect(self.host, self.port, 30)
            sub.loop_start()
            sub.subscribe([("+/x", 1), ("#", 0)])
            time.sleep(1)
            pub.publish("é/x", b"live", qos=1).wait_for_publish(5)
            time.sleep(1)
            return "received" if got else "nothing_received"
        except (OSError, RuntimeError, ValueError):
            return "failed"
        finally:
            for c in (sub, pub):
                c.disconnect()
                c.loop_stop()

    def shared_persistent_unacked(self, n):
        cid = f"hshare{n % 2}"
        topic = f"soakshare{n % 2}"
        r, rc = self.handler_raw(cid, clean=False, properties=p_u32(0x11, 60))
        if rc != 0:
            r.close()
            return f"connack_{rc}"
        pub = self.paho(f"hsharepub{n % 2}", "handler", self.hkey)
        try:
            r.send(subscribe5(1, [f"$share/g/{topic}"], qos=1))
            t, _, _ = r.read_packet()
            pub.connect(self.host, self.port, 30)
            pub.loop_start()
            pub.publish(topic, b"unacked", qos=1).wait_for_publish(5)
            got = False
            try:
                while not got:
                    t, _, _ = r.read_packet()
                    got = t == 3
            except (socket.timeout, TimeoutError):
                pass
            r.close()  # disconnect with the QoS 1 delivery unacknowledged
            time.sleep(0.5)
            pub.publish(topic, b"after", qos=1).wait_for_publish(5)
            # Come back with the same persistent session, then end it.
            r2, rc2 = self.handler_raw(cid, clean=n % 3 == 0, properties=p_u32(0x11, 60))
            r2.close()
            return f"{'delivered' if got else 'not_delivered'}:reconnect_connack_{rc2}"
        except (EOFError, OSError, RuntimeError, ValueError):
            return "failed"
        finally:
            pub.disconnect()
            pub.loop_stop()
            r.close()

    def takeover_storm(self, n):
        uid = "htake"
        conns = []
        codes = Counter()
        try:
            for _ in range(20):
                try:
                    r, rc = self.device(uid, client_id="htake-same")
                    conns.append(r)
                    codes[rc] += 1
                except OSError:
                    codes["connect_error"] += 1
            # The older sockets should all have been ended by the takeovers.
            open_old = 0
            for r in conns[:-1]:
                if r.outcome(0.1) == "open":
                    open_old += 1
            return f"ok_{codes.get(0, 0)}of20:old_open_{'0' if open_old == 0 else 'some'}"
        finally:
            for r in conns:
                r.close()

    def lookalike_identity(self, n):
        uid = f"hlook{n % 4}"
        seen = []
        h = self.paho(f"hlooksink{n % 4}", "handler", self.hkey)
        h.on_message = lambda c, u, m: seen.append(getattr(m.properties, "UserProperty", []))
        subscribed = threading.Event()
        h.on_subscribe = lambda *a: subscribed.set()
        try:
            h.connect(self.host, self.port, 30)
            h.loop_start()
            h.subscribe(f"soaklook{n % 4}", 0)
            if not subscribed.wait(5):
                return "sink_not_subscribed"
            # soaklookN is a command topic once the sink subscribes to it.
            r, rc = self.device(uid)
            try:
                if rc != 0:
                    return f"connack_{rc}"
                r.send(publish5(f"soaklook{n % 4}", b"hi", properties=b"".join([
                    p_user("USER_ID", "victim"), p_user(" User_Id ", "victim"),
                    p_user("CLIENT_ID", "victim"), p_user("user_id", "victim")])))
                end = time.monotonic() + 3
                while not seen and time.monotonic() < end:
                    time.sleep(0.05)
            finally:
                r.close()
            if not seen:
                return "not_delivered"
            names = [k for k, _ in seen[0]]
            forged = [k for k, v in seen[0] if k.strip().lower() in ("user_id", "client_id") and v == "victim"]
            ok = names.count("user_id") == 1 and dict(seen[0]).get("user_id") == uid
            if ok and not forged:
                return "stamped_only"
            return "lookalike_leaked:" + "|".join(sorted(set(forged))) if forged else "user_id_not_stamped"
        except OSError:
            return "failed"
        finally:
            h.disconnect()
            h.loop_stop()

    # ------------------------------------------------------------ driver

    def loop(self, kind, fn, pause):
        n = 0
        while self.live():
            try:
                outcome = fn(n)
            except Exception as e:  # noqa: BLE001 - a failed attempt is an outcome, the loop goes on
                outcome = f"error_{type(e).__name__}"
            self.note(kind, outcome)
            with self.lock:
                # A broker that refuses TCP connections is gone: stop, rather than
                # pile up thousands of refused attempts that say nothing more.
                self.refused_in_row = self.refused_in_row + 1 if outcome == "error_ConnectionRefusedError" else 0
                if self.refused_in_row >= 50 and self.live():
                    self.stopped_early = "the broker refused 50 connections in a row"
                    self.deadline = time.monotonic()
            n += 1
            time.sleep(pause)

    def run(self):
        attacks = [
            ("garbage_instead_of_connect", self.garbage, 0.1),
            ("garbage_to_tls_port", self.garbage_plaintext_to_tls_port, 0.3),
            ("random_after_connect", self.random_after_connect, 0.1),
            ("oversized_packet", self.oversized, 0.3),
            ("connect_then_silence", self.connect_then_silence, 0.5),
            ("bad_token", self.bad_token, 0.05),
            ("client_id_65000", self.long_client_id, 0.5),
            ("subscribe_5000_filters", self.many_filters, 1.0),
            ("qos2_dup_never_released", self.qos2_dup_unreleased, 0.3),
            ("over_receive_maximum", self.receive_maximum, 0.5),
            ("server_only_packets", self.server_only_packets, 0.2),
            ("v311_device_v5_reply", self.v311_device_v5_reply, 0.5),
            ("stop_reading_flooded", self.stop_reading, 1.0),
            ("retained_multibyte_wildcards", self.retained_multibyte, 1.0),
            ("shared_persistent_unacked", self.shared_persistent_unacked, 1.0),
            ("takeover_storm", self.takeover_storm, 0.5),
            ("lookalike_identity", self.lookalike_identity, 0.3),
            ("stop_reading_property_heavy", self.stop_reading_property_heavy, 1.0),
            ("property_heavy_commands", self.property_heavy_commands, 0.2),
            ("property_heavy_reader", self.property_heavy_reader, 0.5),
            ("reconnecting_qos2_hoarder", self.reconnecting_qos2_hoarder, 0.5),
            ("disconnect_expiry_after_zero", self.disconnect_expiry_after_zero, 0.3),
        ]
        if self.only:
            unknown = set(self.only) - {a[0] for a in attacks}
            if unknown:
                sys.exit(f"unknown attack kinds: {', '.join(sorted(unknown))}")
            attacks = [a for a in attacks if a[0] in self.only]
        unknown = set(self.skip) - {a[0] for a in attacks}
        if unknown:
            sys.exit(f"unknown attack kinds to skip: {', '.join(sorted(unknown))}")
        attacks = [a for a in attacks if a[0] not in self.skip]
        threads = [threading.Thread(target=self.loop, args=a, name=a[0], daemon=True) for a in attacks]
        for t in threads:
            t.start()
        for t in threads:
            # Every attempt is bounded (≤ ~40 s); a thread still running well past
            # the deadline is reported rather than waited on forever.
            t.join(timeout=max(0.0, self.deadline - time.monotonic()) + 60)
        stuck = [t.name for t in threads if t.is_alive()]
        return {
            "attempts": dict(sorted(self.attempts.items())),
            "outcomes": {k: dict(sorted(v.items())) for k, v in sorted(self.outcomes.items())},
            "stuck": stuck,
            "stopped_early": self.stopped_early,
        }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="broker TCP port")
    ap.add_argument("--tls-port", type=int, required=True)
    ap.add_argument("--ca", required=True, help="CA certificate (PEM) of the TLS listener")
    ap.add_argument("--duration", type=float, default=1800)
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--only", help="comma-separated attack kinds to run (default: all)")
    ap.add_argument("--skip", help="comma-separated attack kinds to leave out")
    ap.add_argument("--json", help="write the report here too")
    a = ap.parse_args()
    a.jwt_secret = os.environ.get("SOAK_JWT_SECRET", "")
    a.handler_key = os.environ.get("SOAK_HANDLER_KEY", "")
    if not a.jwt_secret or not a.handler_key:
        sys.exit("set SOAK_JWT_SECRET and SOAK_HANDLER_KEY in the environment")
    if a.host not in ("127.0.0.1", "::1", "localhost"):
        sys.exit("hostile clients run against loopback only")
    report = Soak(a).run()
    text = json.dumps(report, indent=1)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
