//! A microVM: KVM VM, guest memory, devices and vCPU threads, with boot,
//! pause/resume, state capture, snapshot and restore. VMs made from saved
//! state (restore, clones, migration) are built by [`crate::vmm::builder`].

use crate::vmm::boot::BootError;
use crate::vmm::cpu_clock::CpuClock;
use crate::vmm::cpu_state::CpuStateError;
use crate::vmm::devices::{Console, Devices, GuestInfo};
use crate::vmm::integrity::{self, Verifier};
use crate::vmm::kvm::KvmError;
use crate::vmm::memory::{GuestMemory, MemoryError};
use crate::vmm::persist::{self, PersistError, VmState};
use crate::vmm::services::{HypercallService, MemoryServer};
use crate::vmm::shared::VmShared;
use crate::vmm::vcpu::{VcpuError, VcpuEvent, VcpuExitReason, VcpuHandle, VcpuRunState, VcpuSetup};
use kvm_bindings::{kvm_irqchip, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::VmFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

pub const MAX_VCPUS: u8 = 32;
/// `wait` checks the memory server (if any) this often.
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
    #[error("the guest did not finish within {0:?}")]
    WaitTimeout(Duration),
    #[error("saved state does not fit the VM being built: {0}")]
    StateMismatch(String),
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

/// How a VM is wired to the world.
pub struct BuildOptions {
    pub console: Console,
    /// Who answers the hypercalls the VMM does not handle.
    pub hypercalls: Option<Arc<dyn HypercallService>>,
    /// Who fills the memory on demand, if anyone.
    pub memory_server: Option<Box<dyn MemoryServer>>,
    /// When making the VM began (for start latencies).
    pub started: Instant,
}

pub struct Vm {
    vcpus: Vec<VcpuHandle>,
    /// Each vCPU thread's CPU time.
    cpu: Vec<Arc<CpuClock>>,
    /// Serves memory filled on demand (a clone's userfaultfd handler):
    /// stopped after the vCPUs (which may wait on it), before the memory
    /// goes.
    memory_server: Option<Box<dyn MemoryServer>>,
    hypercalls: Option<Arc<dyn HypercallService>>,
    /// A lazily restored VM's background check of its memory file.
    pub(crate) integrity: Option<Verifier>,
    events: Receiver<VcpuEvent>,
    event_tx: mpsc::Sender<VcpuEvent>,
    devices: Arc<Mutex<Devices>>,
    console: Console,
    exit: Option<VmExit>,
    pub times: StartTimes,
    shared: Arc<VmShared>,
    /// Who has KVM's dirty log on (`vmm::dirty`).
    pub(crate) dirty_use: Mutex<crate::vmm::dirty_log_state::LogState>,
}

pub fn register_memory(vm_fd: &VmFd, mem: &GuestMemory) -> Result<(), VmError> {
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

impl Vm {
    /// A VM around `shared`, with no vCPU thread yet.
    pub(crate) fn assemble(shared: VmShared, devices: Devices, opts: BuildOptions) -> Vm {
        let (event_tx, events) = mpsc::channel();
        Vm {
            vcpus: Vec::new(),
            cpu: Vec::new(),
            memory_server: opts.memory_server,
            hypercalls: opts.hypercalls,
            integrity: None,
            events,
            event_tx,
            devices: Arc::new(Mutex::new(devices)),
            console: opts.console,
            exit: None,
            times: StartTimes {
                started: opts.started,
                first_run: Arc::new(OnceLock::new()),
            },
            shared: Arc::new(shared),
            dirty_use: Mutex::default(),
        }
    }

    /// Starts one thread per vCPU.
    pub(crate) fn start_vcpus(
        &mut self,
        fds: Vec<(u8, kvm_ioctls::VcpuFd, CpuId)>,
    ) -> Result<(), VmError> {
        for (id, fd, cpuid) in fds {
            let cpu = Arc::new(CpuClock::default());
            self.cpu.push(cpu.clone());
            let handle = VcpuHandle::spawn(VcpuSetup {
                cpu,
                id,
                fd,
                cpuid,
                devices: self.devices.clone(),
                hypercalls: self.hypercalls.clone(),
                vm: self.shared.clone(),
                events: self.event_tx.clone(),
                first_run: self.times.first_run.clone(),
            })?;
            self.vcpus.push(handle);
        }
        Ok(())
    }

    pub fn vcpu_count(&self) -> u8 {
        self.shared.vcpu_count
    }

    /// CPU time the vCPU threads have used so far (guest code and exit
    /// handling; not the time paused or asleep).
    pub fn cpu_time(&self) -> Duration {
        crate::vmm::cpu_clock::total(&self.cpu)
    }

    /// The vCPU threads' CPU clocks, for a sampler that reads them
    /// without holding the VM (their last times outlive the threads).
    pub fn cpu_clocks(&self) -> Vec<Arc<CpuClock>> {
        self.cpu.clone()
    }

    /// Faults its memory server (a userfaultfd handler: clones, post-copy
    /// arrivals) has served so far; `None` without one.
    pub fn memory_faults(&self) -> Option<u64> {
        self.memory_server.as_ref().map(|m| m.faults())
    }

    pub fn console(&self) -> &Console {
        &self.console
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.shared.memory
    }

    /// Guest memory size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.shared.mem_bytes()
    }

    pub(crate) fn vm_fd(&self) -> &VmFd {
        &self.shared.vm_fd
    }

    /// The record of guest pages the VMM writes itself (KVM's dirty log
    /// does not see them). A layer above that writes guest memory while
    /// dirty tracking is on records its writes here.
    pub fn vmm_writes(&self) -> crate::vmm::page_bitmap::VmmWrites {
        self.devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .hypercall
            .writes()
            .clone()
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

    /// The whole state of the paused VM but its memory: vCPUs, irqchip,
    /// clock, devices. What snapshots, host-initiated forks and migration
    /// carry.
    pub fn capture_state(&self) -> Result<VmState, VmError> {
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
        let irqchip = if self.shared.irqchip {
            let mut chips = Vec::new();
            for chip_id in 0..3 {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                ioctl("KVM_GET_IRQCHIP", self.shared.vm_fd.get_irqchip(&mut chip))?;
                chips.push(chip);
            }
            Some(chips)
        } else {
            None
        };
        let clock = ioctl("KVM_GET_CLOCK", self.shared.clock())?;
        let devices = self
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        Ok(VmState {
            mem_bytes: self.shared.mem_bytes(),
            guest: self.shared.guest.clone(),
            cmdline: self.shared.cmdline.clone(),
            vcpus,
            irqchip,
            clock,
            devices,
        })
    }

    /// Writes a snapshot of the paused VM into `dir` (created if needed).
    pub fn snapshot(&mut self, dir: &Path) -> Result<SnapshotStats, VmError> {
        let t = Instant::now();
        let state = self.capture_state()?;
        // Never re-checksum memory restored from a damaged file.
        integrity::ensure_verified(&mut self.integrity)?;
        let w = persist::write_snapshot(dir, &self.shared.memory, state)?;
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
            // A VM whose memory can no longer be served is stopped.
            if let Some(exit) = self.memory_failed() {
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
        // A vCPU that ran on after its memory server gave up (it woke on a
        // zero page) ends for that reason, whatever it then did.
        if let Some(exit) = self.memory_failed() {
            return Ok(exit);
        }
        self.stop_vcpus();
        let exit = integrity::failed_at_end(&mut self.integrity)
            .map_or(VmExit::from(event.reason), VmExit::Failed);
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    /// Ends the VM if its memory server has failed.
    fn memory_failed(&mut self) -> Option<VmExit> {
        let err = self.memory_server.as_ref().and_then(|m| m.error())?;
        self.stop_vcpus();
        let exit = VmExit::Failed(format!("guest memory can no longer be served: {err}"));
        self.exit = Some(exit.clone());
        Some(exit)
    }

    /// Whether the guest has ended (does not block).
    pub fn poll_exit(&mut self) -> Option<VmExit> {
        if self.exit.is_none() && self.memory_failed().is_some() {
            return self.exit.clone();
        }
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
        if let Some(h) = &self.hypercalls {
            h.shutdown();
        }
        if let Some(m) = &mut self.memory_server {
            m.stop();
        }
    }
}
