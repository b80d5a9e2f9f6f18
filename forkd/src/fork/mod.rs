//! VM fork, SnowFlock style, built on the VMM's service interfaces
//! (`vmm::services`): the fork layer answers the guest's `sf_*` hypercalls
//! ([`calls`]) and serves clone memory on demand ([`fault`]).
//!
//! A fork (the guest's `sf_clone`, or a host fork through [`host`]): the
//! parent's state is captured while it is stopped, the [`descriptor`] is
//! built from it (memory as at the fork instant), the family is registered
//! with the memory server behind a page source that waits for the image,
//! a launcher thread starts building the clones ([`clone`]), and only then
//! is the parent's memory frozen (copy-before-write); the parent resumes as
//! soon as the freeze is in place ([`parent`]). Each clone's memory is
//! empty anonymous memory registered with userfaultfd; its [`fault`]
//! handler fills pages from the memory server on demand, or with zeros
//! (UFFDIO_COPY of a zero page) where the avoidance heuristics say the
//! guest will overwrite them.

pub mod calls;
pub mod clone;
pub mod descriptor;
pub mod envelope;
pub mod family;
pub mod fault;
pub mod fault_stats;
pub mod guests;
pub mod handover;
pub mod host;
pub mod hosted;
pub mod identity;
pub mod launch;
pub mod mcdist;
pub mod parent;
pub mod pending;
pub mod pool;
pub mod remote;

use crate::vmm::memory::GuestMemory;
use crate::vmm::persist::VmState;
use crate::vmm::VmError;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    #[error("cannot build clone {clone_id}")]
    Clone {
        clone_id: u64,
        #[source]
        source: VmError,
    },
    #[error("bad descriptor page at {0:#x}")]
    BadDescriptorPage(u64),
    #[error(transparent)]
    Uffd(#[from] fault::UffdError),
    #[error(transparent)]
    Descriptor(#[from] descriptor::DescriptorError),
    #[error("cannot freeze the parent's memory")]
    Freeze(#[source] memserver::image::ImageError),
    #[error("cannot register the family with the memory server")]
    MemServer(#[source] memserver::server::AddFamilyError),
    #[error("cannot make the family's key")]
    Key(#[source] memserver::auth::RandomError),
    #[error("memory server client")]
    PageClient(#[source] memserver::client::ClientError),
    #[error("cannot join the family's multicast group on this host")]
    Multicast(#[source] memserver::mcdist::host::HostReceiverError),
    #[error("cannot start the {what} thread")]
    Thread {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the parent has no memory region")]
    NoMemory,
    #[error(
        "the VM's memory is a private mapping of a snapshot file (a lazy restore), which cannot be frozen copy-before-write; restore it with eager memory to fork it"
    )]
    FileBackedMemory,
    #[error("a fork family of this VM is still running ({0} clones); wait for it to end")]
    FamilyLive(u64),
    #[error("{requested} clones requested; 1..={max} allowed")]
    BadClones { requested: u64, max: u64 },
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error(transparent)]
    Envelope(#[from] envelope::EnvelopeError),
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
    /// The parent's state, captured while it is stopped (its vCPU just
    /// after the doorbell `out`, or paused by the host).
    pub state: VmState,
    pub memory: GuestMemory,
    pub requested_at: Instant,
    /// This fork's distribution and heuristics, if not the hub's.
    pub tuning: Option<family::ForkTuning>,
}
