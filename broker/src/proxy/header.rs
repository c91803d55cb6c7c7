//! Owns the PROXY protocol header as bytes (HAProxy's "PROXY protocol"
//! specification, versions 1 and 2): a strict parser with no I/O that tells
//! whether a prefix is a whole header, the start of one, or not one at all,
//! and whether the first bytes of a connection look like one.
//!
//! The contract the reader in `proxy/mod.rs` relies on: when [`parse`] says
//! [`Parsed::Incomplete`], every byte given belongs to the header, so the
//! reader may consume them without reading past the header into the
//! client's own bytes (TLS or MQTT).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Version 1 opens with this.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// Version 2 opens with this.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest version 1 header, CRLF included (the specification's bound).
pub const V1_MAX: usize = 107;
/// Longest header accepted, of either version. Version 2 allows 16 + 65,535
/// bytes; addresses take at most 216 (Unix sockets) and load balancers'
/// TLVs (AWS, GCP, Azure link ids, HAProxy's unique id) a few dozen more.
pub const MAX_HEADER: usize = 1024;
/// Version 2's fixed part: signature, version and command, family, length.
const V2_FIXED: usize = 16;

/// Where the proxied connection came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A client's connection relayed by the proxy: its source and the
    /// address it connected to on the proxy.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The proxy speaks for itself: a v2 `LOCAL` (health checks), a v1
    /// `UNKNOWN`, or a v2 family with no IP address (unspecified, Unix).
    /// The specification says to use the connection's own addresses.
    Local,
}

/// What a prefix of a connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// A header of `len` bytes (the client's bytes follow it).
    Complete { len: usize, header: Header },
    /// Every byte given belongs to a header that is not finished.
    Incomplete,
}

/// Why the bytes are not a header we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("malformed PROXY v1 header: {0}")]
    V1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
}

impl HeaderError {
    /// The `reason` label of `broker_sockets_dropped_total`.
    pub fn reason(self) -> &'static str {
        match self {
            HeaderError::NotProxy => "proxy_header_missing",
            HeaderError::V1(_) | HeaderError::V2(_) => "proxy_header_malformed",
            HeaderError::TooLong => "proxy_header_too_long",
        }
    }
}

/// Whether `first` (a connection's first bytes, at least one) is, or
/// begins, a PROXY header of either version. Neither TLS (0x16) nor MQTT
/// (0x10, CONNECT) opens with `P` (0x50) or CR (0x0D), so no client's
/// opening is mistaken for one.
pub fn looks_like_header(first: &[u8]) -> bool {
    fn agrees(first: &[u8], signature: &[u8]) -> bool {
        let n = first.len().min(signature.len());
        n > 0 && first.get(..n) == signature.get(..n)
    }
    agrees(first, V1_PREFIX) || agrees(first, &V2_SIGNATURE)
}

/// Parses the header at the start of `bytes` (the connection's first bytes).
pub fn parse(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    if bytes.is_empty() {
        return Ok(Parsed::Incomplete);
    }
    let agrees = |signature: &[u8]| {
        let n = bytes.len().min(signature.len());
        bytes.get(..n) == signature.get(..n)
    };
    if agrees(V1_PREFIX) {
        parse_v1(bytes)
    } else if agrees(&V2_SIGNATURE) {
        parse_v2(bytes)
    } else {
        Err(HeaderError::NotProxy)
    }
}

/// `PROXY TCP4|TCP6 <src> <dst> <sport> <dport>\r\n` or `PROXY UNKNOWN ...\r\n`.
fn parse_v1(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    let end = bytes.iter().position(|b| *b == b'\r');
    // Printable US-ASCII only before the CR: a binary stream is refused at
    // its first byte, not read up to the length bound.
    let line_end = end.unwrap_or(bytes.len());
    let line = bytes.get(..line_end).unwrap_or_default();
    if line.iter().any(|b| !(0x20..0x7f).contains(b)) {
        return Err(HeaderError::V1("a byte that is not printable ASCII"));
    }
    let Some(cr) = end else {
        return if bytes.len() >= V1_MAX {
            Err(HeaderError::TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = cr + 2;
    if len > V1_MAX {
        return Err(HeaderError::TooLong);
    }
    match bytes.get(cr + 1) {
        None => return Ok(Parsed::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(HeaderError::V1("CR not followed by LF")),
    }
    let text = std::str::from_utf8(line).map_err(|_| HeaderError::V1("not ASCII"))?;
    let mut fields = text.split(' ');
    fields.next(); // "PROXY", checked by `parse`.
    let header = match fields.next() {
        // The proxy does not know the source: the connection's own
        // addresses are used; the rest of the line is ignored (spec 2.1).
        Some("UNKNOWN") => Header::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let v4 = family == "TCP4";
            let mut next = || fields.next().ok_or(HeaderError::V1("missing field"));
            let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
            if fields.next().is_some() {
                return Err(HeaderError::V1("extra field"));
            }
            let ip = |text: &str| -> Result<IpAddr, HeaderError> {
                if v4 {
                    text.parse::<Ipv4Addr>().map(IpAddr::V4)
                } else {
                    text.parse::<Ipv6Addr>().map(IpAddr::V6)
                }
                .map_err(|_| HeaderError::V1("bad address for its family"))
            };
            Header::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(HeaderError::V1("unknown protocol")),
    };
    Ok(Parsed::Complete { len, header })
}

/// A v1 port: decimal, 0 to 65535, no sign and no leading zero.
fn port(text: &str) -> Result<u16, HeaderError> {
    let bad = HeaderError::V1("bad port");
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

/// The binary form: signature, version/command, family/protocol, length,
/// addresses, then TLVs.
fn parse_v2(bytes: &[u8]) -> Result<Parsed, HeaderError> {
    let byte = |i: usize| bytes.get(i).copied();
    if let Some(version_command) = byte(12) {
        if version_command >> 4 != 2 {
            return Err(HeaderError::V2("version is not 2"));
        }
        if version_command & 0x0f > 1 {
            return Err(HeaderError::V2("unknown command"));
        }
    }
    let (Some(family), Some(high), Some(low)) = (byte(13), byte(14), byte(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let body_len = usize::from(u16::from_be_bytes([high, low]));
    let len = V2_FIXED + body_len;
    if len > MAX_HEADER {
        return Err(HeaderError::TooLong);
    }
    let Some(body) = bytes.get(V2_FIXED..len) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL: the proxy speaks for itself; the rest is to be ignored
    // (spec 2.2), whatever family it names.
    if byte(12).is_some_and(|vc| vc & 0x0f == 0) {
        return Ok(Parsed::Complete {
            len,
            header: Header::Local,
        });
    }
    let address_len = match (family >> 4, family & 0x0f) {
        (0, _) => 0,
        (1, 1) => 12,
        (2, 1) => 36,
        (3, 1) => 216,
        (1..=3, 2) => return Err(HeaderError::V2("datagram (UDP) on a stream listener")),
        _ => return Err(HeaderError::V2("unknown address family or protocol")),
    };
    if body.len() < address_len {
        return Err(HeaderError::V2("address block shorter than its family"));
    }
    check_tlvs(body.get(address_len..).unwrap_or_default())?;
    let header = match family >> 4 {
        1 => {
            let ip = |at: usize| -> Option<Ipv4Addr> {
                let octets: [u8; 4] = body.get(at..at + 4)?.try_into().ok()?;
                Some(Ipv4Addr::from(octets))
            };
            proxied(ip(0), ip(4), body, 8)?
        }
        2 => {
            let ip = |at: usize| -> Option<Ipv6Addr> {
                let octets: [u8; 16] = body.get(at..at + 16)?.try_into().ok()?;
                Some(Ipv6Addr::from(octets))
            };
            proxied(ip(0), ip(16), body, 32)?
        }
        // Unspecified or a Unix socket: no client IP to use.
        _ => Header::Local,
    };
    Ok(Parsed::Complete { len, header })
}

/// Source and destination with the ports that follow them at `ports`.
fn proxied<A: Into<IpAddr>>(
    source: Option<A>,
    destination: Option<A>,
    body: &[u8],
    ports: usize,
) -> Result<Header, HeaderError> {
    let port = |at: usize| -> Option<u16> {
        let bytes: [u8; 2] = body.get(at..at + 2)?.try_into().ok()?;
        Some(u16::from_be_bytes(bytes))
    };
    match (source, destination, port(ports), port(ports + 2)) {
        (Some(source), Some(destination), Some(sport), Some(dport)) => Ok(Header::Proxied {
            source: SocketAddr::new(source.into(), sport),
            destination: SocketAddr::new(destination.into(), dport),
        }),
        _ => Err(HeaderError::V2("address block shorter than its family")),
    }
}

/// TLVs (type, 16-bit length, value) must fill the rest exactly. Their
/// contents are not used.
fn check_tlvs(mut rest: &[u8]) -> Result<(), HeaderError> {
    while !rest.is_empty() {
        let (Some(high), Some(low)) = (rest.get(1), rest.get(2)) else {
            return Err(HeaderError::V2("truncated TLV"));
        };
        let end = 3 + usize::from(u16::from_be_bytes([*high, *low]));
        rest = rest
            .get(end..)
            .ok_or(HeaderError::V2("TLV longer than the header"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_inet(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&1883u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    fn complete(bytes: &[u8]) -> (usize, Header) {
        match parse(bytes) {
            Ok(Parsed::Complete { len, header }) => (len, header),
            other => panic!("{other:?} for {bytes:?}"),
        }
    }

    fn source(header: Header) -> SocketAddr {
        match header {
            Header::Proxied { source, .. } => source,
            Header::Local => panic!("local"),
        }
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n";
        let mut with_data = line.to_vec();
        with_data.extend_from_slice(&[0x10, 0x20, 0x00]);
        let (len, header) = complete(&with_data);
        assert_eq!(len, line.len());
        assert_eq!(source(header), "192.0.2.7:56324".parse().unwrap());
        assert_eq!(
            header,
            Header::Proxied {
                source: "192.0.2.7:56324".parse().unwrap(),
                destination: "10.0.0.1:1883".parse().unwrap(),
            }
        );
        let (_, header) = complete(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 0\r\n");
        assert_eq!(source(header), "[2001:db8::7]:65535".parse().unwrap());
        assert_eq!(
            complete(b"PROXY UNKNOWN\r\n"),
            (15, Header::Local),
            "UNKNOWN alone"
        );
        assert_eq!(
            complete(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").1,
            Header::Local
        );
    }

    #[test]
    fn v1_every_strict_prefix_is_incomplete() {
        let line = b"PROXY TCP6 ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n";
        for n in 1..line.len() {
            assert_eq!(parse(&line[..n]), Ok(Parsed::Incomplete), "{n}");
        }
        let longest = format!(
            "PROXY TCP6 {a} {a} 65535 65535\r\n",
            a = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(longest.len(), 104, "the specification's TCP6 bound");
        assert_eq!(complete(longest.as_bytes()).0, 104);
        let unknown = format!("PROXY UNKNOWN {}\r\n", "x".repeat(V1_MAX - 16));
        assert_eq!(complete(unknown.as_bytes()), (V1_MAX, Header::Local));
    }

    #[test]
    fn v1_malformed_is_refused() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883 x\r\n",
            b"PROXY TCP4 192.0.2.7  10.0.0.1 56324 1883\r\n",
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.007 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\rX",
            b"PROXY TCP4 192.0.2.7\n10.0.0.1 1 2\r\n",
            b"PROXY \x16\x03\x01",
        ] {
            assert!(
                matches!(parse(bad), Err(HeaderError::V1(_))),
                "{:?}: {:?}",
                String::from_utf8_lossy(bad),
                parse(bad)
            );
        }
        let long = format!("PROXY UNKNOWN {}\r\n", "x".repeat(100));
        assert_eq!(parse(long.as_bytes()), Err(HeaderError::TooLong));
        let endless = vec![b'A'; 200];
        let mut endless_header = b"PROXY ".to_vec();
        endless_header.extend_from_slice(&endless);
        assert_eq!(parse(&endless_header), Err(HeaderError::TooLong));
        assert_eq!(parse(&endless_header[..V1_MAX - 1]), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v2_inet_inet6_with_tlvs() {
        let mut with_data = v2_inet([192, 0, 2, 7], 40000, &[]);
        let len = with_data.len();
        with_data.extend_from_slice(&[0x16, 0x03, 0x01]);
        let (parsed_len, header) = complete(&with_data);
        assert_eq!(parsed_len, len);
        assert_eq!(source(header), "192.0.2.7:40000".parse().unwrap());

        // An ALPN TLV and a NOOP: skipped.
        let tlvs = [0x01, 0x00, 0x02, b'h', b'2', 0x04, 0x00, 0x00];
        let (len, header) = complete(&v2_inet([192, 0, 2, 8], 1, &tlvs));
        assert_eq!(len, 16 + 12 + tlvs.len());
        assert_eq!(source(header), "192.0.2.8:1".parse().unwrap());

        let mut body = Vec::new();
        body.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(&8883u16.to_be_bytes());
        let (_, header) = complete(&v2(1, 0x21, &body));
        assert_eq!(source(header), "[2001:db8::7]:443".parse().unwrap());
    }

    #[test]
    fn v2_local_unspec_and_unix_use_the_connection() {
        assert_eq!(complete(&v2(0, 0x00, &[])), (16, Header::Local));
        // LOCAL with an address block (HAProxy's health checks may send one).
        assert_eq!(complete(&v2(0, 0x11, &[0; 12])).1, Header::Local);
        assert_eq!(complete(&v2(1, 0x00, &[])).1, Header::Local);
        assert_eq!(complete(&v2(1, 0x31, &[0; 216])).1, Header::Local);
    }

    #[test]
    fn v2_every_strict_prefix_is_incomplete() {
        let header = v2_inet([192, 0, 2, 7], 1, &[0x04, 0x00, 0x01, 0x00]);
        for n in 1..header.len() {
            assert_eq!(parse(&header[..n]), Ok(Parsed::Incomplete), "{n}");
        }
    }

    #[test]
    fn v2_malformed_and_oversize_are_refused() {
        let mut bad_version = v2_inet([1, 2, 3, 4], 1, &[]);
        bad_version[12] = 0x11;
        let mut bad_command = v2_inet([1, 2, 3, 4], 1, &[]);
        bad_command[12] = 0x22;
        for bad in [
            bad_version,
            bad_command,
            v2(1, 0x12, &[0; 12]),                            // UDP
            v2(1, 0x41, &[0; 12]),                            // family 4
            v2(1, 0x11, &[0; 11]),                            // short address block
            v2(1, 0x21, &[0; 35]),                            // short IPv6 block
            v2_inet([1, 2, 3, 4], 1, &[0x01, 0x00, 0x05, 0]), // TLV too long
            v2_inet([1, 2, 3, 4], 1, &[0x01, 0x00]),          // truncated TLV
        ] {
            assert!(
                matches!(parse(&bad), Err(HeaderError::V2(_))),
                "{bad:?}: {:?}",
                parse(&bad)
            );
        }
        // Refused as soon as its declared length is known, before the body.
        let mut oversize = V2_SIGNATURE.to_vec();
        oversize.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&oversize), Err(HeaderError::TooLong));
        let just_fits = v2(1, 0x11, &[0; MAX_HEADER - 16]);
        assert!(matches!(
            parse(&just_fits),
            Err(HeaderError::V2(_)) | Ok(Parsed::Complete { .. })
        ));
        let one_over = v2(1, 0x11, &[0; MAX_HEADER - 15]);
        assert_eq!(parse(&one_over[..16]), Err(HeaderError::TooLong));
    }

    #[test]
    fn client_openings_are_not_headers() {
        for opening in [
            &[0x16, 0x03, 0x01][..],   // TLS ClientHello
            &[0x10, 0x0c, 0x00, 0x04], // MQTT CONNECT
            b"GET /mqtt HTTP/1.1\r\n",
            b"\r\n\r\nHELLO",
            b"PROXX",
        ] {
            assert!(!looks_like_header(opening), "{opening:?}");
            assert_eq!(parse(opening), Err(HeaderError::NotProxy), "{opening:?}");
        }
        for opening in [&b"P"[..], b"PROXY TCP4", b"\r\n\r\n\0", &V2_SIGNATURE] {
            assert!(looks_like_header(opening), "{opening:?}");
        }
        assert!(!looks_like_header(&[]));
    }

    /// Fuzz-style: random bytes, random mutations of valid headers and every
    /// truncation never panic; an `Incomplete` answer never comes for bytes
    /// past a complete header; a `Complete` length never exceeds the input
    /// or the bound.
    #[test]
    fn random_and_mutated_input_is_answered_without_panicking() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        let seeds: Vec<Vec<u8>> = vec![
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 1883\r\n".to_vec(),
            b"PROXY TCP6 2001:db8::7 2001:db8::1 1 2\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2_inet([192, 0, 2, 7], 40000, &[0x01, 0x00, 0x02, b'h', b'2']),
            v2(0, 0x00, &[]),
            v2(1, 0x31, &[7; 216]),
        ];
        let check = |bytes: &[u8]| match parse(bytes) {
            Ok(Parsed::Complete { len, .. }) => {
                assert!(len <= bytes.len() && len <= MAX_HEADER, "{bytes:?}");
                // The same header with anything after it parses the same.
                let mut longer = bytes[..len].to_vec();
                longer.extend_from_slice(b"tail");
                assert_eq!(parse(&longer), parse(bytes));
            }
            Ok(Parsed::Incomplete) => assert!(bytes.len() < MAX_HEADER),
            Err(_) => {}
        };
        for _ in 0..20_000 {
            let len = rng.gen_range(0..64);
            let random: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            check(&random);
        }
        for seed in &seeds {
            for _ in 0..5_000 {
                let mut bytes = seed.clone();
                for _ in 0..rng.gen_range(1..4) {
                    let at = rng.gen_range(0..bytes.len());
                    match rng.gen_range(0..3) {
                        0 => bytes[at] = rng.gen(),
                        1 => bytes.truncate(at),
                        _ => bytes.insert(at, rng.gen()),
                    }
                    if bytes.is_empty() {
                        break;
                    }
                }
                check(&bytes);
            }
            for n in 0..=seed.len() {
                check(&seed[..n]);
            }
        }
    }
}
