#!/usr/bin/env python3
"""Where the Redis calls per message go: per command name, per message, for
each latency point (lat-r<n>__<variant>.json) of one or more bench/cluster.sh
results directories, side by side (e.g. the binaries before and after a
change, run back to back).

    python3 bench/cluster_calls.py [--labels before,after] DIR [DIR ...]

Calls are INFO commandstats differences over the point (on a Cluster, the
three masters summed), per message (a round trip is two messages). "sent"
counts each reply's script once: it subtracts the calls the script makes
itself, an XADD and an SPUBLISH per EVALSHA/EVAL, and each PEXPIRE (only the
reply script sends one in this bench), and the replicas' REPLCONF (ACK, the
answer to a WAIT's GETACK: no node sends it); the commands' XADD, XREADGROUP
and XACK, and WAIT, are sent as they are."""

import glob
import json
import os
import re
import sys


def points(d):
    out = {}
    for path in sorted(glob.glob(os.path.join(d, "lat-r*__*.json"))):
        m = re.match(r"lat-r(\d+)__(.+)\.json$", os.path.basename(path))
        r = json.load(open(path))
        red = r.get("redis") or {}
        if not red.get("calls") or not r.get("received"):
            continue
        out[(int(m.group(1)), m.group(2))] = (r, red)
    return out


def per_message(r, red):
    msgs = 2 * r["received"]
    by = red["calls"]
    scripts = by.get("evalsha", 0) + by.get("eval", 0)
    sent = red["total_calls"] - 2 * scripts - by.get("pexpire", 0) - by.get("replconf", 0)
    return msgs, {k: v / msgs for k, v in by.items()}, red["total_calls"] / msgs, sent / msgs


def main():
    args = sys.argv[1:]
    labels = None
    if args[:1] == ["--labels"]:
        labels = args[1].split(",")
        args = args[2:]
    labels = labels or [os.path.basename(d.rstrip("/")) for d in args]
    runs = [(label, points(d)) for label, d in zip(labels, args)]
    keys = sorted({k for _, p in runs for k in p}, key=lambda k: (k[1], k[0]))
    names = set()
    for _, p in runs:
        for r, red in p.values():
            names |= set(red["calls"])
    main_names = [n for n in ("evalsha", "xadd", "pexpire", "spublish", "xreadgroup", "xack", "wait", "replconf")
                  if n in names]
    print("| variant | round | binaries | messages | INFO calls/message | sent/message | "
          + " | ".join(main_names) + " | other |")
    print("| --- " * (6 + len(main_names) + 1) + "|")
    for key in keys:
        for label, p in runs:
            if key not in p:
                continue
            r, red = p[key]
            msgs, by, info, sent = per_message(r, red)
            other = sum(v for k, v in by.items() if k not in main_names)
            cells = [key[1], str(key[0]), label, f"{msgs:,}", f"{info:.2f}", f"{sent:.2f}"]
            cells += [f"{by.get(n, 0):.3f}" for n in main_names] + [f"{other:.3f}"]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
