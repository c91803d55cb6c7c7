//! Owns one load-generator process's devices as a whole: its settings
//! ([`RunConfig`]), connecting the devices at a set rate (source addresses
//! spread over 127.0.0.x, nodes round robin), pacing a total publish rate
//! over them, bringing new users in during the run, and gathering what
//! they counted into a [`ShardReport`]. One device's life (token, CONNECT,
//! SUBACKs, its publishes and replies) is `device.rs`'s.

use crate::device::device;
use crate::mqtt::{Endpoint, MqttVersion};
use crate::stats::{Counters, HistData, Latency, ShardReport};
use crate::LoadError;
use jsonwebtoken::Algorithm;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// How devices log in.
#[derive(Clone)]
pub enum DeviceAuth {
    /// Username `JWT`, password a token minted per device for its uid.
    Jwt { key: JwtKey, ttl_secs: u64 },
    /// A fixed username and password (for other brokers).
    Password { username: String, password: String },
    /// No credentials.
    Anonymous,
}

impl std::fmt::Debug for DeviceAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceAuth::Jwt { ttl_secs, .. } => write!(f, "Jwt(ttl {ttl_secs}s)"),
            DeviceAuth::Password { username, .. } => write!(f, "Password({username})"),
            DeviceAuth::Anonymous => write!(f, "Anonymous"),
        }
    }
}

/// The key device tokens are signed with.
#[derive(Clone)]
pub enum JwtKey {
    /// HS256 with this secret (raw bytes of the configured text).
    Secret(Vec<u8>),
    /// An asymmetric algorithm with a PEM private key and optional `kid`.
    Pem {
        alg: Algorithm,
        pem: Vec<u8>,
        kid: Option<String>,
    },
}

/// What one load-generator process does. `devices`, `new_users` and `rate`
/// are totals over all `shards`; this process takes shard `shard`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub endpoint: Endpoint,
    /// Broker nodes the devices spread over, device `n` on
    /// `node_addrs[n % len]` (TLS settings from `endpoint`); empty: every
    /// device on `endpoint.addr`.
    pub node_addrs: Vec<SocketAddr>,
    pub version: MqttVersion,
    pub auth: DeviceAuth,
    /// Devices connected before sending starts (total over shards).
    pub devices: u64,
    /// A device's uid is `<uid_prefix><uid_offset + index>`.
    pub uid_prefix: String,
    pub uid_offset: u64,
    /// Reply topics per device: `<uid>_<reply_name>`, then `<uid>_s1` ...
    pub subs: usize,
    pub reply_name: String,
    /// The command topic devices publish to.
    pub command_topic: String,
    /// Total round trips per second offered (over shards); 0 sends nothing.
    pub rate: f64,
    /// How long publishes are scheduled.
    pub duration: Duration,
    /// At most this many scheduled publishes in all (over shards); the run
    /// still lasts `duration`. New users' first publishes come on top.
    pub messages: Option<u64>,
    /// Longest wait for outstanding replies after sending stops.
    pub drain: Duration,
    /// New connections per second (over shards); 0 is unlimited.
    pub connect_rate: f64,
    /// Handshakes in flight at once, per process.
    pub connect_concurrency: usize,
    /// Longest time for one device's TCP/TLS/CONNECT/SUBSCRIBE.
    pub connect_timeout: Duration,
    /// Source addresses 127.0.0.1 upward, round-robin by device; 0 lets the kernel choose.
    pub source_addrs: u32,
    /// Users that first connect while sending runs (total over shards).
    pub new_users: u64,
    pub payload_size: usize,
    /// Carry the uid in the payload (for brokers that cannot stamp `user_id`).
    pub uid_in_payload: bool,
    /// QoS of publishes and subscriptions (0 or 1).
    pub qos: u8,
    pub keep_alive: u16,
    pub shard: u64,
    pub shards: u64,
}

impl RunConfig {
    /// Defaults: 100 devices, 1 subscription, 1,000 round trips/s for 10 s,
    /// MQTT 5, anonymous, topic `echo`, 64-byte payloads.
    pub fn new(endpoint: Endpoint) -> Self {
        RunConfig {
            endpoint,
            node_addrs: Vec::new(),
            version: MqttVersion::V5,
            auth: DeviceAuth::Anonymous,
            devices: 100,
            uid_prefix: "u".into(),
            uid_offset: 0,
            subs: 1,
            reply_name: "echo".into(),
            command_topic: "echo".into(),
            rate: 1000.0,
            duration: Duration::from_secs(10),
            messages: None,
            drain: Duration::from_secs(5),
            connect_rate: 2000.0,
            connect_concurrency: 256,
            connect_timeout: Duration::from_secs(30),
            source_addrs: 0,
            new_users: 0,
            payload_size: 64,
            uid_in_payload: false,
            qos: 0,
            keep_alive: 600,
            shard: 0,
            shards: 1,
        }
    }

    fn check(&self) -> Result<(), LoadError> {
        if self.shards == 0 || self.shard >= self.shards {
            return Err(LoadError::Config(format!(
                "shard {} of {} is out of range",
                self.shard, self.shards
            )));
        }
        if self.subs == 0 {
            return Err(LoadError::Config(
                "at least one subscription per device".into(),
            ));
        }
        if self.qos > 1 {
            return Err(LoadError::Config("QoS must be 0 or 1".into()));
        }
        if !self.rate.is_finite() || self.rate < 0.0 {
            return Err(LoadError::Config("rate must be a finite number ≥ 0".into()));
        }
        let probe = self.uid(self.uid_offset + self.devices + self.new_users);
        protocol::UserId::parse(&probe)
            .map_err(|e| LoadError::Config(format!("uid {probe}: {e}")))?;
        Ok(())
    }

    /// The uid of device number `global` (0-based over all shards; new users follow the devices).
    pub fn uid(&self, global: u64) -> String {
        format!("{}{}", self.uid_prefix, self.uid_offset + global)
    }

    /// The reply topics device `uid` subscribes to.
    pub fn filters(&self, uid: &str) -> Vec<String> {
        let mut f = vec![format!("{uid}_{}", self.reply_name)];
        f.extend((1..self.subs).map(|i| format!("{uid}_s{i}")));
        f
    }

    /// The broker address device number `global` connects to.
    pub fn node_addr(&self, global: u64) -> SocketAddr {
        if self.node_addrs.is_empty() {
            return self.endpoint.addr;
        }
        self.node_addrs[(global % self.node_addrs.len() as u64) as usize]
    }

    pub(crate) fn source(&self, global: u64) -> Option<IpAddr> {
        if self.source_addrs == 0 {
            return None;
        }
        let k = (global % u64::from(self.source_addrs)) as u32;
        Some(IpAddr::V4(Ipv4Addr::from(0x7F00_0001u32.wrapping_add(k))))
    }

    pub(crate) fn share(&self) -> f64 {
        1.0 / self.shards as f64
    }
}

/// This shard's part `[start, end)` of `total` items.
pub fn shard_range(total: u64, shard: u64, shards: u64) -> Range<u64> {
    let shards = shards.max(1);
    let start = total * shard / shards;
    let end = total * (shard + 1) / shards;
    start..end
}

/// A device as the pacer sees it: publishes owed to it, and whether it is alive.
#[derive(Default)]
pub(crate) struct Slot {
    pub(crate) pending: AtomicU32,
    pub(crate) notify: Notify,
    pub(crate) alive: AtomicBool,
}

pub(crate) struct Ctx {
    pub(crate) cfg: RunConfig,
    pub(crate) counters: Arc<Counters>,
    pub(crate) latency: Latency,
    pub(crate) first: Latency,
    pub(crate) epoch: Instant,
    pub(crate) cancel: CancellationToken,
    pub(crate) errors: Mutex<Vec<String>>,
}

impl Ctx {
    pub(crate) fn note_error(&self, e: String) {
        tracing::debug!(error = %e, "device");
        if let Ok(mut errs) = self.errors.lock() {
            if errs.len() < 20 {
                errs.push(e);
            }
        }
    }

    pub(crate) fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Why a device stopped.
#[derive(Debug)]
pub(crate) enum DeviceEnd {
    /// Before it was ready (connect, TLS, CONNACK, SUBACK).
    Setup(String),
    /// After it was ready.
    Dropped(String),
}

/// One process's devices, connected and subscribed, ready to run.
pub struct Shard {
    ctx: Arc<Ctx>,
    slots: Vec<Arc<Slot>>,
    ready_tx: mpsc::UnboundedSender<Arc<Slot>>,
    ready_rx: mpsc::UnboundedReceiver<Arc<Slot>>,
    tasks: JoinSet<()>,
    new_tasks: JoinSet<()>,
    devices: Range<u64>,
    connect_secs: f64,
}

impl Shard {
    /// This shard's devices, not yet connected.
    pub fn new(cfg: RunConfig) -> Result<Shard, LoadError> {
        cfg.check()?;
        let devices = shard_range(cfg.devices, cfg.shard, cfg.shards);
        let ctx = Arc::new(Ctx {
            counters: Arc::new(Counters::default()),
            latency: Latency::default(),
            first: Latency::default(),
            epoch: Instant::now(),
            cancel: CancellationToken::new(),
            errors: Mutex::new(Vec::new()),
            cfg,
        });
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        Ok(Shard {
            ctx,
            slots: Vec::new(),
            ready_tx,
            ready_rx,
            tasks: JoinSet::new(),
            new_tasks: JoinSet::new(),
            devices,
            connect_secs: 0.0,
        })
    }

    /// Connects and subscribes this shard's devices, at the configured rate;
    /// returns when every one is ready or has failed.
    pub async fn connect(&mut self) -> Result<(), LoadError> {
        let shard = self;
        let devices = shard.devices.clone();
        let start = Instant::now();
        let rate = shard.ctx.cfg.connect_rate * shard.ctx.cfg.share();
        let sem = Arc::new(Semaphore::new(shard.ctx.cfg.connect_concurrency.max(1)));
        for (i, global) in devices.clone().enumerate() {
            if rate > 0.0 {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                if due > Instant::now() + Duration::from_millis(1) {
                    tokio::time::sleep_until(due.into()).await;
                }
            }
            let permit = sem
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| LoadError::Config("connect semaphore closed".into()))?;
            let ctx = shard.ctx.clone();
            let tx = shard.ready_tx.clone();
            shard.tasks.spawn(async move {
                device(ctx, global, false, tx, Some(permit)).await;
            });
        }
        let count = devices.end - devices.start;
        let c = &shard.ctx.counters;
        let limit = shard.ctx.cfg.connect_timeout + Duration::from_secs(5);
        let mut last_progress = Instant::now();
        let mut last_done = 0;
        loop {
            let done = c.ready.load(Relaxed) + c.connect_failed.load(Relaxed);
            if done >= count {
                break;
            }
            if done != last_done {
                last_done = done;
                last_progress = Instant::now();
            } else if last_progress.elapsed() > limit {
                shard.ctx.note_error(format!(
                    "connect phase stalled: {done} of {count} devices settled"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        shard.connect_secs = start.elapsed().as_secs_f64();
        while let Ok(slot) = shard.ready_rx.try_recv() {
            shard.slots.push(slot);
        }
        Ok(())
    }

    /// The live counters (for progress lines).
    pub fn counters(&self) -> Arc<Counters> {
        self.ctx.counters.clone()
    }

    /// Sends at the configured rate for the configured duration (bringing in
    /// new users meanwhile), waits for outstanding replies and reports. The
    /// devices stay connected until [`Shard::close`].
    pub async fn run(&mut self) -> ShardReport {
        let cfg = &self.ctx.cfg;
        let rate = cfg.rate * cfg.share();
        let duration = cfg.duration;
        let send_start = Instant::now();

        // New users arrive evenly over the first 80% of the run.
        let new_range = shard_range(cfg.new_users, cfg.shard, cfg.shards);
        let new_count = new_range.end - new_range.start;
        let joiner = {
            let ctx = self.ctx.clone();
            let tx = self.ready_tx.clone();
            tokio::spawn(async move {
                let mut set = JoinSet::new();
                let span = ctx.cfg.duration.mul_f64(0.8);
                for (k, j) in new_range.enumerate() {
                    let due = send_start + span.mul_f64(k as f64 / new_count.max(1) as f64);
                    tokio::time::sleep_until(due.into()).await;
                    if ctx.cancel.is_cancelled() {
                        break;
                    }
                    let ctx2 = ctx.clone();
                    let tx2 = tx.clone();
                    let global = ctx.cfg.devices + j;
                    set.spawn(async move { device(ctx2, global, true, tx2, None).await });
                }
                set
            })
        };

        let cap = cfg.messages.map(|m| {
            let r = shard_range(m, cfg.shard, cfg.shards);
            r.end - r.start
        });
        let mut scheduled: u64 = 0;
        let mut rr: usize = 0;
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let c = self.ctx.counters.clone();
        loop {
            ticker.tick().await;
            while let Ok(slot) = self.ready_rx.try_recv() {
                self.slots.push(slot);
            }
            let elapsed = send_start.elapsed();
            if elapsed >= duration || rate <= 0.0 {
                break;
            }
            let mut due = (rate * elapsed.as_secs_f64()) as u64;
            if let Some(cap) = cap {
                due = due.min(cap);
            }
            'assign: while scheduled < due {
                let n = self.slots.len();
                for _ in 0..n {
                    let slot = &self.slots[rr % n];
                    rr = rr.wrapping_add(1);
                    if slot.alive.load(Relaxed) {
                        slot.pending.fetch_add(1, Relaxed);
                        slot.notify.notify_one();
                        scheduled += 1;
                        continue 'assign;
                    }
                }
                c.skipped.fetch_add(due - scheduled, Relaxed);
                scheduled = due;
            }
        }
        let send_secs = send_start.elapsed().as_secs_f64();

        self.new_tasks = match tokio::time::timeout(
            self.ctx.cfg.connect_timeout + Duration::from_secs(1),
            joiner,
        )
        .await
        {
            Ok(Ok(set)) => set,
            _ => JoinSet::new(),
        };

        // Drain: until every publish owed was sent and answered, or the limit.
        let drain_start = Instant::now();
        let mut settled_since: Option<Instant> = None;
        while drain_start.elapsed() < self.ctx.cfg.drain {
            while let Ok(slot) = self.ready_rx.try_recv() {
                self.slots.push(slot);
            }
            let owed: u64 = self
                .slots
                .iter()
                .filter(|s| s.alive.load(Relaxed))
                .map(|s| u64::from(s.pending.load(Relaxed)))
                .sum();
            let done = owed == 0 && c.received.load(Relaxed) >= c.sent.load(Relaxed);
            match (done, settled_since) {
                (true, Some(t)) if t.elapsed() >= Duration::from_millis(50) => break,
                (true, None) => settled_since = Some(Instant::now()),
                (false, _) => settled_since = None,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let drain_secs = drain_start.elapsed().as_secs_f64();

        let report = ShardReport {
            devices_target: self.devices.end - self.devices.start,
            counters: c.snapshot(),
            connect_secs: self.connect_secs,
            subscriptions_requested: (self.devices.end - self.devices.start + new_count)
                * self.ctx.cfg.subs as u64,
            offered_rate: rate,
            send_secs,
            drain_secs,
            unexpected: c.unexpected.load(Relaxed),
            other_received: c.other_received.load(Relaxed),
            skipped: c.skipped.load(Relaxed),
            new_users_target: new_count,
            new_first_reply: c.new_first_reply.load(Relaxed),
            latency: HistData::from_histogram(&self.ctx.latency.merged()),
            first_reply: HistData::from_histogram(&self.ctx.first.merged()),
            errors: self
                .ctx
                .errors
                .lock()
                .map(|e| e.clone())
                .unwrap_or_default(),
        };
        report
    }

    /// Disconnects every device (DISCONNECT, then close) and waits for them.
    pub async fn close(mut self) {
        self.ctx.cancel.cancel();
        let close = async {
            while self.tasks.join_next().await.is_some() {}
            while self.new_tasks.join_next().await.is_some() {}
        };
        if tokio::time::timeout(Duration::from_secs(10), close)
            .await
            .is_err()
        {
            self.tasks.abort_all();
            self.new_tasks.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_everything_once() {
        let total = 10_007;
        let mut covered = 0;
        let mut next = 0;
        for s in 0..7 {
            let r = shard_range(total, s, 7);
            assert_eq!(r.start, next);
            next = r.end;
            covered += r.end - r.start;
        }
        assert_eq!(covered, total);
    }

    #[test]
    fn sources_spread_over_loopback() {
        let mut cfg = RunConfig::new(Endpoint::tcp("127.0.0.1:1".parse().unwrap()));
        assert_eq!(cfg.source(5), None);
        cfg.source_addrs = 300;
        assert_eq!(cfg.source(0), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(cfg.source(255), Some("127.0.1.0".parse().unwrap()));
        assert_eq!(cfg.source(300), Some("127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn devices_spread_over_nodes_round_robin() {
        let mut cfg = RunConfig::new(Endpoint::tcp("127.0.0.1:1".parse().unwrap()));
        assert_eq!(cfg.node_addr(7), "127.0.0.1:1".parse().unwrap());
        cfg.node_addrs = vec![
            "127.0.0.1:10".parse().unwrap(),
            "127.0.0.1:11".parse().unwrap(),
            "127.0.0.1:12".parse().unwrap(),
        ];
        let ports: Vec<u16> = (0..6).map(|n| cfg.node_addr(n).port()).collect();
        assert_eq!(ports, vec![10, 11, 12, 10, 11, 12]);
    }

    #[test]
    fn filters_start_with_the_reply_topic() {
        let mut cfg = RunConfig::new(Endpoint::tcp("127.0.0.1:1".parse().unwrap()));
        cfg.subs = 3;
        assert_eq!(cfg.filters("u7"), vec!["u7_echo", "u7_s1", "u7_s2"]);
        assert!(cfg.check().is_ok());
        cfg.uid_prefix = "bad_".into();
        assert!(cfg.check().is_err());
    }
}
