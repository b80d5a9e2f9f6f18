//! VM fork, SnowFlock style. The parent's vCPU calls `sf_clone`; its vCPU
//! thread completes the call, saves its state and hands a [`ForkRequest`]
//! to the VM's [`ForkService`] ([`parent::ForkHub`]), which freezes the
//! parent's memory (copy-before-write), builds a small [`descriptor`],
//! registers the frozen image with the memory server and starts the clones
//! ([`clone`]); the parent resumes as soon as the freeze is in place. Each
//! clone's memory is empty anonymous memory registered with userfaultfd;
//! its [`fault`] handler fills pages from the memory server on demand, or
//! with zeros where the avoidance heuristics say the guest will overwrite
//! them.

pub mod clone;
pub mod descriptor;
pub mod fault;
pub mod identity;
pub mod parent;
pub mod pending;

use crate::vmm::cpu_state::VcpuState;
use crate::vmm::devices::DevicesState;
use crate::vmm::memory::GuestMemory;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("cannot start clone: {0}")]
    Clone(String),
    #[error("userfaultfd: {0}")]
    Uffd(String),
    #[error(transparent)]
    Descriptor(#[from] descriptor::DescriptorError),
    #[error("cannot freeze the parent's memory: {0}")]
    Freeze(String),
    #[error("memory server: {0}")]
    MemServer(String),
    #[error("cannot fork: {0}")]
    Refused(String),
}

/// How each clone learns it is a clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Answer {
    /// The guest called `sf_clone`: its hypercall page at `page_gpa`
    /// returns the clone id.
    SfClone,
    /// The host forked the VM: the guest's agent page at `page_gpa` gets
    /// this fork epoch and the clone id.
    Agent { epoch: u64 },
}

/// Everything the parent hands over to fork.
pub struct ForkRequest {
    pub ticket: u64,
    /// The page answered per clone (see [`Answer`]).
    pub page_gpa: u64,
    pub answer: Answer,
    /// The parent's vCPU, stopped just after the doorbell `out`.
    pub vcpu: VcpuState,
    pub devices: DevicesState,
    pub memory: GuestMemory,
    pub requested_at: Instant,
}

/// The SnowFlock calls of one VM. Errors are hypercall status codes.
pub trait ForkService: Send + Sync {
    /// `sf_request_ticket(n)` → (ticket, clones granted), for a VM of
    /// `mem_bytes` (the hub may start building the clones' VMs now).
    fn ticket(&self, wanted: u64, mem_bytes: u64) -> Result<(u64, u64), u32>;
    /// `sf_clone(ticket)`, on the parent's vCPU thread. Returns once the
    /// parent may resume.
    fn fork(&self, req: ForkRequest) -> Result<(), u32>;
    /// `sf_join(ticket)` → clones still running.
    fn join(&self, ticket: u64) -> Result<u64, u32>;
    /// Like `join`, but waits up to `max` for the clones to end first, so
    /// the guest's join loop does not spin a host core. Runs on the vCPU
    /// thread, with no device lock held.
    fn join_wait(&self, ticket: u64, _max: std::time::Duration) -> Result<u64, u32> {
        self.join(ticket)
    }
    /// `sf_kill(ticket)`.
    fn kill(&self, ticket: u64) -> Result<(), u32>;
    /// The guest will overwrite `[gpa, gpa + len)` before reading it.
    fn will_overwrite(&self, gpa: u64, len: u64) -> Result<(), u32>;
    /// Whether `sf_exit` ends this VM (clones) or is refused (parents).
    fn may_exit(&self) -> bool;
    /// The VM is going away: stop whatever still uses its memory.
    fn shutdown(&self) {}
    /// The parent-side hub, for host-initiated forks.
    fn as_hub(&self) -> Option<&parent::ForkHub> {
        None
    }
}
