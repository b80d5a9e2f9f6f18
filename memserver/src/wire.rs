//! The versioned UDP wire format between clones and the memory server.
//!
//! Every datagram is one [`Frame`]: a fixed 32-byte header, a body whose
//! length is fixed by the message kind, and a 16-byte MAC tag
//! ([`crate::auth`]): the BLAKE3 keyed hash, under the family's secret, of
//! header and body. All integers are little-endian. A datagram whose length
//! differs from its kind's length is rejected (no trailing bytes, no partial
//! bodies). [`Frame::decode`] only parses; [`verify`] (or [`Frame::open`],
//! which does both) checks the tag, and nothing may act on a frame before.
//!
//! Header (32 bytes):
//!
//! | offset | size | field    | meaning                                          |
//! |-------:|-----:|----------|--------------------------------------------------|
//! |      0 |    4 | magic    | `b"FKPG"`                                        |
//! |      4 |    1 | version  | [`VERSION`] (2)                                  |
//! |      5 |    1 | kind     | see [`Kind`]                                     |
//! |      6 |    2 | flags    | [`FLAG_MULTICAST`], [`FLAG_PUSH`]; others 0      |
//! |      8 |    8 | family   | fork family id (random, see [`crate::auth`])     |
//! |     16 |    8 | client   | requester's random id, echoed in replies         |
//! |     24 |    8 | seq      | requester's sequence number (from 1), echoed     |
//!
//! Bodies (offsets relative to the end of the header), then the tag:
//!
//! | kind | name         | body                                                         | datagram |
//! |-----:|--------------|--------------------------------------------------------------|---------:|
//! |    1 | PageRequest  | `first_page u64`, `count u32`, `reserved [u8; 8]` (0)         |       68 |
//! |    2 | PageReply    | `page u64`, `data [u8; 4096]`                                |     4152 |
//! |    3 | ErrorReply   | `code u16`, `reserved u16` (0), `page u64`, `detail u64`     |       68 |
//! |    4 | InfoRequest  | `reserved [u8; 20]` (0)                                      |       68 |
//! |    5 | InfoReply    | `pages u64`, `max_window u32`                                |       60 |
//!
//! The reserved bytes pad every request to the size of the largest non-page
//! reply: no answer but a page reply is larger than its request, and page
//! replies go only to authenticated, fresh requests ([`crate::server`]).
//! Decoders ignore reserved bytes (the tag covers them).
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
//! Version 1 (a 20-byte header, no tag) is not spoken any more: its requests
//! are unauthenticated and a 32-byte one could ask for 64 pages.
//!
//! The protocol is unreliable by design: a requester that misses replies
//! asks again after a timeout. One page per reply datagram (4152 bytes) is
//! fine on loopback and veth; on a 1500-byte MTU it is IP-fragmented.

use crate::auth::{FamilyKey, TAG_LEN};
use crate::PAGE_SIZE;

/// First four bytes of every datagram.
pub const MAGIC: [u8; 4] = *b"FKPG";
/// Wire format version spoken by this crate.
pub const VERSION: u8 = 2;
/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
/// Largest datagram of this version (a [`Body::PageReply`]).
pub const MAX_DATAGRAM: usize = HEADER_LEN + 8 + PAGE_SIZE + TAG_LEN;

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

    /// Exact datagram length of this kind (header, body and tag).
    pub const fn datagram_len(self) -> usize {
        HEADER_LEN
            + TAG_LEN
            + match self {
                Kind::PageRequest => 20,
                Kind::PageReply => 8 + PAGE_SIZE,
                Kind::ErrorReply => 20,
                Kind::InfoRequest => 20,
                Kind::InfoReply => 12,
            }
    }

    /// Whether clients send this kind (the server answers only these).
    pub const fn is_request(self) -> bool {
        matches!(self, Kind::PageRequest | Kind::InfoRequest)
    }
}

/// Why a request was refused (`ErrorReply.code`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    /// The family is no longer served (sent for recently removed families,
    /// whose key the server still holds; unknown ones get no answer).
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

/// A decoding or verification failure. Decoding never panics.
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
    #[error("the datagram's MAC does not verify under family {family}'s key")]
    BadMac { family: u64 },
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

/// One datagram: header fields plus a body (the tag is computed on encode
/// and checked by [`verify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub flags: u16,
    pub family: u64,
    /// The requester's id (requests) or the id of the requester answered.
    pub client: u64,
    /// The requester's sequence number, echoed in its replies.
    pub seq: u64,
    pub body: Body<'a>,
}

impl<'a> Frame<'a> {
    /// A frame with no flags set.
    pub fn new(family: u64, client: u64, seq: u64, body: Body<'a>) -> Frame<'a> {
        Frame {
            flags: 0,
            family,
            client,
            seq,
            body,
        }
    }

    /// Length of the encoded datagram.
    pub fn encoded_len(&self) -> usize {
        self.body.kind().datagram_len()
    }

    /// Encodes into `buf`, tagged under `key`, and returns the datagram
    /// length. (`key` is normally the key of `self.family`; tests forge.)
    pub fn encode_into(&self, key: &FamilyKey, buf: &mut [u8; MAX_DATAGRAM]) -> usize {
        let kind = self.body.kind();
        let len = kind.datagram_len();
        buf[..len].fill(0);
        buf[0..4].copy_from_slice(&MAGIC);
        buf[4] = VERSION;
        buf[5] = kind as u8;
        buf[6..8].copy_from_slice(&self.flags.to_le_bytes());
        buf[8..16].copy_from_slice(&self.family.to_le_bytes());
        buf[16..24].copy_from_slice(&self.client.to_le_bytes());
        buf[24..32].copy_from_slice(&self.seq.to_le_bytes());
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
                b[4..12].copy_from_slice(&page.to_le_bytes());
                b[12..20].copy_from_slice(&detail.to_le_bytes());
            }
            Body::InfoRequest => {}
            Body::InfoReply { pages, max_window } => {
                b[0..8].copy_from_slice(&pages.to_le_bytes());
                b[8..12].copy_from_slice(&max_window.to_le_bytes());
            }
        }
        let tag = key.tag(&buf[..len - TAG_LEN]);
        buf[len - TAG_LEN..len].copy_from_slice(&tag);
        len
    }

    /// Encodes into a fresh vector (convenience for tests and tools).
    pub fn encode(&self, key: &FamilyKey) -> Vec<u8> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = self.encode_into(key, &mut buf);
        buf[..n].to_vec()
    }

    /// Decodes and verifies one datagram under `key`.
    pub fn open(dgram: &'a [u8], key: &FamilyKey) -> Result<Frame<'a>, WireError> {
        let frame = Frame::decode(dgram)?;
        verify(dgram, key)?;
        Ok(frame)
    }

    /// Parses one datagram **without checking its tag** (the family id
    /// tells which key to [`verify`] it with). Page data is borrowed.
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
        let client = le_u64(&h[16..24]);
        let seq = le_u64(&h[24..32]);
        let b = &dgram[HEADER_LEN..expected - TAG_LEN];
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
            client,
            seq,
            body,
        })
    }
}

/// Checks the tag of a datagram that [`Frame::decode`] accepted.
pub fn verify(dgram: &[u8], key: &FamilyKey) -> Result<(), WireError> {
    let bad = WireError::BadMac { family: key.id() };
    let Some(split) = dgram.len().checked_sub(TAG_LEN) else {
        return Err(bad);
    };
    let (data, tag) = dgram.split_at(split);
    if key.verify(data, tag) {
        Ok(())
    } else {
        Err(bad)
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
    use crate::auth::SECRET_LEN;

    fn key() -> FamilyKey {
        FamilyKey::from_parts(7, [0x42; SECRET_LEN])
    }

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
        let request = Body::PageRequest {
            first_page: 3,
            count: 1,
        };
        let mut v = vec![
            Frame::new(7, 11, 1, request),
            Frame::new(
                u64::MAX,
                u64::MAX,
                u64::MAX,
                Body::PageRequest {
                    first_page: u64::MAX,
                    count: u32::MAX,
                },
            ),
            Frame::new(9, 1, 42, Body::PageReply { page: 12345, data }),
            Frame::new(1, 2, 2, Body::InfoRequest),
            Frame::new(
                1,
                2,
                3,
                Body::InfoReply {
                    pages: 1 << 40,
                    max_window: 64,
                },
            ),
            Frame {
                flags: FLAG_MULTICAST | FLAG_PUSH,
                ..Frame::new(5, 6, 6, Body::PageReply { page: 0, data })
            },
        ];
        for (i, code) in codes.into_iter().enumerate() {
            v.push(Frame::new(
                3,
                4,
                i as u64,
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
    fn round_trips_and_verifies() {
        let data = page(5);
        for f in samples(&data) {
            let bytes = f.encode(&key());
            assert_eq!(bytes.len(), f.encoded_len());
            assert_eq!(Frame::decode(&bytes), Ok(f));
            assert_eq!(Frame::open(&bytes, &key()), Ok(f));
        }
    }

    #[test]
    fn any_flipped_bit_or_other_key_fails_verification() {
        let data = page(9);
        let other = FamilyKey::from_parts(7, [0x43; SECRET_LEN]);
        for f in samples(&data) {
            let bytes = f.encode(&key());
            assert_eq!(
                Frame::open(&bytes, &other),
                Err(WireError::BadMac { family: 7 })
            );
            // Every byte of a short datagram, a sample of a long one.
            let step = if bytes.len() > 100 { 97 } else { 1 };
            for at in (0..bytes.len()).step_by(step) {
                let mut b = bytes.clone();
                b[at] ^= 0x10;
                assert!(Frame::open(&b, &key()).is_err(), "{f:?} byte {at}");
            }
        }
    }

    #[test]
    fn no_answer_but_a_page_is_larger_than_a_request() {
        let smallest_request = Kind::PageRequest
            .datagram_len()
            .min(Kind::InfoRequest.datagram_len());
        for k in [Kind::ErrorReply, Kind::InfoReply] {
            assert!(k.datagram_len() <= smallest_request, "{k:?}");
        }
    }

    #[test]
    fn layout_is_little_endian_and_documented() {
        let f = Frame::new(
            0x0102_0304_0506_0708,
            0x1112_1314_1516_1718,
            0x2122_2324_2526_2728,
            Body::PageRequest {
                first_page: 0x1122_3344_5566_7788,
                count: 0x99aa_bbcc,
            },
        );
        let b = f.encode(&key());
        assert_eq!(&b[0..4], b"FKPG");
        assert_eq!(b[4], 2);
        assert_eq!(b[5], 1);
        assert_eq!(&b[6..8], &[0, 0]);
        assert_eq!(&b[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(
            &b[16..24],
            &[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]
        );
        assert_eq!(
            &b[24..32],
            &[0x28, 0x27, 0x26, 0x25, 0x24, 0x23, 0x22, 0x21]
        );
        assert_eq!(
            &b[32..40],
            &[0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        );
        assert_eq!(&b[40..44], &[0xcc, 0xbb, 0xaa, 0x99]);
        assert_eq!(&b[44..52], &[0; 8]);
        assert_eq!(&b[52..], &key().tag(&b[..52]));
        assert_eq!(Kind::PageReply.datagram_len(), MAX_DATAGRAM);
        assert_eq!(MAX_DATAGRAM, 4152);
        assert_eq!(Kind::PageRequest.datagram_len(), 68);
        assert_eq!(Kind::ErrorReply.datagram_len(), 68);
        assert_eq!(Kind::InfoRequest.datagram_len(), 68);
        assert_eq!(Kind::InfoReply.datagram_len(), 60);
    }

    #[test]
    fn typed_errors() {
        let good = Frame::new(1, 1, 1, Body::InfoRequest).encode(&key());
        assert_eq!(Frame::decode(&good[..5]), Err(WireError::ShortHeader(5)));
        let mut b = good.clone();
        b[0] = b'X';
        assert!(matches!(Frame::decode(&b), Err(WireError::BadMagic(_))));
        let mut b = good.clone();
        b[4] = 1;
        assert_eq!(Frame::decode(&b), Err(WireError::UnsupportedVersion(1)));
        let mut b = good.clone();
        b[5] = 6;
        assert_eq!(Frame::decode(&b), Err(WireError::UnknownKind(6)));
        let mut b = good.clone();
        b.push(0);
        assert_eq!(
            Frame::decode(&b),
            Err(WireError::BadLength {
                kind: Kind::InfoRequest,
                expected: 68,
                got: 69
            })
        );
        let mut e = Frame::new(
            1,
            1,
            1,
            Body::ErrorReply {
                code: ErrorCode::Internal,
                page: 0,
                detail: 0,
            },
        )
        .encode(&key());
        e[HEADER_LEN] = 99;
        assert_eq!(Frame::decode(&e), Err(WireError::UnknownErrorCode(99)));
        assert_eq!(
            verify(&[0; 3], &key()),
            Err(WireError::BadMac { family: 7 })
        );
    }

    #[test]
    fn truncations_and_extensions_never_decode() {
        let data = page(1);
        for f in samples(&data) {
            let bytes = f.encode(&key());
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
            let _ = Frame::open(&buf[..len], &key());
        }
        // Every kind byte, with valid lengths, decodes or errors cleanly.
        for kind in 0..=255u8 {
            for len in [HEADER_LEN, 60, 68, MAX_DATAGRAM] {
                let mut b = vec![0xffu8; len];
                b[0..4].copy_from_slice(&MAGIC);
                b[4] = VERSION;
                b[5] = kind;
                let _ = Frame::decode(&b);
                let _ = Frame::open(&b, &key());
            }
        }
    }
}
