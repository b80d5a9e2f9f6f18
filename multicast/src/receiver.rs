//! The receiver: asks for blocks, re-asks on a timeout, reassembles every
//! block that arrives (its own or another receiver's), and reports its
//! receive rate on each request.
//!
//! [`Receiver::request`] records the wanted blocks and sends the requests
//! from the caller's thread. One thread reads the group socket and the
//! unicast socket (end-game replies arrive there), verifies frames,
//! reassembles blocks and hands each completed block to the sink; it
//! measures its receive rate and, while it is losing frames (it re-asked
//! within [`LOSS_MEMORY`]), puts it in every request; it also
//! re-requests blocks not received within the timeout (doubling up to
//! `max_retry_timeout`; while other requested blocks keep arriving — a
//! backlog at the sender — it waits for a quiet spell of `retry_timeout`,
//! or [`STARVATION_FACTOR`] × `max_retry_timeout`) and gives up
//! after `max_attempts`. State is bounded:
//! wanted blocks (`max_outstanding`, further requests refused), partial
//! blocks (`max_partial`, oldest evicted), senders' replay windows
//! (`max_senders`), recently delivered blocks ([`RECENT_DELIVERED`], used
//! to drop duplicate arrivals of blocks nobody here is waiting for).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::{self, Fragment, Header, Kind, Rejection, ReplayWindow, Request, Session};
use crate::group::{self, GroupConfig, GroupError, GroupSocket};
use crate::rate::RateMeter;
use crate::stats::{self, counters};

/// Datagrams read per socket per round.
pub const READ_BATCH: usize = 64;
/// Longest wait of one round (the stop flag is checked every round).
pub const MAX_WAIT: Duration = Duration::from_millis(10);
/// A wanted block is re-asked after `max_retry_timeout` times this even
/// while other requested blocks keep arriving.
pub const STARVATION_FACTOR: u32 = 4;
/// A receiver reports its rate (holds the sender back) this long after it
/// last had to re-ask.
pub const LOSS_MEMORY: Duration = Duration::from_secs(1);
/// Recently delivered blocks remembered to drop duplicate arrivals.
pub const RECENT_DELIVERED: usize = 4096;

/// In-process loss for tests: drop arriving data frames at random.
#[derive(Debug, Clone, PartialEq)]
pub struct LossInjection {
    /// Probability a frame is dropped, 0..=1.
    pub drop_probability: f64,
    /// PRNG seed (xorshift; reproducible runs).
    pub seed: u64,
}

/// The receiver's configuration.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    /// The session (id and MAC key).
    pub session: Session,
    /// The group to join.
    pub group: GroupConfig,
    /// The sender's request address.
    pub server: SocketAddr,
    /// The local unicast address (requests leave from it, end-game replies
    /// arrive at it).
    pub bind: SocketAddrV4,
    /// The path MTU requests are sized to.
    pub mtu: usize,
    /// First re-request timeout.
    pub retry_timeout: Duration,
    /// Re-request timeout cap (the timeout doubles per attempt).
    pub max_retry_timeout: Duration,
    /// Requests per block before giving up.
    pub max_attempts: u32,
    /// Blocks wanted at once.
    pub max_outstanding: usize,
    /// Blocks being reassembled at once.
    pub max_partial: usize,
    /// Longest block accepted.
    pub max_block_len: usize,
    /// Senders whose replay windows are kept.
    pub max_senders: usize,
    /// Receive-rate measurement interval.
    pub rate_interval: Duration,
    /// Test-only loss.
    pub loss: Option<LossInjection>,
}

impl ReceiverConfig {
    /// Defaults for the rest.
    pub fn new(session: Session, group: GroupConfig, server: SocketAddr) -> ReceiverConfig {
        ReceiverConfig {
            session,
            group,
            server,
            bind: SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0),
            mtu: frame::DEFAULT_MTU,
            retry_timeout: Duration::from_millis(40),
            max_retry_timeout: Duration::from_millis(400),
            max_attempts: 50,
            max_outstanding: 1 << 16,
            max_partial: 1024,
            max_block_len: 64 << 10,
            max_senders: 16,
            rate_interval: Duration::from_millis(50),
            loss: None,
        }
    }
}

/// One arrived block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// The block index.
    pub index: u64,
    /// Its bytes.
    pub data: Vec<u8>,
    /// Whether this receiver had asked for it.
    pub requested: bool,
    /// Whether it came by push.
    pub pushed: bool,
    /// Whether it came by unicast (end game).
    pub unicast: bool,
}

/// What the receiver hands to its sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A block arrived complete.
    Block(Block),
    /// A requested block did not arrive in `max_attempts` requests.
    GaveUp(u64),
}

counters! {
    /// What the receiver saw so far.
    ReceiverStats, ReceiverCounters {
        /// Blocks asked for the first time.
        requested,
        /// Re-requests (block indices sent again after a timeout).
        rerequests,
        /// Request frames sent.
        request_frames,
        /// Request send errors.
        send_errors,
        /// Data frames accepted.
        frames,
        /// Data frames dropped by loss injection.
        injected_drops,
        /// Blocks delivered to the sink.
        delivered,
        /// Of those, blocks this receiver had asked for.
        delivered_requested,
        /// Blocks that arrived again soon after delivery (dropped).
        duplicates,
        /// Partial blocks evicted for room.
        partial_evicted,
        /// Blocks given up on.
        gave_up,
        /// Events the channel sink could not take (full).
        sink_full,
        /// Frames with a bad MAC.
        forged,
        /// Replayed frames.
        replayed,
        /// Frames of another session.
        foreign,
        /// Malformed frames.
        malformed,
        /// Gauge: the receive rate reported, bytes/s.
        rate,
    }
}

/// Starting the receiver failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// A socket or the membership could not be set up.
    #[error("receiver socket: {0}")]
    Socket(#[from] GroupError),
    /// Making a socket non-blocking failed.
    #[error("receiver socket setup: {0}")]
    Setup(#[source] io::Error),
    /// No origin id could be drawn.
    #[error(transparent)]
    Random(#[from] frame::RandomError),
    /// The thread could not be spawned.
    #[error("spawning the receiver thread failed: {0}")]
    Spawn(#[source] io::Error),
}

/// Requesting blocks failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// Too many blocks outstanding; none of this call's were recorded.
    #[error("{outstanding} blocks outstanding, asking for {asked} more exceeds {cap}")]
    TooMany {
        /// Wanted now.
        outstanding: usize,
        /// Asked for in this call.
        asked: usize,
        /// The cap.
        cap: usize,
    },
    /// Sending a request failed (the blocks stay wanted and are retried).
    #[error("sending a request failed: {0}")]
    Send(#[source] io::Error),
}

#[derive(Debug, Clone, Copy)]
struct Want {
    asked: Instant,
    attempts: u32,
}

struct Shared {
    stop: AtomicBool,
    counters: ReceiverCounters,
    wants: Mutex<HashMap<u64, Want>>,
    seq: AtomicU64,
    rate: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The table stays consistent even if a sink panicked mid-update.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Builds and sends request frames.
struct Requester {
    session: Session,
    origin: u32,
    server: SocketAddr,
    per_frame: usize,
    socket: Arc<UdpSocket>,
}

impl Requester {
    fn send(&self, shared: &Shared, blocks: &[u64], retry: bool) -> io::Result<()> {
        let (mut payload, mut out) = (Vec::new(), Vec::new());
        let mut result = Ok(());
        for chunk in blocks.chunks(self.per_frame.max(1)) {
            Request::encode(shared.rate.load(Ordering::Relaxed), chunk, &mut payload);
            let h = Header {
                kind: Kind::Request,
                session: self.session.id,
                origin: self.origin,
                seq: shared.seq.fetch_add(1, Ordering::Relaxed) + 1,
                flags: if retry { frame::FLAG_RETRY } else { 0 },
            };
            frame::encode(&mut out, &self.session, &h, &payload);
            match self.socket.send_to(&out, self.server) {
                Ok(_) => stats::bump(&shared.counters.request_frames),
                Err(e) => {
                    stats::bump(&shared.counters.send_errors);
                    result = Err(e);
                }
            }
        }
        result
    }
}

/// A running receiver; dropping it stops its thread and leaves the group.
pub struct Receiver {
    shared: Arc<Shared>,
    requester: Arc<Requester>,
    thread: Option<JoinHandle<()>>,
    max_outstanding: usize,
    local: SocketAddr,
}

impl Receiver {
    /// Joins the group and starts the receiver thread; `sink` gets every
    /// event, on that thread.
    pub fn start<F>(cfg: ReceiverConfig, sink: F) -> Result<Receiver, ReceiverError>
    where
        F: FnMut(Event) + Send + 'static,
    {
        Self::start_shared(cfg, Arc::new(Self::new_shared()), sink)
    }

    /// Like [`Receiver::start`], with events on a bounded channel; events
    /// that do not fit are counted (`sink_full`) and dropped (requested
    /// blocks stay wanted and are re-requested).
    pub fn with_channel(
        cfg: ReceiverConfig,
        capacity: usize,
    ) -> Result<(Receiver, mpsc::Receiver<Event>), ReceiverError> {
        let (tx, rx) = mpsc::sync_channel(capacity);
        let shared = Arc::new(Self::new_shared());
        let s2 = Arc::clone(&shared);
        let sink = move |e: Event| {
            if let Err(mpsc::TrySendError::Full(e)) = tx.try_send(e) {
                stats::bump(&s2.counters.sink_full);
                if let Event::Block(b) = e {
                    if b.requested {
                        // Ask again: the consumer never saw it.
                        lock(&s2.wants).insert(
                            b.index,
                            Want {
                                asked: Instant::now(),
                                attempts: 1,
                            },
                        );
                    }
                }
            }
        };
        Ok((Self::start_shared(cfg, shared, sink)?, rx))
    }

    fn new_shared() -> Shared {
        Shared {
            stop: AtomicBool::new(false),
            counters: ReceiverCounters::default(),
            wants: Mutex::new(HashMap::new()),
            seq: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        }
    }

    fn start_shared<F>(
        cfg: ReceiverConfig,
        shared: Arc<Shared>,
        sink: F,
    ) -> Result<Receiver, ReceiverError>
    where
        F: FnMut(Event) + Send + 'static,
    {
        let group = GroupSocket::join(&cfg.group)?;
        let unicast = group::unicast_socket(cfg.bind, cfg.group.recv_buffer)?;
        group
            .socket()
            .set_nonblocking(true)
            .map_err(ReceiverError::Setup)?;
        unicast
            .set_nonblocking(true)
            .map_err(ReceiverError::Setup)?;
        let local = unicast.local_addr().map_err(ReceiverError::Setup)?;
        let requester = Arc::new(Requester {
            session: cfg.session.clone(),
            origin: frame::random_origin()?,
            server: cfg.server,
            per_frame: frame::max_request_blocks(cfg.mtu),
            socket: Arc::new(unicast),
        });
        let max_outstanding = cfg.max_outstanding;
        let now = Instant::now();
        let mut run = Run {
            meter: RateMeter::new(cfg.rate_interval, now),
            rng: cfg.loss.as_ref().map_or(1, |l| l.seed.max(1)),
            partial: HashMap::new(),
            senders: HashMap::new(),
            recent: (VecDeque::new(), HashSet::new()),
            buf: vec![0u8; frame::MAX_DATAGRAM],
            next_scan: now,
            last_progress: now,
            last_loss: None,
            cfg,
            group,
            requester: Arc::clone(&requester),
            shared: Arc::clone(&shared),
            sink,
        };
        let thread = std::thread::Builder::new()
            .name("mcast-receiver".into())
            .spawn(move || run.run())
            .map_err(ReceiverError::Spawn)?;
        Ok(Receiver {
            shared,
            requester,
            thread: Some(thread),
            max_outstanding,
            local,
        })
    }

    /// The unicast address requests leave from.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Asks for `blocks` (already wanted ones are not asked again here;
    /// the timeout re-asks them).
    pub fn request(&self, blocks: &[u64]) -> Result<(), RequestError> {
        let now = Instant::now();
        let fresh: Vec<u64> = {
            let mut w = lock(&self.shared.wants);
            let fresh: Vec<u64> = blocks
                .iter()
                .copied()
                .filter(|b| !w.contains_key(b))
                .collect::<HashSet<u64>>()
                .into_iter()
                .collect();
            if w.len() + fresh.len() > self.max_outstanding {
                return Err(RequestError::TooMany {
                    outstanding: w.len(),
                    asked: fresh.len(),
                    cap: self.max_outstanding,
                });
            }
            for &b in &fresh {
                w.insert(
                    b,
                    Want {
                        asked: now,
                        attempts: 1,
                    },
                );
            }
            fresh
        };
        stats::add(&self.shared.counters.requested, fresh.len() as u64);
        self.requester
            .send(&self.shared, &fresh, false)
            .map_err(RequestError::Send)
    }

    /// Blocks asked for and not arrived yet.
    pub fn outstanding(&self) -> usize {
        lock(&self.shared.wants).len()
    }

    /// The counters so far.
    pub fn stats(&self) -> ReceiverStats {
        self.shared.counters.snapshot()
    }

    /// Stops the thread, waits for it, and leaves the group.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the multicast receiver thread panicked");
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.halt();
    }
}

struct Partial {
    len: u32,
    count: u16,
    got: Vec<bool>,
    n_got: usize,
    bytes_got: usize,
    data: Vec<u8>,
    started: Instant,
}

struct Run<F> {
    cfg: ReceiverConfig,
    group: GroupSocket,
    requester: Arc<Requester>,
    shared: Arc<Shared>,
    sink: F,
    meter: RateMeter,
    rng: u64,
    partial: HashMap<u64, Partial>,
    /// Replay windows per (sender, path): frames come by the group and, in
    /// the end game, by unicast, on two sockets read in turn, so one
    /// path's frames can lag the other's by many sequence numbers; each
    /// path alone arrives in order. The path is the MAC'd UNICAST flag,
    /// not the socket, so a frame cannot be replayed by switching paths.
    senders: HashMap<(u32, bool), (ReplayWindow, Instant)>,
    recent: (VecDeque<u64>, HashSet<u64>),
    buf: Vec<u8>,
    next_scan: Instant,
    last_progress: Instant,
    /// When this receiver last re-asked or gave up (it is losing frames).
    last_loss: Option<Instant>,
}

impl<F: FnMut(Event)> Run<F> {
    fn c(&self) -> &ReceiverCounters {
        &self.shared.counters
    }

    fn run(&mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let wait = self
                .next_scan
                .saturating_duration_since(Instant::now())
                .min(MAX_WAIT);
            let ready =
                match group::wait_readable([self.group.socket(), &*self.requester.socket], wait) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "receiver poll failed");
                        std::thread::sleep(wait);
                        [true, true]
                    }
                };
            if ready[0] {
                self.read(false);
            }
            if ready[1] {
                self.read(true);
            }
            let now = Instant::now();
            let busy = !lock(&self.shared.wants).is_empty();
            self.meter.tick(busy, now);
            // Only a receiver that is losing frames holds the sender back:
            // one that keeps up reports nothing (0), and the sender may go
            // as fast as its cap allows.
            let losing = self
                .last_loss
                .is_some_and(|t| now.saturating_duration_since(t) < LOSS_MEMORY);
            let report = if losing { self.meter.rate() } else { 0 };
            self.shared.rate.store(report, Ordering::Relaxed);
            stats::set(&self.c().rate, report);
            if now >= self.next_scan {
                self.retry(now);
                self.next_scan = now + self.cfg.retry_timeout / 4;
            }
        }
        tracing::debug!("multicast receiver stopped");
    }

    fn read(&mut self, unicast: bool) {
        for _ in 0..READ_BATCH {
            let sock = if unicast {
                &*self.requester.socket
            } else {
                self.group.socket()
            };
            let n = match sock.recv_from(&mut self.buf) {
                Ok((n, _)) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "receiver recv failed");
                    return;
                }
            };
            if self.inject_loss() {
                stats::bump(&self.c().injected_drops);
                continue;
            }
            let buf = std::mem::take(&mut self.buf);
            self.handle(&buf[..n]);
            self.buf = buf;
        }
    }

    fn inject_loss(&mut self) -> bool {
        let Some(p) = self.cfg.loss.as_ref().map(|l| l.drop_probability) else {
            return false;
        };
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        ((self.rng >> 11) as f64 / (1u64 << 53) as f64) < p
    }

    fn reject(&self, r: Rejection) {
        let c = self.c();
        stats::bump(match r {
            Rejection::Malformed => &c.malformed,
            Rejection::Foreign => &c.foreign,
            Rejection::Forged => &c.forged,
            Rejection::Replayed => &c.replayed,
        });
    }

    fn replay_ok(&mut self, origin: u32, unicast: bool, seq: u64, now: Instant) -> bool {
        let origin = (origin, unicast);
        if !self.senders.contains_key(&origin)
            && self.senders.len() >= 2 * self.cfg.max_senders.max(1)
        {
            if let Some(k) = self
                .senders
                .iter()
                .min_by_key(|(_, v)| v.1)
                .map(|(k, _)| *k)
            {
                self.senders.remove(&k);
            }
        }
        let e = self
            .senders
            .entry(origin)
            .or_insert_with(|| (ReplayWindow::default(), now));
        e.1 = now;
        e.0.accept(seq)
    }

    fn handle(&mut self, dgram: &[u8]) {
        let (h, payload) = match frame::decode(&self.cfg.session, dgram) {
            Ok(v) => v,
            Err(e) => {
                tracing::trace!(error = %e, "frame rejected");
                return self.reject(Rejection::from(&e));
            }
        };
        if h.kind != Kind::Data {
            return self.reject(Rejection::Malformed);
        }
        let Ok(f) = Fragment::decode(payload) else {
            return self.reject(Rejection::Malformed);
        };
        if f.block_len as usize > self.cfg.max_block_len {
            return self.reject(Rejection::Malformed);
        }
        let now = Instant::now();
        let unicast = h.flags & frame::FLAG_UNICAST != 0;
        if !self.replay_ok(h.origin, unicast, h.seq, now) {
            return self.reject(Rejection::Replayed);
        }
        stats::bump(&self.c().frames);
        self.meter.add(dgram.len() + frame::IP_UDP_OVERHEAD);
        if let Some(data) = self.assemble(&f, now) {
            self.complete(f.block, data, h.flags);
        }
    }

    /// Adds a fragment; returns the block's bytes once complete.
    fn assemble(&mut self, f: &Fragment<'_>, now: Instant) -> Option<Vec<u8>> {
        if f.count == 1 {
            return (f.bytes.len() == f.block_len as usize).then(|| f.bytes.to_vec());
        }
        let fresh = self
            .partial
            .get(&f.block)
            .is_none_or(|p| p.len != f.block_len || p.count != f.count);
        if fresh {
            if !self.partial.contains_key(&f.block) && self.partial.len() >= self.cfg.max_partial {
                if let Some(k) = self
                    .partial
                    .iter()
                    .min_by_key(|(_, p)| p.started)
                    .map(|(k, _)| *k)
                {
                    self.partial.remove(&k);
                    stats::bump(&self.c().partial_evicted);
                }
            }
            self.partial.insert(
                f.block,
                Partial {
                    len: f.block_len,
                    count: f.count,
                    got: vec![false; f.count as usize],
                    n_got: 0,
                    bytes_got: 0,
                    data: vec![0u8; f.block_len as usize],
                    started: now,
                },
            );
        }
        let p = self.partial.get_mut(&f.block)?;
        let i = f.index as usize;
        if p.got[i] {
            return None;
        }
        let at = f.offset as usize;
        p.data[at..at + f.bytes.len()].copy_from_slice(f.bytes);
        p.got[i] = true;
        p.n_got += 1;
        p.bytes_got += f.bytes.len();
        if p.n_got < p.count as usize {
            return None;
        }
        let p = self.partial.remove(&f.block)?;
        if p.bytes_got != p.len as usize {
            stats::bump(&self.c().malformed);
            return None;
        }
        Some(p.data)
    }

    fn complete(&mut self, index: u64, data: Vec<u8>, flags: u16) {
        let requested = lock(&self.shared.wants).remove(&index).is_some();
        if !requested && self.recent.1.contains(&index) {
            stats::bump(&self.c().duplicates);
            return;
        }
        if self.recent.1.insert(index) {
            self.recent.0.push_back(index);
            if self.recent.0.len() > RECENT_DELIVERED {
                if let Some(old) = self.recent.0.pop_front() {
                    self.recent.1.remove(&old);
                }
            }
        }
        stats::bump(&self.c().delivered);
        if requested {
            stats::bump(&self.c().delivered_requested);
            self.last_progress = Instant::now();
        }
        (self.sink)(Event::Block(Block {
            index,
            data,
            requested,
            pushed: flags & frame::FLAG_PUSH != 0,
            unicast: flags & frame::FLAG_UNICAST != 0,
        }));
    }

    fn timeout(&self, attempts: u32) -> Duration {
        let factor = 1u32 << attempts.saturating_sub(1).min(16);
        (self.cfg.retry_timeout * factor).min(self.cfg.max_retry_timeout)
    }

    fn retry(&mut self, now: Instant) {
        let mut again = Vec::new();
        let mut gave_up = Vec::new();
        // While requested blocks keep arriving, the sender is working
        // through a backlog: wait for a quiet spell (or the starvation cap)
        // before re-asking, so re-requests mean loss, not queueing.
        let quiet = now.saturating_duration_since(self.last_progress) >= self.cfg.retry_timeout;
        let starved = self.cfg.max_retry_timeout * STARVATION_FACTOR;
        {
            let mut w = lock(&self.shared.wants);
            for (&b, want) in w.iter_mut() {
                let waited = now.saturating_duration_since(want.asked);
                if waited < self.timeout(want.attempts) || !(quiet || waited >= starved) {
                    continue;
                }
                if want.attempts >= self.cfg.max_attempts {
                    gave_up.push(b);
                } else {
                    want.attempts += 1;
                    want.asked = now;
                    again.push(b);
                }
            }
            for b in &gave_up {
                w.remove(b);
            }
        }
        if !again.is_empty() || !gave_up.is_empty() {
            self.last_loss = Some(now);
        }
        if !again.is_empty() {
            stats::add(&self.c().rerequests, again.len() as u64);
            tracing::trace!(blocks = again.len(), "re-requesting");
            if let Err(e) = self.requester.send(&self.shared, &again, true) {
                tracing::debug!(error = %e, "re-request failed");
            }
        }
        for b in gave_up {
            stats::bump(&self.c().gave_up);
            tracing::warn!(block = b, "giving up on a block");
            (self.sink)(Event::GaveUp(b));
        }
    }
}
