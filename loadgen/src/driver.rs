//! Owns a whole run: in one process, or as a coordinator of several child
//! processes (each a shard of the devices, because one process holds at most
//! about 19,990 sockets here), with live progress lines, broker CPU and
//! memory sampled around the phases (summed over several processes: broker
//! nodes and their Redis), Redis command counts taken at the same moments,
//! and the merged end report.
//!
//! Child protocol: a child prints JSON lines on stdout (`progress`, `ready`,
//! then `report`), and waits for a `go` line on stdin between `ready` and
//! sending, so that every child's devices are connected before any sends.

use crate::procstat;
use crate::run::{RunConfig, Shard};
use crate::stats::{BrokerStats, CounterSnapshot, ProcessCpu, RedisStats, Report, ShardReport};
use crate::LoadError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Options of a run beyond the devices' own configuration.
#[derive(Debug, Clone, Default)]
pub struct DriveOptions {
    /// Name of the run in the report.
    pub label: String,
    /// Broker processes to sample CPU and memory of (reported summed, and each).
    pub broker_pids: Vec<u32>,
    /// Redis servers (`redis://` URLs) to read `INFO commandstats` from.
    pub redis_stats: Vec<String>,
    /// Print a progress line to stderr this often.
    pub progress: Option<Duration>,
}

/// A child's message to its coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ChildMsg {
    Progress { counters: CounterSnapshot },
    Ready { counters: CounterSnapshot },
    Report { report: Box<ShardReport> },
}

/// CPU and memory of one process across the phases.
struct ProcProbe {
    pid: u32,
    cpu_start: f64,
    rss_before: u64,
    cpu_connected: f64,
    rss_connected: u64,
}

/// CPU and memory of the broker processes across the phases.
struct Probe {
    procs: Vec<ProcProbe>,
}

impl Probe {
    fn start(pids: &[u32]) -> Result<Option<Probe>, LoadError> {
        if pids.is_empty() {
            return Ok(None);
        }
        let mut procs = Vec::with_capacity(pids.len());
        for &pid in pids {
            let (rss, _) = procstat::rss_kib(pid)?;
            procs.push(ProcProbe {
                pid,
                cpu_start: procstat::cpu_secs(pid)?,
                rss_before: rss,
                cpu_connected: 0.0,
                rss_connected: 0,
            });
        }
        Ok(Some(Probe { procs }))
    }

    fn connected(&mut self) -> Result<(), LoadError> {
        for p in &mut self.procs {
            p.cpu_connected = procstat::cpu_secs(p.pid)?;
            p.rss_connected = procstat::rss_kib(p.pid)?.0;
        }
        Ok(())
    }

    fn finish(&self, report: &Report) -> Result<BrokerStats, LoadError> {
        let per = |x: f64, n: u64| if n > 0 { x / n as f64 } else { 0.0 };
        let mut s = BrokerStats {
            pid: self.procs.first().map(|p| p.pid).unwrap_or_default(),
            ..Default::default()
        };
        let mut each = Vec::with_capacity(self.procs.len());
        for p in &self.procs {
            let cpu_end = procstat::cpu_secs(p.pid)?;
            let (rss_end, hwm) = procstat::rss_kib(p.pid)?;
            let run_cpu = cpu_end - p.cpu_connected;
            let connect_cpu = p.cpu_connected - p.cpu_start;
            s.run_cpu_secs += run_cpu;
            s.connect_cpu_secs += connect_cpu;
            s.rss_before_kib += p.rss_before;
            s.rss_connected_kib += p.rss_connected;
            s.rss_end_kib += rss_end;
            s.peak_rss_kib += hwm;
            s.pids.push(p.pid);
            each.push(ProcessCpu {
                pid: p.pid,
                connect_cpu_secs: connect_cpu,
                run_cpu_secs: run_cpu,
                cpu_us_per_round_trip: per(run_cpu * 1e6, report.received),
                rss_end_kib: rss_end,
            });
        }
        s.cpu_us_per_round_trip = per(s.run_cpu_secs * 1e6, report.received);
        s.cpu_us_per_connect = per(s.connect_cpu_secs * 1e6, report.devices_connected);
        s.kib_per_connection = per(
            s.rss_connected_kib.saturating_sub(s.rss_before_kib) as f64,
            report.devices_ready,
        );
        if each.len() > 1 {
            s.per_process = each;
        }
        Ok(s)
    }
}

/// How long one `INFO commandstats` may take.
const REDIS_WITHIN: Duration = Duration::from_secs(5);

/// Connections to the Redis servers measured, opened before the first
/// count (so that their own setup commands are not counted).
struct RedisProbe {
    cons: Vec<(String, redis::aio::MultiplexedConnection)>,
    start: BTreeMap<String, u64>,
}

impl RedisProbe {
    async fn start(urls: &[String]) -> Result<Option<RedisProbe>, LoadError> {
        if urls.is_empty() {
            return Ok(None);
        }
        let mut cons = Vec::with_capacity(urls.len());
        for url in urls {
            let open = async {
                redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await
            };
            let con = tokio::time::timeout(REDIS_WITHIN, open)
                .await
                .map_err(|_| LoadError::Redis(format!("{url}: connect timed out")))?
                .map_err(|e| LoadError::Redis(format!("{url}: {e}")))?;
            cons.push((url.clone(), con));
        }
        let mut probe = RedisProbe {
            cons,
            start: BTreeMap::new(),
        };
        probe.start = probe.calls().await?;
        Ok(Some(probe))
    }

    /// `INFO commandstats` of every Redis, summed: calls per command.
    async fn calls(&mut self) -> Result<BTreeMap<String, u64>, LoadError> {
        let mut sum = BTreeMap::new();
        for (url, con) in &mut self.cons {
            let mut cmd = redis::cmd("INFO");
            cmd.arg("commandstats");
            let read = cmd.query_async::<String>(con);
            let text = tokio::time::timeout(REDIS_WITHIN, read)
                .await
                .map_err(|_| LoadError::Redis(format!("{url}: INFO timed out")))?
                .map_err(|e| LoadError::Redis(format!("{url}: {e}")))?;
            for (name, calls) in parse_commandstats(&text) {
                *sum.entry(name).or_insert(0) += calls;
            }
        }
        Ok(sum)
    }

    async fn finish(mut self, report: &mut Report) -> Result<(), LoadError> {
        let end = self.calls().await?;
        report.redis = Some(redis_delta(&self.start, &end, report.received));
        Ok(())
    }
}

/// The `calls=` of each `cmdstat_<name>:` line, `info` left out (the
/// measurement's own calls).
pub fn parse_commandstats(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            (name != "info").then(|| (name.to_ascii_lowercase(), calls))
        })
        .collect()
}

/// Calls during the run: `end − start` per command, and per round trip.
fn redis_delta(
    start: &BTreeMap<String, u64>,
    end: &BTreeMap<String, u64>,
    received: u64,
) -> RedisStats {
    let mut calls = BTreeMap::new();
    for (name, &n) in end {
        let d = n.saturating_sub(start.get(name).copied().unwrap_or(0));
        if d > 0 {
            calls.insert(name.clone(), d);
        }
    }
    let total_calls: u64 = calls.values().sum();
    let per_rt = if received > 0 {
        total_calls as f64 / received as f64
    } else {
        0.0
    };
    RedisStats {
        calls,
        total_calls,
        calls_per_round_trip: per_rt,
        calls_per_message: per_rt / 2.0,
    }
}

fn spawn_progress(
    counters: std::sync::Arc<crate::stats::Counters>,
    every: Duration,
    start: Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut prev = counters.snapshot();
        let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            t.tick().await;
            let now = counters.snapshot();
            eprintln!(
                "{}",
                now.progress_line(&prev, every.as_secs_f64(), start.elapsed().as_secs_f64())
            );
            prev = now;
        }
    })
}

/// Runs every device in this process and reports.
pub async fn run_in_process(cfg: RunConfig, opts: &DriveOptions) -> Result<Report, LoadError> {
    let start = Instant::now();
    let mut probe = Probe::start(&opts.broker_pids)?;
    let mut shard = Shard::new(cfg)?;
    let progress = opts
        .progress
        .map(|every| spawn_progress(shard.counters(), every, start));
    shard.connect().await?;
    let redis = RedisProbe::start(&opts.redis_stats).await?;
    if let Some(p) = probe.as_mut() {
        p.connected()?;
    }
    let shard_report = shard.run().await;
    let mut report = Report::from_shards(&opts.label, 1, &shard_report);
    if let Some(p) = &probe {
        report.broker = Some(p.finish(&report)?);
    }
    if let Some(r) = redis {
        r.finish(&mut report).await?;
    }
    shard.close().await;
    if let Some(p) = progress {
        p.abort();
    }
    Ok(report)
}

fn emit(msg: &ChildMsg) {
    if let Ok(line) = serde_json::to_string(msg) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}

/// A child process's part: connect this shard, say `ready`, wait for `go` on
/// stdin, run, and print the shard report.
pub async fn run_child(cfg: RunConfig) -> Result<(), LoadError> {
    let mut shard = Shard::new(cfg)?;
    let counters = shard.counters();
    let progress = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(500));
        loop {
            t.tick().await;
            emit(&ChildMsg::Progress {
                counters: counters.snapshot(),
            });
        }
    });
    shard.connect().await?;
    emit(&ChildMsg::Ready {
        counters: shard.counters().snapshot(),
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        match lines.next_line().await? {
            Some(l) if l.trim() == "go" => break,
            Some(_) => continue,
            None => {
                progress.abort();
                return Err(LoadError::Child("coordinator went away before go".into()));
            }
        }
    }
    let report = shard.run().await;
    progress.abort();
    emit(&ChildMsg::Report {
        report: Box::new(report),
    });
    shard.close().await;
    Ok(())
}

/// Runs `processes` children of `exe`, child `i` with `args` followed by
/// `--child --shard i --shards processes`, and merges their reports.
pub async fn run_children(
    exe: PathBuf,
    args: Vec<OsString>,
    processes: u64,
    opts: &DriveOptions,
) -> Result<Report, LoadError> {
    let start = Instant::now();
    let mut probe = Probe::start(&opts.broker_pids)?;
    let mut redis = None;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Option<ChildMsg>)>();
    let mut children = Vec::new();
    let mut stdins = Vec::new();
    for i in 0..processes {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(&args)
            .arg("--child")
            .arg("--shard")
            .arg(i.to_string())
            .arg("--shards")
            .arg(processes.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| LoadError::Child(format!("spawning {}: {e}", exe.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| LoadError::Child("child has no stdout".into()))?;
        stdins.push(
            child
                .stdin
                .take()
                .ok_or_else(|| LoadError::Child("child has no stdin".into()))?,
        );
        let tx = tx.clone();
        let idx = i as usize;
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<ChildMsg>(&line) {
                    Ok(m) => {
                        let _ = tx.send((idx, Some(m)));
                    }
                    Err(_) => eprintln!("child {idx}: {line}"),
                }
            }
            let _ = tx.send((idx, None));
        });
        children.push(child);
    }
    drop(tx);

    let n = processes as usize;
    let mut latest = vec![CounterSnapshot::default(); n];
    let mut ready = vec![false; n];
    let mut reports: Vec<Option<ShardReport>> = vec![None; n];
    let every = opts.progress.unwrap_or(Duration::from_secs(1));
    let mut last_print = Instant::now();
    let mut prev_total = CounterSnapshot::default();
    let mut went = false;

    while reports.iter().any(Option::is_none) {
        let msg = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        match msg {
            Ok(Some((i, Some(m)))) => match m {
                ChildMsg::Progress { counters } => latest[i] = counters,
                ChildMsg::Ready { counters } => {
                    latest[i] = counters;
                    ready[i] = true;
                }
                ChildMsg::Report { report } => {
                    latest[i] = report.counters;
                    reports[i] = Some(*report);
                }
            },
            Ok(Some((i, None))) => {
                if reports[i].is_none() {
                    return Err(LoadError::Child(format!(
                        "child {i} ended without a report"
                    )));
                }
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if !went && ready.iter().all(|r| *r) {
            redis = RedisProbe::start(&opts.redis_stats).await?;
            if let Some(p) = probe.as_mut() {
                p.connected()?;
            }
            for s in stdins.iter_mut() {
                s.write_all(b"go\n").await?;
                s.flush().await?;
            }
            went = true;
        }
        if opts.progress.is_some() && last_print.elapsed() >= every {
            let mut total = CounterSnapshot::default();
            for l in &latest {
                total.add(l);
            }
            eprintln!(
                "{}",
                total.progress_line(
                    &prev_total,
                    last_print.elapsed().as_secs_f64(),
                    start.elapsed().as_secs_f64()
                )
            );
            prev_total = total;
            last_print = Instant::now();
        }
    }
    let mut merged = ShardReport::default();
    for r in reports.iter().flatten() {
        merged.merge(r);
    }
    let mut report = Report::from_shards(&opts.label, processes, &merged);
    if let Some(p) = &probe {
        report.broker = Some(p.finish(&report)?);
    }
    if let Some(r) = redis {
        r.finish(&mut report).await?;
    }
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(15), c.wait()).await;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commandstats_deltas_per_round_trip() {
        let start = "# Commandstats\r\ncmdstat_xadd:calls=10,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\ncmdstat_info:calls=3,usec=1,usec_per_call=0.3,rejected_calls=0,failed_calls=0\r\n";
        let end = "# Commandstats\r\ncmdstat_xadd:calls=210,usec=50,usec_per_call=5.00,rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=100,usec=9\r\ncmdstat_info:calls=9,usec=1\r\ngarbage line\r\ncmdstat_bad:calls=x\r\n";
        let a: BTreeMap<_, _> = parse_commandstats(start).into_iter().collect();
        let b: BTreeMap<_, _> = parse_commandstats(end).into_iter().collect();
        assert!(!b.contains_key("info"));
        assert!(!b.contains_key("bad"));
        let r = redis_delta(&a, &b, 100);
        assert_eq!(r.calls.get("xadd"), Some(&200));
        assert_eq!(r.calls.get("evalsha"), Some(&100));
        assert_eq!(r.total_calls, 300);
        assert!((r.calls_per_round_trip - 3.0).abs() < 1e-9);
        assert!((r.calls_per_message - 1.5).abs() < 1e-9);
    }
}
