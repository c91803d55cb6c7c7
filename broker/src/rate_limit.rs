//! Owns connection admission per source address, applied to a socket before
//! its TLS handshake so that a connect storm costs an accept and a close, not
//! a handshake: a token bucket of new connections per address, a cap on the
//! address's connections that are not yet answered (accepted, no CONNACK
//! written), and one log line per episode of refusals.
//!
//! A peer in `BROKER_TRUSTED_PROXIES` is not admitted as a client: it
//! speaks for many. Its connections count against a pending cap of their
//! own (per proxy, until their PROXY header arrives, so a proxy that opens
//! connections and says nothing is bounded like any source), and the
//! client the header names is then admitted as if it had connected
//! directly (see [`Admission::admit_accepted`]).
//!
//! Addresses are keyed as [`AddrKey`]: IPv4 whole (IPv4-mapped IPv6 too, so
//! a dual-stack listener cannot be used to double an IPv4 client's
//! allowance), IPv6 by its /64, the smallest block one subscriber gets.

use crate::proxy::TrustedProxies;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

/// Buckets idle this long are full again and can be forgotten.
const FORGET_AFTER_SECS: f64 = 60.0;

pub use protocol::addr_key::AddrKey;
/// A source's connections between accept and their first answer are
/// counted by a [`SourceLimit`]; the slot is a [`PendingGuard`].
pub use protocol::admission::SourceSlot as PendingGuard;
use protocol::admission::{RefusalEpisodes, SourceLimit, EPISODE_QUIET};

struct Bucket {
    tokens: f64,
    refreshed: Instant,
}

/// Allows `burst` connections at once and `rate` per second after that, per [`AddrKey`].
pub struct ConnectionRateLimit {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<AddrKey, Bucket>>,
    last_sweep: Mutex<Instant>,
}

impl ConnectionRateLimit {
    /// `rate` 0 means no limit.
    pub fn new(rate: f64, burst: u32) -> Self {
        ConnectionRateLimit {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    /// Whether a new connection from `ip` may proceed now.
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(AddrKey::of(ip), Instant::now())
    }

    fn allow_at(&self, key: AddrKey, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.sweep(now);
        let mut buckets = self.buckets.lock();
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            refreshed: now,
        });
        let elapsed = now
            .saturating_duration_since(bucket.refreshed)
            .as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.refreshed = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops buckets that have refilled, so memory follows active addresses.
    fn sweep(&self, now: Instant) {
        let mut last = self.last_sweep.lock();
        if now.saturating_duration_since(*last).as_secs_f64() < FORGET_AFTER_SECS {
            return;
        }
        *last = now;
        drop(last);
        self.buckets.lock().retain(|_, b| {
            now.saturating_duration_since(b.refreshed).as_secs_f64() < FORGET_AFTER_SECS
        });
    }
}

/// Why a socket was closed at accept (the `reason` label of
/// `broker_sockets_dropped_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AdmissionRefusal {
    /// The address's bucket of new connections is empty.
    RateLimited,
    /// The address has its most connections in handshake / before CONNACK.
    TooManyPending,
    /// The broker holds its most connections.
    TooManyConnections,
}

impl AdmissionRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            AdmissionRefusal::RateLimited => "rate_limited",
            AdmissionRefusal::TooManyPending => "too_many_pending",
            AdmissionRefusal::TooManyConnections => "too_many_connections",
        }
    }
}

/// What admission gave a freshly accepted socket.
pub enum Admitted {
    /// A client: its source's pending slot.
    Direct(PendingGuard),
    /// A trusted proxy: the slot its connection holds until the PROXY
    /// header arrives; the client it names is admitted then
    /// ([`Admission::admit`]).
    ViaProxy(PendingGuard),
}

/// The `reason` of a PROXY header from a peer not in `BROKER_TRUSTED_PROXIES`.
pub const UNTRUSTED_PROXY_HEADER: &str = "proxy_header_untrusted";

/// Decides whether a freshly accepted socket may go on to its handshake.
pub struct Admission {
    /// Names the listener in logs ("public", "internal").
    listener: &'static str,
    rate: ConnectionRateLimit,
    pending: Arc<SourceLimit>,
    episodes: RefusalEpisodes<AdmissionRefusal>,
    /// Peers that may open with a PROXY header (and must).
    trusted: TrustedProxies,
    /// Per trusted proxy: its connections whose header has not arrived.
    awaiting_header: Arc<SourceLimit>,
    /// Refused openings (PROXY header missing, malformed, untrusted...).
    opening_episodes: RefusalEpisodes<&'static str>,
}

impl Admission {
    /// `rate` 0 or `max_pending` 0 turns that check off.
    pub fn new(listener: &'static str, rate: f64, burst: u32, max_pending: usize) -> Self {
        Admission {
            listener,
            rate: ConnectionRateLimit::new(rate, burst),
            pending: SourceLimit::new(max_pending),
            episodes: RefusalEpisodes::default(),
            trusted: TrustedProxies::none(),
            awaiting_header: SourceLimit::new(max_pending),
            opening_episodes: RefusalEpisodes::default(),
        }
    }

    /// Trusts `proxies` to open with a PROXY header naming the client.
    pub fn with_trusted_proxies(mut self, proxies: TrustedProxies) -> Self {
        self.trusted = proxies;
        self
    }

    /// Whether `ip` is a trusted proxy.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.contains(ip)
    }

    /// Admission at accept: a client is admitted by [`Admission::admit`];
    /// a trusted proxy only against its cap of connections awaiting their
    /// header (the per-source rate would otherwise throttle every client
    /// behind it as one; the client is admitted once the header names it).
    pub fn admit_accepted(&self, peer: IpAddr) -> Result<Admitted, AdmissionRefusal> {
        if self.trusted.contains(peer) {
            self.awaiting_header
                .try_admit(AddrKey::of(peer))
                .map(Admitted::ViaProxy)
                .ok_or(AdmissionRefusal::TooManyPending)
        } else {
            self.admit(peer).map(Admitted::Direct)
        }
    }

    /// Records a refused opening (`reason`, the metric's label) and logs it
    /// if it begins an episode of its kind, as [`Admission::log_refusal`].
    pub fn log_opening_refusal(
        &self,
        peer: std::net::SocketAddr,
        reason: &'static str,
        why: &dyn std::fmt::Display,
    ) {
        if let Some(previous_episode_refused) = self.opening_episodes.record(reason) {
            let trusted = self.trusted.contains(peer.ip());
            tracing::warn!(
                listener = self.listener,
                %peer,
                trusted_proxy = trusted,
                reason,
                previous_episode_refused,
                "refused a connection's opening: {why}{}; further ones are counted in broker_sockets_dropped_total until {}s pass without one",
                if trusted { "" } else if reason == UNTRUSTED_PROXY_HEADER { " (add the proxy to BROKER_TRUSTED_PROXIES if it is yours)" } else { "" },
                EPISODE_QUIET.as_secs()
            );
        }
    }

    /// A pending slot for a new connection from `ip`, or why not. The pending
    /// cap is checked first, so an address at its cap spends no rate tokens.
    pub fn admit(&self, ip: IpAddr) -> Result<PendingGuard, AdmissionRefusal> {
        let key = AddrKey::of(ip);
        let guard = self
            .pending
            .try_admit(key)
            .ok_or(AdmissionRefusal::TooManyPending)?;
        if !self.rate.allow_at(key, Instant::now()) {
            return Err(AdmissionRefusal::RateLimited);
        }
        Ok(guard)
    }

    /// Connections from `ip`'s key that are not answered yet.
    pub fn pending(&self, ip: IpAddr) -> usize {
        self.pending.held(AddrKey::of(ip))
    }

    /// Records a refusal and logs it if it begins an episode: the first
    /// refusal of its kind after [`EPISODE_QUIET`] without one. The rest are
    /// only counted (the caller's metric), so a storm costs one log line.
    pub fn log_refusal(&self, ip: IpAddr, why: AdmissionRefusal) {
        let previous = self.episodes.record(why);
        if let Some(previous_episode_refused) = previous {
            tracing::warn!(
                listener = self.listener,
                source = %AddrKey::of(ip),
                reason = why.reason(),
                previous_episode_refused,
                "refusing connections at accept; further refusals are counted in broker_sockets_dropped_total until {}s pass without one",
                EPISODE_QUIET.as_secs()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    fn key(text: &str) -> AddrKey {
        AddrKey::of(ip(text))
    }

    #[test]
    fn burst_then_rate_per_address() {
        let limit = ConnectionRateLimit::new(2.0, 3);
        let (a, b) = (key("10.0.0.1"), key("10.0.0.2"));
        let t0 = Instant::now();
        assert!((0..3).all(|_| limit.allow_at(a, t0)));
        assert!(!limit.allow_at(a, t0));
        assert!(limit.allow_at(b, t0), "addresses are limited separately");
        assert!(limit.allow_at(a, t0 + Duration::from_millis(500)));
        assert!(!limit.allow_at(a, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let limit = ConnectionRateLimit::new(0.0, 1);
        assert!((0..10_000).all(|_| limit.allow(ip("127.0.0.1"))));
    }

    #[test]
    fn ipv6_is_keyed_by_its_64() {
        let same = [
            "2001:db8:1:2::1",
            "2001:db8:1:2:ffff:ffff:ffff:ffff",
            "2001:db8:1:2:dead:beef:0:1",
        ];
        for addr in same {
            assert_eq!(key(addr), key("2001:db8:1:2::"), "{addr}");
        }
        assert_ne!(key("2001:db8:1:3::1"), key("2001:db8:1:2::1"));
        assert_ne!(key("2001:db9:1:2::1"), key("2001:db8:1:2::1"));
        assert_eq!(key("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");

        // One /64 shares one bucket: rotating the interface id gains nothing.
        let limit = ConnectionRateLimit::new(1.0, 4);
        let t0 = Instant::now();
        let allowed = (0..100u128)
            .filter(|i| {
                let addr =
                    std::net::Ipv6Addr::from_bits(0x2001_0db8_0001_0002_0000_0000_0000_0000 | i);
                limit.allow_at(AddrKey::of(IpAddr::V6(addr)), t0)
            })
            .count();
        assert_eq!(allowed, 4);
        assert!(
            limit.allow_at(key("2001:db8:1:3::1"), t0),
            "the next /64 has its own"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_is_keyed_as_ipv4() {
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("::ffff:192.0.2.7").to_string(), "192.0.2.7");
        assert_ne!(key("::ffff:192.0.2.7"), key("::ffff:192.0.2.8"));
        let limit = ConnectionRateLimit::new(1.0, 2);
        let t0 = Instant::now();
        assert!(limit.allow_at(key("192.0.2.7"), t0));
        assert!(limit.allow_at(key("::ffff:192.0.2.7"), t0));
        assert!(
            !limit.allow_at(key("192.0.2.7"), t0),
            "one bucket for both forms"
        );
    }

    #[test]
    fn pending_cap_per_address_released_on_drop() {
        let admission = Admission::new("test", 0.0, 1, 2);
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        let first = admission.admit(a).expect("first");
        let second = admission.admit(a).expect("second");
        assert_eq!(
            admission.admit(a).err(),
            Some(AdmissionRefusal::TooManyPending)
        );
        assert!(admission.admit(b).is_ok(), "another address is not held up");
        assert_eq!(admission.pending(a), 2);
        drop(first);
        assert_eq!(admission.pending(a), 1);
        let third = admission.admit(a).expect("a slot came free");
        drop((second, third));
        assert_eq!(admission.pending(a), 0);
        assert_eq!(admission.pending.sources(), 0, "no entry left behind");
    }

    #[test]
    fn pending_cap_spends_no_rate_tokens() {
        let admission = Admission::new("test", 1.0, 2, 1);
        let a = ip("10.0.0.1");
        let held = admission.admit(a).expect("first");
        for _ in 0..10 {
            assert_eq!(
                admission.admit(a).err(),
                Some(AdmissionRefusal::TooManyPending)
            );
        }
        drop(held);
        assert!(
            admission.admit(a).is_ok(),
            "the second token is still there"
        );
        assert_eq!(
            admission.admit(a).err(),
            Some(AdmissionRefusal::RateLimited)
        );
    }

    #[test]
    fn zero_pending_cap_is_unlimited() {
        let admission = Admission::new("test", 0.0, 1, 0);
        let guards: Vec<_> = (0..1000).map(|_| admission.admit(ip("10.0.0.1"))).collect();
        assert!(guards.iter().all(Result::is_ok));
    }

    /// The defaults let a carrier-grade NAT address of 5,000 devices that all
    /// reconnect at once in within 5 s, counting tokens only.
    #[test]
    fn default_budget_admits_a_nat_storm_in_seconds() {
        let limits = crate::config::Limits::default();
        let limit = ConnectionRateLimit::new(limits.conn_rate_per_sec, limits.conn_burst);
        let nat = key("100.64.0.1");
        let t0 = Instant::now();
        let mut admitted = 0;
        let mut at = t0;
        // Devices retry every 100 ms until admitted.
        while admitted < 5_000 {
            while admitted < 5_000 && limit.allow_at(nat, at) {
                admitted += 1;
            }
            at += Duration::from_millis(100);
            assert!(
                at - t0 <= Duration::from_secs(5),
                "{admitted} admitted by 5 s"
            );
        }
    }
}
