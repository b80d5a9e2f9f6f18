//! Building a VM from saved state, one way for every caller: a snapshot
//! restore, a fork clone and (next) a migration receiver all hand a
//! [`VmShell`] (KVM VM, guest memory, vCPUs) and a [`VmState`] to
//! [`VmShell::build`], which restores the vCPUs, the irqchip, the KVM
//! clock and the devices; [`PreparedVm::start`] then starts the vCPUs.
//! The caller may touch the memory between the two (a clone installs its
//! descriptor pages).

use crate::vmm::devices::{Console, Devices};
use crate::vmm::kvm::KvmContext;
use crate::vmm::memory::GuestMemory;
use crate::vmm::persist::VmState;
use crate::vmm::services::{HypercallService, MemoryServer};
use crate::vmm::vm::{register_memory, Vm, VmError, VmShared};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use std::sync::Arc;
use std::time::Instant;

fn ioctl<T>(op: &'static str, r: Result<T, vmm_sys_util::errno::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Ioctl { op, source })
}

/// A VM before it has any state: the KVM VM, its guest memory registered
/// as slot 0, the in-kernel irqchip if wanted, and its vCPUs created.
/// Creating one costs a few ms here, mostly the memory slot, so the fork
/// layer builds them ahead of time (a warm pool).
pub struct VmShell {
    vm_fd: VmFd,
    memory: GuestMemory,
    irqchip: bool,
    vcpus: Vec<(u8, VcpuFd)>,
}

/// How a built VM is wired to the world.
pub struct BuildOptions {
    pub console: Console,
    /// Who answers the hypercalls the VMM does not handle.
    pub hypercalls: Option<Arc<dyn HypercallService>>,
    /// Who fills the memory on demand, if anyone.
    pub memory_server: Option<Box<dyn MemoryServer>>,
    /// When making the VM began (for start latencies).
    pub started: Instant,
}

impl VmShell {
    /// Creates a KVM VM around `memory` with vCPUs `ids`.
    pub fn create(memory: GuestMemory, ids: &[u8], irqchip: bool) -> Result<VmShell, VmError> {
        let ctx = KvmContext::get()?;
        let vm_fd = ioctl("KVM_CREATE_VM", ctx.kvm.create_vm())?;
        register_memory(&vm_fd, &memory)?;
        if irqchip {
            ioctl("KVM_CREATE_IRQCHIP", vm_fd.create_irq_chip())?;
        }
        let mut vcpus = Vec::with_capacity(ids.len());
        for &id in ids {
            vcpus.push((id, ioctl("KVM_CREATE_VCPU", vm_fd.create_vcpu(id as u64))?));
        }
        Ok(VmShell {
            vm_fd,
            memory,
            irqchip,
            vcpus,
        })
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    pub fn mem_bytes(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.memory.last_addr().0 + 1
    }

    /// The ids of the shell's vCPUs.
    pub fn vcpu_ids(&self) -> Vec<u8> {
        self.vcpus.iter().map(|(id, _)| *id).collect()
    }

    /// Whether this shell can take `state` (same memory size and vCPUs).
    pub fn fits(&self, state: &VmState) -> bool {
        self.mem_bytes() == state.mem_bytes
            && self.irqchip == state.irqchip.is_some()
            && self.vcpu_ids() == state.vcpus.iter().map(|v| v.id).collect::<Vec<_>>()
    }

    pub(crate) fn into_parts(self) -> (VmFd, GuestMemory, bool, Vec<(u8, VcpuFd)>) {
        (self.vm_fd, self.memory, self.irqchip, self.vcpus)
    }

    /// Loads `state` into the shell: vCPUs (registers, MSRs, CPUID, LAPIC,
    /// events …), irqchip, KVM clock and devices. The vCPUs do not run yet.
    pub fn build(self, state: &VmState, opts: BuildOptions) -> Result<PreparedVm, VmError> {
        if !self.fits(state) {
            return Err(VmError::StateMismatch(format!(
                "state of {} bytes, vCPUs {:?}, irqchip {}; VM of {} bytes, vCPUs {:?}, irqchip {}",
                state.mem_bytes,
                state.vcpus.iter().map(|v| v.id).collect::<Vec<_>>(),
                state.irqchip.is_some(),
                self.mem_bytes(),
                self.vcpu_ids(),
                self.irqchip
            )));
        }
        let ctx = KvmContext::get()?;
        let (vm_fd, memory, irqchip, vcpus) = self.into_parts();
        let mut fds = Vec::with_capacity(vcpus.len());
        for ((id, fd), vs) in vcpus.into_iter().zip(&state.vcpus) {
            vs.restore(ctx, &fd)?;
            let cpuid = CpuId::from_entries(&vs.cpuid).map_err(|e| {
                VmError::StateMismatch(format!("CPUID of vCPU {id} does not fit KVM: {e:?}"))
            })?;
            fds.push((id, fd, cpuid));
        }
        for chip in state.irqchip.iter().flatten() {
            ioctl("KVM_SET_IRQCHIP", vm_fd.set_irqchip(chip))?;
        }
        if let Some(mut clock) = state.clock {
            clock.flags = 0;
            ioctl("KVM_SET_CLOCK", vm_fd.set_clock(&clock))?;
        }
        let devices = Devices::restore(memory.clone(), opts.console.clone(), &state.devices);
        let shared = VmShared {
            vm_fd,
            memory,
            guest: state.guest.clone(),
            cmdline: state.cmdline.clone(),
            irqchip,
            vcpu_count: fds.len() as u8,
        };
        Ok(PreparedVm {
            vm: Vm::assemble(shared, devices, opts),
            fds,
        })
    }
}

/// A VM with its state loaded whose vCPUs have not run yet.
pub struct PreparedVm {
    vm: Vm,
    fds: Vec<(u8, VcpuFd, CpuId)>,
}

impl PreparedVm {
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    /// Starts the vCPUs.
    pub fn start(self) -> Result<Vm, VmError> {
        let mut vm = self.vm;
        vm.start_vcpus(self.fds)?;
        Ok(vm)
    }
}
