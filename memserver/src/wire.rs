//! The versioned UDP wire format between clones and the memory server.
//!
//! Every datagram is one [`Frame`]: a fixed 20-byte header followed by a
//! body whose length is fixed by the message kind. All integers are
//! little-endian. A datagram whose length differs from its kind's length is
//! rejected (no trailing bytes, no partial bodies).
//!
//! Header (20 bytes):
//!
//! | offset | size | field    | meaning                                      |
//! |-------:|-----:|----------|----------------------------------------------|
//! |      0 |    4 | magic    | `b"FKPG"`                                    |
//! |      4 |    1 | version  | [`VERSION`] (1)                              |
//! |      5 |    1 | kind     | see [`Kind`]                                 |
//! |      6 |    2 | flags    | [`FLAG_MULTICAST`], [`FLAG_PUSH`]; others 0  |
//! |      8 |    8 | family   | fork family id                               |
//! |     16 |    4 | req_id   | chosen by the requester, echoed in replies   |
//!
//! Bodies (offsets relative to the end of the header):
//!
//! | kind | name         | body                                                | datagram |
//! |-----:|--------------|-----------------------------------------------------|---------:|
//! |    1 | PageRequest  | `first_page u64`, `count u32`                       |       32 |
//! |    2 | PageReply    | `page u64`, `data [u8; 4096]`                       |     4124 |
//! |    3 | ErrorReply   | `code u16`, `reserved u16` (0), `page u64`, `detail u64` |  40 |
//! |    4 | InfoRequest  | (none)                                              |       20 |
//! |    5 | InfoReply    | `pages u64`, `max_window u32`                       |       32 |
//!
//! `ErrorReply.detail` carries the image size in pages for `OutOfRange` and
//! the server's window limit for `TooLarge`; 0 otherwise.
//!
//! Room for later: kinds 6.. are reserved (a multicast push stream would be
//! a new kind, or a `PageReply` with [`FLAG_PUSH`] sent to a group);
//! [`FLAG_MULTICAST`] marks a reply that went to the family's group rather
//! than to the requester only. Decoders keep the flags as received; this
//! version never sets them.
//!
//! The protocol is unreliable by design: a requester that misses replies
//! asks again after a timeout. One page per reply datagram (4124 bytes) is
//! fine on loopback and veth; on a 1500-byte MTU it is IP-fragmented.

use crate::PAGE_SIZE;

/// First four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"FKPG";
/// Wire format version spoken by this crate.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 20;
/// Largest datagram of this version (a [`Body::PageReply`]).
pub const MAX_DATAGRAM: usize = HEADER_LEN + 8 + PAGE_SIZE;

/// Flag: the reply was sent to the family's multicast group (reserved).
pub const FLAG_MULTICAST: u16 = 1 << 0;
/// Flag: the page was pushed, not requested (reserved).
pub const FLAG_PUSH: u16 = 1 << 1;

/// Message kinds (header byte 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    PageRequest = 1,
    PageReply = 2,
    ErrorReply = 3,
    InfoRequest = 4,
    InfoReply = 5,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::PageRequest,
            2 => Kind::PageReply,
            3 => Kind::ErrorReply,
            4 => Kind::InfoRequest,
            5 => Kind::InfoReply,
            _ => return None,
        })
    }

    /// Exact datagram length of this kind.
    pub const fn datagram_len(self) -> usize {
        HEADER_LEN
            + match self {
                Kind::PageRequest => 12,
                Kind::PageReply => 8 + PAGE_SIZE,
                Kind::ErrorReply => 20,
                Kind::InfoRequest => 0,
                Kind::InfoReply => 12,
            }
    }
}

/// Why a request was refused (`ErrorReply.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// No session for this family on the server.
    UnknownFamily = 1,
    /// The page (range) runs past the image; `detail` = image pages.
    OutOfRange = 2,
    /// More pages than the server serves per request; `detail` = limit.
    TooLarge = 3,
    /// The server's request queue is full; ask again later.
    Overloaded = 4,
    /// The page source failed on the server.
    Internal = 5,
}

impl ErrorCode {
    fn from_u16(v: u16) -> Option<ErrorCode> {
        Some(match v {
            1 => ErrorCode::UnknownFamily,
            2 => ErrorCode::OutOfRange,
            3 => ErrorCode::TooLarge,
            4 => ErrorCode::Overloaded,
            5 => ErrorCode::Internal,
            _ => return None,
        })
    }
}

/// A decoding failure. Decoding never panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("datagram of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    ShortHeader(usize),
    #[error("bad magic {0:02x?} (not a fork page datagram)")]
    BadMagic([u8; 4]),
    #[error("unsupported wire version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("{kind:?} datagram is {got} bytes, expected {expected}")]
    BadLength {
        kind: Kind,
        expected: usize,
        got: usize,
    },
    #[error("unknown error code {0}")]
    UnknownErrorCode(u16),
}

/// A message body; the header fields live in [`Frame`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// Pages `first_page .. first_page + count` (count 1 = a single page).
    PageRequest { first_page: u64, count: u32 },
    /// One page of the image.
    PageReply {
        page: u64,
        data: &'a [u8; PAGE_SIZE],
    },
    /// A refused request; `page` is the page the refusal is about.
    ErrorReply {
        code: ErrorCode,
        page: u64,
        detail: u64,
    },
    /// Asks for the family's image size.
    InfoRequest,
    /// The image has `pages` pages; at most `max_window` per request.
    InfoReply { pages: u64, max_window: u32 },
}

impl Body<'_> {
    pub fn kind(&self) -> Kind {
        match self {
            Body::PageRequest { .. } => Kind::PageRequest,
            Body::PageReply { .. } => Kind::PageReply,
            Body::ErrorReply { .. } => Kind::ErrorReply,
            Body::InfoRequest => Kind::InfoRequest,
            Body::InfoReply { .. } => Kind::InfoReply,
        }
    }
}

/// One datagram: header fields plus a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub flags: u16,
    pub family: u64,
    pub req_id: u32,
    pub body: Body<'a>,
}

impl<'a> Frame<'a> {
    /// A frame with no flags set.
    pub fn new(family: u64, req_id: u32, body: Body<'a>) -> Frame<'a> {
        Frame {
            flags: 0,
            family,
            req_id,
            body,
        }
    }

    /// Length of the encoded datagram.
    pub fn encoded_len(&self) -> usize {
        self.body.kind().datagram_len()
    }

    /// Encodes into `buf` and returns the datagram length.
    pub fn encode_into(&self, buf: &mut [u8; MAX_DATAGRAM]) -> usize {
        let kind = self.body.kind();
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4] = VERSION;
        buf[5] = kind as u8;
        buf[6..8].copy_from_slice(&self.flags.to_le_bytes());
        buf[8..16].copy_from_slice(&self.family.to_le_bytes());
        buf[16..20].copy_from_slice(&self.req_id.to_le_bytes());
        let b = &mut buf[HEADER_LEN..];
        match self.body {
            Body::PageRequest { first_page, count } => {
                b[0..8].copy_from_slice(&first_page.to_le_bytes());
                b[8..12].copy_from_slice(&count.to_le_bytes());
            }
            Body::PageReply { page, data } => {
                b[0..8].copy_from_slice(&page.to_le_bytes());
                b[8..8 + PAGE_SIZE].copy_from_slice(data);
            }
            Body::ErrorReply { code, page, detail } => {
                b[0..2].copy_from_slice(&(code as u16).to_le_bytes());
                b[2..4].copy_from_slice(&0u16.to_le_bytes());
                b[4..12].copy_from_slice(&page.to_le_bytes());
                b[12..20].copy_from_slice(&detail.to_le_bytes());
            }
            Body::InfoRequest => {}
            Body::InfoReply { pages, max_window } => {
                b[0..8].copy_from_slice(&pages.to_le_bytes());
                b[8..12].copy_from_slice(&max_window.to_le_bytes());
            }
        }
        kind.datagram_len()
    }

    /// Encodes into a fresh vector (convenience for tests and tools).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = self.encode_into(&mut buf);
        buf[..n].to_vec()
    }

    /// Decodes one datagram. Page data is borrowed from `dgram`.
    pub fn decode(dgram: &'a [u8]) -> Result<Frame<'a>, WireError> {
        let Some(h) = dgram.first_chunk::<HEADER_LEN>() else {
            return Err(WireError::ShortHeader(dgram.len()));
        };
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        if h[4] != VERSION {
            return Err(WireError::UnsupportedVersion(h[4]));
        }
        let kind = Kind::from_u8(h[5]).ok_or(WireError::UnknownKind(h[5]))?;
        let expected = kind.datagram_len();
        if dgram.len() != expected {
            return Err(WireError::BadLength {
                kind,
                expected,
                got: dgram.len(),
            });
        }
        let flags = u16::from_le_bytes([h[6], h[7]]);
        let family = le_u64(&h[8..16]);
        let req_id = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
        let b = &dgram[HEADER_LEN..];
        let body = match kind {
            Kind::PageRequest => Body::PageRequest {
                first_page: le_u64(&b[0..8]),
                count: le_u32(&b[8..12]),
            },
            Kind::PageReply => {
                let data = b[8..]
                    .first_chunk::<PAGE_SIZE>()
                    .ok_or(WireError::BadLength {
                        kind,
                        expected,
                        got: dgram.len(),
                    })?;
                Body::PageReply {
                    page: le_u64(&b[0..8]),
                    data,
                }
            }
            Kind::ErrorReply => {
                let raw = u16::from_le_bytes([b[0], b[1]]);
                Body::ErrorReply {
                    code: ErrorCode::from_u16(raw).ok_or(WireError::UnknownErrorCode(raw))?,
                    page: le_u64(&b[4..12]),
                    detail: le_u64(&b[12..20]),
                }
            }
            Kind::InfoRequest => Body::InfoRequest,
            Kind::InfoReply => Body::InfoReply {
                pages: le_u64(&b[0..8]),
                max_window: le_u32(&b[8..12]),
            },
        };
        Ok(Frame {
            flags,
            family,
            req_id,
            body,
        })
    }
}

/// Little-endian u64 from an 8-byte slice (callers pass exact slices of a
/// length-checked datagram).
fn le_u64(s: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&s[..8]);
    u64::from_le_bytes(a)
}

fn le_u32(s: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&s[..4]);
    u32::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(seed: u8) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = seed.wrapping_add((i % 251) as u8);
        }
        p
    }

    fn samples(data: &[u8; PAGE_SIZE]) -> Vec<Frame<'_>> {
        let codes = [
            ErrorCode::UnknownFamily,
            ErrorCode::OutOfRange,
            ErrorCode::TooLarge,
            ErrorCode::Overloaded,
            ErrorCode::Internal,
        ];
        let mut v = vec![
            Frame::new(
                7,
                1,
                Body::PageRequest {
                    first_page: 3,
                    count: 1,
                },
            ),
            Frame::new(
                u64::MAX,
                u32::MAX,
                Body::PageRequest {
                    first_page: u64::MAX,
                    count: u32::MAX,
                },
            ),
            Frame::new(9, 42, Body::PageReply { page: 12345, data }),
            Frame::new(1, 2, Body::InfoRequest),
            Frame::new(
                1,
                3,
                Body::InfoReply {
                    pages: 1 << 40,
                    max_window: 64,
                },
            ),
            Frame {
                flags: FLAG_MULTICAST | FLAG_PUSH,
                ..Frame::new(5, 6, Body::PageReply { page: 0, data })
            },
        ];
        for (i, code) in codes.into_iter().enumerate() {
            v.push(Frame::new(
                3,
                i as u32,
                Body::ErrorReply {
                    code,
                    page: 77,
                    detail: 1000 + i as u64,
                },
            ));
        }
        v
    }

    #[test]
    fn round_trips() {
        let data = page(5);
        for f in samples(&data) {
            let bytes = f.encode();
            assert_eq!(bytes.len(), f.encoded_len());
            assert_eq!(Frame::decode(&bytes), Ok(f));
        }
    }

    #[test]
    fn layout_is_little_endian_and_documented() {
        let f = Frame::new(
            0x0102_0304_0506_0708,
            0x0a0b_0c0d,
            Body::PageRequest {
                first_page: 0x1122_3344_5566_7788,
                count: 0x99aa_bbcc,
            },
        );
        let b = f.encode();
        assert_eq!(&b[0..4], b"FKPG");
        assert_eq!(b[4], 1);
        assert_eq!(b[5], 1);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0x0d, 0x0c, 0x0b, 0x0a]);
        assert_eq!(
            &b[20..28],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(&b[28..32], &[0xcc, 0xbb, 0xaa, 0x99]);
        assert_eq!(Kind::PageReply.datagram_len(), MAX_DATAGRAM);
        assert_eq!(MAX_DATAGRAM, 4124);
        assert_eq!(Kind::ErrorReply.datagram_len(), 40);
    }

    #[test]
    fn typed_errors() {
        let good = Frame::new(1, 1, Body::InfoRequest).encode();
        assert_eq!(Frame::decode(&good[..5]), Err(WireError::ShortHeader(5)));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Frame::decode(&b), Err(WireError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 2;
        assert_eq!(Frame::decode(&b), Err(WireError::UnsupportedVersion(2)));
        let mut b = good.clone();
        b[5] = 6;
        assert_eq!(Frame::decode(&b), Err(WireError::UnknownKind(6)));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            Frame::decode(&b),
            Err(WireError::BadLength {
                kind: Kind::InfoRequest,
                expected: 20,
                got: 21
            })
        );
        let mut e = Frame::new(
            1,
            1,
            Body::ErrorReply {
                code: ErrorCode::Internal,
                page: 0,
                detail: 0,
            },
        )
        .encode();
        e[20] = 99;
        assert_eq!(Frame::decode(&e), Err(WireError::UnknownErrorCode(99)));
    }

    #[test]
    fn truncations_and_extensions_never_decode() {
        let data = page(1);
        for f in samples(&data) {
            let bytes = f.encode();
            for n in 0..bytes.len() {
                assert!(Frame::decode(&bytes[..n]).is_err(), "{f:?} cut at {n}");
            }
            let mut long = bytes.clone();
            long.extend_from_slice(&[0; 9]);
            for n in bytes.len() + 1..long.len() {
                assert!(Frame::decode(&long[..n]).is_err());
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        // xorshift64: deterministic pseudo-random garbage of every length
        // up to a page reply, plus garbage behind a valid header.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; MAX_DATAGRAM + 16];
        for round in 0..3000 {
            let len = (next() as usize) % buf.len();
            for b in buf.iter_mut().take(len) {
                *b = next() as u8;
            }
            if round % 2 == 0 && len >= 6 {
                buf[0..4].copy_from_slice(&MAGIC);
                buf[4] = VERSION;
                buf[5] = (next() % 7) as u8;
            }
            let _ = Frame::decode(&buf[..len]);
        }
        // Every kind byte, with valid lengths, decodes or errors cleanly.
        for kind in 0..=255u8 {
            for len in [HEADER_LEN, 32, 40, MAX_DATAGRAM] {
                let mut b = vec![0xffu8; len];
                b[0..4].copy_from_slice(&MAGIC);
                b[4] = VERSION;
                b[5] = kind;
                let _ = Frame::decode(&b);
            }
        }
    }
}
