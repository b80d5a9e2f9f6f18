//! The destination side: an explicit state machine (see the module docs of
//! [`crate::migrate`]) driven by [`receive`]. It accepts connections on its
//! listener until one presents the migration's secret (a peer that sends
//! garbage, another version or the wrong secret is answered with `Abort`
//! and dropped), fills fresh anonymous guest memory with the pages that
//! arrive, builds the VM from the state with the shared builder, and starts
//! it only on `Commit`, through the [`CommitGate`] that also lets the
//! source's host ask, atomically, whether it committed.

use super::micros;
use super::postcopy::{self, PostcopyError};
use super::protocol::{self, Hello, Message, PostcopyOffer, ProtocolError};
use crate::fork::clone::{rehome, FamilySource};
use crate::fork::fault::FaultStatsView;
use crate::fork::ForkError;
use crate::vmm::builder::VmShell;
use crate::vmm::dirty::{PageBitmap, PAGE_SIZE};
use crate::vmm::memory::{self, GuestMemory};
use crate::vmm::persist::VmState;
use crate::vmm::vm::{BuildOptions, MAX_VCPUS};
use crate::vmm::{Vm, VmError};
use bincode::Options;
use serde::Serialize;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Longest wait for a connection's first message.
const HELLO_TIMEOUT: Duration = Duration::from_secs(2);

/// What the destination expects.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub secret: [u8; 32],
    pub mem_bytes: u64,
    /// How long to wait for the source to connect.
    pub accept_timeout: Duration,
    /// Longest wait for the next message.
    pub io_timeout: Duration,
    /// A clone: the pages that do not come fault in from its family's
    /// memory server ([`crate::fork::clone::rehome`]).
    pub family: Option<FamilySource>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("no source connected within {0:?}")]
    AcceptTimeout(Duration),
    #[error("listening for the source: {0}")]
    Listen(std::io::Error),
    #[error("from the source: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the source presented the wrong secret")]
    BadSecret,
    #[error("the source's VM ({got}) does not match the migration opened ({expected})")]
    Mismatch { expected: String, got: String },
    #[error("{got} message where {expected} was expected")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("pages {first}..{end} lie outside guest memory of {pages} pages")]
    OutsideMemory { first: u64, end: u64, pages: u64 },
    #[error("the source aborted: {0}")]
    SourceAborted(String),
    #[error("the VM state cannot be decoded: {0}")]
    BadState(String),
    #[error("guest memory: {0}")]
    Memory(#[from] memory::MemoryError),
    #[error("building the VM: {0}")]
    Build(#[from] VmError),
    #[error("the migration was aborted on this host before commit")]
    Aborted,
    #[error("the VM could not be registered: {0}")]
    Register(String),
    #[error(transparent)]
    Postcopy(#[from] PostcopyError),
    #[error("a clone migrates by pre-copy only: its missing pages are its family's")]
    ClonePostcopy,
    #[error("the clone's memory: {0}")]
    Rehome(#[source] ForkError),
}

/// Where the destination is, as its API shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GateState {
    /// Receiving, or waiting for commit.
    Open,
    Committed,
    Aborted,
}

/// The commit decision, taken once: by the receiver on `Commit` (the VM is
/// started and registered while the gate is held), or by an abort from
/// the API (the source's host resolving an in-doubt commit). Whoever
/// comes second sees the first one's decision.
#[derive(Debug)]
pub struct CommitGate {
    state: Mutex<(GateState, Option<String>)>,
}

impl Default for CommitGate {
    fn default() -> Self {
        CommitGate {
            state: Mutex::new((GateState::Open, None)),
        }
    }
}

impl CommitGate {
    fn lock(&self) -> MutexGuard<'_, (GateState, Option<String>)> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Aborts unless committed; the decision and the committed VM's id.
    pub fn abort(&self) -> (GateState, Option<String>) {
        let mut g = self.lock();
        if g.0 == GateState::Open {
            g.0 = GateState::Aborted;
        }
        g.clone()
    }

    pub fn state(&self) -> (GateState, Option<String>) {
        self.lock().clone()
    }
}

/// What the receiver did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReceiveReport {
    pub pages_received: u64,
    pub bytes_received: u64,
    pub rounds: u32,
    /// Connections refused before the source's (garbage, wrong version or
    /// secret), and why the last one was.
    pub rejected: u64,
    pub last_rejection: Option<String>,
    /// State received until the VM ran here.
    pub build_us: u64,
    pub vm: Option<String>,
    /// Post-copy: pages to fetch after resuming, those still missing (none
    /// once done), commit until the last one arrived, and why fetching
    /// failed (the guest here then fails too).
    pub postcopy_pages_needed: u64,
    pub postcopy_pages_left: u64,
    pub postcopy_window_us: Option<u64>,
    pub postcopy_error: Option<String>,
}

impl ReceiveReport {
    /// Committed in post-copy and still fetching from the source.
    pub fn postcopy_pending(&self) -> bool {
        self.postcopy_pages_needed > 0
            && self.postcopy_window_us.is_none()
            && self.postcopy_error.is_none()
    }
}

/// Progress the API shows while receiving.
#[derive(Default)]
pub struct ReceiveProgress {
    report: Mutex<ReceiveReport>,
    /// A clone's fault counters, once its memory is set up here.
    faults: OnceLock<FaultStatsView>,
}

impl std::fmt::Debug for ReceiveProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveProgress")
            .field("report", &self.view())
            .finish()
    }
}

impl ReceiveProgress {
    fn update(&self, f: impl FnOnce(&mut ReceiveReport)) {
        f(&mut self.report.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A clone's fault counters (from the build on).
    pub fn faults(&self) -> Option<FaultStatsView> {
        self.faults.get().cloned()
    }

    pub fn view(&self) -> ReceiveReport {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The receiver's states.
enum State {
    Accept,
    Receiving {
        conn: Conn,
        shell: VmShell,
    },
    Building {
        conn: Conn,
        shell: VmShell,
        state: Box<VmState>,
        console: Vec<String>,
        /// Post-copy, as offered by the source: where the rest comes from.
        postcopy: Option<PostcopyOffer>,
        /// The pages pre-copy wrote here.
        have: PageBitmap,
    },
    Done(String),
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn recv(&mut self) -> Result<Message, ProtocolError> {
        protocol::read_message(&mut self.reader)
    }

    fn send(&mut self, m: &Message) -> Result<(), ProtocolError> {
        protocol::write_message(&mut self.writer, m)?;
        self.writer.flush()?;
        Ok(())
    }
}

/// Receives one VM on `listener`; `commit` registers the started VM and
/// returns its id (it runs while the gate is held). Returns the id.
pub fn receive(
    listener: TcpListener,
    inc: &Incoming,
    build: BuildOptions,
    gate: &CommitGate,
    progress: &ReceiveProgress,
    commit: impl FnOnce(Vm) -> Result<String, String>,
) -> Result<String, ReceiveError> {
    let mut build = Some(build);
    let mut commit = Some(commit);
    let mut state = State::Accept;
    let mut conn_for_abort: Option<TcpStream> = None;
    let result = loop {
        let step = match state {
            State::Done(id) => break Ok(id),
            State::Accept => accept(&listener, inc, progress).map(|(conn, shell)| {
                conn_for_abort = conn.writer.try_clone().ok();
                State::Receiving { conn, shell }
            }),
            State::Receiving { conn, shell } => receiving(conn, shell, gate, progress),
            State::Building {
                conn,
                shell,
                state,
                console,
                postcopy,
                have,
            } => match (build.take(), commit.take()) {
                (Some(b), Some(c)) => {
                    for line in &console {
                        b.console.push_bytes(line.as_bytes());
                        b.console.push_byte(b'\n');
                    }
                    let arrived = Arrived {
                        postcopy,
                        have,
                        family: inc.family.as_ref(),
                    };
                    building(conn, shell, &state, arrived, b, c, gate, progress)
                }
                _ => Err(ReceiveError::Aborted),
            },
        };
        match step {
            Ok(next) => state = next,
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &result {
        // Nothing runs here: make sure the gate says so, tell the source.
        gate.abort();
        if let Some(mut s) = conn_for_abort {
            if !matches!(e, ReceiveError::SourceAborted(_)) {
                let _ = protocol::write_message(
                    &mut s,
                    &Message::Abort {
                        reason: e.to_string(),
                    },
                );
            }
        }
    }
    result
}

/// Waits for the source: connections that do not start with a valid
/// `Hello` carrying the secret are answered with `Abort` and dropped.
fn accept(
    listener: &TcpListener,
    inc: &Incoming,
    progress: &ReceiveProgress,
) -> Result<(Conn, VmShell), ReceiveError> {
    let deadline = Instant::now() + inc.accept_timeout;
    listener
        .set_nonblocking(true)
        .map_err(ReceiveError::Listen)?;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(ReceiveError::AcceptTimeout(inc.accept_timeout));
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => return Err(ReceiveError::Listen(e)),
        };
        match handshake(stream, inc) {
            Ok(c) => return Ok(c),
            Err((why, stream)) => {
                tracing::warn!("migration connection refused: {why}");
                // Counted before the answer: whoever got it sees the count.
                progress.update(|r| {
                    r.rejected += 1;
                    r.last_rejection = Some(why.to_string());
                });
                if let Some(mut s) = stream {
                    let _ = protocol::write_message(
                        &mut s,
                        &Message::Abort {
                            reason: why.to_string(),
                        },
                    );
                }
                if Instant::now() >= deadline {
                    return Err(ReceiveError::AcceptTimeout(inc.accept_timeout));
                }
            }
        }
    }
}

type Refusal = (ReceiveError, Option<TcpStream>);

/// A valid `Hello` → fresh guest memory in a VM shell (KVM VM, memory
/// slot, vCPUs): made now, so its cost is not part of the downtime.
fn handshake(stream: TcpStream, inc: &Incoming) -> Result<(Conn, VmShell), Refusal> {
    let setup = |s: &TcpStream| -> std::io::Result<TcpStream> {
        s.set_nonblocking(false)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(inc.io_timeout))?;
        s.set_write_timeout(Some(inc.io_timeout))?;
        s.try_clone()
    };
    let writer = setup(&stream).map_err(|e| (ReceiveError::Listen(e), None))?;
    // A peer that connects and says nothing holds the listener up only
    // this long (the source's Hello is there at once).
    stream
        .set_read_timeout(Some(inc.io_timeout.min(HELLO_TIMEOUT)))
        .map_err(|e| (ReceiveError::Listen(e), None))?;
    let mut conn = Conn {
        reader: BufReader::with_capacity(1 << 20, stream),
        writer,
    };
    let refuse = |e: ReceiveError, c: &Conn| (e, c.writer.try_clone().ok());
    let hello = match conn.recv() {
        Ok(Message::Hello(h)) => h,
        Ok(other) => {
            let e = ReceiveError::Unexpected {
                expected: "Hello",
                got: other.kind(),
            };
            return Err(refuse(e, &conn));
        }
        Err(e) => return Err(refuse(e.into(), &conn)),
    };
    check_hello(&hello, inc).map_err(|e| refuse(e, &conn))?;
    conn.reader
        .get_ref()
        .set_read_timeout(Some(inc.io_timeout))
        .map_err(|e| refuse(ReceiveError::Listen(e), &conn))?;
    let memory = memory::anonymous(inc.mem_bytes).map_err(|e| refuse(e.into(), &conn))?;
    let ids: Vec<u8> = (0..hello.vcpus).collect();
    let shell =
        VmShell::create(memory, &ids, hello.irqchip).map_err(|e| refuse(e.into(), &conn))?;
    conn.send(&Message::Welcome)
        .map_err(|e| refuse(e.into(), &conn))?;
    Ok((conn, shell))
}

fn check_hello(h: &Hello, inc: &Incoming) -> Result<(), ReceiveError> {
    // Constant time: the secret is the only credential on this port.
    let diff = h
        .secret
        .iter()
        .zip(inc.secret.iter())
        .fold(0u8, |a, (x, y)| a | (x ^ y));
    if diff != 0 {
        return Err(ReceiveError::BadSecret);
    }
    if h.mem_bytes != inc.mem_bytes || h.vcpus == 0 || h.vcpus > MAX_VCPUS {
        return Err(ReceiveError::Mismatch {
            expected: format!("{} bytes", inc.mem_bytes),
            got: format!("{} bytes, {} vCPUs", h.mem_bytes, h.vcpus),
        });
    }
    Ok(())
}

fn receiving(
    mut conn: Conn,
    shell: VmShell,
    gate: &CommitGate,
    progress: &ReceiveProgress,
) -> Result<State, ReceiveError> {
    let memory = shell.memory().clone();
    let pages = mem_pages(&memory);
    let zeros = vec![0u8; (protocol::MAX_PAGES_PER_MESSAGE * PAGE_SIZE) as usize];
    let mut console = Vec::new();
    let mut offer = None;
    // The pages written here, for post-copy.
    let mut have = PageBitmap::repeat(false, pages as usize);
    let mut mark = |first: u64, count: u32| {
        have[first as usize..(first + count as u64) as usize].fill(true);
    };
    loop {
        // Aborted from the API meanwhile: stop taking pages.
        if gate.state().0 == GateState::Aborted {
            return Err(ReceiveError::Aborted);
        }
        match conn.recv()? {
            Message::Pages { first, count, data } => {
                check_range(first, count, pages)?;
                write(&memory, first, &data)?;
                mark(first, count);
                progress.update(|r| {
                    r.pages_received += count as u64;
                    r.bytes_received += data.len() as u64;
                });
            }
            Message::Zeros { first, count } => {
                check_range(first, count, pages)?;
                write(
                    &memory,
                    first,
                    &zeros[..(count as u64 * PAGE_SIZE) as usize],
                )?;
                mark(first, count);
            }
            Message::Postcopy(o) => {
                if o.needed.len() as u64 != pages.div_ceil(64) {
                    return Err(PostcopyError::BadNeeded {
                        got: o.needed.len(),
                        pages,
                    }
                    .into());
                }
                offer = Some(o);
            }
            Message::RoundEnd { round, .. } => {
                progress.update(|r| r.rounds = round + 1);
                conn.send(&Message::RoundAck { round })?;
            }
            Message::Console(lines) => console = lines,
            Message::State(bytes) => {
                let state: VmState = bincode::DefaultOptions::new()
                    .with_limit(protocol::MAX_PAYLOAD as u64)
                    .deserialize(&bytes)
                    .map_err(|e| ReceiveError::BadState(e.to_string()))?;
                return Ok(State::Building {
                    conn,
                    shell,
                    state: Box::new(state),
                    console,
                    postcopy: offer,
                    have,
                });
            }
            Message::Abort { reason } => return Err(ReceiveError::SourceAborted(reason)),
            other => {
                return Err(ReceiveError::Unexpected {
                    expected: "Pages, Zeros, RoundEnd, Console, Postcopy or State",
                    got: other.kind(),
                })
            }
        }
    }
}

fn mem_pages(m: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryBackend;
    (m.last_addr().0 + 1) / PAGE_SIZE
}

fn check_range(first: u64, count: u32, pages: u64) -> Result<(), ReceiveError> {
    let end = first.saturating_add(count as u64);
    if end > pages {
        return Err(ReceiveError::OutsideMemory { first, end, pages });
    }
    Ok(())
}

fn write(memory: &GuestMemory, first: u64, data: &[u8]) -> Result<(), ReceiveError> {
    // In bounds (checked), so the write cannot fail; report it if it does.
    memory
        .write_slice(data, GuestAddress(first * PAGE_SIZE))
        .map_err(|e| ReceiveError::BadState(format!("writing guest memory: {e}")))
}

/// What came before the state, and where the rest of memory is.
struct Arrived<'a> {
    postcopy: Option<PostcopyOffer>,
    have: PageBitmap,
    family: Option<&'a FamilySource>,
}

#[allow(clippy::too_many_arguments)]
fn building(
    mut conn: Conn,
    shell: VmShell,
    state: &VmState,
    arrived: Arrived<'_>,
    mut build: BuildOptions,
    commit: impl FnOnce(Vm) -> Result<String, String>,
    gate: &CommitGate,
    progress: &ReceiveProgress,
) -> Result<State, ReceiveError> {
    let t = Instant::now();
    if state.vcpus.is_empty() || state.vcpus.len() > MAX_VCPUS as usize {
        return Err(ReceiveError::BadState(format!(
            "{} vCPUs",
            state.vcpus.len()
        )));
    }
    // A clone: what did not come faults in from its family.
    if let Some(family) = arrived.family {
        if arrived.postcopy.is_some() {
            return Err(ReceiveError::ClonePostcopy);
        }
        let (handler, faults, service) = rehome(shell.memory(), &arrived.have, family, "migrated")
            .map_err(ReceiveError::Rehome)?;
        let _ = progress.faults.set(faults);
        build.memory_server = Some(Box::new(handler));
        build.hypercalls = Some(service);
    }
    // Post-copy: the rest of memory faults in from the source.
    let arrival = match arrived.postcopy {
        Some(offer) => {
            let (handler, arrival) =
                postcopy::arrive(shell.memory(), &offer, &arrived.have, "migrated")?;
            build.memory_server = Some(Box::new(handler));
            let needed = arrival.needed();
            progress.update(|r| {
                r.postcopy_pages_needed = needed;
                r.postcopy_pages_left = needed;
            });
            Some(arrival)
        }
        None => None,
    };
    let prepared = shell.build(state, build)?;
    conn.send(&Message::Ready)?;
    match conn.recv()? {
        Message::Commit => {}
        Message::Abort { reason } => return Err(ReceiveError::SourceAborted(reason)),
        other => {
            return Err(ReceiveError::Unexpected {
                expected: "Commit",
                got: other.kind(),
            })
        }
    }
    // The decision: under the gate, so an abort from the API either came
    // first (refused here) or sees the committed VM.
    let id = {
        let mut g = gate.lock();
        if g.0 != GateState::Open {
            return Err(ReceiveError::Aborted);
        }
        let vm = prepared.start()?;
        let id = commit(vm).map_err(ReceiveError::Register)?;
        *g = (GateState::Committed, Some(id.clone()));
        id
    };
    progress.update(|r| {
        r.build_us = micros(t.elapsed());
        r.vm = Some(id.clone());
    });
    // The guest runs here now; a lost acknowledgement is resolved by the
    // source through the gate.
    if let Err(e) = conn.send(&Message::Committed { vm: id.clone() }) {
        tracing::warn!("commit acknowledgement not delivered: {e}");
    }
    if let Some(arrival) = arrival {
        let left = |n| progress.update(|r| r.postcopy_pages_left = n);
        match arrival.wait(&mut conn.writer, &left) {
            Ok(done) => progress.update(|r| r.postcopy_window_us = Some(micros(done.window))),
            Err(why) => {
                tracing::warn!("post-copy of {id} failed: {why}");
                progress.update(|r| r.postcopy_error = Some(why));
            }
        }
    }
    Ok(State::Done(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_decides_once() {
        let g = CommitGate::default();
        assert_eq!(g.state().0, GateState::Open);
        // Committed first: an abort afterwards learns it.
        *g.lock() = (GateState::Committed, Some("vm-3".into()));
        assert_eq!(g.abort(), (GateState::Committed, Some("vm-3".into())));
        // Aborted first: it stays aborted.
        let g = CommitGate::default();
        assert_eq!(g.abort().0, GateState::Aborted);
        assert_eq!(g.abort().0, GateState::Aborted);
        assert_eq!(g.state().0, GateState::Aborted);
    }

    #[test]
    fn hello_checks() {
        let inc = Incoming {
            secret: [9; 32],
            mem_bytes: 64 << 20,
            accept_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(1),
            family: None,
        };
        let mut h = Hello {
            secret: [9; 32],
            mem_bytes: 64 << 20,
            vcpus: 1,
            irqchip: false,
            source: "t".into(),
        };
        assert!(check_hello(&h, &inc).is_ok());
        h.secret[31] ^= 1;
        assert!(matches!(
            check_hello(&h, &inc),
            Err(ReceiveError::BadSecret)
        ));
        h.secret[31] ^= 1;
        h.mem_bytes = 128 << 20;
        assert!(matches!(
            check_hello(&h, &inc),
            Err(ReceiveError::Mismatch { .. })
        ));
        h.mem_bytes = 64 << 20;
        h.vcpus = 0;
        assert!(check_hello(&h, &inc).is_err());
        assert!(check_range(10, 6, 16).is_ok());
        assert!(matches!(
            check_range(10, 7, 16),
            Err(ReceiveError::OutsideMemory { .. })
        ));
        assert!(check_range(u64::MAX, 1, 16).is_err());
    }
}
