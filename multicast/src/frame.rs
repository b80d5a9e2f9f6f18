//! The wire format: frame header, payloads, the session MAC and the replay
//! window.
//!
//! Every datagram is one frame (all integers big-endian):
//!
//! ```text
//! off len field
//!   0   2 magic 0x6d63 ("mc")
//!   2   1 version (1)
//!   3   1 kind: 1 = data, 2 = request
//!   4   8 session id
//!  12   4 origin id (random per sender / receiver instance)
//!  16   8 sequence number (per origin, 1, 2, 3, ...)
//!  24   2 flags
//!  26   2 payload length L
//!  28   L payload
//! 28+L 16 MAC: BLAKE3 keyed hash (key = session key) of bytes 0..28+L, truncated
//! ```
//!
//! Data payload (one fragment of one block): block index u64, block length
//! u32, fragment offset u32, fragment index u16, fragment count u16, then the
//! fragment's bytes. Request payload: the requester's receive rate u64
//! (bytes/s, 0 = unknown), a count u16, then that many block indices u64.
//!
//! [`decode`] checks, in order: length, magic, version, kind, session id
//! (a mismatch is [`DecodeError::ForeignSession`]) and the MAC (compared in
//! constant time). Only frames whose MAC verified may touch a
//! [`ReplayWindow`], so forged frames cannot poison it.

/// Frame magic ("mc").
pub const MAGIC: u16 = 0x6d63;
/// Wire version.
pub const VERSION: u8 = 1;
/// Length of the frame header.
pub const HEADER_LEN: usize = 28;
/// Length of the MAC that ends every frame.
pub const MAC_LEN: usize = 16;
/// IPv4 (no options) + UDP header bytes on the path.
pub const IP_UDP_OVERHEAD: usize = 28;
/// Default path MTU (Ethernet).
pub const DEFAULT_MTU: usize = 1500;
/// Smallest MTU accepted (IPv4's minimum reassembly size).
pub const MIN_MTU: usize = 576;
/// Largest datagram this crate sends or reads.
pub const MAX_DATAGRAM: usize = 65_507;
/// Length of the data payload's header (before the fragment bytes).
pub const DATA_HEADER_LEN: usize = 20;
/// Length of the request payload's header (before the block indices).
pub const REQUEST_HEADER_LEN: usize = 10;
/// Sequence numbers below the highest seen that are still accepted once.
pub const REPLAY_WINDOW: u64 = 4096;

/// Request flag: every block in this request was asked for before.
pub const FLAG_RETRY: u16 = 1 << 0;
/// Data flag: sent by unicast to one receiver (end game).
pub const FLAG_UNICAST: u16 = 1 << 1;
/// Data flag: streamed by push mode, not asked for.
pub const FLAG_PUSH: u16 = 1 << 2;

/// The 64-bit id of a distribution session (e.g. one fork family).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub u64);

/// The 32-byte secret every frame of a session is authenticated with.
#[derive(Clone)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// A session: its id (on the wire) and its key (never on the wire).
#[derive(Debug, Clone)]
pub struct Session {
    /// The id every frame carries.
    pub id: SessionId,
    /// The MAC key.
    pub key: SessionKey,
}

/// Getting random bytes from the operating system failed.
#[derive(Debug, thiserror::Error)]
#[error("reading random bytes from the operating system failed: {0}")]
pub struct RandomError(#[source] getrandom::Error);

impl Session {
    /// A session with a random id and key.
    pub fn random() -> Result<Session, RandomError> {
        let mut id = [0u8; 8];
        let mut key = [0u8; 32];
        getrandom::fill(&mut id).map_err(RandomError)?;
        getrandom::fill(&mut key).map_err(RandomError)?;
        Ok(Session {
            id: SessionId(u64::from_be_bytes(id)),
            key: SessionKey(key),
        })
    }
}

/// A random nonzero origin id.
pub fn random_origin() -> Result<u32, RandomError> {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).map_err(RandomError)?;
    Ok(u32::from_be_bytes(b).max(1))
}

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One fragment of one block (sender → receivers).
    Data = 1,
    /// A list of wanted blocks (receiver → sender).
    Request = 2,
}

/// The parsed header of a verified frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The payload kind.
    pub kind: Kind,
    /// The session the frame belongs to.
    pub session: SessionId,
    /// The origin's id.
    pub origin: u32,
    /// The origin's sequence number.
    pub seq: u64,
    /// `FLAG_*` bits.
    pub flags: u16,
}

/// Why a datagram was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than a header and a MAC, or the length field disagrees.
    #[error("malformed frame length ({0} bytes)")]
    BadLength(usize),
    /// Not a frame of this protocol or version.
    #[error("not an mcast v{VERSION} frame")]
    NotOurs,
    /// An unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame of another session.
    #[error("frame of foreign session {0:#x}")]
    ForeignSession(u64),
    /// The MAC did not verify (forged or corrupted).
    #[error("bad MAC")]
    BadMac,
    /// The payload is malformed for its kind.
    #[error("malformed payload: {0}")]
    BadPayload(&'static str),
}

fn mac(key: &SessionKey, bytes: &[u8]) -> [u8; MAC_LEN] {
    let h = blake3::keyed_hash(&key.0, bytes);
    let mut out = [0u8; MAC_LEN];
    out.copy_from_slice(&h.as_bytes()[..MAC_LEN]);
    out
}

/// Constant-time equality of two tags.
fn ct_eq(a: &[u8; MAC_LEN], b: &[u8]) -> bool {
    if b.len() != MAC_LEN {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Appends a complete frame (header, `payload`, MAC) to `out` (cleared
/// first). `payload` must be at most `u16::MAX` bytes.
pub fn encode(out: &mut Vec<u8>, session: &Session, h: &Header, payload: &[u8]) {
    debug_assert!(payload.len() <= u16::MAX as usize);
    out.clear();
    out.extend_from_slice(&MAGIC.to_be_bytes());
    out.push(VERSION);
    out.push(h.kind as u8);
    out.extend_from_slice(&session.id.0.to_be_bytes());
    out.extend_from_slice(&h.origin.to_be_bytes());
    out.extend_from_slice(&h.seq.to_be_bytes());
    out.extend_from_slice(&h.flags.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    out.extend_from_slice(payload);
    let tag = mac(&session.key, out);
    out.extend_from_slice(&tag);
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Checks a datagram against `session` and returns its header and payload.
pub fn decode<'a>(session: &Session, dgram: &'a [u8]) -> Result<(Header, &'a [u8]), DecodeError> {
    if dgram.len() < HEADER_LEN + MAC_LEN {
        return Err(DecodeError::BadLength(dgram.len()));
    }
    if be16(dgram, 0) != MAGIC || dgram[2] != VERSION {
        return Err(DecodeError::NotOurs);
    }
    let kind = match dgram[3] {
        1 => Kind::Data,
        2 => Kind::Request,
        k => return Err(DecodeError::UnknownKind(k)),
    };
    let sid = be64(dgram, 4);
    if sid != session.id.0 {
        return Err(DecodeError::ForeignSession(sid));
    }
    let len = be16(dgram, 26) as usize;
    if dgram.len() != HEADER_LEN + len + MAC_LEN {
        return Err(DecodeError::BadLength(dgram.len()));
    }
    let (body, tag) = dgram.split_at(HEADER_LEN + len);
    if !ct_eq(&mac(&session.key, body), tag) {
        return Err(DecodeError::BadMac);
    }
    let h = Header {
        kind,
        session: SessionId(sid),
        origin: be32(dgram, 12),
        seq: be64(dgram, 16),
        flags: be16(dgram, 24),
    };
    Ok((h, &body[HEADER_LEN..]))
}

/// The largest payload a frame may carry on a path with this MTU.
pub fn max_payload(mtu: usize) -> usize {
    mtu.clamp(MIN_MTU, MAX_DATAGRAM + IP_UDP_OVERHEAD) - IP_UDP_OVERHEAD - HEADER_LEN - MAC_LEN
}

/// The largest number of fragment bytes per data frame at this MTU.
pub fn max_fragment(mtu: usize) -> usize {
    max_payload(mtu) - DATA_HEADER_LEN
}

/// The largest number of block indices per request frame at this MTU.
pub fn max_request_blocks(mtu: usize) -> usize {
    ((max_payload(mtu) - REQUEST_HEADER_LEN) / 8).min(u16::MAX as usize)
}

/// One fragment of one block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment<'a> {
    /// The block index.
    pub block: u64,
    /// The whole block's length.
    pub block_len: u32,
    /// Where this fragment starts in the block.
    pub offset: u32,
    /// This fragment's number (0-based).
    pub index: u16,
    /// How many fragments the block has.
    pub count: u16,
    /// The fragment's bytes.
    pub bytes: &'a [u8],
}

impl Fragment<'_> {
    /// Appends the data payload to `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.block.to_be_bytes());
        out.extend_from_slice(&self.block_len.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(self.bytes);
    }

    /// Parses and checks a data payload (offsets and counts consistent).
    pub fn decode(p: &[u8]) -> Result<Fragment<'_>, DecodeError> {
        if p.len() < DATA_HEADER_LEN {
            return Err(DecodeError::BadPayload("data payload too short"));
        }
        let f = Fragment {
            block: be64(p, 0),
            block_len: be32(p, 8),
            offset: be32(p, 12),
            index: be16(p, 16),
            count: be16(p, 18),
            bytes: &p[DATA_HEADER_LEN..],
        };
        let end = u64::from(f.offset) + f.bytes.len() as u64;
        if f.count == 0 || f.index >= f.count {
            return Err(DecodeError::BadPayload("fragment index out of range"));
        }
        if end > u64::from(f.block_len) {
            return Err(DecodeError::BadPayload("fragment beyond block end"));
        }
        if f.bytes.is_empty() && f.block_len != 0 {
            return Err(DecodeError::BadPayload("empty fragment"));
        }
        Ok(f)
    }
}

/// A request: wanted blocks plus the requester's receive rate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The requester's measured receive rate, bytes/s (0 = unknown).
    pub rate: u64,
    /// The wanted blocks.
    pub blocks: Vec<u64>,
}

impl Request {
    /// Appends the request payload to `out` (cleared first).
    pub fn encode(rate: u64, blocks: &[u64], out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&rate.to_be_bytes());
        out.extend_from_slice(&(blocks.len().min(u16::MAX as usize) as u16).to_be_bytes());
        for b in blocks.iter().take(u16::MAX as usize) {
            out.extend_from_slice(&b.to_be_bytes());
        }
    }

    /// Parses a request payload, keeping at most `max_blocks` indices.
    pub fn decode(p: &[u8], max_blocks: usize) -> Result<Request, DecodeError> {
        if p.len() < REQUEST_HEADER_LEN {
            return Err(DecodeError::BadPayload("request payload too short"));
        }
        let rate = be64(p, 0);
        let n = be16(p, 8) as usize;
        if p.len() != REQUEST_HEADER_LEN + 8 * n {
            return Err(DecodeError::BadPayload(
                "request count disagrees with length",
            ));
        }
        let blocks = p[REQUEST_HEADER_LEN..]
            .chunks_exact(8)
            .take(max_blocks)
            .map(|c| be64(c, 0))
            .collect();
        Ok(Request { rate, blocks })
    }
}

/// The highest sequence number seen from one origin and a window of the
/// [`REPLAY_WINDOW`] numbers below it.
#[derive(Debug, Clone)]
pub struct ReplayWindow {
    highest: u64,
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Default for ReplayWindow {
    fn default() -> ReplayWindow {
        ReplayWindow {
            highest: 0,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }
}

impl ReplayWindow {
    /// Records `seq`; false if it was seen before or is older than the
    /// window (a replay). Sequence 0 is never valid.
    pub fn accept(&mut self, seq: u64) -> bool {
        if seq == 0 {
            return false;
        }
        if seq > self.highest {
            let shift = seq - self.highest;
            if shift >= REPLAY_WINDOW {
                self.seen = [0; (REPLAY_WINDOW / 64) as usize];
            } else {
                self.shift_by(shift);
            }
            self.highest = seq;
            self.set(0);
            return true;
        }
        let back = self.highest - seq;
        if back >= REPLAY_WINDOW || self.get(back) {
            return false;
        }
        self.set(back);
        true
    }

    fn shift_by(&mut self, shift: u64) {
        // Bit i = "highest - i seen"; shifting moves every bit up (towards
        // older), whole words first. `shift` < REPLAY_WINDOW.
        let (words, bits) = ((shift / 64) as usize, (shift % 64) as u32);
        let n = self.seen.len();
        for i in (0..n).rev() {
            let lo = i.checked_sub(words).map_or(0, |j| self.seen[j]);
            let below = i.checked_sub(words + 1).map_or(0, |j| self.seen[j]);
            self.seen[i] = if bits == 0 {
                lo
            } else {
                (lo << bits) | (below >> (64 - bits))
            };
        }
    }
    fn get(&self, back: u64) -> bool {
        self.seen[(back / 64) as usize] & (1 << (back % 64)) != 0
    }
    fn set(&mut self, back: u64) {
        self.seen[(back / 64) as usize] |= 1 << (back % 64);
    }
}

/// Why a frame was rejected, for counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Malformed, not ours, or an unknown kind.
    Malformed,
    /// Another session's frame.
    Foreign,
    /// The MAC did not verify.
    Forged,
    /// Already seen or too old.
    Replayed,
}

impl From<&DecodeError> for Rejection {
    fn from(e: &DecodeError) -> Rejection {
        match e {
            DecodeError::ForeignSession(_) => Rejection::Foreign,
            DecodeError::BadMac => Rejection::Forged,
            _ => Rejection::Malformed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: u64, k: u8) -> Session {
        Session {
            id: SessionId(id),
            key: SessionKey([k; 32]),
        }
    }

    fn header(seq: u64) -> Header {
        Header {
            kind: Kind::Data,
            session: SessionId(7),
            origin: 9,
            seq,
            flags: FLAG_PUSH,
        }
    }

    #[test]
    fn roundtrip_and_mtu() {
        let s = session(7, 1);
        let data = vec![0xabu8; max_fragment(DEFAULT_MTU)];
        let mut p = Vec::new();
        Fragment {
            block: 5,
            block_len: 4096,
            offset: 0,
            index: 0,
            count: 3,
            bytes: &data,
        }
        .encode(&mut p);
        let mut f = Vec::new();
        encode(&mut f, &s, &header(3), &p);
        assert_eq!(f.len() + IP_UDP_OVERHEAD, DEFAULT_MTU);
        let (h, payload) = decode(&s, &f).expect("valid frame");
        assert_eq!(h, header(3));
        let frag = Fragment::decode(payload).expect("valid payload");
        assert_eq!((frag.block, frag.count, frag.bytes), (5, 3, &data[..]));
    }

    #[test]
    fn forged_foreign_truncated_rejected() {
        let s = session(7, 1);
        let mut f = Vec::new();
        encode(&mut f, &s, &header(1), b"hello");
        assert_eq!(decode(&session(7, 2), &f), Err(DecodeError::BadMac));
        assert_eq!(
            decode(&session(8, 1), &f),
            Err(DecodeError::ForeignSession(7))
        );
        for i in 0..f.len() {
            let mut g = f.clone();
            g[i] ^= 0x01;
            assert!(decode(&s, &g).is_err(), "bit flip at {i} accepted");
        }
        for n in 0..f.len() {
            assert!(decode(&s, &f[..n]).is_err());
        }
    }

    #[test]
    fn request_roundtrip_and_bounds() {
        let mut p = Vec::new();
        Request::encode(12345, &[1, 2, 3], &mut p);
        let r = Request::decode(&p, 2).expect("valid");
        assert_eq!(r.rate, 12345);
        assert_eq!(r.blocks, vec![1, 2]);
        assert!(Request::decode(&p[..p.len() - 1], 10).is_err());
        assert_eq!(max_request_blocks(DEFAULT_MTU), (1428 - 10) / 8);
    }

    #[test]
    fn fragment_bounds_checked() {
        let mut p = Vec::new();
        let bytes = [1u8; 10];
        let mut f = Fragment {
            block: 1,
            block_len: 15,
            offset: 10,
            index: 1,
            count: 2,
            bytes: &bytes,
        };
        f.encode(&mut p);
        assert!(Fragment::decode(&p).is_err(), "beyond end");
        f.offset = 5;
        f.index = 2;
        f.encode(&mut p);
        assert!(Fragment::decode(&p).is_err(), "index >= count");
        f.index = 1;
        f.encode(&mut p);
        assert!(Fragment::decode(&p).is_ok());
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        assert!(!w.accept(0));
        assert!(w.accept(1));
        assert!(!w.accept(1));
        assert!(w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(w.accept(2));
        assert!(w.accept(5 + REPLAY_WINDOW - 2));
        assert!(w.accept(4), "still inside the window");
        assert!(!w.accept(3), "seen before");
        assert!(w.accept(10_000));
        assert!(!w.accept(10_000 - REPLAY_WINDOW), "older than the window");
        assert!(w.accept(10_000 - REPLAY_WINDOW + 1));
        assert!(w.accept(100_000));
        assert!(!w.accept(10_000));
    }

    #[test]
    fn replay_window_shifts_across_words() {
        let mut w = ReplayWindow::default();
        for seq in [1, 2, 64, 65, 130] {
            assert!(w.accept(seq));
        }
        // Jumps of every size below the window keep what was seen.
        let mut top = 130;
        for jump in [1, 63, 64, 65, 127, 1000] {
            top += jump;
            assert!(w.accept(top));
            for seq in [1, 2, 64, 65, 130] {
                assert!(!w.accept(seq), "seq {seq} after a jump to {top}");
            }
        }
        assert!(w.accept(3), "never seen, still inside");
        assert!(w.accept(132));
    }
}
