#!/usr/bin/env python3
"""Turns one bench/run.sh results directory into bench/RESULTS.md and an SVG
plot of round-trip latency against offered rate. Standard library only.

usage: report.py RESULTS_DIR RESULTS_MD PLOT_SVG
"""
import json
import math
import os
import re
import sys

BROKERS = ["bare", "ours-tcp", "ours-tls", "mosquitto"]
NAMES = {
    "bare": "bare rumqttd router",
    "ours-tcp": "our broker, TCP",
    "ours-tls": "our broker, TLS",
    "mosquitto": "Mosquitto",
}
COLORS = {"bare": "#d62728", "ours-tcp": "#1f77b4", "ours-tls": "#2ca02c", "mosquitto": "#ff7f0e"}


def load(dirname):
    runs = {}
    for f in sorted(os.listdir(dirname)):
        m = re.match(r"(.+)__(.+)\.json$", f)
        if not m:
            continue
        with open(os.path.join(dirname, f)) as fh:
            try:
                runs[(m.group(1), m.group(2))] = json.load(fh)
            except json.JSONDecodeError:
                pass
    return runs


def cpu(r):
    b = r.get("broker") or {}
    return b.get("cpu_us_per_round_trip")


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return f"{v:,}"


def ratio(a, b):
    if a is None or b in (None, 0):
        return "–"
    return f"{a / b:.2f}×"


def lat(r, key):
    return r["latency"][key]


def row(cells):
    return "| " + " | ".join(cells) + " |"


def run_table(runs, scenario_prefix, brokers, key_name, key_fn):
    lines = [
        row([key_name, "broker", "devices ready", "subs acked", "offered /s", "achieved /s", "sent", "lost", "dup",
             "p50 ms", "p99 ms", "p99.9 ms", "max ms", "broker CPU µs/rt", "broker KiB/conn", "peak RSS MiB"]),
        row(["---"] * 16),
    ]
    keys = sorted({k for (k, b) in runs if k.startswith(scenario_prefix)}, key=key_fn)
    for k in keys:
        for b in brokers:
            r = runs.get((k, b))
            if not r:
                continue
            br = r.get("broker") or {}
            lines.append(row([
                k[len(scenario_prefix):] or k, NAMES.get(b, b), fmt(r["devices_ready"]),
                f'{fmt(r["subscriptions_acked"])} / {fmt(r["subscriptions_requested"])}',
                fmt(r["offered_rate"], 0), fmt(r["achieved_rate"], 0), fmt(r["sent"]), fmt(r["lost"]),
                fmt(r["duplicated"]), fmt(lat(r, "p50_ms"), 2), fmt(lat(r, "p99_ms"), 2),
                fmt(lat(r, "p999_ms"), 2), fmt(lat(r, "max_ms"), 2), fmt(cpu(r)),
                fmt(br.get("kib_per_connection")),
                fmt((br.get("peak_rss_kib") or 0) / 1024.0, 0) if br else "–",
            ]))
    return "\n".join(lines)


def num_suffix(k):
    m = re.search(r"(\d+)$", k)
    return int(m.group(1)) if m else 0


def svg_plot(runs, path):
    series = {}
    for (k, b), r in runs.items():
        if k.startswith("sweep-") or k == "cpu1k":
            series.setdefault(b, []).append((r["offered_rate"], lat(r, "p99_ms"), lat(r, "p50_ms"), r["lost"]))
    W, H, L, R, T, B = 760, 460, 70, 190, 40, 60
    pw, ph = W - L - R, H - T - B
    rates = [p[0] for s in series.values() for p in s] or [1]
    ys = [max(p[1], 0.01) for s in series.values() for p in s] + [max(p[2], 0.01) for s in series.values() for p in s]
    xmax = max(rates) * 1.05
    ymin = 10 ** math.floor(math.log10(min(ys or [0.1])))
    ymax = 10 ** math.ceil(math.log10(max(ys or [10])))
    if ymax <= ymin:
        ymax = ymin * 10

    def X(v):
        return L + pw * v / xmax

    def Y(v):
        v = max(v, ymin)
        return T + ph * (1 - (math.log10(v) - math.log10(ymin)) / (math.log10(ymax) - math.log10(ymin)))

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="22" font-size="15">Round-trip latency vs offered rate (1,000 devices, 64-byte QoS 0 echo)</text>']
    # grid
    e = int(math.log10(ymin))
    while 10 ** e <= ymax:
        y = Y(10 ** e)
        out.append(f'<line x1="{L}" y1="{y:.1f}" x2="{L + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{L - 8}" y="{y + 4:.1f}" text-anchor="end">{10 ** e:g} ms</text>')
        e += 1
    step = 5000 if xmax > 12000 else 1000
    x = 0
    while x <= xmax:
        out.append(f'<line x1="{X(x):.1f}" y1="{T}" x2="{X(x):.1f}" y2="{T + ph}" stroke="#eee"/>')
        out.append(f'<text x="{X(x):.1f}" y="{T + ph + 18}" text-anchor="middle">{x // 1000}k</text>')
        x += step
    out.append(f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{L + pw / 2}" y="{H - 15}" text-anchor="middle">offered round trips per second</text>')
    ly = T + 10
    for b in BROKERS:
        pts = sorted(series.get(b, []))
        if not pts:
            continue
        c = COLORS[b]
        for idx, dash in ((1, ""), (2, ' stroke-dasharray="4 3"')):
            d = " ".join(f"{X(p[0]):.1f},{Y(p[idx]):.1f}" for p in pts)
            out.append(f'<polyline points="{d}" fill="none" stroke="{c}" stroke-width="2"{dash}/>')
        for p in pts:
            mark = "white" if p[3] > 0 else c
            out.append(f'<circle cx="{X(p[0]):.1f}" cy="{Y(p[1]):.1f}" r="3.5" fill="{mark}" stroke="{c}"/>')
        out.append(f'<line x1="{L + pw + 12}" y1="{ly}" x2="{L + pw + 32}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<text x="{L + pw + 38}" y="{ly + 4}">{NAMES[b]}</text>')
        ly += 20
    out.append(f'<text x="{L + pw + 12}" y="{ly + 10}">solid: p99, dashed: p50</text>')
    out.append(f'<text x="{L + pw + 12}" y="{ly + 28}">hollow dot: messages lost</text>')
    out.append("</svg>")
    with open(path, "w") as fh:
        fh.write("\n".join(out) + "\n")


def targets(runs):
    """Issue 4's targets, each with the measured value and met or missed."""
    out = [row(["target", "measured", "verdict"]), row(["---"] * 3)]

    def verdict(ok):
        return "met" if ok else "**missed**"

    r = runs.get(("new10k", "ours-tcp"))
    if r:
        ok = r["lost"] == 0 and lat(r, "p99_ms") < 10 and r["devices_ready"] >= 10000 and r["new_users_first_reply"] == r["new_users_target"]
        out.append(row(["10,000 devices at 5,000/s + 1,000 new users (TCP): p99 < 10 ms, no loss",
                        f'p99 {fmt(lat(r, "p99_ms"), 2)} ms, lost {r["lost"]}, new users replied {r["new_users_first_reply"]}/{r["new_users_target"]}, devices {r["devices_ready"]}',
                        verdict(ok)]))
    r = runs.get(("new10k", "ours-tls"))
    if r:
        ok = r["lost"] == 0 and lat(r, "p99_ms") < 10 and r["devices_ready"] >= 10000
        out.append(row(["same over TLS", f'p99 {fmt(lat(r, "p99_ms"), 2)} ms, lost {r["lost"]}', verdict(ok)]))
    r = runs.get(("tls19k", "ours-tls"))
    if r:
        br = r.get("broker") or {}
        kib = br.get("kib_per_connection") or 0
        devices = max(r["devices_ready"], 1)
        end_kib = ((br.get("rss_end_kib") or 0) - (br.get("rss_before_kib") or 0)) / devices
        ok = r["lost"] == 0 and lat(r, "p99_ms") < 50 and kib * 1024 <= 20000 and r["subscriptions_acked"] >= 114000
        out.append(row(["19,000 TLS devices × 6 subs at 5,000/s: p99 < 50 ms, no loss, ≤ 20 KB/conn",
                        f'devices {r["devices_ready"]}, subs {r["subscriptions_acked"]}, p99 {fmt(lat(r, "p99_ms"), 2)} ms, lost {r["lost"]}, '
                        f'{fmt(kib)} KiB/conn connected ({fmt(end_kib)} KiB/conn at the end of the traffic, logs and buffers included)',
                        verdict(ok)]))
    a, b = runs.get(("cpu1k", "ours-tcp")), runs.get(("cpu1k", "bare"))
    if a and b and cpu(a) and cpu(b):
        out.append(row(["gate over TCP within 15% of bare router CPU/rt at 1,000 devices",
                        f"{fmt(cpu(a))} vs {fmt(cpu(b))} µs ({ratio(cpu(a), cpu(b))})", verdict(cpu(a) <= 1.15 * cpu(b))]))
    worst = []
    for (k, br), r in runs.items():
        if br != "ours-tcp" or cpu(r) is None:
            continue
        peers = [cpu(runs[(k, p)]) for p in ("bare", "mosquitto") if (k, p) in runs and cpu(runs[(k, p)])]
        if peers:
            worst.append((cpu(r) / min(peers), k))
    if worst:
        worst.sort(reverse=True)
        ok = worst[0][0] < 1
        out.append(row(["broker CPU/rt below every peer's at every load point (TCP)",
                        f"worst ratio to best peer {worst[0][0]:.2f}× at {worst[0][1]}", verdict(ok)]))
    hi = [r for (k, b), r in runs.items() if b == "ours-tcp" and k.startswith("sweep-") and r["offered_rate"] >= 20000]
    if hi:
        best = min(cpu(r) or 1e9 for r in hi)
        out.append(row(["over TCP below 20 µs CPU/rt at high rate", f"{fmt(best)} µs at ≥ 20,000/s", verdict(best < 20)]))
    tls = [r for (k, b), r in runs.items() if b == "ours-tls" and (k.startswith("sweep-") or k == "cpu1k")]
    good = [r for r in tls if r["lost"] == 0 and lat(r, "p99_ms") < 20]
    if tls:
        best = max((r["achieved_rate"] for r in good), default=0)
        out.append(row(["1,000 TLS devices: ≥ 25,000/s, no loss, p99 < 20 ms (default: 1 async worker)",
                        f"best clean point {fmt(best, 0)} /s", verdict(best >= 25000 * 0.98)]))
    r = runs.get(("tls25k2w", "ours-tls"))
    if r:
        ok = r["lost"] == 0 and lat(r, "p99_ms") < 20 and r["achieved_rate"] >= 25000 * 0.98
        out.append(row(["same with BROKER_WORKER_THREADS=2",
                        f'{fmt(r["achieved_rate"], 0)} /s, p99 {fmt(lat(r, "p99_ms"), 2)} ms, lost {r["lost"]}',
                        verdict(ok)]))
    return "\n".join(out)


def main():
    d, md, svg = sys.argv[1], sys.argv[2], sys.argv[3]
    runs = load(d)
    svg_plot(runs, svg)
    machine = open(os.path.join(d, "machine.txt")).read().strip() if os.path.exists(os.path.join(d, "machine.txt")) else ""
    notes_path = os.path.join(os.path.dirname(md), "notes.md")
    notes = open(notes_path).read().strip() if os.path.exists(notes_path) else ""
    brokers = [b for b in BROKERS if any(bb == b for (_, bb) in runs)]

    cpu_rows = [row(["broker", "CPU µs per round trip", "vs bare router", "vs Mosquitto", "p50 ms", "p99 ms", "lost"]),
                row(["---"] * 7)]
    base, mosq = runs.get(("cpu1k", "bare")), runs.get(("cpu1k", "mosquitto"))
    for b in brokers:
        r = runs.get(("cpu1k", b))
        if r:
            cpu_rows.append(row([NAMES[b], fmt(cpu(r)), ratio(cpu(r), cpu(base) if base else None),
                                 ratio(cpu(r), cpu(mosq) if mosq else None), fmt(lat(r, "p50_ms"), 2),
                                 fmt(lat(r, "p99_ms"), 2), fmt(r["lost"])]))

    new_rows = [row(["broker", "devices", "p50 ms", "p99 ms", "max ms", "lost", "new users replied",
                     "first reply p99 ms", "CPU µs/rt", "KiB/conn", "peak RSS MiB"]), row(["---"] * 11)]
    for b in brokers:
        r = runs.get(("new10k", b))
        if r:
            br = r.get("broker") or {}
            new_rows.append(row([NAMES[b], fmt(r["devices_ready"]), fmt(lat(r, "p50_ms"), 2), fmt(lat(r, "p99_ms"), 2),
                                 fmt(lat(r, "max_ms"), 2), fmt(r["lost"]),
                                 f'{r["new_users_first_reply"]} / {r["new_users_target"]}',
                                 fmt(r["first_reply_latency"]["p99_ms"], 2), fmt(cpu(r)),
                                 fmt(br.get("kib_per_connection")), fmt((br.get("peak_rss_kib") or 0) / 1024, 0)]))

    parts = [
        "# Benchmark results",
        "",
        "Generated by `bench/run.sh` (then `bench/report.py`) from one run on one machine: every broker ran the same",
        "loads back to back, loopback only, with the load generator and the echo handler on the same cores as the",
        "broker. Round trip = a device publishes 64 bytes (QoS 0) on `echo`, the echo handler answers on",
        "`<uid>_echo`. Broker CPU is user + system time of the broker process from `/proc/<pid>/stat` over the",
        "sending and draining window, divided by round trips received; memory per connection is the broker's RSS",
        "growth while the devices connected, divided by devices. Raw JSON per run: `bench/results/<stamp>/`.",
        "",
        "## Machine",
        "",
        "```",
        machine,
        "```",
        "",
        "## Targets of issue 4",
        "",
        targets(runs),
        "",
        "## CPU per round trip, 1,000 devices at 2,000 round trips/s",
        "",
        "\n".join(cpu_rows),
        "",
        "## Latency against offered rate, 1,000 devices",
        "",
        "![round-trip latency vs offered rate](latency-vs-rate.svg)",
        "",
        run_table(runs, "sweep-", brokers, "offered", num_suffix),
        "",
        "## 10,000 devices at 5,000/s with 1,000 new users joining",
        "",
        "\n".join(new_rows),
        "",
        "## Scale curve in devices (5,000 round trips/s, 1 subscription each)",
        "",
        run_table(runs, "devices-", brokers, "devices", num_suffix),
        "",
        "## Scale curve in subscriptions (5,000 round trips/s)",
        "",
        run_table(runs, "subs-", brokers, "subs/device", num_suffix),
        "",
        "## 19,000 TLS devices × 6 subscriptions, 5,000 round trips/s",
        "",
        run_table(runs, "tls19k", ["ours-tls"], "run", num_suffix),
        "",
        "## 1,000 TLS devices at 25,000 round trips/s, two async workers",
        "",
        run_table(runs, "tls25k2w", ["ours-tls"], "run", num_suffix),
        "",
    ]
    if notes:
        parts += [notes, ""]
    # The "Many nodes" section that bench/cluster.sh keeps (its own run).
    cluster_path = os.path.join(os.path.dirname(md), "cluster-results.md")
    if os.path.exists(cluster_path):
        parts += [open(cluster_path).read().strip(), ""]
    with open(md, "w") as fh:
        fh.write("\n".join(parts))


if __name__ == "__main__":
    main()
