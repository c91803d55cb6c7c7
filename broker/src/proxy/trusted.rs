//! Owns which peers may speak for another address (`BROKER_TRUSTED_PROXIES`):
//! a list of CIDR blocks, IPv4 and IPv6. Only a peer inside one may send a
//! PROXY protocol header (and, on the WebSocket listener, an
//! `X-Forwarded-For` the broker believes).

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// The peers whose word on a client's address is taken. Empty: nobody's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    blocks: Vec<IpNet>,
}

/// Why a `BROKER_TRUSTED_PROXIES` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("BROKER_TRUSTED_PROXIES entry {entry:?} is not a CIDR block: write each proxy as an address with its prefix length, comma-separated (e.g. `127.0.0.1/32,10.0.0.0/8,fd00::/8`), or leave it empty to trust no proxy")]
pub struct BadTrustedProxy {
    pub entry: String,
}

/// Most blocks configured: a list longer than this is a mistake, and every
/// accepted connection is checked against each one.
pub const MAX_TRUSTED_BLOCKS: usize = 256;

impl TrustedProxies {
    /// Trusts nobody (the default).
    pub fn none() -> Self {
        TrustedProxies::default()
    }

    /// Whether `ip` is a trusted proxy. IPv4-mapped IPv6 peers (a
    /// dual-stack listener) are checked as the IPv4 address they are.
    pub fn contains(&self, ip: IpAddr) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.blocks.iter().any(|block| block.contains(&ip))
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

impl FromStr for TrustedProxies {
    type Err = BadTrustedProxy;

    /// Comma-separated CIDR blocks; blanks around entries and empty entries
    /// are ignored. A bare address without a prefix length is refused: a
    /// typo there (a /8 meant as a /32) would trust far too much or too
    /// little, so the operator writes which one.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut blocks = Vec::new();
        for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let block: IpNet = entry.parse().map_err(|_| BadTrustedProxy {
                entry: entry.to_owned(),
            })?;
            if blocks.len() == MAX_TRUSTED_BLOCKS {
                return Err(BadTrustedProxy {
                    entry: format!("{entry} (more than {MAX_TRUSTED_BLOCKS} blocks)"),
                });
            }
            // `10.1.2.3/8` is refused: its host bits suggest a mistake.
            if block.trunc() != block {
                return Err(BadTrustedProxy {
                    entry: format!("{entry} (host bits set; did you mean {}?)", block.trunc()),
                });
            }
            blocks.push(block);
        }
        Ok(TrustedProxies { blocks })
    }
}

impl fmt::Display for TrustedProxies {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, block) in self.blocks.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{block}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_ipv4_and_ipv6_blocks() {
        let trusted: TrustedProxies = " 127.0.0.1/32, 10.0.0.0/8 ,fd00::/8,".parse().unwrap();
        assert_eq!(trusted.to_string(), "127.0.0.1/32,10.0.0.0/8,fd00::/8");
        assert!(trusted.contains(ip("127.0.0.1")));
        assert!(!trusted.contains(ip("127.0.0.2")));
        assert!(trusted.contains(ip("10.200.3.4")));
        assert!(!trusted.contains(ip("11.0.0.1")));
        assert!(trusted.contains(ip("fd12::1")));
        assert!(!trusted.contains(ip("fe80::1")));
        assert!(trusted.contains(ip("::ffff:10.1.1.1")), "IPv4-mapped");
        assert!(!trusted.contains(ip("::ffff:11.1.1.1")));
    }

    #[test]
    fn empty_trusts_nobody() {
        for text in ["", " ", ",,"] {
            let trusted: TrustedProxies = text.parse().unwrap();
            assert!(trusted.is_empty());
            assert!(!trusted.contains(ip("127.0.0.1")));
        }
        assert!(!TrustedProxies::none().contains(ip("::1")));
    }

    #[test]
    fn refuses_what_is_not_a_block_with_a_fix() {
        for bad in [
            "127.0.0.1",
            "10.0.0.0/33",
            "localhost/32",
            "10.0.0.0/8;11.0.0.0/8",
            "10.1.2.3/8",
            "::1/129",
        ] {
            let err = bad.parse::<TrustedProxies>().unwrap_err();
            let message = err.to_string();
            assert!(message.contains("BROKER_TRUSTED_PROXIES"), "{message}");
            assert!(message.contains("127.0.0.1/32"), "{message}");
        }
        let err = "10.1.2.3/8".parse::<TrustedProxies>().unwrap_err();
        assert!(err.to_string().contains("10.0.0.0/8"), "{err}");
        let many = (0..=MAX_TRUSTED_BLOCKS)
            .map(|i| format!("10.0.{}.{}/32", i / 256, i % 256))
            .collect::<Vec<_>>()
            .join(",");
        assert!(many.parse::<TrustedProxies>().is_err());
    }
}
