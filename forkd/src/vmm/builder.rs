//! Making VMs. A fresh boot ([`Vm::boot_with`]) loads an ELF into a new
//! VM. Everything else is built from saved state, one way for every
//! caller: a snapshot restore ([`Vm::restore_with`]), a fork clone and
//! (next) a migration receiver all hand a [`VmShell`] (KVM VM, guest
//! memory, vCPUs) and a [`VmState`] to [`VmShell::build`], which restores
//! the vCPUs, the irqchip, the KVM clock and the devices;
//! [`PreparedVm::start`] then starts the vCPUs. The caller may touch the
//! memory between the two (a clone installs its descriptor pages).

use crate::vmm::boot;
use crate::vmm::devices::{Console, Devices};
use crate::vmm::integrity;
use crate::vmm::kvm::KvmContext;
use crate::vmm::memory::{self, GuestMemory};
use crate::vmm::persist::{self, StateFile, VmState};
use crate::vmm::services::HypercallService;
use crate::vmm::shared::VmShared;
use crate::vmm::vm::{
    register_memory, BuildOptions, RestoreMemory, RestoreOptions, Vm, VmConfig, VmError, MAX_VCPUS,
};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use std::path::Path;
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

/// KVM's timing leaf (as VMware and QEMU define it): TSC and bus kHz.
const CPUID_TIMING_LEAF: u32 = 0x4000_0010;
const CPUID_HYPERVISOR_BASE: u32 = 0x4000_0000;

/// CPUID for vCPU `id`: what KVM supports, with its own APIC id and, when
/// KVM knows it, the TSC frequency in the timing leaf (the zone guest paces
/// `tick_us` by it).
fn vcpu_cpuid(ctx: &KvmContext, id: u8, tsc_khz: Option<u32>) -> CpuId {
    let mut cpuid = ctx.cpuid.clone();
    for e in cpuid.as_mut_slice() {
        if e.function == 1 {
            e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24);
        }
    }
    let has_base = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == CPUID_HYPERVISOR_BASE);
    if let (Some(khz), true) = (tsc_khz, has_base) {
        for e in cpuid.as_mut_slice() {
            if e.function == CPUID_HYPERVISOR_BASE {
                e.eax = e.eax.max(CPUID_TIMING_LEAF);
            }
        }
        let leaf = kvm_bindings::kvm_cpuid_entry2 {
            function: CPUID_TIMING_LEAF,
            eax: khz,
            ebx: 1_000_000,
            ..Default::default()
        };
        if !cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == CPUID_TIMING_LEAF)
        {
            // A full table just goes without the leaf.
            let _ = cpuid.push(leaf);
        }
    }
    cpuid
}

impl Vm {
    /// Creates and starts a VM running the guest ELF.
    pub fn boot(cfg: &VmConfig) -> Result<Vm, VmError> {
        Vm::boot_with(cfg, None)
    }

    /// Creates and starts a VM whose non-VMM hypercalls go to `hypercalls`.
    pub fn boot_with(
        cfg: &VmConfig,
        hypercalls: Option<Arc<dyn HypercallService>>,
    ) -> Result<Vm, VmError> {
        let started = Instant::now();
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS as u64 {
            return Err(VmError::BadVcpus(cfg.vcpus));
        }
        let mem_bytes = memory::check_size(cfg.mem_mib)?;
        let ctx = KvmContext::get()?;
        // Application processors need an in-kernel LAPIC to sit in
        // wait-for-SIPI; a single-vCPU zone guest needs no irqchip at all.
        let irqchip = cfg.vcpus > 1;
        let ids: Vec<u8> = (0..cfg.vcpus as u8).collect();
        let shell = VmShell::create(memory::anonymous(mem_bytes)?, &ids, irqchip)?;
        let entry = boot::load(shell.memory(), &cfg.guest, &cfg.cmdline)?;
        let console = Console::new(cfg.echo, cfg.name.as_deref());
        let devices = Devices::new(shell.memory().clone(), console.clone());
        let mut fds = Vec::new();
        let (vm_fd, memory, _, vcpu_fds) = shell.into_parts();
        for (id, fd) in vcpu_fds {
            let cpuid = vcpu_cpuid(ctx, id, fd.get_tsc_khz().ok());
            ioctl("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
            if id == 0 {
                let sregs = ioctl("KVM_GET_SREGS", fd.get_sregs())?;
                let (regs, sregs) = boot::entry_state(entry, sregs);
                ioctl("KVM_SET_SREGS", fd.set_sregs(&sregs))?;
                ioctl("KVM_SET_REGS", fd.set_regs(&regs))?;
            }
            ctx.saved_msrs(&fd);
            fds.push((id, fd, cpuid));
        }
        let shared = VmShared {
            vm_fd,
            memory,
            guest: cfg.guest.display().to_string(),
            cmdline: cfg.cmdline.clone(),
            irqchip,
            vcpu_count: cfg.vcpus as u8,
        };
        let opts = BuildOptions {
            console,
            hypercalls,
            memory_server: None,
            started,
        };
        let mut vm = Vm::assemble(shared, devices, opts);
        vm.start_vcpus(fds)?;
        Ok(vm)
    }

    /// Restores a VM from a snapshot directory and starts it, with guest
    /// memory mapped lazily from the snapshot's memory file.
    pub fn restore(dir: &Path, echo: bool, name: Option<&str>) -> Result<Vm, VmError> {
        Vm::restore_with(
            dir,
            &RestoreOptions {
                echo,
                name: name.map(str::to_owned),
                memory: RestoreMemory::Lazy,
            },
            None,
        )
    }

    /// Restores a VM from a snapshot directory and starts it; its non-VMM
    /// hypercalls go to `hypercalls` (a restored zone can fork too).
    pub fn restore_with(
        dir: &Path,
        opts: &RestoreOptions,
        hypercalls: Option<Arc<dyn HypercallService>>,
    ) -> Result<Vm, VmError> {
        let started = Instant::now();
        let StateFile {
            vm: state,
            memory: digest,
        } = persist::read_state(dir)?;
        if state.vcpus.is_empty() || state.vcpus.len() > MAX_VCPUS as usize {
            return Err(VmError::BadVcpus(state.vcpus.len() as u64));
        }
        let mem_path = dir.join(persist::MEMORY_FILE);
        // Eager: every chunk checked as it is copied; lazy: checked by a
        // background verifier that fails the VM on a mismatch.
        let eager = opts.memory == RestoreMemory::Eager;
        let (memory, verifier) =
            integrity::restore_memory(&mem_path, &digest, state.mem_bytes, eager)?;
        let ids: Vec<u8> = state.vcpus.iter().map(|v| v.id).collect();
        let shell = VmShell::create(memory, &ids, state.irqchip.is_some())?;
        let build = BuildOptions {
            console: Console::new(opts.echo, opts.name.as_deref()),
            hypercalls,
            memory_server: None,
            started,
        };
        let mut vm = shell.build(&state, build)?.start()?;
        vm.integrity = verifier;
        Ok(vm)
    }
}
