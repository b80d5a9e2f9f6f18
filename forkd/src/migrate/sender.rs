//! The source side: an explicit state machine (see the module docs of
//! [`crate::migrate`]) driven by [`migrate`]. The caller owns the VM; on
//! any error before commit the VM is running again when `migrate` returns.

use super::converge::{Convergence, Decision, StopReason};
use super::postcopy::{PostcopyError, Serving, Tail};
use super::protocol::{self, Hello, Message, ProtocolError, MAX_PAGES_PER_MESSAGE};
use super::{micros, MigrateOptions, Mode, Phase, Progress, Report};
use crate::vmm::dirty::{self, DirtyError, PageBitmap, PageRange, PAGE_SIZE};
use crate::vmm::{Vm, VmError};
use bincode::Options;
use memserver::server::MemServer;
use std::io::{BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Where to send the VM.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub addr: SocketAddr,
    pub secret: [u8; 32],
    /// This VM's name for the destination's logs (`h1/vm-3`).
    pub source: String,
    /// This host's memory server, which serves the rest of memory in
    /// post-copy (modes `postcopy` and `auto`).
    pub memserver: Option<Arc<MemServer>>,
}

/// A committed migration: the destination runs the guest.
pub struct Migrated {
    pub report: Report,
    /// Post-copy: the destination still fetches pages from here; keep
    /// serving with [`Tail::finish`] (after destroying the VM: its memory
    /// stays mapped for the tail) and add its report.
    pub postcopy: Option<Tail>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect to the destination {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("talking to the destination: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the destination aborted: {0}")]
    Refused(String),
    #[error("the destination sent {got} while {expected} was expected")]
    Unexpected {
        expected: &'static str,
        got: &'static str,
    },
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    #[error("cancelled before commit")]
    Cancelled,
    #[error("the guest ended during the migration ({0})")]
    GuestEnded(String),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("cannot read guest memory at {gpa:#x}: {why}")]
    Memory { gpa: u64, why: String },
    #[error("the VM state cannot be encoded: {0}")]
    Encode(String),
    #[error(transparent)]
    Postcopy(#[from] PostcopyError),
    /// `Commit` was sent and no answer came: the VM stays paused; ask the
    /// destination whether it committed.
    #[error("commit sent, no answer from the destination: {0}")]
    InDoubt(String),
}

/// The sender's states (the diagram in [`crate::migrate`]).
enum State {
    Connect,
    Handshake,
    Round(u32),
    StopAndCopy {
        rounds: u32,
        reason: StopReason,
    },
    /// Stop and resume on the destination with the dirty (or every
    /// populated) page left to fetch from here.
    Switch {
        rounds: u32,
        reason: StopReason,
    },
    Commit {
        rounds: u32,
        reason: StopReason,
    },
    Done(Report),
}

struct Sender<'a> {
    vm: &'a mut Vm,
    out: &'a Outgoing,
    opts: &'a MigrateOptions,
    progress: &'a Progress,
    stream: Option<TcpStream>,
    writer: Option<BufWriter<StallWriter>>,
    started: Instant,
    /// Time spent writing pages and the bytes written, for the bandwidth.
    send_time: Duration,
    send_bytes: u64,
    /// Dirty set found after the last round.
    dirty: PageBitmap,
    paused: bool,
    tracking: bool,
    conv: Convergence,
    last_round_end: Instant,
    // Downtime parts.
    pause_start: Option<Instant>,
    pause: Duration,
    last_round: Duration,
    last_round_pages: u64,
    state_time: Duration,
    /// Post-copy: the paused memory served to the destination.
    serving: Option<Serving>,
}

/// Migrates the running `vm` to `out`. `Ok`: the destination runs the
/// guest; destroy `vm` (it is paused and must never run again). `Err`:
/// nothing was committed and the guest runs here again — except
/// [`MigrateError::InDoubt`], where it stays paused. `progress` shows the
/// live phases; the final one is the owner's to publish with [`conclude`]
/// once it has dealt with the VM (destroyed it, or taken it back), so that
/// whoever sees `committed` or `aborted` finds the VM where it should be.
pub fn migrate(
    vm: &mut Vm,
    out: &Outgoing,
    opts: &MigrateOptions,
    progress: &Progress,
) -> Result<Migrated, MigrateError> {
    let now = Instant::now();
    let mut s = Sender {
        vm,
        out,
        opts,
        progress,
        stream: None,
        writer: None,
        started: now,
        send_time: Duration::ZERO,
        send_bytes: 0,
        dirty: PageBitmap::new(),
        paused: false,
        tracking: false,
        conv: Convergence::new(opts.downtime, opts.max_rounds),
        last_round_end: now,
        pause_start: None,
        pause: Duration::ZERO,
        last_round: Duration::ZERO,
        last_round_pages: 0,
        state_time: Duration::ZERO,
        serving: None,
    };
    let mut state = State::Connect;
    loop {
        let step = match state {
            State::Done(report) => return Ok(s.migrated(report)),
            st => s.step(st),
        };
        match step {
            Ok(next) => state = next,
            Err(e) => {
                if !matches!(e, MigrateError::InDoubt(_)) {
                    s.abort(&e);
                } else if let Some(serving) = s.serving.take() {
                    // The destination may have committed and need pages.
                    serving.linger();
                }
                s.hang_up();
                return Err(e);
            }
        }
    }
}

/// Publishes the outcome of [`migrate`] (and its post-copy tail, if any) as
/// the final phase.
pub fn conclude(progress: &Progress, result: Result<&Report, &MigrateError>) {
    match result {
        Ok(r) => progress.finish(Phase::Committed, Some(r.clone()), None),
        Err(e @ MigrateError::InDoubt(_)) => {
            progress.finish(Phase::InDoubt, None, Some(e.to_string()))
        }
        Err(e) => progress.finish(Phase::Aborted, None, Some(e.to_string())),
    }
}

impl Sender<'_> {
    fn step(&mut self, state: State) -> Result<State, MigrateError> {
        match state {
            State::Connect => {
                self.progress.set_phase(Phase::Connecting);
                let addr = self.out.addr;
                let stream = TcpStream::connect_timeout(&addr, self.opts.io_timeout)
                    .map_err(|source| MigrateError::Connect { addr, source })?;
                let io = |source| MigrateError::Connect { addr, source };
                stream.set_nodelay(true).map_err(io)?;
                stream
                    .set_read_timeout(Some(self.opts.io_timeout))
                    .map_err(io)?;
                stream
                    .set_write_timeout(Some(self.opts.io_timeout))
                    .map_err(io)?;
                let w = StallWriter {
                    stream: stream.try_clone().map_err(io)?,
                    timeout: self.opts.io_timeout,
                    stalled: Duration::ZERO,
                };
                self.writer = Some(BufWriter::with_capacity(1 << 20, w));
                self.stream = Some(stream);
                Ok(State::Handshake)
            }
            State::Handshake => {
                let hello = Hello {
                    secret: self.out.secret,
                    mem_bytes: self.vm.mem_bytes(),
                    vcpus: self.vm.vcpu_count(),
                    irqchip: self.vm.vcpu_count() > 1,
                    source: self.out.source.clone(),
                };
                self.send(&Message::Hello(hello))?;
                self.flush()?;
                match self.recv()? {
                    Message::Welcome if self.opts.mode == Mode::Postcopy => Ok(State::Switch {
                        rounds: 0,
                        reason: StopReason::Postcopy,
                    }),
                    Message::Welcome => Ok(State::Round(0)),
                    other => Err(self.unexpected("Welcome", other)),
                }
            }
            State::Round(round) => self.round(round),
            State::StopAndCopy { rounds, reason } => self.stop_and_copy(rounds, reason),
            State::Switch { rounds, reason } => self.switch(rounds, reason),
            State::Commit { rounds, reason } => self.commit(rounds, reason),
            State::Done(r) => Ok(State::Done(r)),
        }
    }

    /// One pre-copy round: round 0 copies every populated page that is not
    /// zero (the destination's memory starts zero), later rounds the dirty
    /// set. Then the convergence rule decides.
    fn round(&mut self, round: u32) -> Result<State, MigrateError> {
        self.check_cancel()?;
        self.progress.set_phase(Phase::Precopy);
        if let Some(exit) = self.vm.poll_exit() {
            return Err(MigrateError::GuestEnded(exit.to_string()));
        }
        let pages = if round == 0 {
            self.vm.start_dirty_log()?;
            self.tracking = true;
            let populated = dirty::populated_pages(self.vm.memory())?;
            self.send_pages(&populated, true)?
        } else {
            let set = std::mem::take(&mut self.dirty);
            self.send_pages(&set, false)?
        };
        self.send(&Message::RoundEnd { round, pages })?;
        self.flush()?;
        // Until the destination has every page of the round: nothing is
        // left in flight to lengthen a stop now, and the throughput
        // counts delivery, not the socket buffers.
        let t = Instant::now();
        match self.recv()? {
            Message::RoundAck { round: r } if r == round => {}
            other => return Err(self.unexpected("RoundAck", other)),
        }
        self.send_time += t.elapsed();
        let now = Instant::now();
        let took = now.duration_since(self.last_round_end);
        self.last_round_end = now;
        self.dirty = self.vm.dirty_pages()?;
        let dirty = self.dirty.count_ones() as u64;
        let per_s = (dirty as f64 / took.as_secs_f64().max(1e-6)) as u64;
        let bw = self.bandwidth();
        let estimate = Convergence::estimate(dirty * PAGE_SIZE, STATE_ESTIMATE, bw);
        self.progress.round(round, dirty, per_s, estimate);
        tracing::debug!(round, pages, dirty, per_s, ?estimate, "pre-copy round");
        match self
            .conv
            .decide(round, dirty * PAGE_SIZE, STATE_ESTIMATE, bw)
        {
            Decision::Continue => Ok(State::Round(round + 1)),
            // Auto: pre-copy cannot converge, post-copy the rest.
            Decision::Stop(reason)
                if self.opts.mode == Mode::Auto
                    && !self.opts.family_backed
                    && reason != StopReason::Converged =>
            {
                Ok(State::Switch {
                    rounds: round + 1,
                    reason,
                })
            }
            Decision::Stop(reason) => Ok(State::StopAndCopy {
                rounds: round + 1,
                reason,
            }),
        }
    }

    /// Stops the guest (the downtime starts).
    fn pause(&mut self) -> Result<(), MigrateError> {
        self.progress.set_phase(Phase::StopAndCopy);
        let t = Instant::now();
        self.pause_start = Some(t);
        self.vm.pause().map_err(|e| match e {
            VmError::Exited => MigrateError::GuestEnded("exited".into()),
            e => MigrateError::Vm(e),
        })?;
        self.paused = true;
        self.pause = t.elapsed();
        Ok(())
    }

    fn stop_and_copy(&mut self, rounds: u32, reason: StopReason) -> Result<State, MigrateError> {
        self.pause()?;
        let t = Instant::now();
        let mut set = std::mem::take(&mut self.dirty);
        dirty::or_into(&mut set, &self.vm.dirty_pages()?);
        self.last_round_pages = self.send_pages(&set, false)?;
        self.send(&Message::RoundEnd {
            round: rounds,
            pages: self.last_round_pages,
        })?;
        self.last_round = t.elapsed();
        self.send_state(rounds, reason)
    }

    /// Post-copy: stop, serve the memory the destination lacks from this
    /// host's memory server, send where it is and the state.
    fn switch(&mut self, rounds: u32, reason: StopReason) -> Result<State, MigrateError> {
        // Without pre-copy rounds, the guest's pages are every populated
        // one: scanned while it still runs (the scan is milliseconds per
        // GiB), with the dirty log catching what it writes after.
        if !self.tracking {
            self.vm.start_dirty_log()?;
            self.tracking = true;
            self.dirty = dirty::populated_pages(self.vm.memory())?;
        }
        self.pause()?;
        let t = Instant::now();
        let mut needed = std::mem::take(&mut self.dirty);
        dirty::or_into(&mut needed, &self.vm.dirty_pages()?);
        let server = self.out.memserver.as_ref().ok_or(PostcopyError::NoServer)?;
        let (serving, offer) = Serving::start(server, self.vm.memory(), &needed)?;
        self.serving = Some(serving);
        self.send(&Message::Postcopy(offer))?;
        self.last_round = t.elapsed();
        self.send_state(rounds, reason)
    }

    /// Console and state, then wait for the destination to have built the
    /// VM.
    fn send_state(&mut self, rounds: u32, reason: StopReason) -> Result<State, MigrateError> {
        let t = Instant::now();
        self.send(&Message::Console(self.console_tail()))?;
        let state = self.vm.capture_state()?;
        let bytes = bincode::DefaultOptions::new()
            .with_limit(protocol::MAX_PAYLOAD as u64)
            .serialize(&state)
            .map_err(|e| MigrateError::Encode(e.to_string()))?;
        self.send(&Message::State(bytes))?;
        self.flush()?;
        let mut answer = self.recv()?;
        // The last round's acknowledgement comes first (stop-and-copy).
        if matches!(answer, Message::RoundAck { .. }) {
            answer = self.recv()?;
        }
        match answer {
            Message::Ready => {}
            Message::Abort { reason } => return Err(MigrateError::Refused(reason)),
            other => return Err(self.unexpected("Ready", other)),
        }
        self.state_time = t.elapsed();
        Ok(State::Commit { rounds, reason })
    }

    fn check_cancel(&self) -> Result<(), MigrateError> {
        if self.progress.cancelled() {
            return Err(MigrateError::Cancelled);
        }
        Ok(())
    }

    fn commit(&mut self, rounds: u32, reason: StopReason) -> Result<State, MigrateError> {
        // The last moment a cancel counts.
        self.check_cancel()?;
        self.progress.set_phase(Phase::Committing);
        let t = Instant::now();
        // From here on the guest is never resumed here unless the
        // destination says it aborted.
        let sent = self.send(&Message::Commit).and_then(|_| self.flush());
        if let Err(e) = sent {
            return Err(MigrateError::InDoubt(e.to_string()));
        }
        let vm = match self.recv() {
            Ok(Message::Committed { vm }) => vm,
            Ok(Message::Abort { reason }) => return Err(MigrateError::Refused(reason)),
            Ok(other) => {
                return Err(MigrateError::InDoubt(format!(
                    "{} instead of Committed",
                    other.kind()
                )))
            }
            Err(e) => return Err(MigrateError::InDoubt(e.to_string())),
        };
        let resume = t.elapsed();
        let downtime = self.pause_start.map(|p| p.elapsed()).unwrap_or_default();
        let v = self.progress.view();
        Ok(State::Done(Report {
            rounds,
            stop_reason: reason,
            bytes_sent: v.bytes_sent,
            pages_sent: v.pages_sent,
            last_round_pages: self.last_round_pages,
            total_us: micros(self.started.elapsed()),
            downtime_us: micros(downtime),
            pause_us: micros(self.pause),
            last_round_us: micros(self.last_round),
            state_us: micros(self.state_time),
            resume_us: micros(resume),
            bandwidth_mib_s: self.bandwidth() / (1 << 20) as f64,
            destination_vm: vm,
            mode: self.opts.mode,
            postcopy: None,
        }))
    }

    /// The committed outcome; in post-copy the connection and the served
    /// memory go on into the tail.
    fn migrated(&mut self, report: Report) -> Migrated {
        let tail = match (self.serving.take(), self.stream.take()) {
            (Some(serving), Some(stream)) => {
                if let Some(w) = self.writer.take() {
                    drop(w.into_parts());
                }
                Some(Tail {
                    stream,
                    serving,
                    committed: Instant::now(),
                    io_timeout: self.opts.io_timeout,
                })
            }
            _ => None,
        };
        if tail.is_some() {
            self.progress.set_phase(Phase::Postcopy);
        }
        Migrated {
            report,
            postcopy: tail,
        }
    }

    /// Before commit: tell the destination (best effort, without waiting
    /// on a dead connection), stop tracking, resume the guest if this
    /// migration paused it.
    fn abort(&mut self, why: &MigrateError) {
        if let Some(w) = self.writer.take() {
            // Unsent pages are dropped, not flushed into a stuck link.
            let (mut inner, _) = w.into_parts();
            inner.timeout = ABORT_TIMEOUT;
            inner.stalled = Duration::ZERO;
            if !matches!(why, MigrateError::Refused(_)) {
                let m = Message::Abort {
                    reason: why.to_string(),
                };
                let _ = protocol::write_message(&mut inner, &m);
            }
        }
        // Not served any more: the guest runs here again.
        self.serving = None;
        if self.tracking {
            if let Err(e) = self.vm.stop_dirty_log() {
                tracing::warn!("cannot stop the dirty log after an aborted migration: {e}");
            }
        }
        if self.paused {
            if let Err(e) = self.vm.resume() {
                tracing::warn!("cannot resume the guest after an aborted migration: {e}");
            }
            self.paused = false;
        }
    }

    /// The newest console lines that fit the protocol's bound.
    fn console_tail(&self) -> Vec<String> {
        let log = self.vm.console().log();
        let mut bytes = 0;
        let mut tail: Vec<String> = log
            .lines
            .iter()
            .rev()
            .take_while(|l| {
                bytes += l.len() + 1;
                bytes <= protocol::MAX_CONSOLE_BYTES
            })
            .cloned()
            .collect();
        tail.reverse();
        tail
    }

    /// Closes the connection without flushing what a dead link would not
    /// take (a `BufWriter` dropped with data waits out the write timeout).
    fn hang_up(&mut self) {
        if let Some(w) = self.writer.take() {
            drop(w.into_parts());
        }
        if let Some(s) = self.stream.take() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Bytes per second the page copy has achieved so far (never above
    /// the cap). Buffered writes return at once, so a round's wall time
    /// is what counts, not the time inside `write`.
    fn bandwidth(&self) -> f64 {
        let measured = self.send_bytes as f64 / self.send_time.as_secs_f64().max(1e-6);
        match self.opts.bandwidth_mib_s {
            0 => measured,
            cap => measured.min(cap as f64 * (1 << 20) as f64),
        }
    }

    /// Sends the pages set in `set`; with `skip_zero`, zero pages are left
    /// out (the destination starts from zeros). Returns the pages sent.
    fn send_pages(&mut self, set: &PageBitmap, skip_zero: bool) -> Result<u64, MigrateError> {
        // The throughput counts everything a page costs: reading it, the
        // zero check, the write, the cap's sleeps.
        let t = Instant::now();
        let r = self.send_pages_timed(set, skip_zero);
        self.send_time += t.elapsed();
        r
    }

    fn send_pages_timed(&mut self, set: &PageBitmap, skip_zero: bool) -> Result<u64, MigrateError> {
        let mut buf = vec![0u8; (MAX_PAGES_PER_MESSAGE * PAGE_SIZE) as usize];
        let mut sent = 0;
        for r in dirty::split(&dirty::ranges(set), MAX_PAGES_PER_MESSAGE) {
            let len = r.bytes() as usize;
            self.vm
                .memory()
                .read_slice(&mut buf[..len], GuestAddress(r.gpa()))
                .map_err(|e| MigrateError::Memory {
                    gpa: r.gpa(),
                    why: e.to_string(),
                })?;
            if !skip_zero {
                sent += self.send_run(r, &buf[..len])?;
                continue;
            }
            // Runs of zero and of non-zero pages within the range: the
            // non-zero ones are sent; the zero ones only for a clone,
            // whose missing pages are its family's, not zero (a few
            // bytes per run).
            let page = |i: usize| &buf[i * PAGE_SIZE as usize..(i + 1) * PAGE_SIZE as usize];
            let count = r.count as usize;
            let mut s = 0;
            // Each page is looked at once: a run ends at a page of the
            // other kind, which starts the next.
            let mut zero = page(0) == &ZERO_PAGE[..];
            while s < count {
                let mut e = s + 1;
                while e < count && (page(e) == &ZERO_PAGE[..]) == zero {
                    e += 1;
                }
                let run = PageRange {
                    first: r.first + s as u64,
                    count: (e - s) as u64,
                };
                if !zero {
                    let bytes = &buf[s * PAGE_SIZE as usize..e * PAGE_SIZE as usize];
                    sent += self.send_run(run, bytes)?;
                } else if self.opts.family_backed {
                    self.send_zeros(run)?;
                }
                s = e;
                zero = !zero;
            }
        }
        Ok(sent)
    }

    fn send_zeros(&mut self, r: PageRange) -> Result<(), MigrateError> {
        self.check_cancel()?;
        let n = self.send(&Message::Zeros {
            first: r.first,
            count: r.count as u32,
        })?;
        self.send_bytes += n as u64;
        Ok(())
    }

    fn send_run(&mut self, r: PageRange, bytes: &[u8]) -> Result<u64, MigrateError> {
        self.check_cancel()?;
        self.check_peer()?;
        let w = self.writer.as_mut().ok_or(ProtocolError::Closed)?;
        let n = match protocol::write_pages(w, r.first, r.count as u32, bytes) {
            Ok(n) => n,
            Err(e) => return Err(self.peer_reason().unwrap_or(MigrateError::Protocol(e))),
        };
        self.send_bytes += n as u64;
        self.progress.sent(r.count, n as u64);
        self.throttle();
        Ok(r.count)
    }

    /// With a bandwidth cap: sleep until the bytes sent fit it (this thread
    /// holds no lock).
    fn throttle(&self) {
        if self.opts.bandwidth_mib_s == 0 {
            return;
        }
        let cap = self.opts.bandwidth_mib_s as f64 * (1 << 20) as f64;
        let due = Duration::from_secs_f64(self.progress.bytes_sent() as f64 / cap);
        let spent = self.started.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }

    fn send(&mut self, m: &Message) -> Result<usize, MigrateError> {
        let w = self.writer.as_mut().ok_or(ProtocolError::Closed)?;
        match protocol::write_message(w, m) {
            Ok(n) => Ok(n),
            Err(e) => Err(self.peer_reason().unwrap_or(MigrateError::Protocol(e))),
        }
    }

    fn flush(&mut self) -> Result<(), MigrateError> {
        let w = self.writer.as_mut().ok_or(ProtocolError::Closed)?;
        match w.flush() {
            Ok(()) => Ok(()),
            Err(e) => Err(self
                .peer_reason()
                .unwrap_or(MigrateError::Protocol(e.into()))),
        }
    }

    /// The destination says nothing during the rounds unless it gives up
    /// (`Abort`, then it hangs up): look, without waiting, before each
    /// frame, so a destination that aborted (e.g. its read timed out on a
    /// cut link) is noticed before our writes fill the socket buffers.
    fn check_peer(&mut self) -> Result<(), MigrateError> {
        let Some(s) = self.stream.as_ref() else {
            return Ok(());
        };
        let mut byte = 0u8;
        // SAFETY: recv into one byte we own, on the connection's open
        // socket; MSG_PEEK leaves the data, MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                (&mut byte as *mut u8).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            // Nothing to read: the usual case.
            n if n < 0 => Ok(()),
            0 => Err(MigrateError::Protocol(ProtocolError::Closed)),
            _ => Err(self.peer_reason().unwrap_or(MigrateError::Unexpected {
                expected: "nothing during the rounds",
                got: "data",
            })),
        }
    }

    /// After a failed write: the destination's `Abort`, if it sent one.
    fn peer_reason(&mut self) -> Option<MigrateError> {
        let s = self.stream.as_mut()?;
        let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
        let m = protocol::read_message(s).ok();
        let _ = s.set_read_timeout(Some(self.opts.io_timeout));
        match m? {
            Message::Abort { reason } => Some(MigrateError::Refused(reason)),
            _ => None,
        }
    }

    fn recv(&mut self) -> Result<Message, MigrateError> {
        let s = self.stream.as_mut().ok_or(ProtocolError::Closed)?;
        Ok(protocol::read_message(s)?)
    }

    fn unexpected(&self, expected: &'static str, got: Message) -> MigrateError {
        match got {
            Message::Abort { reason } => MigrateError::Refused(reason),
            other => MigrateError::Unexpected {
                expected,
                got: other.kind(),
            },
        }
    }
}

/// The connection's writing side. A blocking write that times out after
/// copying part of its buffer returns that count, and the next one waits
/// the whole timeout again: on a cut link that doubles the wait. So the
/// time spent blocked in writes that did not take all they were given adds
/// up, and only a write that takes all of it (the link moves) starts over:
/// `timeout` of that and the write fails as timed out.
struct StallWriter {
    stream: TcpStream,
    timeout: Duration,
    stalled: Duration,
}

impl Write for StallWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.timeout.saturating_sub(self.stalled);
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        self.stream.set_write_timeout(Some(left))?;
        let t = Instant::now();
        let r = self.stream.write(buf);
        match &r {
            Ok(n) if *n == buf.len() => self.stalled = Duration::ZERO,
            _ => self.stalled += t.elapsed(),
        }
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

static ZERO_PAGE: [u8; PAGE_SIZE as usize] = [0; PAGE_SIZE as usize];
/// What the VM state and console weigh in a downtime estimate (a one-vCPU
/// zone's state is tens of KiB).
const STATE_ESTIMATE: u64 = 64 << 10;
/// How long an `Abort` may take to leave.
const ABORT_TIMEOUT: Duration = Duration::from_millis(200);
