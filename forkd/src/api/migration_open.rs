//! The daemon-to-daemon request that opens an incoming migration
//! (`POST /v1/migrations`): what the destination is told of the VM, and
//! for a clone its origin ([`super::migration_clone`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::fork::envelope::from_hex;
use crate::fork::identity::CloneIdentity;
use memserver::FamilyKey;

/// `POST /v1/migrations` (daemon to daemon).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenIncoming {
    /// The source's host and VM id, for the record.
    pub source: String,
    /// The VM's id (`vm-N`): it keeps it here (409 if taken).
    pub vm: String,
    pub mem_mib: u64,
    pub vcpus: u64,
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<PathBuf>,
    /// Fork tickets the guest was granted and has not used: its new fork
    /// hub grants them again, so its `sf_clone` works there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tickets: Vec<PendingTicket>,
    /// A clone of a family whose parent runs elsewhere
    /// ([`super::migration_clone`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone: Option<CloneOrigin>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PendingTicket {
    pub id: u64,
    pub clones: u64,
}

/// A migrating clone's origin, in the open request (daemon to daemon,
/// with the cluster's bearer token, like the envelope it came in).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloneOrigin {
    pub family: u64,
    /// The family's key on its memory server: 32 bytes, hex.
    pub secret: String,
    pub parent_host: String,
    /// The family's memory server (unicast).
    pub memserver: SocketAddr,
    pub clone_id: u64,
    /// The clone's MAC (low 48 bits) and IPv4 address.
    pub mac: u64,
    pub ip: Ipv4Addr,
    /// Its generation id, 32 hex digits.
    pub generation: String,
    /// Since its family's share came to its first host, in µs (the
    /// clone's times count from there).
    pub age_us: u64,
}

impl CloneOrigin {
    pub(super) fn identity(&self) -> Result<CloneIdentity, ApiError> {
        let generation = u128::from_str_radix(&self.generation, 16)
            .ok()
            .filter(|g| *g != 0 && self.generation.len() == 32)
            .ok_or_else(|| ApiError::BadRequest("clone.generation: 32 hex digits".into()))?;
        if self.mac >> 48 != 0 {
            return Err(ApiError::BadRequest("clone.mac: 48 bits".into()));
        }
        let m = self.mac.to_be_bytes();
        Ok(CloneIdentity {
            clone_id: self.clone_id,
            mac: [m[2], m[3], m[4], m[5], m[6], m[7]],
            ip: self.ip,
            generation,
        })
    }

    pub(super) fn key(&self) -> Result<FamilyKey, ApiError> {
        match from_hex(&self.secret) {
            Some(s) if s.len() == 32 => {
                let mut secret = [0u8; 32];
                secret.copy_from_slice(&s);
                Ok(FamilyKey::from_parts(self.family, secret))
            }
            _ => Err(ApiError::BadRequest("clone.secret: 32 bytes, hex".into())),
        }
    }
}
