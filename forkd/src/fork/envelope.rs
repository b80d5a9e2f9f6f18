//! The family envelope: what the parent's host sends each clone host, once
//! per family, so that host can build its share of the clones.
//!
//! Wire format (all integers little-endian):
//!
//! | bytes | what |
//! |---|---|
//! | 8 | magic `FKDFAMv1` |
//! | 2 | format version (2: multicast endpoint and heuristics added) |
//! | 4 | payload length N |
//! | N | payload: bincode of [`EnvelopeBody`] |
//! | 32 | checksum: BLAKE3 of everything before |
//! | 32 | MAC: BLAKE3 keyed with the cluster key over everything before |
//!
//! The cluster key is derived from the cluster's bearer token
//! ([`envelope_key`]), so only daemons holding the token can make or read
//! an envelope's claims. The checksum tells corruption from forgery.

use crate::vmm::kvm::KvmContext;
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr};

const MAGIC: &[u8; 8] = b"FKDFAMv1";
pub const ENVELOPE_VERSION: u16 = 2;
const HEAD: usize = 8 + 2 + 4;
const TAIL: usize = 32 + 32;
/// Largest envelope accepted (a descriptor is ~63 KB; clones are small).
pub const MAX_ENVELOPE: usize = 16 << 20;
/// Most clones one envelope may carry.
pub const MAX_ENVELOPE_CLONES: usize = 1024;
/// Longest host name.
pub const MAX_HOST_NAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("the envelope is {0} bytes; at most {MAX_ENVELOPE} and at least {min} accepted", min = HEAD + TAIL)]
    Size(usize),
    #[error("not a family envelope (bad magic)")]
    Magic,
    #[error("envelope format version {0}; this daemon reads version {ENVELOPE_VERSION}")]
    Version(u16),
    #[error("the envelope's length field ({0}) does not match its size")]
    Length(u32),
    #[error("the envelope's checksum does not match: it was corrupted on the way")]
    Checksum,
    #[error("the envelope's MAC does not verify: it was not made with this cluster's token")]
    Mac,
    #[error("cannot decode the envelope's payload")]
    Decode(#[source] bincode::Error),
    #[error("cannot encode the envelope")]
    Encode(#[source] bincode::Error),
    #[error("the envelope is invalid: {0}")]
    Invalid(&'static str),
    #[error("cannot read this host's CPUID")]
    Kvm(#[source] crate::vmm::kvm::KvmError),
    #[error(
        "CPU mismatch: the parent's host offers CPUID {parent}, this host {here}; a clone could not run here"
    )]
    CpuMismatch { parent: String, here: String },
}

/// One clone the envelope asks for, with the identity leased for it on
/// the parent's host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeClone {
    pub clone_id: u64,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    /// The 128-bit generation id, low word first.
    pub generation: [u64; 2],
}

/// Where the family's pages are multicast (mcdist): the group and data
/// port to join, and the sender's request address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeMulticast {
    pub group: Ipv4Addr,
    pub port: u16,
    pub server: SocketAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeBody {
    /// The family id (the memory server's) and its secret.
    pub family: u64,
    pub secret: [u8; 32],
    /// The parent's host (its daemon's `--name`).
    pub parent_host: String,
    /// The memory server's unicast endpoint.
    pub memserver: SocketAddr,
    /// The family's multicast endpoint (`None`: unicast distribution).
    pub multicast: Option<EnvelopeMulticast>,
    /// The clones zero-fill pages the guest will overwrite (avoidance).
    pub avoidance: bool,
    /// Unicast: the clones prefetch the allocated-at-fork pages (with
    /// multicast the parent's host pushes them instead).
    pub prefetch: bool,
    /// BLAKE3 of the parent host's KVM_GET_SUPPORTED_CPUID entries.
    pub cpu: [u8; 32],
    pub clones: Vec<EnvelopeClone>,
    /// The encoded `ForkDescriptor`.
    pub descriptor: Vec<u8>,
}

/// The key envelopes are MACed with, from the cluster's token.
pub fn envelope_key(token: &[u8]) -> [u8; 32] {
    blake3::derive_key("forkd 2026-12 family envelope v1", token)
}

/// This host's CPU-compatibility fingerprint: BLAKE3 over the entries of
/// KVM_GET_SUPPORTED_CPUID (function, index, flags, eax..edx), without
/// the APIC id of the CPU the calling thread happens to run on (KVM
/// reports it in leaf 1 EBX[31:24] and the x2APIC id in leaves 0xB and
/// 0x1F EDX, and AMD's 0x8000001E EAX), which differs between calls.
pub fn cpu_fingerprint() -> Result<[u8; 32], EnvelopeError> {
    let ctx = KvmContext::get().map_err(EnvelopeError::Kvm)?;
    let mut h = blake3::Hasher::new();
    for e in ctx.cpuid.as_slice() {
        let (mut eax, mut ebx, mut edx) = (e.eax, e.ebx, e.edx);
        match e.function {
            0x1 => ebx &= 0x00ff_ffff,
            0xb | 0x1f => edx = 0,
            0x8000_001e => eax = 0,
            _ => {}
        }
        for w in [e.function, e.index, e.flags, eax, ebx, e.ecx, edx] {
            h.update(&w.to_le_bytes());
        }
    }
    Ok(*h.finalize().as_bytes())
}

fn hex8(b: &[u8; 32]) -> String {
    b[..8].iter().map(|x| format!("{x:02x}")).collect()
}

impl EnvelopeBody {
    /// Seals the body: header, payload, checksum, MAC.
    pub fn seal(&self, key: &[u8; 32]) -> Result<Vec<u8>, EnvelopeError> {
        let payload = bincode::serialize(self).map_err(EnvelopeError::Encode)?;
        let len = u32::try_from(payload.len()).map_err(|_| EnvelopeError::Size(payload.len()))?;
        let mut out = Vec::with_capacity(HEAD + payload.len() + TAIL);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&ENVELOPE_VERSION.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&payload);
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        let mac = blake3::keyed_hash(key, &out);
        out.extend_from_slice(mac.as_bytes());
        if out.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::Size(out.len()));
        }
        Ok(out)
    }

    /// Checks and opens a sealed envelope: size, magic, version, length,
    /// checksum, MAC (constant time), then the payload's own bounds.
    pub fn open(bytes: &[u8], key: &[u8; 32]) -> Result<EnvelopeBody, EnvelopeError> {
        if bytes.len() < HEAD + TAIL || bytes.len() > MAX_ENVELOPE {
            return Err(EnvelopeError::Size(bytes.len()));
        }
        if &bytes[..8] != MAGIC {
            return Err(EnvelopeError::Magic);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != ENVELOPE_VERSION {
            return Err(EnvelopeError::Version(version));
        }
        let len = u32::from_le_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]);
        if HEAD + len as usize + TAIL != bytes.len() {
            return Err(EnvelopeError::Length(len));
        }
        let (body, tail) = bytes.split_at(bytes.len() - TAIL);
        let (sum, mac) = tail.split_at(32);
        if blake3::hash(body).as_bytes() != sum {
            return Err(EnvelopeError::Checksum);
        }
        let signed = &bytes[..bytes.len() - 32];
        let expected = blake3::keyed_hash(key, signed);
        let mut tag = [0u8; 32];
        tag.copy_from_slice(mac);
        // blake3::Hash's equality is constant time.
        if expected != blake3::Hash::from_bytes(tag) {
            return Err(EnvelopeError::Mac);
        }
        let b: EnvelopeBody = bincode::deserialize(&body[HEAD..]).map_err(EnvelopeError::Decode)?;
        if b.clones.is_empty() || b.clones.len() > MAX_ENVELOPE_CLONES {
            return Err(EnvelopeError::Invalid("1..=1024 clones per envelope"));
        }
        if b.clones.iter().any(|c| c.clone_id == 0) {
            return Err(EnvelopeError::Invalid("clone ids start at 1"));
        }
        if b.parent_host.is_empty() || b.parent_host.len() > MAX_HOST_NAME {
            return Err(EnvelopeError::Invalid("the parent host's name"));
        }
        if b.multicast
            .is_some_and(|m| !m.group.is_multicast() || m.port == 0)
        {
            return Err(EnvelopeError::Invalid(
                "the multicast group must be in 224.0.0.0/4 with a port",
            ));
        }
        Ok(b)
    }

    /// Refuses a family whose parent's host offers other CPU features.
    pub fn check_cpu(&self, here: &[u8; 32]) -> Result<(), EnvelopeError> {
        if &self.cpu != here {
            return Err(EnvelopeError::CpuMismatch {
                parent: hex8(&self.cpu),
                here: hex8(here),
            });
        }
        Ok(())
    }
}

/// Lowercase hex (the envelope travels in JSON as hex).
pub fn to_hex(bytes: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(D[(b >> 4) as usize] as char);
        s.push(D[(b & 15) as usize] as char);
    }
    s
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> EnvelopeBody {
        EnvelopeBody {
            family: 7,
            secret: [9; 32],
            parent_host: "h1".into(),
            memserver: "10.77.1.1:4000".parse().unwrap(),
            multicast: Some(EnvelopeMulticast {
                group: Ipv4Addr::new(239, 77, 0, 9),
                port: 47009,
                server: "10.77.1.1:4001".parse().unwrap(),
            }),
            avoidance: true,
            prefetch: false,
            cpu: [1; 32],
            clones: vec![EnvelopeClone {
                clone_id: 3,
                mac: [2, 0xfd, 0, 0, 0, 3],
                ip: Ipv4Addr::new(10, 200, 0, 3),
                generation: [5, 6],
            }],
            descriptor: vec![1, 2, 3],
        }
    }

    #[test]
    fn seals_and_opens() {
        let key = envelope_key(b"token");
        let sealed = body().seal(&key).unwrap();
        assert_eq!(EnvelopeBody::open(&sealed, &key).unwrap(), body());
        assert_eq!(from_hex(&to_hex(&sealed)).unwrap(), sealed);
        assert!(from_hex("0g").is_none());
    }

    #[test]
    fn refuses_tampering_other_keys_and_versions() {
        let key = envelope_key(b"token");
        let sealed = body().seal(&key).unwrap();
        let other = envelope_key(b"another token");
        assert!(matches!(
            EnvelopeBody::open(&sealed, &other),
            Err(EnvelopeError::Mac)
        ));
        let mut bad = sealed.clone();
        bad[HEAD + 2] ^= 1;
        assert!(matches!(
            EnvelopeBody::open(&bad, &key),
            Err(EnvelopeError::Checksum)
        ));
        // A forger who fixes the checksum still lacks the key.
        let n = bad.len();
        let sum = blake3::hash(&bad[..n - TAIL]);
        bad[n - TAIL..n - 32].copy_from_slice(sum.as_bytes());
        assert!(matches!(
            EnvelopeBody::open(&bad, &key),
            Err(EnvelopeError::Mac)
        ));
        let mut v1 = sealed.clone();
        v1[8] = 1;
        assert!(matches!(
            EnvelopeBody::open(&v1, &key),
            Err(EnvelopeError::Version(1))
        ));
        let mut unicast_group = body();
        unicast_group.multicast = Some(EnvelopeMulticast {
            group: Ipv4Addr::new(10, 0, 0, 1),
            port: 1,
            server: "10.77.1.1:4001".parse().unwrap(),
        });
        assert!(matches!(
            EnvelopeBody::open(&unicast_group.seal(&key).unwrap(), &key),
            Err(EnvelopeError::Invalid(_))
        ));
        assert!(matches!(
            EnvelopeBody::open(&sealed[..20], &key),
            Err(EnvelopeError::Size(20))
        ));
        let e = body().check_cpu(&[2; 32]).unwrap_err();
        assert!(e.to_string().contains("CPU mismatch"), "{e}");
    }
}
