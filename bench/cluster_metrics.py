#!/usr/bin/env python3
"""Reads the nodes' /metrics around one bench/cluster.sh point
(CLUSTER_METRICS=1): where the messages went and where they were dropped.

usage:
  cluster_metrics.py fetch OUT_PREFIX NAME=HOST:PORT...
      saves each node's /metrics as OUT_PREFIX-NAME.txt (2 s deadline each;
      a node that does not answer is written as an empty file)
  cluster_metrics.py diff BEFORE_PREFIX AFTER_PREFIX NAME...
      prints, per node and summed, how much each counter of interest grew
      between the two fetches: messages in/out, the cluster plane's
      cluster_messages{what} and cluster_dropped{reason}, replies_dropped,
      sessions_ended{reason}
"""
import re
import sys
import urllib.request

INTEREST = (
    "broker_messages_in_total",
    "broker_messages_out_total",
    "broker_replies_dropped_total",
    "broker_cluster_messages_total",
    "broker_cluster_dropped_total",
    "broker_sessions_ended_total",
    "broker_session_panics_total",
)
LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?)\s+([0-9.eE+-]+)$")


def fetch(prefix, nodes):
    for spec in nodes:
        name, addr = spec.split("=", 1)
        try:
            with urllib.request.urlopen(f"http://{addr}/metrics", timeout=2) as r:
                text = r.read().decode("utf-8", "replace")
        except OSError as e:
            print(f"  metrics of {name} ({addr}) not read: {e}", file=sys.stderr)
            text = ""
        with open(f"{prefix}-{name}.txt", "w") as fh:
            fh.write(text)


def parse(path):
    values = {}
    try:
        with open(path) as fh:
            for line in fh:
                m = LINE.match(line.strip())
                if m and m.group(1).startswith(INTEREST):
                    values[m.group(1)] = float(m.group(2))
    except OSError:
        pass
    return values


def diff(before, after, names):
    total = {}
    for name in names:
        b, a = parse(f"{before}-{name}.txt"), parse(f"{after}-{name}.txt")
        grew = {k: v - b.get(k, 0.0) for k, v in a.items() if v - b.get(k, 0.0) != 0}
        print(f"  {name}: " + (", ".join(f"{k} +{int(v)}" for k, v in sorted(grew.items())) or "no change"))
        for k, v in grew.items():
            total[k] = total.get(k, 0.0) + v
    if len(names) > 1:
        print("  all nodes: " + (", ".join(f"{k} +{int(v)}" for k, v in sorted(total.items())) or "no change"))


def main(argv):
    if len(argv) >= 3 and argv[1] == "fetch":
        fetch(argv[2], argv[3:])
    elif len(argv) >= 4 and argv[1] == "diff":
        diff(argv[2], argv[3], argv[4:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
