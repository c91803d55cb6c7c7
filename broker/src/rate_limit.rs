//! Owns the per-address connection rate limit, applied to a socket before its
//! TLS handshake so that a connect storm costs an accept and a close, not a
//! handshake. A token bucket per IP address, refilled continuously.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

/// Buckets idle this long are full again and can be forgotten.
const FORGET_AFTER_SECS: f64 = 60.0;

struct Bucket {
    tokens: f64,
    refreshed: Instant,
}

/// Allows `burst` connections at once and `rate` per second after that, per address.
pub struct ConnectionRateLimit {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
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
        self.allow_at(ip, Instant::now())
    }

    fn allow_at(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        self.sweep(now);
        let mut buckets = self.buckets.lock();
        let bucket = buckets.entry(ip).or_insert(Bucket {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate_per_address() {
        let limit = ConnectionRateLimit::new(2.0, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
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
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        assert!((0..10_000).all(|_| limit.allow(a)));
    }
}
