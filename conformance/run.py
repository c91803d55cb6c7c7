#!/usr/bin/env python3
"""Generates the conformance matrix: starts this broker (the binary built by
run.sh) and Mosquitto on free loopback ports, both over TLS with the
development CA this broker makes, runs suite.py against both at once, and
writes docs/CONFORMANCE.md and docs/conformance.json.

Mosquitto emulates the device role with a password file (username = uid) and
an ACL allowing exactly the device's reply topics (read) and the suite's
command topics (write), so device rows compare like for like; what it cannot
emulate is said in the matrix notes.
"""

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import suite  # noqa: E402  (the check list, for the ACL and the row order)

KEEPALIVE_CAP = 30
SUITE_DEADLINE = 300
START_DEADLINE = 30

# Why this broker deliberately differs from plain MQTT in a role (shown in the
# note column of every row of that role).
ROLE_NOTES = {
    "device": "device rules: publishes only commands, subscribes only to its own `U_` reply topics; "
              "the broker stamps `user_id`/`client_id` user properties on its commands and clears retain",
}
# Per-area notes: where we deliberately differ, or what a row does not show.
AREA_NOTES = {
    "v5.topic-alias-server": "server-to-client aliases are optional (MQTT 5 §3.3.2.3.4); the row reports "
                             "whether they are used",
    "v5.properties-forwarded": "device role: the identity properties the broker stamps (`user_id`, "
                               "`client_id`) are ignored in the comparison; all the device's own are kept",
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, proc, what):
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port} within {START_DEADLINE} s")


def mosquitto_binary():
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("mosquitto is not installed: apt-get install -y mosquitto (conformance/run.sh does it)")


def mosquitto_version(binary):
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    for line in (out.stdout + out.stderr).splitlines():
        if "version" in line:
            return line.split("version", 1)[1].split()[0]
    return "unknown"


def start_ours(binary, work, log):
    port = free_port()
    dev_dir = work / "dev"
    handler_key = secrets.token_hex(16)
    jwt_secret = secrets.token_hex(32)
    env = dict(os.environ)
    for name in list(env):
        if name.startswith(("BROKER_", "JWT_", "HANDLER_", "COMMAND_", "METRICS_", "REDIS_")):
            del env[name]
    env.update({
        "BROKER_TLS_LISTEN": f"127.0.0.1:{port}",
        "BROKER_DEV_DIR": str(dev_dir),
        "BROKER_HANDLERS": "none",
        "DATA_DIR": str(work / "data"),
        "JWT_SECRET": jwt_secret,
        "HANDLER_KEYS": handler_key,
        "BROKER_MAX_KEEP_ALIVE_SECS": str(KEEPALIVE_CAP),
        # Many short connections from one address.
        "BROKER_CONN_RATE": "0",
        "RUST_LOG": env.get("RUST_LOG", "warn"),
    })
    proc = subprocess.Popen([str(binary)], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(work))
    wait_port(port, proc, "the broker")
    ca = dev_dir / "ca.pem"
    deadline = time.monotonic() + START_DEADLINE
    while not ca.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    target = ["--target-name", "ours", "--port", str(port), "--cafile", str(ca), "--handler-key", handler_key,
              "--jwt-secret", jwt_secret, "--keepalive-cap", str(KEEPALIVE_CAP)]
    return proc, target, dev_dir


def write_mosquitto_acl(path, handler_user):
    lines = [f"user {handler_user}", "topic readwrite #", ""]
    # Each device uid: read its own reply topics, write the command topics its
    # checks use (on this broker any device may publish any declared command;
    # the suite's device publishes only its own).
    for uid, replies, cmds in suite.device_topics():
        lines.append(f"user {uid}")
        lines.extend(f"topic read {topic}" for topic in replies)
        lines.extend(f"topic write {topic}" for topic in cmds)
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def start_mosquitto(binary, work, dev_dir, log):
    port = free_port()
    handler_key = secrets.token_hex(16)
    device_password = secrets.token_hex(12)
    mosq = work / "mosquitto"
    mosq.mkdir()
    passwd = mosq / "passwd"
    users = [("handler", handler_key)] + [(uid, device_password) for uid, _, _ in suite.device_topics()]
    passwd.write_text("".join(f"{user}:{password}\n" for user, password in users))
    subprocess.run(["mosquitto_passwd", "-U", str(passwd)], check=True, timeout=60)
    acl = mosq / "acl"
    write_mosquitto_acl(acl, "handler")
    # The broker's development certificate serves Mosquitto too (same CA).
    certs = {}
    for name in ("ca.pem", "server.pem", "server-key.pem"):
        shutil.copy(dev_dir / name, mosq / name)
        certs[name] = mosq / name
    for path in mosq.iterdir():
        path.chmod(0o644)
    mosq.chmod(0o755)
    work.chmod(0o755)
    conf = mosq / "mosquitto.conf"
    conf.write_text("\n".join([
        "per_listener_settings false",
        "persistence false",
        "allow_anonymous false",
        f"password_file {passwd}",
        f"acl_file {acl}",
        f"max_keepalive {KEEPALIVE_CAP}",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        f"listener {port} 127.0.0.1",
        f"cafile {certs['ca.pem']}",
        f"certfile {certs['server.pem']}",
        f"keyfile {certs['server-key.pem']}",
        "",
    ]))
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT, cwd=str(mosq))
    wait_port(port, proc, "mosquitto")
    target = ["--target-name", "mosquitto", "--port", str(port), "--cafile", str(certs["ca.pem"]),
              "--handler-key", handler_key, "--device-password", device_password,
              "--keepalive-cap", str(KEEPALIVE_CAP)]
    return proc, target


def run_suite(target_args, out_json, log_path, extra, results, name):
    cmd = [sys.executable, str(HERE / "suite.py"), *target_args, "--json", str(out_json), *extra]
    with open(log_path, "w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=log, timeout=SUITE_DEADLINE)
            results[name] = proc.returncode
        except subprocess.TimeoutExpired:
            results[name] = "timeout"


def cell(row):
    if row is None:
        return "—"
    status = row["status"]
    mark = {"pass": "pass", "fail": "**FAIL**", "n/a": "n/a"}.get(status, status)
    return mark


def render(ours, theirs, mosq_version, paho_version):
    by_key = {(r["id"], r["role"]): r for r in theirs["rows"]}
    lines = [
        "# MQTT conformance matrix",
        "",
        "Generated by `conformance/run.sh` (do not edit by hand): the checks in",
        "[`conformance/suite.py`](../conformance/suite.py), written from the normative statements of",
        "OASIS MQTT 5.0 and 3.1.1, run with paho-mqtt "
        f"{paho_version} against this broker and Mosquitto {mosq_version} in one run, both over TLS on",
        "loopback. Each area runs in two roles: **handler** (username `handler`, full rights; the other",
        "party is a handler) and **device** (username `JWT`, a token for a fresh uid `U`: publishes",
        "only command topics, subscribes only to literal `U_...` reply topics; the other party is an",
        "MQTT 5 handler). Mosquitto emulates the device role with a password file and an ACL granting",
        "exactly those topics; it cannot clear a device's retain flag or stamp identity properties,",
        "which no row depends on.",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} from commit {git_commit()}. "
        f"This broker: {summary(ours)}. Mosquitto {mosq_version}: {summary(theirs)}.",
        "",
        f"| area | spec statement | role | this broker | Mosquitto {mosq_version} | note |",
        "|---|---|---|---|---|---|",
    ]
    for row in ours["rows"]:
        other = by_key.get((row["id"], row["role"]))
        notes = []
        if row["status"] == "n/a":
            notes.append(row["detail"])
        if row["id"] in AREA_NOTES:
            notes.append(AREA_NOTES[row["id"]])
        for who, result in (("this broker", row), ("Mosquitto", other)):
            if result is not None and result["status"] != "n/a" and result["detail"]:
                notes.append(f"{who}: {result['detail']}")
        note = "; ".join(n.replace("|", "\\|").replace("\n", " ") for n in notes if n)
        area = f"{row['title']} (MQTT {row['protocol']}) `{row['id']}`"
        lines.append(f"| {area} | {row['spec']} | {row['role']} | {cell(row)} | {cell(other)} | {note} |")
    lines += [
        "",
        "Device role, everywhere: " + ROLE_NOTES["device"] + ".",
        "",
        "Regenerate: `conformance/run.sh` (README, \"Conformance\"). Rows this broker must pass are listed in",
        "`conformance/expected.json` and enforced by `cargo test -p e2e --test conformance_matrix`.",
        "",
    ]
    return "\n".join(lines)


def git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=str(ROOT))
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10, cwd=str(ROOT))
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def summary(result):
    rows = result["rows"]
    passed = sum(1 for r in rows if r["status"] == "pass")
    failed = sum(1 for r in rows if r["status"] == "fail")
    na = sum(1 for r in rows if r["status"] == "n/a")
    return f"{passed} pass, {failed} fail, {na} n/a of {len(rows)} rows"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", required=True, help="path of this broker's binary")
    parser.add_argument("--out-dir", default=str(ROOT / "docs"))
    parser.add_argument("--only", help="run only checks whose id contains this text (no docs written)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="conformance-"))
    procs = []
    try:
        with open(work / "broker.log", "w") as blog, open(work / "mosquitto.log", "w") as mlog:
            ours_proc, ours_target, dev_dir = start_ours(Path(args.broker).resolve(), work, blog)
            procs.append(ours_proc)
            mosq = mosquitto_binary()
            mosq_proc, mosq_target = start_mosquitto(mosq, work, dev_dir, mlog)
            procs.append(mosq_proc)
            extra = ["--only", args.only] if args.only else []
            results = {}
            threads = [
                threading.Thread(target=run_suite, args=(ours_target, work / "ours.json", work / "ours.log",
                                                         extra, results, "ours")),
                threading.Thread(target=run_suite, args=(mosq_target, work / "mosquitto.json",
                                                         work / "mosquitto-suite.log", extra, results,
                                                         "mosquitto")),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            for name in ("ours", "mosquitto"):
                sys.stderr.write((work / f"{'ours' if name == 'ours' else 'mosquitto-suite'}.log").read_text())
                if results.get(name) != 0:
                    raise SystemExit(f"the suite against {name} did not complete ({results.get(name)}); "
                                     f"logs in {work}")
            ours = json.loads((work / "ours.json").read_text())
            theirs = json.loads((work / "mosquitto.json").read_text())
            version = mosquitto_version(mosq)
            sys.stderr.write(f"this broker: {summary(ours)}; Mosquitto {version}: {summary(theirs)}\n")
            if args.only:
                return 0
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "CONFORMANCE.md").write_text(render(ours, theirs, version, ours["paho_mqtt"]))
            (out / "conformance.json").write_text(json.dumps({
                "generator": "conformance/run.sh",
                "paho_mqtt": ours["paho_mqtt"],
                "brokers": {"this broker": ours, f"mosquitto {version}": theirs},
            }, indent=2) + "\n")
            sys.stderr.write(f"wrote {out / 'CONFORMANCE.md'} and {out / 'conformance.json'}\n")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
