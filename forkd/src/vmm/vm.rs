//! A microVM: KVM VM, guest memory, devices and vCPU threads, with boot,
//! pause/resume, snapshot and restore.

use crate::fork::fault::FaultHandler;
use crate::fork::parent::Family;
use crate::fork::{Answer, ForkRequest, ForkService};
use crate::vmm::boot::{self, BootError};
use crate::vmm::cpu_state::CpuStateError;
use crate::vmm::devices::{Console, Devices, GuestInfo};
use crate::vmm::integrity::{self, Verifier};
use crate::vmm::kvm::{KvmContext, KvmError};
use crate::vmm::memory::{self, GuestMemory, MemoryError};
use crate::vmm::persist::{self, PersistError, StateFile, VmState};
use crate::vmm::vcpu::{VcpuError, VcpuEvent, VcpuExitReason, VcpuHandle, VcpuRunState, VcpuSetup};
use guest_agent::abi;
use kvm_bindings::{kvm_irqchip, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::VmFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub const MAX_VCPUS: u8 = 32;
/// `wait` checks a clone's fault handler this often.
const WAIT_SLICE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    CpuState(#[from] CpuStateError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    #[error("{0} vCPUs requested; 1..={MAX_VCPUS} supported")]
    BadVcpus(u64),
    #[error("the VM has already exited")]
    Exited,
    #[error("the VM must be paused first")]
    NotPaused,
    #[error("cannot write guest memory to the snapshot: {0}")]
    MemoryWrite(std::io::Error),
    #[error("the guest did not finish within {0:?}")]
    WaitTimeout(Duration),
    /// The fork could not be done (freeze, memory server, descriptor).
    #[error("cannot fork: {0}")]
    Fork(String),
    /// The VM is not in a state to fork (the request may work later, or
    /// never for this VM).
    #[error("cannot fork now: {0}")]
    ForkRefused(String),
    #[error("{requested} clones requested; 1..={max} allowed")]
    BadClones { requested: u64, max: u64 },
}

fn ioctl<T>(op: &'static str, r: Result<T, vmm_sys_util::errno::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Ioctl { op, source })
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest wrote this status to the exit port (0: success).
    Guest(u8),
    Halted,
    TripleFault,
    Failed(String),
    Stopped,
}

impl VmExit {
    /// Process exit code for `forkd run` / `restore`: the guest's own
    /// status, or 100+ for VMM-side endings.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Guest(s) => *s as i32,
            VmExit::Halted => 101,
            VmExit::TripleFault => 102,
            VmExit::Failed(_) => 103,
            VmExit::Stopped => 104,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Guest(s) => write!(f, "guest exited with status {s}"),
            VmExit::Halted => write!(f, "guest halted"),
            VmExit::TripleFault => write!(f, "guest triple-faulted"),
            VmExit::Failed(why) => write!(f, "vCPU failed: {why}"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
        }
    }
}

impl From<VcpuExitReason> for VmExit {
    fn from(r: VcpuExitReason) -> Self {
        match r {
            VcpuExitReason::Guest(s) => VmExit::Guest(s),
            VcpuExitReason::Halted => VmExit::Halted,
            VcpuExitReason::TripleFault => VmExit::TripleFault,
            VcpuExitReason::Stopped => VmExit::Stopped,
            VcpuExitReason::Failed(s) => VmExit::Failed(s),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub guest: PathBuf,
    pub mem_mib: u64,
    pub vcpus: u64,
    pub cmdline: String,
    /// Console options: echo lines to stdout, with a `[name]` prefix.
    pub echo: bool,
    pub name: Option<String>,
}

/// Timestamps of a VM's start.
#[derive(Debug, Clone)]
pub struct StartTimes {
    /// When creation (boot or restore) began.
    pub started: Instant,
    /// Just before the first KVM_RUN.
    pub first_run: Arc<OnceLock<Instant>>,
}

/// How a restored guest gets its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreMemory {
    /// Private mapping of the memory file: starts at once, pages load from
    /// the page cache on first touch (4 KiB pages).
    #[default]
    Lazy,
    /// Copy the file's data into anonymous memory before starting: start
    /// time grows with the touched memory, the guest then runs at full speed.
    Eager,
}

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub echo: bool,
    pub name: Option<String>,
    pub memory: RestoreMemory,
}

#[derive(Debug, Clone, Copy)]
pub struct SnapshotStats {
    pub state_bytes: u64,
    pub memory_bytes: u64,
    pub duration: Duration,
}

pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    /// A clone's userfaultfd handler: stopped after the vCPUs (which may
    /// wait on it), before the memory goes.
    fault_handler: Option<FaultHandler>,
    fork_service: Option<Arc<dyn ForkService>>,
    /// A lazily restored VM's background check of its memory file.
    integrity: Option<Verifier>,
    vcpu_count: u8,
    events: Receiver<VcpuEvent>,
    event_tx: mpsc::Sender<VcpuEvent>,
    devices: Arc<Mutex<Devices>>,
    console: Console,
    irqchip: bool,
    exit: Option<VmExit>,
    guest: String,
    cmdline: String,
    pub times: StartTimes,
    // Dropped after the vCPU threads (fields drop in order).
    memory: GuestMemory,
    vm_fd: VmFd,
}

pub(crate) fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes owned
        // by the Vm, which outlives the VM fd's use of it (the vCPU threads
        // are joined before `memory` is dropped).
        ioctl("KVM_SET_USER_MEMORY_REGION", unsafe {
            vm_fd.set_user_memory_region(r)
        })?;
    }
    Ok(())
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

    /// Creates and starts a VM whose SnowFlock calls go to `fork`.
    pub fn boot_with(cfg: &VmConfig, fork: Option<Arc<dyn ForkService>>) -> Result<Vm, VmError> {
        let started = Instant::now();
        if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS as u64 {
            return Err(VmError::BadVcpus(cfg.vcpus));
        }
        let mem_bytes = memory::check_size(cfg.mem_mib)?;
        let ctx = KvmContext::get()?;
        let vm_fd = ioctl("KVM_CREATE_VM", ctx.kvm.create_vm())?;
        let memory = memory::anonymous(mem_bytes)?;
        register_memory(&vm_fd, &memory)?;
        // Application processors need an in-kernel LAPIC to sit in
        // wait-for-SIPI; a single-vCPU zone guest needs no irqchip at all.
        let irqchip = cfg.vcpus > 1;
        if irqchip {
            ioctl("KVM_CREATE_IRQCHIP", vm_fd.create_irq_chip())?;
        }
        let entry = boot::load(&memory, &cfg.guest, &cfg.cmdline)?;
        let console = Console::new(cfg.echo, cfg.name.as_deref());
        let devices = Arc::new(Mutex::new(Devices::new(
            memory.clone(),
            console.clone(),
            fork.clone(),
        )));
        let mut vm = Vm::assemble(
            vm_fd,
            memory,
            devices,
            console,
            irqchip,
            cfg.guest.display().to_string(),
            cfg.cmdline.clone(),
            started,
        );
        vm.fork_service = fork;
        vm.vcpu_count = cfg.vcpus as u8;
        for id in 0..cfg.vcpus as u8 {
            let fd = ioctl("KVM_CREATE_VCPU", vm.vm_fd.create_vcpu(id as u64))?;
            let cpuid = vcpu_cpuid(ctx, id, fd.get_tsc_khz().ok());
            ioctl("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid))?;
            if id == 0 {
                let sregs = ioctl("KVM_GET_SREGS", fd.get_sregs())?;
                let (regs, sregs) = boot::entry_state(entry, sregs);
                ioctl("KVM_SET_SREGS", fd.set_sregs(&sregs))?;
                ioctl("KVM_SET_REGS", fd.set_regs(&regs))?;
            }
            ctx.saved_msrs(&fd);
            vm.spawn_vcpu(id, fd, cpuid)?;
        }
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
        )
    }

    /// Restores a VM from a snapshot directory and starts it.
    pub fn restore_with(dir: &Path, opts: &RestoreOptions) -> Result<Vm, VmError> {
        let started = Instant::now();
        let StateFile {
            vm: state,
            memory: digest,
        } = persist::read_state(dir)?;
        if state.vcpus.is_empty() || state.vcpus.len() > MAX_VCPUS as usize {
            return Err(VmError::BadVcpus(state.vcpus.len() as u64));
        }
        let ctx = KvmContext::get()?;
        let mem_path = dir.join(persist::MEMORY_FILE);
        let eager = opts.memory == RestoreMemory::Eager;
        let (memory, verifier) =
            integrity::restore_memory(&mem_path, &digest, state.mem_bytes, eager)?;
        let vm_fd = ioctl("KVM_CREATE_VM", ctx.kvm.create_vm())?;
        register_memory(&vm_fd, &memory)?;
        let irqchip = state.irqchip.is_some();
        if irqchip {
            ioctl("KVM_CREATE_IRQCHIP", vm_fd.create_irq_chip())?;
        }
        let console = Console::new(opts.echo, opts.name.as_deref());
        let devices = Arc::new(Mutex::new(Devices::restore(
            memory.clone(),
            console.clone(),
            &state.devices,
            None,
        )));
        let mut vm = Vm::assemble(
            vm_fd,
            memory,
            devices,
            console,
            irqchip,
            state.guest.clone(),
            state.cmdline.clone(),
            started,
        );
        vm.vcpu_count = state.vcpus.len() as u8;
        vm.integrity = verifier;
        let mut fds = Vec::new();
        for vs in &state.vcpus {
            let fd = ioctl("KVM_CREATE_VCPU", vm.vm_fd.create_vcpu(vs.id as u64))?;
            vs.restore(ctx, &fd)?;
            fds.push((vs.id, fd, vs.cpuid.clone()));
        }
        for chip in state.irqchip.iter().flatten() {
            ioctl("KVM_SET_IRQCHIP", vm.vm_fd.set_irqchip(chip))?;
        }
        if let Some(mut clock) = state.clock {
            clock.flags = 0;
            ioctl("KVM_SET_CLOCK", vm.vm_fd.set_clock(&clock))?;
        }
        for (id, fd, entries) in fds {
            let cpuid = CpuId::from_entries(&entries).map_err(|e| {
                VmError::CpuState(CpuStateError::Incompatible(format!("CPUID: {e:?}")))
            })?;
            vm.spawn_vcpu(id, fd, cpuid)?;
        }
        Ok(vm)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn assemble(
        vm_fd: VmFd,
        memory: GuestMemory,
        devices: Arc<Mutex<Devices>>,
        console: Console,
        irqchip: bool,
        guest: String,
        cmdline: String,
        started: Instant,
    ) -> Vm {
        let (event_tx, events) = mpsc::channel();
        Vm {
            vcpus: Vec::new(),
            fault_handler: None,
            fork_service: None,
            integrity: None,
            vcpu_count: 1,
            events,
            event_tx,
            devices,
            console,
            irqchip,
            exit: None,
            guest,
            cmdline,
            times: StartTimes {
                started,
                first_run: Arc::new(OnceLock::new()),
            },
            memory,
            vm_fd,
        }
    }

    /// A clone's fault handler and its fork service (for `sf_exit`).
    pub(crate) fn set_clone_parts(&mut self, handler: FaultHandler, service: Arc<dyn ForkService>) {
        self.fault_handler = Some(handler);
        self.fork_service = Some(service);
    }

    pub fn fault_handler(&self) -> Option<&FaultHandler> {
        self.fault_handler.as_ref()
    }

    pub(crate) fn spawn_vcpu(
        &mut self,
        id: u8,
        fd: kvm_ioctls::VcpuFd,
        cpuid: CpuId,
    ) -> Result<(), VmError> {
        let events = self.event_tx.clone();
        let handle = VcpuHandle::spawn(VcpuSetup {
            id,
            fd,
            cpuid,
            irqchip: self.irqchip,
            devices: self.devices.clone(),
            events,
            first_run: self.times.first_run.clone(),
            vcpu_count: self.vcpu_count,
        })?;
        self.vcpus.push(handle);
        Ok(())
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// What the guest announced through `OP_HELLO`, if it did.
    pub fn guest_info(&self) -> Option<GuestInfo> {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hypercall
            .guest_info()
    }

    pub fn exit(&self) -> Option<&VmExit> {
        self.exit.as_ref()
    }

    pub fn is_paused(&self) -> bool {
        self.vcpus.iter().all(|v| v.state() == VcpuRunState::Paused)
    }

    /// Pauses every vCPU; returns how long that took.
    pub fn pause(&mut self) -> Result<Duration, VmError> {
        if self.exit.is_some() {
            return Err(VmError::Exited);
        }
        let t = Instant::now();
        for v in &self.vcpus {
            v.pause().map_err(|e| match e {
                VcpuError::Exited(_) => VmError::Exited,
                e => VmError::Vcpu(e),
            })?;
        }
        Ok(t.elapsed())
    }

    pub fn resume(&mut self) -> Result<(), VmError> {
        if self.exit.is_some() {
            return Err(VmError::Exited);
        }
        for v in &self.vcpus {
            v.resume().map_err(|_| VmError::Exited)?;
        }
        Ok(())
    }

    /// Forks the running VM into `clones` clones, started by the host: the
    /// VM pauses, its memory is frozen, the clones start from the
    /// descriptor and the parent resumes. The guest learns of the fork at
    /// its next tick boundary through its agent page (clone id 0 in the
    /// parent, 1..=clones in the clones).
    pub fn fork(&mut self, clones: u64) -> Result<Arc<Family>, VmError> {
        let requested_at = Instant::now();
        let service = self
            .fork_service
            .clone()
            .ok_or_else(|| VmError::ForkRefused("this VM has no fork service".into()))?;
        let hub = service
            .as_hub()
            .ok_or_else(|| VmError::ForkRefused("a clone cannot fork again".into()))?;
        if clones == 0 || clones > hub.max_clones() {
            return Err(VmError::BadClones {
                requested: clones,
                max: hub.max_clones(),
            });
        }
        if self.exit.is_some() {
            return Err(VmError::Exited);
        }
        if self.vcpu_count != 1 {
            return Err(VmError::ForkRefused(format!(
                "the VM has {} vCPUs; only single-vCPU VMs fork",
                self.vcpu_count
            )));
        }
        let agent = self
            .guest_info()
            .map(|g| g.agent_gpa)
            .filter(|a| *a != 0)
            .ok_or_else(|| {
                VmError::ForkRefused(
                    "the guest agent has not started yet; try again shortly".into(),
                )
            })?;
        let word = |w: usize| GuestAddress(agent + 8 * w as u64);
        self.pause()?;
        let forked = (|| -> Result<Arc<Family>, VmError> {
            // Read while paused: past this mark the guest no longer looks.
            if self
                .memory
                .read_obj::<u64>(word(abi::AGENT_WORD_FINISHED))
                .map_err(|e| VmError::Fork(format!("agent page: {e}")))?
                != 0
            {
                return Err(VmError::ForkRefused(
                    "the guest has finished its work and would not notice a fork".into(),
                ));
            }
            let vcpu = self.vcpus[0].save()?;
            let devices = self
                .devices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save();
            let epoch = self
                .memory
                .read_obj::<u64>(word(abi::AGENT_WORD_EPOCH))
                .map_err(|e| VmError::Fork(format!("agent page: {e}")))?
                .wrapping_add(1);
            let family = hub
                .fork_paused(
                    ForkRequest {
                        ticket: 0,
                        page_gpa: agent,
                        answer: Answer::Agent { epoch },
                        vcpu,
                        devices,
                        memory: self.memory.clone(),
                        requested_at,
                    },
                    clones,
                )
                .map_err(|e| VmError::Fork(e.to_string()))?;
            // The parent is clone 0 of the same fork.
            self.memory
                .write_obj(0u64, word(abi::AGENT_WORD_CLONE_ID))
                .and_then(|()| self.memory.write_obj(epoch, word(abi::AGENT_WORD_EPOCH)))
                .map_err(|e| VmError::Fork(format!("agent page: {e}")))?;
            Ok(family)
        })();
        let resumed = self.resume();
        let family = forked?;
        resumed?;
        Ok(family)
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed).
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotStats, VmError> {
        let t = Instant::now();
        if self.exit.is_some() {
            return Err(VmError::Exited);
        }
        if !self.is_paused() {
            return Err(VmError::NotPaused);
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for v in &self.vcpus {
            vcpus.push(v.save()?);
        }
        let irqchip = if self.irqchip {
            let mut chips = Vec::new();
            for chip_id in 0..3 {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                ioctl("KVM_GET_IRQCHIP", self.vm_fd.get_irqchip(&mut chip))?;
                chips.push(chip);
            }
            Some(chips)
        } else {
            None
        };
        let ctx = KvmContext::get()?;
        let clock = if ctx.caps.adjust_clock {
            Some(ioctl("KVM_GET_CLOCK", self.vm_fd.get_clock())?)
        } else {
            None
        };
        let devices = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        let state = VmState {
            mem_bytes: self.memory.last_addr().0 + 1,
            guest: self.guest.clone(),
            cmdline: self.cmdline.clone(),
            vcpus,
            irqchip,
            clock,
            devices,
        };
        // Never re-checksum memory restored from a damaged file.
        integrity::ensure_verified(&mut self.integrity)?;
        let w = persist::write_snapshot(dir, &self.memory, state)?;
        Ok(SnapshotStats {
            state_bytes: w.state_bytes,
            memory_bytes: w.memory_bytes,
            duration: t.elapsed(),
        })
    }

    /// Waits for the guest to end (or `timeout`), then stops every vCPU.
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<VmExit, VmError> {
        if let Some(e) = &self.exit {
            return Ok(e.clone());
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let event = loop {
            // A clone whose memory can no longer be served is stopped.
            if let Some(err) = self.fault_handler.as_ref().and_then(|h| h.error()) {
                self.stop_vcpus();
                let exit = VmExit::Failed(format!("clone memory: {err}"));
                self.exit = Some(exit.clone());
                return Ok(exit);
            }
            if let Some(err) = integrity::failed(&self.integrity) {
                self.stop_vcpus();
                let exit = VmExit::Failed(err);
                self.exit = Some(exit.clone());
                return Ok(exit);
            }
            let slice = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()).min(WAIT_SLICE),
                None => WAIT_SLICE,
            };
            match self.events.recv_timeout(slice) {
                Ok(e) => break e,
                Err(RecvTimeoutError::Disconnected) => return Err(VmError::Exited),
                Err(RecvTimeoutError::Timeout) => {
                    if let (Some(d), Some(t)) = (deadline, timeout) {
                        if Instant::now() >= d {
                            return Err(VmError::WaitTimeout(t));
                        }
                    }
                }
            }
        };
        self.stop_vcpus();
        let exit = integrity::failed_at_end(&mut self.integrity)
            .map_or(VmExit::from(event.reason), VmExit::Failed);
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    /// Whether the guest has ended (does not block).
    pub fn poll_exit(&mut self) -> Option<VmExit> {
        if self.exit.is_none() {
            if let Some(err) = integrity::failed(&self.integrity) {
                self.stop_vcpus();
                self.exit = Some(VmExit::Failed(err));
            } else if let Ok(event) = self.events.try_recv() {
                self.stop_vcpus();
                let exit = integrity::failed_at_end(&mut self.integrity);
                self.exit = Some(exit.map_or(VmExit::from(event.reason), VmExit::Failed));
            }
        }
        self.exit.clone()
    }

    /// Stops the VM for good.
    pub fn kill(&mut self) {
        self.stop_vcpus();
        if self.exit.is_none() {
            self.exit = Some(VmExit::Stopped);
        }
    }

    fn stop_vcpus(&mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop_vcpus();
        if let Some(f) = &self.fork_service {
            f.shutdown();
        }
        if let Some(h) = &mut self.fault_handler {
            h.stop();
        }
    }
}
