//! Owns counting and reporting: live counters shared by device tasks, HDR
//! latency histograms (sharded to keep lock contention low, mergeable across
//! processes), the per-process shard report and the final report as a table
//! and as JSON.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Live counters of one load-generator process.
#[derive(Debug, Default)]
pub struct Counters {
    /// Devices (not new users) whose CONNECT was accepted.
    pub connected: AtomicU64,
    /// Devices (not new users) that failed to connect or subscribe.
    pub connect_failed: AtomicU64,
    /// Devices (not new users) connected with every subscription acknowledged.
    pub ready: AtomicU64,
    /// Subscription filters granted in SUBACKs.
    pub subs_acked: AtomicU64,
    /// Subscription filters refused in SUBACKs.
    pub subs_refused: AtomicU64,
    /// Publishes written to the broker (measured phase).
    pub sent: AtomicU64,
    /// Distinct replies received for our publishes.
    pub received: AtomicU64,
    /// Replies received a second time.
    pub duplicated: AtomicU64,
    /// Replies with a sequence number never sent, or an unreadable payload.
    pub unexpected: AtomicU64,
    /// Messages received on a subscription other than the echo reply topic.
    pub other_received: AtomicU64,
    /// Scheduled publishes dropped because no live device could take them.
    pub skipped: AtomicU64,
    /// Ready devices whose connection ended before the run did.
    pub dropped: AtomicU64,
    /// New users that connected and subscribed during the run.
    pub new_joined: AtomicU64,
    /// New users that failed to connect or subscribe.
    pub new_failed: AtomicU64,
    /// New users that got their first reply.
    pub new_first_reply: AtomicU64,
}

impl Counters {
    /// A copy of the values, for progress lines.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            connected: self.connected.load(Relaxed),
            connect_failed: self.connect_failed.load(Relaxed),
            ready: self.ready.load(Relaxed),
            subs_acked: self.subs_acked.load(Relaxed),
            subs_refused: self.subs_refused.load(Relaxed),
            sent: self.sent.load(Relaxed),
            received: self.received.load(Relaxed),
            duplicated: self.duplicated.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            new_joined: self.new_joined.load(Relaxed),
            new_failed: self.new_failed.load(Relaxed),
        }
    }
}

/// Point-in-time counter values (summable across processes).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub connected: u64,
    pub connect_failed: u64,
    pub ready: u64,
    pub subs_acked: u64,
    pub subs_refused: u64,
    pub sent: u64,
    pub received: u64,
    pub duplicated: u64,
    pub dropped: u64,
    pub new_joined: u64,
    pub new_failed: u64,
}

impl CounterSnapshot {
    /// Adds another process's values.
    pub fn add(&mut self, o: &CounterSnapshot) {
        self.connected += o.connected;
        self.connect_failed += o.connect_failed;
        self.ready += o.ready;
        self.subs_acked += o.subs_acked;
        self.subs_refused += o.subs_refused;
        self.sent += o.sent;
        self.received += o.received;
        self.duplicated += o.duplicated;
        self.dropped += o.dropped;
        self.new_joined += o.new_joined;
        self.new_failed += o.new_failed;
    }

    /// One progress line; rates from the difference to `prev` over `dt` seconds.
    pub fn progress_line(&self, prev: &CounterSnapshot, dt: f64, elapsed: f64) -> String {
        let rate = |a: u64, b: u64| {
            if dt > 0.0 {
                (a - b.min(a)) as f64 / dt
            } else {
                0.0
            }
        };
        format!(
            "[{elapsed:6.1}s] connected {} ready {} failed {} subs {} (refused {}) | sent {} ({:.0}/s) received {} ({:.0}/s) dup {} dropped {} new {}",
            self.connected,
            self.ready,
            self.connect_failed,
            self.subs_acked,
            self.subs_refused,
            self.sent,
            rate(self.sent, prev.sent),
            self.received,
            rate(self.received, prev.received),
            self.duplicated,
            self.dropped,
            self.new_joined,
        )
    }
}

const HIST_SHARDS: usize = 16;
/// Highest latency recorded, in microseconds (values above are clamped).
const HIST_MAX_US: u64 = 120_000_000;

fn new_histogram() -> Histogram<u64> {
    // Bounds are constants known valid: 1 µs to 120 s, 3 significant digits.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits is valid"))
    })
}

/// A latency recorder in microseconds, sharded by caller-chosen key.
pub struct Latency {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            shards: (0..HIST_SHARDS)
                .map(|_| Mutex::new(new_histogram()))
                .collect(),
        }
    }
}

impl Latency {
    /// Records `us` microseconds in the shard for `key`.
    pub fn record(&self, key: usize, us: u64) {
        let v = us.clamp(1, HIST_MAX_US);
        if let Ok(mut h) = self.shards[key % HIST_SHARDS].lock() {
            // In bounds by the clamp above.
            let _ = h.record(v);
        }
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut out = new_histogram();
        for shard in &self.shards {
            if let Ok(h) = shard.lock() {
                let _ = out.add(&*h);
            }
        }
        out
    }
}

/// A histogram as (value, count) pairs, for JSON transport between processes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HistData(pub Vec<(u64, u64)>);

impl HistData {
    /// The recorded buckets of `h`.
    pub fn from_histogram(h: &Histogram<u64>) -> Self {
        HistData(
            h.iter_recorded()
                .map(|v| (v.value_iterated_to(), v.count_at_value()))
                .collect(),
        )
    }

    /// Adds these buckets into `h`.
    pub fn add_to(&self, h: &mut Histogram<u64>) {
        for &(v, n) in &self.0 {
            let _ = h.record_n(v.clamp(1, HIST_MAX_US), n);
        }
    }

    /// A fresh histogram holding these buckets.
    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        self.add_to(&mut h);
        h
    }
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl LatencySummary {
    /// Summary of a histogram recorded in microseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// What one load-generator process measured (summable across processes).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ShardReport {
    pub devices_target: u64,
    pub counters: CounterSnapshot,
    /// Seconds from the first connection attempt until every device was ready or failed.
    pub connect_secs: f64,
    pub subscriptions_requested: u64,
    pub offered_rate: f64,
    /// Seconds publishes were scheduled.
    pub send_secs: f64,
    /// Seconds waited for the last replies after sending stopped.
    pub drain_secs: f64,
    pub unexpected: u64,
    pub other_received: u64,
    pub skipped: u64,
    pub new_users_target: u64,
    pub new_first_reply: u64,
    pub latency: HistData,
    pub first_reply: HistData,
    /// The first few error messages, for diagnosis.
    pub errors: Vec<String>,
}

impl ShardReport {
    /// Adds another process's report into this one.
    pub fn merge(&mut self, o: &ShardReport) {
        self.devices_target += o.devices_target;
        self.counters.add(&o.counters);
        self.connect_secs = self.connect_secs.max(o.connect_secs);
        self.subscriptions_requested += o.subscriptions_requested;
        self.offered_rate += o.offered_rate;
        self.send_secs = self.send_secs.max(o.send_secs);
        self.drain_secs = self.drain_secs.max(o.drain_secs);
        self.unexpected += o.unexpected;
        self.other_received += o.other_received;
        self.skipped += o.skipped;
        self.new_users_target += o.new_users_target;
        self.new_first_reply += o.new_first_reply;
        let mut h = self.latency.to_histogram();
        o.latency.add_to(&mut h);
        self.latency = HistData::from_histogram(&h);
        let mut f = self.first_reply.to_histogram();
        o.first_reply.add_to(&mut f);
        self.first_reply = HistData::from_histogram(&f);
        for e in &o.errors {
            if self.errors.len() < 20 {
                self.errors.push(e.clone());
            }
        }
    }
}

/// CPU and memory of the broker process, read from `/proc/<pid>`.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct BrokerStats {
    pub pid: u32,
    /// CPU seconds (user + system) while connecting.
    pub connect_cpu_secs: f64,
    /// CPU seconds (user + system) from the start of sending to the end of draining.
    pub run_cpu_secs: f64,
    /// Broker CPU microseconds per round trip received (run CPU / received).
    pub cpu_us_per_round_trip: f64,
    /// Broker CPU microseconds per device connection (connect CPU / connected).
    pub cpu_us_per_connect: f64,
    pub rss_before_kib: u64,
    pub rss_connected_kib: u64,
    pub rss_end_kib: u64,
    /// Peak resident set (VmHWM) at the end of the run.
    pub peak_rss_kib: u64,
    /// (RSS when every device was ready − RSS before connecting) / devices ready.
    pub kib_per_connection: f64,
    /// Every process measured (the figures above are their sums; `pid` is the first).
    #[serde(default)]
    pub pids: Vec<u32>,
    /// Each process's own CPU, when more than one was measured.
    #[serde(default)]
    pub per_process: Vec<ProcessCpu>,
}

/// One measured process's CPU and memory.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessCpu {
    pub pid: u32,
    pub connect_cpu_secs: f64,
    pub run_cpu_secs: f64,
    pub cpu_us_per_round_trip: f64,
    pub rss_end_kib: u64,
}

/// Redis commands executed while sending and draining, from the difference
/// of `INFO commandstats` (summed over every Redis given) between the moment
/// every device was ready and the end. The `INFO` calls of the measurement
/// itself are left out. Commands run by a script count once for `evalsha`
/// and once each for what the script calls.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct RedisStats {
    /// Calls per command name (lower case) during the run.
    pub calls: std::collections::BTreeMap<String, u64>,
    /// Their sum.
    pub total_calls: u64,
    /// Calls per round trip received (a round trip is two messages: the
    /// command and its reply).
    pub calls_per_round_trip: f64,
    /// Calls per message (half of the above).
    pub calls_per_message: f64,
}

/// The end-of-run report.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Report {
    pub label: String,
    pub processes: u64,
    pub devices_target: u64,
    pub devices_connected: u64,
    pub devices_ready: u64,
    pub connect_failures: u64,
    pub connect_secs: f64,
    pub connect_rate: f64,
    pub subscriptions_requested: u64,
    pub subscriptions_acked: u64,
    pub subscriptions_refused: u64,
    pub offered_rate: f64,
    pub send_secs: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub unexpected: u64,
    pub skipped: u64,
    pub dropped_connections: u64,
    pub achieved_rate: f64,
    pub latency: LatencySummary,
    pub new_users_target: u64,
    pub new_users_joined: u64,
    pub new_users_failed: u64,
    pub new_users_first_reply: u64,
    pub first_reply_latency: LatencySummary,
    pub broker: Option<BrokerStats>,
    #[serde(default)]
    pub redis: Option<RedisStats>,
    pub errors: Vec<String>,
}

impl Report {
    /// Builds the final report from merged shard data.
    pub fn from_shards(label: &str, processes: u64, s: &ShardReport) -> Report {
        let c = &s.counters;
        let connect_rate = if s.connect_secs > 0.0 {
            c.ready as f64 / s.connect_secs
        } else {
            0.0
        };
        Report {
            label: label.to_owned(),
            processes,
            devices_target: s.devices_target,
            devices_connected: c.connected,
            devices_ready: c.ready,
            connect_failures: c.connect_failed,
            connect_secs: s.connect_secs,
            connect_rate,
            subscriptions_requested: s.subscriptions_requested,
            subscriptions_acked: c.subs_acked,
            subscriptions_refused: c.subs_refused,
            offered_rate: s.offered_rate,
            send_secs: s.send_secs,
            sent: c.sent,
            received: c.received,
            lost: c.sent.saturating_sub(c.received),
            duplicated: c.duplicated,
            unexpected: s.unexpected,
            skipped: s.skipped,
            dropped_connections: c.dropped,
            achieved_rate: if s.send_secs > 0.0 {
                c.received as f64 / s.send_secs
            } else {
                0.0
            },
            latency: LatencySummary::of(&s.latency.to_histogram()),
            new_users_target: s.new_users_target,
            new_users_joined: c.new_joined,
            new_users_failed: c.new_failed,
            new_users_first_reply: s.new_first_reply,
            first_reply_latency: LatencySummary::of(&s.first_reply.to_histogram()),
            broker: None,
            redis: None,
            errors: s.errors.clone(),
        }
    }

    /// Whether every message sent came back exactly once and every device was ready.
    pub fn clean(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.connect_failures == 0
            && self.subscriptions_refused == 0
            && self.new_users_failed == 0
            && self.new_users_first_reply == self.new_users_target
    }

    /// The report as an aligned two-column table.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "  {k:<28} {v}");
        };
        row("run", self.label.clone());
        row("processes", self.processes.to_string());
        row(
            "devices ready / target",
            format!(
                "{} / {} (connected {}, failed {})",
                self.devices_ready,
                self.devices_target,
                self.devices_connected,
                self.connect_failures
            ),
        );
        row(
            "connect time, rate",
            format!("{:.2} s, {:.0} /s", self.connect_secs, self.connect_rate),
        );
        row(
            "subscriptions acked",
            format!(
                "{} / {} (refused {})",
                self.subscriptions_acked, self.subscriptions_requested, self.subscriptions_refused
            ),
        );
        row(
            "offered, achieved rate",
            format!(
                "{:.0} /s, {:.0} /s over {:.1} s",
                self.offered_rate, self.achieved_rate, self.send_secs
            ),
        );
        row(
            "sent / received",
            format!("{} / {}", self.sent, self.received),
        );
        row(
            "lost / duplicated",
            format!(
                "{} / {} (unexpected {}, skipped {}, dropped conns {})",
                self.lost, self.duplicated, self.unexpected, self.skipped, self.dropped_connections
            ),
        );
        let l = &self.latency;
        row(
            "round trip p50/p99/p99.9/max",
            format!(
                "{:.3} / {:.3} / {:.3} / {:.3} ms (mean {:.3})",
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms
            ),
        );
        if self.new_users_target > 0 {
            let f = &self.first_reply_latency;
            row(
                "new users joined / replied",
                format!(
                    "{} / {} of {} (failed {}); first reply p50/p99/max {:.3} / {:.3} / {:.3} ms",
                    self.new_users_joined,
                    self.new_users_first_reply,
                    self.new_users_target,
                    self.new_users_failed,
                    f.p50_ms,
                    f.p99_ms,
                    f.max_ms
                ),
            );
        }
        if let Some(b) = &self.broker {
            row(
                "broker CPU run / connect",
                format!(
                    "{:.2} s / {:.2} s (pid {})",
                    b.run_cpu_secs, b.connect_cpu_secs, b.pid
                ),
            );
            row(
                "broker CPU per round trip",
                format!("{:.1} µs", b.cpu_us_per_round_trip),
            );
            row(
                "broker CPU per connect",
                format!("{:.1} µs", b.cpu_us_per_connect),
            );
            row(
                "broker RSS before/conn/end",
                format!(
                    "{} / {} / {} KiB, peak {} KiB",
                    b.rss_before_kib, b.rss_connected_kib, b.rss_end_kib, b.peak_rss_kib
                ),
            );
            row(
                "broker memory per connection",
                format!("{:.1} KiB", b.kib_per_connection),
            );
        }
        if let Some(b) = &self.broker {
            for p in &b.per_process {
                row(
                    &format!("  pid {}", p.pid),
                    format!(
                        "CPU run {:.2} s ({:.1} µs/rt), connect {:.2} s, RSS end {} KiB",
                        p.run_cpu_secs, p.cpu_us_per_round_trip, p.connect_cpu_secs, p.rss_end_kib
                    ),
                );
            }
        }
        if let Some(r) = &self.redis {
            row(
                "Redis calls per round trip",
                format!(
                    "{:.2} ({:.2} per message; {} calls in the run)",
                    r.calls_per_round_trip, r.calls_per_message, r.total_calls
                ),
            );
            let mut top: Vec<_> = r.calls.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1));
            let list: Vec<String> = top
                .iter()
                .take(8)
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            row("Redis calls by command", list.join(", "));
        }
        for e in self.errors.iter().take(5) {
            row("error", e.clone());
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_merge_across_processes() {
        let a = Latency::default();
        let b = Latency::default();
        for i in 1..=1000u64 {
            a.record(i as usize, i);
            b.record(i as usize, i + 1000);
        }
        let mut ra = ShardReport {
            latency: HistData::from_histogram(&a.merged()),
            ..Default::default()
        };
        let rb = ShardReport {
            latency: HistData::from_histogram(&b.merged()),
            ..Default::default()
        };
        ra.merge(&rb);
        let s = LatencySummary::of(&ra.latency.to_histogram());
        assert_eq!(s.count, 2000);
        assert!((s.p50_ms - 1.0).abs() < 0.01, "{s:?}");
        assert!((s.max_ms - 2.0).abs() < 0.01, "{s:?}");
    }
}
