#!/usr/bin/env python3
"""What BROKER_CLUSTER_WAIT_REPLICAS costs, from one bench/cluster.sh run
whose variants include a variant and the same with "_wait<n>" (e.g.
CLUSTER_VARIANTS="cluster1 cluster1_wait1 cluster cluster_wait1"
CLUSTER_SWEEP=none): per round, p50/p99 round trip and CPU per round trip
(nodes, the redis-servers, both), and the ratio of each "_wait" variant to
its base measured in the same round; then the mean ratio over rounds.

    python3 bench/cluster_wait.py bench/results/cluster-<stamp> [out.md]
"""
import json
import os
import re
import statistics
import sys

# redis-server processes at the end of --broker-pid, per base variant.
REDIS_PROCS = {"redis": 1, "three": 1, "cluster": 6, "cluster1": 6}
NAMES = {
    "redis": "1 node + Redis",
    "three": "3 nodes + Redis",
    "cluster": "3 nodes + Redis Cluster (3+3)",
    "cluster1": "1 node + Redis Cluster (3+3)",
}


def load(d):
    runs = {}
    for f in sorted(os.listdir(d)):
        m = re.match(r"lat-r(\d+)__(\w+)\.json$", f)
        if not m:
            continue
        with open(os.path.join(d, f)) as fh:
            try:
                runs[(int(m.group(1)), m.group(2))] = json.load(fh)
            except json.JSONDecodeError:
                pass
    return runs


def point(r, variant):
    """(p50, p99, nodes µs/rt, Redis µs/rt, total µs/rt, sent, lost)."""
    base = variant.split("_wait")[0]
    b = r.get("broker") or {}
    total = b.get("cpu_us_per_round_trip")
    per = b.get("per_process") or []
    k = REDIS_PROCS.get(base, 0)
    nodes, redis = total, None
    if 0 < k < len(per):
        redis = sum(p["cpu_us_per_round_trip"] for p in per[-k:])
        nodes = sum(p["cpu_us_per_round_trip"] for p in per[:-k])
    lat = r.get("latency") or {}
    calls = (r.get("redis") or {}).get("calls_per_message")
    return (lat.get("p50_ms"), lat.get("p99_ms"), nodes, redis, total, r.get("sent"), r.get("lost"), calls)


def fmt(x, nd=2):
    return "–" if x is None else f"{x:,.{nd}f}"


def ratio(a, b):
    return a / b if a is not None and b else None


def main():
    d = sys.argv[1]
    runs = load(d)
    variants = sorted({v for (_, v) in runs}, key=lambda v: (v.split("_wait")[0], v))
    rounds = sorted({r for (r, _) in runs})
    out = [
        f"Results directory `{d.rstrip('/')}` (`bench/cluster.sh`, latency points: "
        "1,000 TCP devices, 2,000 round trips/s). CPU per round trip is user + system of the "
        "nodes and of every redis-server of the variant (on the Cluster: 3 masters and 3 replicas).",
        "",
        "| round | variant | sent | lost | p50 ms | p99 ms | CPU µs/rt nodes | CPU µs/rt Redis | CPU µs/rt total "
        "| Redis calls/msg (INFO, masters) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rnd in rounds:
        for v in variants:
            r = runs.get((rnd, v))
            if r is None:
                continue
            p50, p99, nodes, redis, total, sent, lost, calls = point(r, v)
            out.append(f"| {rnd} | {v} | {sent:,} | {lost:,} | {fmt(p50)} | {fmt(p99)} | "
                       f"{fmt(nodes, 1)} | {fmt(redis, 1)} | {fmt(total, 1)} | {fmt(calls)} |")
    out += ["", "Ratio of each `_wait` variant to its base in the same round (then the mean):", "",
            "| variant / base | round | p50 | p99 | CPU nodes | CPU Redis | CPU total |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for v in variants:
        if "_wait" not in v:
            continue
        base = v.split("_wait")[0]
        ratios = []
        for rnd in rounds:
            a, b = runs.get((rnd, v)), runs.get((rnd, base))
            if a is None or b is None:
                continue
            pa, pb = point(a, v), point(b, base)
            rs = [ratio(pa[i], pb[i]) for i in (0, 1, 2, 3, 4)]
            ratios.append(rs)
            out.append(f"| {v} / {base} | {rnd} | " + " | ".join(fmt(x) + "×" if x else "–" for x in rs) + " |")
        if ratios:
            means = [statistics.mean([r[i] for r in ratios if r[i] is not None] or [0]) or None
                     for i in range(5)]
            out.append(f"| **{v} / {base}** ({NAMES.get(base, base)}) | mean | "
                       + " | ".join(("**" + fmt(x) + "×**") if x else "–" for x in means) + " |")
    text = "\n".join(out) + "\n"
    print(text)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
