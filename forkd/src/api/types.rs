//! Request and response bodies of the API (see `forkd/api/openapi.json`).
//! Optional response fields are left out rather than `null`.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::fork::fault::FaultCounts;
use crate::fork::identity::CloneIdentity;
use crate::fork::mcdist::{Distribution, ReceiverFigures};
use crate::vmm::VmExit;

pub const DEFAULT_MEM_MIB: u64 = 512;
pub const DEFAULT_VCPUS: u64 = 1;
/// Longest `name` accepted.
pub const MAX_NAME: usize = 64;

fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}

fn default_vcpus() -> u64 {
    DEFAULT_VCPUS
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub cmdline: String,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u64,
    /// Guest PVH ELF; default: the zone guest built with forkd.
    #[serde(default)]
    pub guest: Option<PathBuf>,
    #[serde(default)]
    pub name: Option<String>,
    /// Where the guest's own forks (`fork_at`, `sf_clone`) place clones.
    #[serde(default)]
    pub placement: Option<Placement>,
    /// How this VM's forks send pages to their clones (default unicast).
    #[serde(default)]
    pub distribution: Option<Distribution>,
    /// Page avoidance and push/prefetch in this VM's forks (default on).
    #[serde(default)]
    pub heuristics: Option<bool>,
}

/// A default placement: clones per host, or hosts to spread them over.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    #[serde(default)]
    pub hosts: Option<BTreeMap<String, u64>>,
    #[serde(default)]
    pub spread: Option<Vec<String>>,
}

/// `POST /v1/vms/{id}/fork`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForkVm {
    pub clones: u64,
    /// Clones per host (the daemon's own name: here); must add up to
    /// `clones`.
    #[serde(default)]
    pub hosts: Option<BTreeMap<String, u64>>,
    /// Hosts to share the clones out among evenly.
    #[serde(default)]
    pub spread: Option<Vec<String>>,
    /// This fork's distribution (default: the VM's).
    #[serde(default)]
    pub distribution: Option<Distribution>,
    /// This fork's heuristics (default: the VM's).
    #[serde(default)]
    pub heuristics: Option<bool>,
}

/// `POST /v1/families` (daemon to daemon): a sealed family envelope, hex.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostFamily {
    pub envelope: String,
}

/// A clone of a family hosted here for a parent on another host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostedCloneInfo {
    pub clone_id: u64,
    /// Its VM id on this host.
    pub id: String,
    /// `running`, `exited`, `failed` or `migrated` (see `moved_to`).
    pub state: String,
    /// The host a migrated clone runs on now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moved_to: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_line: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The envelope's arrival here → the clone's first KVM_RUN, in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_us: Option<u64>,
    /// The envelope's arrival here → its `zone: done` line, in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_us: Option<u64>,
    /// Its fault counters, once it has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultCounts>,
}

/// `GET /v1/families/{family}`, and the answer to `POST /v1/families`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FamilyStatus {
    pub family: u64,
    pub parent_host: String,
    pub running: u64,
    pub clones: Vec<HostedCloneInfo>,
    /// Multicast: this host's receiver of the family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receiver: Option<ReceiverFigures>,
    /// In the answer to `POST`: the envelope's arrival → this answer, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handled_us: Option<u64>,
}

/// A family's multicast receiver on one host.
#[derive(Debug, Clone, Serialize)]
pub struct HostReceiverInfo {
    pub host: String,
    #[serde(flatten)]
    pub figures: ReceiverFigures,
}

/// `GET /v1/memserver`: this host's memory server, counters since the
/// daemon started.
#[derive(Debug, Clone, Serialize)]
pub struct MemServerInfo {
    pub address: String,
    pub requests: u64,
    pub pages_sent: u64,
    /// Every datagram sent, unicast and multicast.
    pub bytes_sent: u64,
    pub families: u64,
    pub multicast: MulticastInfo,
}

/// The multicast senders' counters (all families, ended ones included).
#[derive(Debug, Clone, Serialize)]
pub struct MulticastInfo {
    pub bytes_sent: u64,
    pub frames_sent: u64,
    pub blocks_requested: u64,
    pub blocks_multicast: u64,
    pub blocks_unicast: u64,
    pub blocks_pushed: u64,
    pub push_skipped: u64,
    pub lockstep_suppressed: u64,
    pub retries_received: u64,
    pub end_game_entered: u64,
    pub forged: u64,
    pub replayed: u64,
    pub foreign: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Running,
    Exited,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneState {
    Running,
    Exited,
    /// The clone could not be started.
    Failed,
}

#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub id: String,
    pub state: VmState,
}

/// How a VM or clone ended: `code` as `forkd run` would exit (the guest's
/// status, or 100+ for VMM-side endings), `reason` in words.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: i32,
    pub reason: String,
}

impl From<&VmExit> for ExitInfo {
    fn from(e: &VmExit) -> Self {
        ExitInfo {
            code: e.exit_code(),
            reason: e.to_string(),
        }
    }
}

/// One entry of `GET /v1/vms`.
#[derive(Debug, Clone, Serialize)]
pub struct VmSummary {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub state: VmState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_line: Option<String>,
    /// Lines the guest printed so far (including any dropped from the log).
    pub console_lines: u64,
    /// A clone of a parent on another host: its family, clone id and the
    /// parent's host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_host: Option<String>,
}

/// `POST /v1/vms/{id}/join`.
#[derive(Debug, Clone, Serialize)]
pub struct Joined {
    pub family: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VmList {
    pub vms: Vec<VmSummary>,
}

/// `GET /v1/vms/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct VmDetail {
    #[serde(flatten)]
    pub summary: VmSummary,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u64,
    pub guest: String,
    pub families: Vec<FamilyInfo>,
    /// Its load, once sampled (every second while it runs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load: Option<super::load::VmLoad>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FamilyInfo {
    pub family: u64,
    pub clones_granted: u64,
    /// Clones still running (started or about to start).
    pub running: u64,
    pub distribution: Distribution,
    pub heuristics: bool,
    /// The fork request → the parent may run again, in µs (0 until then).
    pub parent_stopped_us: u64,
    pub clones: Vec<CloneInfo>,
    pub start_failures: Vec<StartFailure>,
    /// Multicast: each host's receiver (this one's first).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub receivers: Vec<HostReceiverInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CloneInfo {
    pub clone_id: u64,
    pub state: CloneState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_line: Option<String>,
    /// Why the clone could not start (state "failed").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The host it runs on, if not the parent's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub ip: String,
    pub mac: String,
    /// The clone's generation id (32 hex digits), new in every clone.
    pub generation: String,
    /// The fork request → the clone's first KVM_RUN, in µs (on another
    /// host: estimated, see ARCHITECTURE.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_us: Option<u64>,
    /// The fork request → its `zone: done` line, in µs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_us: Option<u64>,
    /// Its fault counters, once it has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<FaultCounts>,
    /// Its faults per second over the parent's last load sample (this
    /// host's clones; others once they ended).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults_per_s: Option<f64>,
}

impl CloneInfo {
    pub fn new(identity: &CloneIdentity, state: CloneState) -> Self {
        let clone_id = identity.clone_id;
        CloneInfo {
            clone_id,
            state,
            exit: None,
            last_line: None,
            error: None,
            host: None,
            ip: identity.ip.to_string(),
            mac: identity.mac_string(),
            generation: identity.generation_hex(),
            start_us: None,
            done_us: None,
            faults: None,
            faults_per_s: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct StartFailure {
    pub clone_id: u64,
    pub error: String,
}

/// `POST /v1/vms/{id}/fork`.
#[derive(Debug, Clone, Serialize)]
pub struct Forked {
    pub family: u64,
    pub clones: Vec<u64>,
}

/// `GET /v1/vms/{id}/console`.
#[derive(Debug, Clone, Serialize)]
pub struct ConsoleLines {
    pub lines: Vec<String>,
    /// Older lines dropped from the bounded log.
    pub dropped_lines: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ErrorBody {
    pub error: String,
}

/// `vm-<n>` ↔ n.
pub fn vm_id(n: u64) -> String {
    format!("vm-{n}")
}

pub fn parse_vm_id(s: &str) -> Option<u64> {
    let n = s.strip_prefix("vm-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_round_trip() {
        assert_eq!(parse_vm_id(&vm_id(17)), Some(17));
        assert_eq!(parse_vm_id("vm-"), None);
        assert_eq!(parse_vm_id("vm-+1"), None);
        assert_eq!(parse_vm_id("17"), None);
        assert_eq!(parse_vm_id("vm-99999999999999999999999"), None);
    }

    #[test]
    fn create_rejects_unknown_fields_and_fills_defaults() {
        let c: CreateVm = serde_json::from_str(r#"{"cmdline":"ticks=1"}"#).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (DEFAULT_MEM_MIB, DEFAULT_VCPUS));
        let e = serde_json::from_str::<CreateVm>(r#"{"cmdline":"","memory":1}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `memory`"), "{e}");
        assert!(serde_json::from_str::<ForkVm>(r#"{"clones":-1}"#).is_err());
    }
}
