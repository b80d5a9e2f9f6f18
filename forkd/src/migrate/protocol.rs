//! The migration wire protocol: typed messages in frames over one TCP
//! connection.
//!
//! A frame is a 16-byte header, the payload, and a CRC-32 of header and
//! payload (little endian throughout):
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `FKMG` |
//! | 4..6 | protocol version ([`VERSION`]) |
//! | 6..8 | message type ([`Message::kind`]) |
//! | 8..12 | payload length (at most [`MAX_PAYLOAD`]) |
//! | 12..16 | reserved, zero |
//! | 16.. | payload |
//! | end-4.. | CRC-32 of everything before it |
//!
//! Payloads: `Pages` is binary (first page u64, count u32, then the pages),
//! `Zeros` is (first u64, count u32); the others are bincode with a size
//! limit. Every decode failure is a [`ProtocolError`], never a panic.

use crate::vmm::dirty::PAGE_SIZE;
use bincode::Options;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};

pub const MAGIC: [u8; 4] = *b"FKMG";
pub const VERSION: u16 = 3;
pub const HEADER_LEN: usize = 16;
/// Pages in one `Pages` message (1 MiB).
pub const MAX_PAGES_PER_MESSAGE: u64 = 256;
/// Largest payload: a full `Pages` message, or a VM state (tens of KiB).
pub const MAX_PAYLOAD: u32 = 12 + (MAX_PAGES_PER_MESSAGE * PAGE_SIZE) as u32;
/// Longest string a peer may send (names, reasons).
pub const MAX_TEXT: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection: {0}")]
    Io(io::Error),
    #[error("timed out: the connection made no progress within the I/O timeout")]
    TimedOut,
    #[error("the peer closed the connection")]
    Closed,
    #[error("bad magic {0:02x?}: not a forkd migration stream")]
    BadMagic([u8; 4]),
    #[error("protocol version {found}; this forkd speaks version {VERSION}")]
    WrongVersion { found: u16 },
    #[error("unknown message type {0}")]
    UnknownType(u16),
    #[error("message of {0} bytes is larger than the bound of {MAX_PAYLOAD}")]
    TooLarge(u32),
    #[error("message damaged: checksum {actual:#010x}, frame says {expected:#010x}")]
    Checksum { expected: u32, actual: u32 },
    #[error("malformed {kind} message: {why}")]
    Malformed { kind: &'static str, why: String },
    #[error("message cannot be encoded: {0}")]
    Encode(String),
}

/// The source's first message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The one-time secret the destination handed out for this migration.
    pub secret: [u8; 32],
    pub mem_bytes: u64,
    pub vcpus: u8,
    pub irqchip: bool,
    /// The source's VM id and host, for the destination's logs.
    pub source: String,
}

/// Post-copy (source, before `State`): the guest resumes on the
/// destination before all of its memory has arrived; the pages of
/// `needed` fault in from the source's memory server (family `family`,
/// secret `secret`, the key of [`memserver::FamilyKey`]) and are fetched in
/// the background. Pages neither in `needed` nor sent are zero.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostcopyOffer {
    pub server: std::net::SocketAddr,
    pub family: u64,
    pub secret: [u8; 32],
    /// Bitmap of the pages the destination must fetch (bit i of word w =
    /// page 64w + i), one bit per guest page.
    pub needed: Vec<u64>,
}

/// One message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Hello(Hello),
    /// Destination: memory is ready, send.
    Welcome,
    /// `count` pages from page `first`; `data` holds exactly their bytes.
    Pages {
        first: u64,
        count: u32,
        data: Vec<u8>,
    },
    /// `count` pages from page `first` are zero now.
    Zeros {
        first: u64,
        count: u32,
    },
    /// End of a pre-copy round.
    RoundEnd {
        round: u32,
        pages: u64,
    },
    /// Destination: every page of round `round` is written here. The
    /// source waits for it before deciding, so that the guest is never
    /// paused behind pages still in flight (they would be downtime).
    RoundAck {
        round: u32,
    },
    /// The console lines the guest printed so far (the newest, at most
    /// [`MAX_CONSOLE_BYTES`] of them), so its history moves with it.
    Console(Vec<String>),
    /// The VM's whole state but memory: bincode of `vmm::persist::VmState`.
    State(Vec<u8>),
    /// Destination: the VM is built and waits for commit.
    Ready,
    /// Source: resume on your side; this host will never run the guest again.
    Commit,
    /// Destination: the guest runs here now, as VM `vm`.
    Committed {
        vm: String,
    },
    /// Either side: the migration is over, nothing was committed.
    Abort {
        reason: String,
    },
    /// Source, in post-copy: where the rest of memory comes from.
    Postcopy(PostcopyOffer),
    /// Destination, in post-copy after commit, every few hundred ms: pages
    /// of the needed set still missing.
    PostcopyProgress {
        left: u64,
    },
    /// Destination: every needed page is here; the source may let go.
    PostcopyDone {
        faulted: u64,
        prefetched: u64,
    },
    /// Destination: the rest of memory cannot be fetched (the guest there
    /// has failed).
    PostcopyFailed {
        reason: String,
    },
}

const T_HELLO: u16 = 1;
const T_WELCOME: u16 = 2;
const T_PAGES: u16 = 3;
const T_ZEROS: u16 = 4;
const T_ROUND_END: u16 = 5;
const T_STATE: u16 = 6;
const T_READY: u16 = 7;
const T_COMMIT: u16 = 8;
const T_COMMITTED: u16 = 9;
const T_ABORT: u16 = 10;
const T_CONSOLE: u16 = 11;
const T_POSTCOPY: u16 = 12;
const T_POSTCOPY_PROGRESS: u16 = 13;
const T_POSTCOPY_DONE: u16 = 14;
const T_POSTCOPY_FAILED: u16 = 15;
const T_ROUND_ACK: u16 = 16;
/// Largest needed-set bitmap: 32 GiB of guest memory.
const MAX_NEEDED_WORDS: usize = (32 << 30) / 4096 / 64;
/// Console history carried at most.
pub const MAX_CONSOLE_BYTES: usize = 256 << 10;

impl From<io::Error> for ProtocolError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ProtocolError::TimedOut,
            _ => ProtocolError::Io(e),
        }
    }
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_PAYLOAD as u64)
}

fn malformed(kind: &'static str, why: impl Into<String>) -> ProtocolError {
    ProtocolError::Malformed {
        kind,
        why: why.into(),
    }
}

fn de<T: serde::de::DeserializeOwned>(kind: &'static str, p: &[u8]) -> Result<T, ProtocolError> {
    codec()
        .deserialize(p)
        .map_err(|e| malformed(kind, e.to_string()))
}

fn ser<T: Serialize>(v: &T) -> Result<Vec<u8>, ProtocolError> {
    codec()
        .serialize(v)
        .map_err(|e| ProtocolError::Encode(e.to_string()))
}

fn range_payload(first: u64, count: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&first.to_le_bytes());
    p.extend_from_slice(&count.to_le_bytes());
    p
}

fn parse_range(kind: &'static str, p: &[u8]) -> Result<(u64, u32), ProtocolError> {
    if p.len() < 12 {
        return Err(malformed(kind, format!("{} bytes, need 12", p.len())));
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&p[..8]);
    let mut count = [0u8; 4];
    count.copy_from_slice(&p[8..12]);
    let (first, count) = (u64::from_le_bytes(first), u32::from_le_bytes(count));
    if count == 0 || count as u64 > MAX_PAGES_PER_MESSAGE {
        return Err(malformed(
            kind,
            format!("{count} pages; 1..={MAX_PAGES_PER_MESSAGE} allowed"),
        ));
    }
    Ok((first, count))
}

impl Message {
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Welcome => "Welcome",
            Message::Pages { .. } => "Pages",
            Message::Zeros { .. } => "Zeros",
            Message::RoundEnd { .. } => "RoundEnd",
            Message::RoundAck { .. } => "RoundAck",
            Message::Console(_) => "Console",
            Message::State(_) => "State",
            Message::Ready => "Ready",
            Message::Commit => "Commit",
            Message::Committed { .. } => "Committed",
            Message::Abort { .. } => "Abort",
            Message::Postcopy(_) => "Postcopy",
            Message::PostcopyProgress { .. } => "PostcopyProgress",
            Message::PostcopyDone { .. } => "PostcopyDone",
            Message::PostcopyFailed { .. } => "PostcopyFailed",
        }
    }

    fn encode_payload(&self) -> Result<(u16, Vec<u8>), ProtocolError> {
        Ok(match self {
            Message::Hello(h) => (T_HELLO, ser(h)?),
            Message::Welcome => (T_WELCOME, Vec::new()),
            Message::Pages { first, count, data } => {
                if data.len() as u64 != *count as u64 * PAGE_SIZE {
                    return Err(ProtocolError::Encode(format!(
                        "{count} pages but {} bytes",
                        data.len()
                    )));
                }
                let mut p = range_payload(*first, *count);
                p.extend_from_slice(data);
                (T_PAGES, p)
            }
            Message::Zeros { first, count } => (T_ZEROS, range_payload(*first, *count)),
            Message::RoundEnd { round, pages } => (T_ROUND_END, ser(&(round, pages))?),
            Message::RoundAck { round } => (T_ROUND_ACK, ser(round)?),
            Message::Console(lines) => (T_CONSOLE, ser(lines)?),
            Message::State(s) => (T_STATE, s.clone()),
            Message::Ready => (T_READY, Vec::new()),
            Message::Commit => (T_COMMIT, Vec::new()),
            Message::Committed { vm } => (T_COMMITTED, ser(vm)?),
            Message::Abort { reason } => (T_ABORT, ser(reason)?),
            Message::Postcopy(o) => (T_POSTCOPY, ser(o)?),
            Message::PostcopyProgress { left } => (T_POSTCOPY_PROGRESS, ser(left)?),
            Message::PostcopyDone {
                faulted,
                prefetched,
            } => (T_POSTCOPY_DONE, ser(&(faulted, prefetched))?),
            Message::PostcopyFailed { reason } => (T_POSTCOPY_FAILED, ser(reason)?),
        })
    }

    /// The whole frame.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        let (kind, payload) = self.encode_payload()?;
        let len = u32::try_from(payload.len()).map_err(|_| ProtocolError::TooLarge(u32::MAX))?;
        if len > MAX_PAYLOAD {
            return Err(ProtocolError::TooLarge(len));
        }
        let mut f = Vec::with_capacity(HEADER_LEN + payload.len() + 4);
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&VERSION.to_le_bytes());
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&len.to_le_bytes());
        f.extend_from_slice(&[0u8; 4]);
        f.extend_from_slice(&payload);
        let crc = crc32fast::hash(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        Ok(f)
    }

    fn decode_payload(kind: u16, p: Vec<u8>) -> Result<Message, ProtocolError> {
        let empty = |m: Message, name: &'static str| {
            if p.is_empty() {
                Ok(m)
            } else {
                Err(malformed(name, "carries a payload"))
            }
        };
        match kind {
            T_HELLO => {
                let h: Hello = de("Hello", &p)?;
                if h.source.len() > MAX_TEXT {
                    return Err(malformed("Hello", "source name too long"));
                }
                Ok(Message::Hello(h))
            }
            T_WELCOME => empty(Message::Welcome, "Welcome"),
            T_PAGES => {
                let (first, count) = parse_range("Pages", &p)?;
                if (p.len() - 12) as u64 != count as u64 * PAGE_SIZE {
                    return Err(malformed(
                        "Pages",
                        format!("{count} pages but {} bytes of data", p.len() - 12),
                    ));
                }
                let mut data = p;
                data.drain(..12);
                Ok(Message::Pages { first, count, data })
            }
            T_ZEROS => {
                if p.len() != 12 {
                    return Err(malformed("Zeros", format!("{} bytes, need 12", p.len())));
                }
                let (first, count) = parse_range("Zeros", &p)?;
                Ok(Message::Zeros { first, count })
            }
            T_ROUND_END => {
                let (round, pages) = de("RoundEnd", &p)?;
                Ok(Message::RoundEnd { round, pages })
            }
            T_CONSOLE => {
                let lines: Vec<String> = de("Console", &p)?;
                if lines.iter().map(|l| l.len() + 1).sum::<usize>() > MAX_CONSOLE_BYTES {
                    return Err(malformed("Console", "more than the console bound"));
                }
                Ok(Message::Console(lines))
            }
            T_STATE => Ok(Message::State(p)),
            T_READY => empty(Message::Ready, "Ready"),
            T_COMMIT => empty(Message::Commit, "Commit"),
            T_COMMITTED => {
                let vm: String = de("Committed", &p)?;
                if vm.len() > MAX_TEXT {
                    return Err(malformed("Committed", "VM id too long"));
                }
                Ok(Message::Committed { vm })
            }
            T_ABORT => {
                let mut reason: String = de("Abort", &p)?;
                reason.truncate(MAX_TEXT);
                Ok(Message::Abort { reason })
            }
            T_ROUND_ACK => Ok(Message::RoundAck {
                round: de("RoundAck", &p)?,
            }),
            T_POSTCOPY => {
                let o: PostcopyOffer = de("Postcopy", &p)?;
                if o.needed.is_empty() || o.needed.len() > MAX_NEEDED_WORDS {
                    return Err(malformed(
                        "Postcopy",
                        format!("a needed set of {} words", o.needed.len()),
                    ));
                }
                Ok(Message::Postcopy(o))
            }
            T_POSTCOPY_PROGRESS => Ok(Message::PostcopyProgress {
                left: de("PostcopyProgress", &p)?,
            }),
            T_POSTCOPY_DONE => {
                let (faulted, prefetched) = de("PostcopyDone", &p)?;
                Ok(Message::PostcopyDone {
                    faulted,
                    prefetched,
                })
            }
            T_POSTCOPY_FAILED => {
                let mut reason: String = de("PostcopyFailed", &p)?;
                reason.truncate(MAX_TEXT);
                Ok(Message::PostcopyFailed { reason })
            }
            other => Err(ProtocolError::UnknownType(other)),
        }
    }
}

/// Fills `buf`; the stream ending before any byte of a frame is `Closed`,
/// inside one it is a truncated message.
fn read_full(r: &mut impl Read, buf: &mut [u8], at_start: bool) -> Result<(), ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_start => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Malformed {
                    kind: "frame",
                    why: "truncated: the connection ended inside a message".into(),
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads one frame: header checked before the payload is read (so a bad
/// length never allocates), checksum checked before it is decoded.
pub fn read_message(r: &mut impl Read) -> Result<Message, ProtocolError> {
    let mut h = [0u8; HEADER_LEN];
    read_full(r, &mut h, true)?;
    let magic = [h[0], h[1], h[2], h[3]];
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if version != VERSION {
        return Err(ProtocolError::WrongVersion { found: version });
    }
    let kind = u16::from_le_bytes([h[6], h[7]]);
    if !(T_HELLO..=T_ROUND_ACK).contains(&kind) {
        return Err(ProtocolError::UnknownType(kind));
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if len > MAX_PAYLOAD {
        return Err(ProtocolError::TooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    read_full(r, &mut payload, false)?;
    let mut crc = [0u8; 4];
    read_full(r, &mut crc, false)?;
    let expected = u32::from_le_bytes(crc);
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h);
    hasher.update(&payload);
    let actual = hasher.finalize();
    if actual != expected {
        return Err(ProtocolError::Checksum { expected, actual });
    }
    Message::decode_payload(kind, payload)
}

/// Writes a `Pages` frame straight from `data` (no intermediate copy):
/// the same bytes as `Message::Pages { .. }.encode()`.
pub fn write_pages(
    w: &mut impl Write,
    first: u64,
    count: u32,
    data: &[u8],
) -> Result<usize, ProtocolError> {
    if count == 0
        || count as u64 > MAX_PAGES_PER_MESSAGE
        || data.len() as u64 != count as u64 * PAGE_SIZE
    {
        return Err(ProtocolError::Encode(format!(
            "{count} pages in {} bytes",
            data.len()
        )));
    }
    let len = 12 + data.len() as u32;
    let mut head = [0u8; HEADER_LEN + 12];
    head[..4].copy_from_slice(&MAGIC);
    head[4..6].copy_from_slice(&VERSION.to_le_bytes());
    head[6..8].copy_from_slice(&T_PAGES.to_le_bytes());
    head[8..12].copy_from_slice(&len.to_le_bytes());
    head[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&first.to_le_bytes());
    head[HEADER_LEN + 8..].copy_from_slice(&count.to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(data);
    w.write_all(&head)?;
    w.write_all(data)?;
    w.write_all(&h.finalize().to_le_bytes())?;
    Ok(head.len() + data.len() + 4)
}

pub fn write_message(w: &mut impl Write, m: &Message) -> Result<usize, ProtocolError> {
    let f = m.encode()?;
    w.write_all(&f)?;
    Ok(f.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message) {
        let f = m.encode().unwrap();
        let back = read_message(&mut &f[..]).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(Message::Hello(Hello {
            secret: [7; 32],
            mem_bytes: 512 << 20,
            vcpus: 1,
            irqchip: false,
            source: "h1/vm-1".into(),
        }));
        round_trip(Message::Welcome);
        round_trip(Message::Pages {
            first: 9,
            count: 2,
            data: vec![3; 8192],
        });
        round_trip(Message::Zeros { first: 1, count: 5 });
        round_trip(Message::RoundEnd { round: 3, pages: 7 });
        round_trip(Message::RoundAck { round: 3 });
        round_trip(Message::State(vec![1, 2, 3]));
        round_trip(Message::Console(vec!["zone: a".into(), "b".into()]));
        round_trip(Message::Ready);
        round_trip(Message::Commit);
        round_trip(Message::Committed { vm: "vm-4".into() });
        round_trip(Message::Abort {
            reason: "no".into(),
        });
        round_trip(Message::Postcopy(PostcopyOffer {
            server: "10.0.0.1:7000".parse().unwrap(),
            family: 77,
            secret: [4; 32],
            needed: vec![0b1011, 0, u64::MAX],
        }));
        round_trip(Message::PostcopyProgress { left: 12 });
        round_trip(Message::PostcopyDone {
            faulted: 3,
            prefetched: 9,
        });
        round_trip(Message::PostcopyFailed {
            reason: "gone".into(),
        });
    }

    #[test]
    fn write_pages_is_a_pages_frame() {
        let data = vec![5u8; 3 * 4096];
        let mut out = Vec::new();
        let n = write_pages(&mut out, 11, 3, &data).unwrap();
        assert_eq!(n, out.len());
        let m = Message::Pages {
            first: 11,
            count: 3,
            data,
        };
        assert_eq!(out, m.encode().unwrap());
        assert!(write_pages(&mut out, 0, 2, &[0; 4096]).is_err());
        assert!(write_pages(&mut out, 0, 0, &[]).is_err());
    }

    #[test]
    fn bad_frames_are_typed_errors() {
        let good = Message::Zeros { first: 1, count: 5 }.encode().unwrap();
        // Empty stream: closed.
        assert!(matches!(
            read_message(&mut &[][..]),
            Err(ProtocolError::Closed)
        ));
        // Garbage.
        assert!(matches!(
            read_message(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]),
            Err(ProtocolError::BadMagic(_))
        ));
        // Wrong version.
        let mut f = good.clone();
        f[4] = 9;
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(ProtocolError::WrongVersion { found: 9 })
        ));
        // Unknown type.
        let mut f = good.clone();
        f[6] = 77;
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(ProtocolError::UnknownType(77))
        ));
        // Absurd length: refused before reading.
        let mut f = good.clone();
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(ProtocolError::TooLarge(_))
        ));
        // Truncated at every length.
        for cut in 1..good.len() {
            let e = read_message(&mut &good[..cut]).unwrap_err();
            assert!(
                matches!(e, ProtocolError::Malformed { .. }),
                "cut {cut}: {e}"
            );
        }
        // A flipped payload bit.
        let mut f = good.clone();
        f[HEADER_LEN] ^= 1;
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(ProtocolError::Checksum { .. })
        ));
        // A Pages message whose count disagrees with its data (checksum
        // recomputed, so only the content is wrong).
        let mut f = Message::Pages {
            first: 0,
            count: 1,
            data: vec![0; 4096],
        }
        .encode()
        .unwrap();
        f[HEADER_LEN + 8] = 2;
        let n = f.len() - 4;
        let crc = crc32fast::hash(&f[..n]);
        f[n..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            read_message(&mut &f[..]),
            Err(ProtocolError::Malformed { kind: "Pages", .. })
        ));
        // Random garbage after a valid header never panics.
        let mut seed = 0x1234_5678u64;
        for _ in 0..200 {
            let mut f = good.clone();
            for b in f[HEADER_LEN..].iter_mut() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                *b = (seed >> 33) as u8;
            }
            assert!(read_message(&mut &f[..]).is_err());
        }
    }
}
