//! Owns a whole run: in one process, or as a coordinator of several child
//! processes (each a shard of the devices, because one process holds at most
//! about 19,990 sockets here), with live progress lines, broker CPU and
//! memory sampled around the phases, and the merged end report.
//!
//! Child protocol: a child prints JSON lines on stdout (`progress`, `ready`,
//! then `report`), and waits for a `go` line on stdin between `ready` and
//! sending, so that every child's devices are connected before any sends.

use crate::procstat;
use crate::run::{RunConfig, Shard};
use crate::stats::{BrokerStats, CounterSnapshot, Report, ShardReport};
use crate::LoadError;
use serde::{Deserialize, Serialize};
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
    /// Broker process to sample CPU and memory of.
    pub broker_pid: Option<u32>,
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

/// CPU and memory of the broker across the phases.
struct Probe {
    pid: u32,
    cpu_start: f64,
    rss_before: u64,
    cpu_connected: f64,
    rss_connected: u64,
}

impl Probe {
    fn start(pid: Option<u32>) -> Result<Option<Probe>, LoadError> {
        let Some(pid) = pid else { return Ok(None) };
        let (rss, _) = procstat::rss_kib(pid)?;
        Ok(Some(Probe {
            pid,
            cpu_start: procstat::cpu_secs(pid)?,
            rss_before: rss,
            cpu_connected: 0.0,
            rss_connected: 0,
        }))
    }

    fn connected(&mut self) -> Result<(), LoadError> {
        // Let the broker settle what the last connections allocated.
        self.cpu_connected = procstat::cpu_secs(self.pid)?;
        self.rss_connected = procstat::rss_kib(self.pid)?.0;
        Ok(())
    }

    fn finish(&self, report: &Report) -> Result<BrokerStats, LoadError> {
        let cpu_end = procstat::cpu_secs(self.pid)?;
        let (rss_end, hwm) = procstat::rss_kib(self.pid)?;
        let run_cpu = cpu_end - self.cpu_connected;
        let connect_cpu = self.cpu_connected - self.cpu_start;
        let per = |x: f64, n: u64| if n > 0 { x / n as f64 } else { 0.0 };
        Ok(BrokerStats {
            pid: self.pid,
            connect_cpu_secs: connect_cpu,
            run_cpu_secs: run_cpu,
            cpu_us_per_round_trip: per(run_cpu * 1e6, report.received),
            cpu_us_per_connect: per(connect_cpu * 1e6, report.devices_connected),
            rss_before_kib: self.rss_before,
            rss_connected_kib: self.rss_connected,
            rss_end_kib: rss_end,
            peak_rss_kib: hwm,
            kib_per_connection: per(
                self.rss_connected.saturating_sub(self.rss_before) as f64,
                report.devices_ready,
            ),
        })
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
    let mut probe = Probe::start(opts.broker_pid)?;
    let mut shard = Shard::new(cfg)?;
    let progress = opts
        .progress
        .map(|every| spawn_progress(shard.counters(), every, start));
    shard.connect().await?;
    if let Some(p) = probe.as_mut() {
        p.connected()?;
    }
    let shard_report = shard.run().await;
    let mut report = Report::from_shards(&opts.label, 1, &shard_report);
    if let Some(p) = &probe {
        report.broker = Some(p.finish(&report)?);
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
    let mut probe = Probe::start(opts.broker_pid)?;
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
    for mut c in children {
        let _ = tokio::time::timeout(Duration::from_secs(15), c.wait()).await;
    }
    Ok(report)
}
