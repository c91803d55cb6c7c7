//! Owns the load generator's message layout: a sequence number and a send
//! timestamp (for loss, duplicate and round-trip accounting), and optionally
//! the sender's uid for brokers that cannot stamp the `user_id` property.
//!
//! Layout: `seq` u64 BE, `sent_ns` u64 BE, uid length u8, uid bytes, zero
//! padding up to the requested size.

use bytes::BufMut;

/// Bytes before the optional uid.
pub const HEADER_LEN: usize = 17;

/// Writes a payload of at least `size` bytes into `out` (cleared first).
pub fn encode(seq: u64, sent_ns: u64, uid: Option<&str>, size: usize, out: &mut Vec<u8>) {
    out.clear();
    out.put_u64(seq);
    out.put_u64(sent_ns);
    match uid {
        Some(uid) if uid.len() <= u8::MAX as usize => {
            out.put_u8(uid.len() as u8);
            out.put_slice(uid.as_bytes());
        }
        _ => out.put_u8(0),
    }
    if out.len() < size {
        out.resize(size, 0);
    }
}

/// Sequence number and send timestamp of a payload, if it is one of ours.
pub fn decode(p: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_be_bytes(p.get(0..8)?.try_into().ok()?);
    let ts = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, ts))
}

/// The uid carried in the payload, if any.
pub fn uid(p: &[u8]) -> Option<&str> {
    let len = *p.get(16)? as usize;
    if len == 0 {
        return None;
    }
    std::str::from_utf8(p.get(HEADER_LEN..HEADER_LEN + len)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut out = Vec::new();
        encode(5, 99, Some("u17"), 64, &mut out);
        assert_eq!(out.len(), 64);
        assert_eq!(decode(&out), Some((5, 99)));
        assert_eq!(uid(&out), Some("u17"));
        encode(1, 2, None, 0, &mut out);
        assert_eq!(out.len(), HEADER_LEN);
        assert_eq!(uid(&out), None);
        assert_eq!(decode(&out[..10]), None);
        assert_eq!(uid(&[0u8; 17]), None);
    }
}
