//! The client-update datagrams (UDP), little endian, version 1.
//!
//! Every datagram starts with an 8-byte header: magic `FKCU`, version
//! (u8, [`VERSION`]), kind (u8), count (u16), then the zone's VM id (u64).
//!
//! | kind | after the header | sent by |
//! |---|---|---|
//! | 1 `Updates` | `count` updates | a client, to the zone's daemon |
//! | 2 `Acks` | `count` acks | the daemon whose guest applied them |
//! | 3 `Redirect` | IPv4 (4), port (u16), pad (2): send this zone's updates there | a daemon the zone left |
//! | 4 `Refused` | reason (u8), pad (7) | a daemon that cannot take them (unknown zone) |
//! | 5 `Forward` | family (u64), clone id (u64), reply IPv4 (4), port (u16), pad (2), then `count` updates, then a 16-byte tag | the parent's daemon, to a clone's |
//!
//! An update: client id (u32), payload length (u16), flags (u16, 0),
//! sequence number (u64), floor (u64: the client's oldest unacknowledged
//! sequence number when it sent this; see `ingress`), the client's
//! timestamp (u64, echoed in the ack), then the payload (1..=512 bytes).
//! An ack: client id (u32), status (u8: 1 applied, 2 duplicate — applied
//! before), pad (3), sequence number (u64), timestamp (u64).
//!
//! A `Forward` ends with a BLAKE3 keyed MAC (16 bytes) of everything
//! before it, under a key the cluster's daemons share ([`forward_key`]):
//! only a daemon of the cluster can inject updates for a clone with
//! somebody else's reply address.
//!
//! Decoding never trusts the input: every length is checked against the
//! datagram, and anything malformed is a [`WireError`].

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

pub const MAGIC: [u8; 4] = *b"FKCU";
pub const VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 16;
pub const UPDATE_HEADER_BYTES: usize = 32;
pub const ACK_BYTES: usize = 24;
/// Payload bytes of one update: at most the guest's slot.
pub const PAYLOAD_MAX: usize = guest_agent::abi::UPDATE_PAYLOAD_MAX as usize;
/// Largest datagram we send or accept.
pub const DATAGRAM_MAX: usize = 65_507;

const KIND_UPDATES: u8 = 1;
const KIND_ACKS: u8 = 2;
const KIND_REDIRECT: u8 = 3;
const KIND_REFUSED: u8 = 4;
const KIND_FORWARD: u8 = 5;

/// Bytes of a `Forward`'s MAC.
pub const TAG_BYTES: usize = 16;

/// The forwards' MAC key, derived from the cluster's shared secret.
pub fn forward_key(cluster_secret: &[u8; 32]) -> [u8; 32] {
    blake3::derive_key("forkd 2026-12 client update forward v1", cluster_secret)
}

fn tag(key: &[u8; 32], body: &[u8]) -> [u8; TAG_BYTES] {
    let mut t = [0u8; TAG_BYTES];
    t.copy_from_slice(&blake3::keyed_hash(key, body).as_bytes()[..TAG_BYTES]);
    t
}

/// Whether a `Forward` datagram's tag is right under `key` (constant
/// time). Any other datagram: false.
pub fn forward_verifies(b: &[u8], key: &[u8; 32]) -> bool {
    if b.len() < HEADER_BYTES + TAG_BYTES || b.get(5) != Some(&KIND_FORWARD) {
        return false;
    }
    let (body, t) = b.split_at(b.len() - TAG_BYTES);
    let want = blake3::keyed_hash(key, body);
    let mut diff = 0u8;
    for (x, y) in want.as_bytes()[..TAG_BYTES].iter().zip(t) {
        diff |= x ^ y;
    }
    diff == 0
}

/// Ack status: the guest applied the update, or had applied it before.
pub const ACK_APPLIED: u8 = 1;
pub const ACK_DUPLICATE: u8 = 2;
/// Refusal reason: no such zone here.
pub const REFUSED_UNKNOWN_VM: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic")]
    Magic,
    #[error("unsupported version {0}")]
    Version(u8),
    #[error("unknown kind {0}")]
    Kind(u8),
    #[error("datagram truncated: {count} entries announced")]
    Truncated { count: u16 },
    #[error("{0} trailing bytes")]
    Trailing(usize),
    #[error("update payload of {0} bytes (1..={PAYLOAD_MAX})")]
    Payload(usize),
    #[error("reply address is not IPv4")]
    NotIpv4,
}

/// One update as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireUpdate<'a> {
    pub client: u32,
    pub seq: u64,
    pub floor: u64,
    pub ts: u64,
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    pub client: u32,
    pub status: u8,
    pub seq: u64,
    pub ts: u64,
}

/// Where a forwarded batch goes and whom to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub family: u64,
    pub clone_id: u64,
    pub reply_to: SocketAddrV4,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datagram<'a> {
    Updates {
        vm: u64,
        forward: Option<Forward>,
        updates: Vec<WireUpdate<'a>>,
    },
    Acks {
        vm: u64,
        acks: Vec<Ack>,
    },
    Redirect {
        vm: u64,
        to: SocketAddrV4,
    },
    Refused {
        vm: u64,
        reason: u8,
    },
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|s| s.try_into().ok())
            .map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn addr(&mut self) -> Option<SocketAddrV4> {
        let ip = Ipv4Addr::from(self.u32()?);
        let port = self.u16()?;
        self.take(2)?;
        Some(SocketAddrV4::new(ip, port))
    }
}

/// Decodes one datagram.
pub fn decode(b: &[u8]) -> Result<Datagram<'_>, WireError> {
    if b.len() < HEADER_BYTES {
        return Err(WireError::Short(b.len()));
    }
    // A forward's tag is not part of its body (checked by the receiver).
    let b = if b[5] == KIND_FORWARD {
        b.get(..b.len().saturating_sub(TAG_BYTES))
            .filter(|body| body.len() >= HEADER_BYTES)
            .ok_or(WireError::Short(b.len()))?
    } else {
        b
    };
    if b[0..4] != MAGIC {
        return Err(WireError::Magic);
    }
    if b[4] != VERSION {
        return Err(WireError::Version(b[4]));
    }
    let kind = b[5];
    let count = u16::from_le_bytes([b[6], b[7]]);
    let mut r = Reader { b, at: 8 };
    let truncated = WireError::Truncated { count };
    let vm = r.u64().ok_or(truncated.clone())?;
    let d = match kind {
        KIND_UPDATES | KIND_FORWARD => {
            let forward = if kind == KIND_FORWARD {
                let family = r.u64().ok_or(truncated.clone())?;
                let clone_id = r.u64().ok_or(truncated.clone())?;
                let reply_to = r.addr().ok_or(truncated.clone())?;
                Some(Forward {
                    family,
                    clone_id,
                    reply_to,
                })
            } else {
                None
            };
            // Bounded by the datagram: each update takes 33 bytes at least.
            let mut updates = Vec::with_capacity((count as usize).min(b.len() / 33));
            for _ in 0..count {
                let client = r.u32().ok_or(truncated.clone())?;
                let len = r.u16().ok_or(truncated.clone())? as usize;
                r.u16().ok_or(truncated.clone())?;
                let seq = r.u64().ok_or(truncated.clone())?;
                let floor = r.u64().ok_or(truncated.clone())?;
                let ts = r.u64().ok_or(truncated.clone())?;
                if len == 0 || len > PAYLOAD_MAX {
                    return Err(WireError::Payload(len));
                }
                let payload = r.take(len).ok_or(truncated.clone())?;
                updates.push(WireUpdate {
                    client,
                    seq,
                    floor,
                    ts,
                    payload,
                });
            }
            Datagram::Updates {
                vm,
                forward,
                updates,
            }
        }
        KIND_ACKS => {
            let mut acks = Vec::with_capacity((count as usize).min(b.len() / ACK_BYTES));
            for _ in 0..count {
                let client = r.u32().ok_or(truncated.clone())?;
                let status = r.take(4).ok_or(truncated.clone())?[0];
                let seq = r.u64().ok_or(truncated.clone())?;
                let ts = r.u64().ok_or(truncated.clone())?;
                acks.push(Ack {
                    client,
                    status,
                    seq,
                    ts,
                });
            }
            Datagram::Acks { vm, acks }
        }
        KIND_REDIRECT => Datagram::Redirect {
            vm,
            to: r.addr().ok_or(truncated)?,
        },
        KIND_REFUSED => {
            let reason = r.take(8).ok_or(truncated)?[0];
            Datagram::Refused { vm, reason }
        }
        k => return Err(WireError::Kind(k)),
    };
    match b.len() - r.at {
        0 => Ok(d),
        n => Err(WireError::Trailing(n)),
    }
}

fn header(out: &mut Vec<u8>, kind: u8, count: u16, vm: u64) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&count.to_le_bytes());
    out.extend_from_slice(&vm.to_le_bytes());
}

fn put_addr(out: &mut Vec<u8>, a: SocketAddrV4) {
    out.extend_from_slice(&u32::from(*a.ip()).to_le_bytes());
    out.extend_from_slice(&a.port().to_le_bytes());
    out.extend_from_slice(&[0, 0]);
}

/// An IPv4 socket address, or [`WireError::NotIpv4`].
pub fn v4(a: SocketAddr) -> Result<SocketAddrV4, WireError> {
    match a {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(ip) => Ok(SocketAddrV4::new(ip, a.port())),
            None => Err(WireError::NotIpv4),
        },
    }
}

/// Builds an `Updates` (or `Forward`) datagram update by update.
#[derive(Debug, Clone)]
pub struct UpdatesEncoder {
    buf: Vec<u8>,
    count: u16,
}

impl UpdatesEncoder {
    pub fn new(vm: u64, forward: Option<Forward>) -> Self {
        let mut buf = Vec::with_capacity(1500);
        match forward {
            None => header(&mut buf, KIND_UPDATES, 0, vm),
            Some(f) => {
                header(&mut buf, KIND_FORWARD, 0, vm);
                buf.extend_from_slice(&f.family.to_le_bytes());
                buf.extend_from_slice(&f.clone_id.to_le_bytes());
                put_addr(&mut buf, f.reply_to);
            }
        }
        UpdatesEncoder { buf, count: 0 }
    }

    /// Bytes `u` would add.
    pub fn cost(u: &WireUpdate) -> usize {
        UPDATE_HEADER_BYTES + u.payload.len()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `u`; the payload must be 1..=[`PAYLOAD_MAX`] bytes.
    pub fn push(&mut self, u: &WireUpdate) -> Result<(), WireError> {
        if u.payload.is_empty() || u.payload.len() > PAYLOAD_MAX {
            return Err(WireError::Payload(u.payload.len()));
        }
        let b = &mut self.buf;
        b.extend_from_slice(&u.client.to_le_bytes());
        b.extend_from_slice(&(u.payload.len() as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&u.seq.to_le_bytes());
        b.extend_from_slice(&u.floor.to_le_bytes());
        b.extend_from_slice(&u.ts.to_le_bytes());
        b.extend_from_slice(u.payload);
        self.count += 1;
        self.buf[6..8].copy_from_slice(&self.count.to_le_bytes());
        Ok(())
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }

    /// A `Forward`'s bytes with their MAC under `key`.
    pub fn finish_signed(mut self, key: &[u8; 32]) -> Vec<u8> {
        let t = tag(key, &self.buf);
        self.buf.extend_from_slice(&t);
        self.buf
    }
}

pub fn encode_acks(vm: u64, acks: &[Ack]) -> Vec<u8> {
    let count = acks.len().min(u16::MAX as usize);
    let mut out = Vec::with_capacity(HEADER_BYTES + count * ACK_BYTES);
    header(&mut out, KIND_ACKS, count as u16, vm);
    for a in &acks[..count] {
        out.extend_from_slice(&a.client.to_le_bytes());
        out.extend_from_slice(&[a.status, 0, 0, 0]);
        out.extend_from_slice(&a.seq.to_le_bytes());
        out.extend_from_slice(&a.ts.to_le_bytes());
    }
    out
}

/// Acks that fit one datagram.
pub const ACKS_PER_DATAGRAM: usize = (DATAGRAM_MAX - HEADER_BYTES) / ACK_BYTES;

pub fn encode_redirect(vm: u64, to: SocketAddrV4) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 8);
    header(&mut out, KIND_REDIRECT, 0, vm);
    put_addr(&mut out, to);
    out
}

pub fn encode_refused(vm: u64, reason: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 8);
    header(&mut out, KIND_REFUSED, 0, vm);
    out.push(reason);
    out.extend_from_slice(&[0; 7]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upd(p: &[u8]) -> WireUpdate<'_> {
        WireUpdate {
            client: 7,
            seq: 3,
            floor: 2,
            ts: 99,
            payload: p,
        }
    }

    #[test]
    fn round_trips() {
        let (p1, p2) = ([1u8; 256], [2u8; 512]);
        let mut e = UpdatesEncoder::new(5, None);
        e.push(&upd(&p1)).unwrap();
        e.push(&upd(&p2)).unwrap();
        let b = e.finish();
        assert_eq!(b.len(), HEADER_BYTES + 2 * UPDATE_HEADER_BYTES + 768);
        match decode(&b).unwrap() {
            Datagram::Updates {
                vm: 5,
                forward: None,
                updates,
            } => assert_eq!(updates, vec![upd(&p1), upd(&p2)]),
            d => panic!("{d:?}"),
        }
        let f = Forward {
            family: 9,
            clone_id: 2,
            reply_to: "10.1.2.3:4567".parse().unwrap(),
        };
        let mut e = UpdatesEncoder::new(5, Some(f));
        e.push(&upd(&p1)).unwrap();
        let key = forward_key(&[7; 32]);
        let signed = e.finish_signed(&key);
        assert!(matches!(decode(&signed).unwrap(),
            Datagram::Updates { forward: Some(g), updates, .. } if g == f && updates.len() == 1));
        assert!(forward_verifies(&signed, &key));
        assert!(!forward_verifies(&signed, &forward_key(&[8; 32])));
        let mut forged = signed.clone();
        forged[HEADER_BYTES + 16] ^= 1;
        assert!(!forward_verifies(&forged, &key));
        assert!(!forward_verifies(&encode_refused(1, 1), &key));
        let acks = vec![Ack {
            client: 1,
            status: ACK_APPLIED,
            seq: 2,
            ts: 3,
        }];
        assert_eq!(
            decode(&encode_acks(4, &acks)).unwrap(),
            Datagram::Acks { vm: 4, acks }
        );
        let to: SocketAddrV4 = "10.0.0.2:7071".parse().unwrap();
        assert_eq!(
            decode(&encode_redirect(4, to)).unwrap(),
            Datagram::Redirect { vm: 4, to }
        );
        assert_eq!(
            decode(&encode_refused(4, REFUSED_UNKNOWN_VM)).unwrap(),
            Datagram::Refused {
                vm: 4,
                reason: REFUSED_UNKNOWN_VM
            }
        );
    }

    #[test]
    fn malformed_input_is_an_error_never_a_panic() {
        let mut e = UpdatesEncoder::new(5, None);
        e.push(&upd(&[3u8; 300])).unwrap();
        let good = e.finish();
        // Every truncation fails cleanly.
        for n in 0..good.len() {
            assert!(decode(&good[..n]).is_err(), "prefix {n}");
        }
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(WireError::Trailing(1)));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode(&bad), Err(WireError::Magic));
        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(decode(&bad), Err(WireError::Version(2)));
        let mut bad = good.clone();
        bad[5] = 77;
        assert_eq!(decode(&bad), Err(WireError::Kind(77)));
        // A count far beyond the bytes present.
        let mut bad = good.clone();
        bad[6..8].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(matches!(decode(&bad), Err(WireError::Truncated { .. })));
        // A payload length past the slot.
        let mut bad = good.clone();
        bad[HEADER_BYTES + 4..HEADER_BYTES + 6].copy_from_slice(&600u16.to_le_bytes());
        assert_eq!(decode(&bad), Err(WireError::Payload(600)));
        assert!(UpdatesEncoder::new(1, None).push(&upd(&[])).is_err());
        // Random garbage never panics.
        let mut x = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut g = good.clone();
            for _ in 0..4 {
                x = guest_agent::mix::mix64(x);
                let i = (x as usize) % g.len();
                g[i] = (x >> 32) as u8;
            }
            let _ = decode(&g);
        }
    }
}
