//! What a VM and its vCPU threads share: the KVM VM, guest memory and the
//! facts a vCPU needs to capture the whole VM's state from its own thread.

use crate::vmm::kvm::KvmContext;
use crate::vmm::memory::GuestMemory;
use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryBackend;

/// What a VM and its vCPU threads share.
pub struct VmShared {
    pub vm_fd: VmFd,
    pub memory: GuestMemory,
    pub guest: String,
    pub cmdline: String,
    pub irqchip: bool,
    pub vcpu_count: u8,
}

impl VmShared {
    pub fn mem_bytes(&self) -> u64 {
        self.memory.last_addr().0 + 1
    }

    /// The KVM clock, where this KVM lets it be set again.
    pub fn clock(&self) -> Result<Option<kvm_clock_data>, vmm_sys_util::errno::Error> {
        match KvmContext::get() {
            Ok(ctx) if ctx.caps.adjust_clock => self.vm_fd.get_clock().map(Some),
            _ => Ok(None),
        }
    }
}
