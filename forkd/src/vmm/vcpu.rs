//! One thread per vCPU, with an explicit Running / Paused / Exited state
//! machine driven from other threads through a command channel.
//!
//! Pausing a vCPU that sits in KVM_RUN: the controller sends the command,
//! then kicks the thread with a real-time signal whose handler sets
//! `kvm_run.immediate_exit`; KVM_RUN returns EINTR (or does at its next
//! entry, if the signal landed outside it), and the thread reads the
//! command. Before it reports Paused, the thread re-enters KVM_RUN once
//! with `immediate_exit` set, so that an I/O exit it just handled is
//! completed and the saved state is consistent (KVM API doc, KVM_RUN).

use crate::vmm::cpu_clock::CpuClock;
use crate::vmm::cpu_state::{CpuStateError, VcpuState};
use crate::vmm::devices::{Devices, PioAction};
use crate::vmm::kvm::KvmContext;
use crate::vmm::memory::GuestMemory;
use crate::vmm::persist::VmState;
use crate::vmm::services::{CallOutcome, CaptureError, GuestCall, HypercallService};
use crate::vmm::shared::VmShared;
use guest_agent::abi::{self, HypercallPage};
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// How long a vCPU may take to answer a command before we call it stuck.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    Running,
    Paused,
    Exited,
}

/// Why a vCPU thread ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest wrote this status to the exit port.
    Guest(u8),
    /// The guest executed HLT with nothing to wake it.
    Halted,
    /// Triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// Stopped by the VMM.
    Stopped,
    /// KVM reported an error or an exit we cannot handle.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {0} has exited")]
    Exited(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("vCPU {0} is running; pause it first")]
    NotPaused(u8),
    #[error("cannot save vCPU state")]
    State(#[from] CpuStateError),
    #[error(transparent)]
    Kvm(#[from] crate::vmm::kvm::KvmError),
    #[error("cannot start vCPU thread")]
    Spawn(#[source] std::io::Error),
    #[error("cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// An event a vCPU thread reports to its VM when it ends.
#[derive(Debug, Clone)]
pub struct VcpuEvent {
    pub vcpu: u8,
    pub reason: VcpuExitReason,
}

enum Command {
    Pause(Sender<()>),
    Resume,
    Save(Sender<Result<VcpuState, VcpuError>>),
    Stop,
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // the vCPU loop while it owns the VcpuFd and cleared before the fd
        // is dropped; a single-byte volatile store is async-signal-safe.
        unsafe { p.write_volatile(1) };
    }
}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    static RESULT: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    ONCE.call_once(|| {
        let _ = RESULT.set(register_signal_handler(kick_signal(), on_kick));
    });
    match RESULT.get() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(VcpuError::Signal(*e)),
        None => Ok(()),
    }
}

/// How long [`VcpuHandle::stop`] waits for a vCPU thread.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// Everything a vCPU thread needs.
pub struct VcpuSetup {
    pub id: u8,
    pub fd: VcpuFd,
    pub cpuid: CpuId,
    pub devices: Arc<Mutex<Devices>>,
    /// Who answers the hypercalls the VMM does not handle (none: refused).
    pub hypercalls: Option<Arc<dyn HypercallService>>,
    /// The VM this vCPU belongs to.
    pub vm: Arc<VmShared>,
    pub events: Sender<VcpuEvent>,
    /// Set just before the first KVM_RUN (restore/boot latency).
    pub first_run: Arc<OnceLock<Instant>>,
    /// This thread's CPU time, for the VM's load.
    pub cpu: Arc<CpuClock>,
}

/// The controller's side of a vCPU thread.
pub struct VcpuHandle {
    id: u8,
    commands: Sender<Command>,
    state: Arc<Mutex<VcpuRunState>>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn spawn(setup: VcpuSetup) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let (tx, rx) = mpsc::channel();
        let state = Arc::new(Mutex::new(VcpuRunState::Running));
        let id = setup.id;
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu_thread(setup, rx, thread_state))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            id,
            commands: tx,
            state,
            thread: Some(thread),
        })
    }

    pub fn state(&self) -> VcpuRunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // Failure means the thread is gone, which the command reply
            // reports on its own.
            let _ = t.kill(kick_signal());
        }
    }

    fn send(&self, cmd: Command) -> Result<(), VcpuError> {
        self.commands
            .send(cmd)
            .map_err(|_| VcpuError::Exited(self.id))?;
        self.kick();
        Ok(())
    }

    fn await_reply<T>(&self, rx: Receiver<T>) -> Result<T, VcpuError> {
        rx.recv_timeout(COMMAND_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, COMMAND_TIMEOUT),
            RecvTimeoutError::Disconnected => VcpuError::Exited(self.id),
        })
    }

    pub fn pause(&self) -> Result<(), VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Pause(tx))?;
        self.await_reply(rx)
    }

    pub fn resume(&self) -> Result<(), VcpuError> {
        self.send(Command::Resume)
    }

    pub fn save(&self) -> Result<VcpuState, VcpuError> {
        let (tx, rx) = mpsc::channel();
        self.send(Command::Save(tx))?;
        self.await_reply(rx)?
    }

    /// Stops the thread and waits for it.
    /// Stops the thread and joins it. A thread that has not ended is kicked
    /// again every 50 ms (a kick that found it outside KVM_RUN is not lost
    /// for good); after [`STOP_LIMIT`] it is left to end on its own, with an
    /// error logged, rather than hang the caller (it owns or shares
    /// everything it touches: the fd, the devices, the guest memory).
    pub fn stop(&mut self) {
        let _ = self.send(Command::Stop);
        let started = Instant::now();
        let mut kicked = started;
        let mut nap = Duration::from_micros(50);
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            if started.elapsed() > STOP_LIMIT {
                tracing::error!(
                    "vCPU {} did not stop within {STOP_LIMIT:?}; its thread is left to end on its own",
                    self.id
                );
                drop(self.thread.take());
                return;
            }
            if kicked.elapsed() > Duration::from_millis(50) {
                self.kick();
                kicked = Instant::now();
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(2));
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_state(state: &Mutex<VcpuRunState>, s: VcpuRunState) {
    *state.lock().unwrap_or_else(|e| e.into_inner()) = s;
}

fn vcpu_thread(mut setup: VcpuSetup, commands: Receiver<Command>, state: Arc<Mutex<VcpuRunState>>) {
    setup.cpu.attach_current_thread();
    let run = &mut setup.fd.get_kvm_run().immediate_exit as *mut u8;
    IMMEDIATE_EXIT.with(|c| c.set(run));
    let reason = run_loop(&mut setup, &commands, &state);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    setup.cpu.retire();
    set_state(&state, VcpuRunState::Exited);
    let _ = setup.events.send(VcpuEvent {
        vcpu: setup.id,
        reason,
    });
}

/// Completes any pending I/O and leaves KVM_RUN at once.
fn settle(fd: &mut VcpuFd) -> Result<(), VcpuExitReason> {
    fd.set_kvm_immediate_exit(1);
    let r = match fd.run() {
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
        Err(e) => Err(VcpuExitReason::Failed(format!("KVM_RUN: {e}"))),
        Ok(_) => Ok(()),
    };
    fd.set_kvm_immediate_exit(0);
    r
}

/// Handles commands (`first`, if given, then the channel's); returns
/// `Some(reason)` if the thread must end.
fn handle_commands(
    setup: &mut VcpuSetup,
    commands: &Receiver<Command>,
    state: &Mutex<VcpuRunState>,
    mut first: Option<Command>,
) -> Option<VcpuExitReason> {
    let mut paused = false;
    loop {
        let cmd = if let Some(c) = first.take() {
            c
        } else if paused {
            match commands.recv() {
                Ok(c) => c,
                Err(_) => return Some(VcpuExitReason::Stopped),
            }
        } else {
            match commands.try_recv() {
                Ok(c) => c,
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Disconnected) => return Some(VcpuExitReason::Stopped),
            }
        };
        match cmd {
            Command::Pause(reply) => {
                if !paused {
                    if let Err(r) = settle(&mut setup.fd) {
                        return Some(r);
                    }
                    paused = true;
                    set_state(state, VcpuRunState::Paused);
                }
                let _ = reply.send(());
            }
            Command::Resume => {
                paused = false;
                set_state(state, VcpuRunState::Running);
            }
            Command::Save(reply) => {
                let r = if paused {
                    KvmContext::get().map_err(VcpuError::Kvm).and_then(|ctx| {
                        VcpuState::save(ctx, &setup.fd, setup.id, &setup.cpuid, setup.vm.irqchip)
                            .map_err(VcpuError::from)
                    })
                } else {
                    Err(VcpuError::NotPaused(setup.id))
                };
                let _ = reply.send(r);
            }
            Command::Stop => return Some(VcpuExitReason::Stopped),
        }
    }
}

/// A hypercall as the VM's service sees it: the calling vCPU's thread.
struct VcpuCall<'a> {
    setup: &'a mut VcpuSetup,
    page_gpa: u64,
}

impl GuestCall for VcpuCall<'_> {
    fn page_gpa(&self) -> u64 {
        self.page_gpa
    }

    fn memory(&self) -> &GuestMemory {
        &self.setup.vm.memory
    }

    fn capture(&mut self) -> Result<VmState, CaptureError> {
        let setup = &mut *self.setup;
        if setup.vm.vcpu_count != 1 {
            return Err(CaptureError::MultipleVcpus(setup.vm.vcpu_count));
        }
        // Complete the doorbell `out` first, so the state resumes after it.
        settle(&mut setup.fd).map_err(|r| CaptureError::Settle(format!("{r:?}")))?;
        let ctx = KvmContext::get()?;
        let vcpu = VcpuState::save(ctx, &setup.fd, setup.id, &setup.cpuid, setup.vm.irqchip)?;
        let devices = setup
            .devices
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save();
        Ok(VmState {
            mem_bytes: setup.vm.mem_bytes(),
            guest: setup.vm.guest.clone(),
            cmdline: setup.vm.cmdline.clone(),
            vcpus: vec![vcpu],
            irqchip: None,
            clock: setup.vm.clock().map_err(CaptureError::Clock)?,
            devices,
        })
    }
}

/// Hands a hypercall to the VM's service (no lock held) and answers it.
fn serve_hypercall(
    setup: &mut VcpuSetup,
    page_gpa: u64,
    page: &HypercallPage,
) -> Option<VcpuExitReason> {
    let outcome = match setup.hypercalls.clone() {
        Some(service) => service.call(page, &mut VcpuCall { setup, page_gpa }),
        None => CallOutcome::status(abi::STATUS_UNKNOWN_OP),
    };
    match outcome {
        CallOutcome::Answer { status, ret } => {
            setup
                .devices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .hypercall
                .complete(page_gpa, status, ret);
            None
        }
        CallOutcome::Exit(status) => Some(VcpuExitReason::Guest(status)),
    }
}

/// `OP_SLEEP` (the device answered it already): wait up to `d` on the
/// command channel, outside KVM_RUN and with no device lock held. A
/// command ends the sleep early and is handled as at the top of the loop
/// (a pause settles the doorbell `out`, so a save taken now resumes after
/// the call); the guest checks its clock and sleeps again if it is early.
fn sleep_vcpu(
    setup: &mut VcpuSetup,
    commands: &Receiver<Command>,
    state: &Mutex<VcpuRunState>,
    d: Duration,
) -> Option<VcpuExitReason> {
    match commands.recv_timeout(d) {
        Ok(cmd) => handle_commands(setup, commands, state, Some(cmd)),
        Err(RecvTimeoutError::Timeout) => None,
        Err(RecvTimeoutError::Disconnected) => Some(VcpuExitReason::Stopped),
    }
}

fn run_loop(
    setup: &mut VcpuSetup,
    commands: &Receiver<Command>,
    state: &Mutex<VcpuRunState>,
) -> VcpuExitReason {
    loop {
        if let Some(reason) = handle_commands(setup, commands, state, None) {
            return reason;
        }
        setup.first_run.get_or_init(Instant::now);
        match setup.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                let action = setup
                    .devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pio_write(port, data);
                match action {
                    PioAction::Continue => {}
                    PioAction::Exit(status) => return VcpuExitReason::Guest(status),
                    PioAction::Fail(why) => return VcpuExitReason::Failed(why),
                    PioAction::Service { page_gpa, page } => {
                        if let Some(reason) = serve_hypercall(setup, page_gpa, &page) {
                            return reason;
                        }
                    }
                    PioAction::Sleep { ns } => {
                        let d = Duration::from_nanos(ns.min(abi::SLEEP_MAX_NS));
                        if let Some(reason) = sleep_vcpu(setup, commands, state, d) {
                            return reason;
                        }
                    }
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => setup
                .devices
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pio_read(port, data),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) => {}
            Ok(VcpuExit::Hlt) => return VcpuExitReason::Halted,
            Ok(VcpuExit::Shutdown) => return VcpuExitReason::TripleFault,
            Ok(VcpuExit::InternalError) => {
                let rip = setup.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                return VcpuExitReason::Failed(format!(
                    "KVM internal error (emulation failure?) at rip={rip:#x}"
                ));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return VcpuExitReason::Failed(format!(
                    "KVM entry failure, hardware reason {reason:#x} on cpu {cpu}"
                ))
            }
            Ok(other) => return VcpuExitReason::Failed(format!("unexpected exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                setup.fd.set_kvm_immediate_exit(0);
            }
            Err(e) => return VcpuExitReason::Failed(format!("KVM_RUN: {e}")),
        }
    }
}
