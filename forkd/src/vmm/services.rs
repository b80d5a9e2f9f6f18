//! The interfaces the VMM offers to the layers above it. `vmm/` knows
//! nothing of fork or migration; those layers plug in here:
//!
//! - a [`HypercallService`] answers the hypercalls the VMM does not handle
//!   itself (the VMM owns `OP_HELLO`, `OP_CONSOLE` and `OP_SLEEP`; the fork
//!   layer answers SnowFlock's `sf_*` calls). It is called on the vCPU
//!   thread with no device lock held, through a [`GuestCall`] that lets it
//!   capture the calling VM's state;
//! - a [`MemoryServer`] serves guest memory that is filled on demand (a
//!   clone's userfaultfd handler): the VM fails when it can no longer serve,
//!   and stops it after the vCPUs and before the memory is unmapped.

use crate::vmm::memory::GuestMemory;
use crate::vmm::persist::VmState;
use guest_agent::abi::HypercallPage;

/// What a hypercall service decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallOutcome {
    /// Write this status and these results into the guest's hypercall page.
    Answer { status: u32, ret: [u64; 4] },
    /// End the VM with this guest status (a clone's `sf_exit`).
    Exit(u8),
}

impl CallOutcome {
    pub fn status(status: u32) -> Self {
        CallOutcome::Answer {
            status,
            ret: [0; 4],
        }
    }
}

/// Why the calling VM's state could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the VM has {0} vCPUs; its state can be captured from one vCPU only if it has one")]
    MultipleVcpus(u8),
    #[error("cannot complete the doorbell exit: {0}")]
    Settle(String),
    #[error(transparent)]
    Kvm(#[from] crate::vmm::kvm::KvmError),
    #[error(transparent)]
    CpuState(#[from] crate::vmm::cpu_state::CpuStateError),
    #[error("KVM_GET_CLOCK: {0}")]
    Clock(vmm_sys_util::errno::Error),
}

/// The VM making a hypercall, as the service sees it.
pub trait GuestCall {
    /// Guest-physical address of the caller's hypercall page.
    fn page_gpa(&self) -> u64;
    fn memory(&self) -> &GuestMemory;
    /// Completes the doorbell exit and captures the VM's whole state (its
    /// only vCPU, clock, devices): restored elsewhere, the guest continues
    /// just after the doorbell. Single-vCPU VMs only.
    fn capture(&mut self) -> Result<VmState, CaptureError>;
}

/// Answers the hypercalls the VMM does not handle itself.
pub trait HypercallService: Send + Sync {
    /// Runs on the calling vCPU's thread, with no device lock held; a pause
    /// of the VM waits until it returns, so it must not block for long.
    fn call(&self, call: &HypercallPage, guest: &mut dyn GuestCall) -> CallOutcome;
    /// The VM is going away: stop whatever still uses its memory.
    fn shutdown(&self) {}
}

/// Guest memory filled on demand by someone outside the VMM.
pub trait MemoryServer: Send {
    /// Why the memory can no longer be served, if so: the VM then fails
    /// with this error.
    fn error(&self) -> Option<String>;
    /// Stops serving. Called after the vCPUs have stopped and before the
    /// memory is unmapped.
    fn stop(&mut self);
    /// Faults served so far (a load figure: faults per second).
    fn faults(&self) -> u64 {
        0
    }
}
