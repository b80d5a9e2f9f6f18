//! The sender: answers requests by multicast (or unicast at the end game),
//! suppresses lockstep duplicates, paces to the flow-control rate, and
//! streams pushed blocks when no request is waiting.
//!
//! One thread owns the socket. Each round it waits (bounded) for requests
//! or for the token bucket, reads at most [`READ_BATCH`] datagrams, then
//! sends at most [`SEND_BATCH`] frames. Requested blocks go before pushed
//! ones. State is bounded: the request queue (`max_queued`), the push queue
//! (`max_push`), the lockstep table (`max_lockstep`), the receivers' replay
//! windows (`max_receivers`, least recently seen evicted).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::frame::{self, Fragment, Header, Kind, Rejection, ReplayWindow, Request, Session};
use crate::group::{self, GroupConfig, GroupError};
use crate::rate::{FlowControl, RateConfig, TokenBucket};
use crate::stats::{self, counters};

/// Datagrams read per round.
pub const READ_BATCH: usize = 64;
/// Frames sent per round.
pub const SEND_BATCH: usize = 256;
/// Longest wait of one round (the stop flag is checked every round).
pub const MAX_WAIT: Duration = Duration::from_millis(20);

/// Where the sender gets block contents from.
pub trait BlockSource: Send + Sync + 'static {
    /// Copies block `index` into `out` (empty on entry); false if there is
    /// no such block.
    fn read_block(&self, index: u64, out: &mut Vec<u8>) -> bool;
}

/// When retries are answered by unicast.
#[derive(Debug, Clone, PartialEq)]
pub struct EndGame {
    /// Whether the sender ever switches.
    pub enabled: bool,
    /// The last this many requested blocks are looked at...
    pub window: usize,
    /// ...and when at least this fraction of them were retries (and at
    /// least half the window is filled), retries go by unicast.
    pub retry_fraction: f64,
}

impl Default for EndGame {
    fn default() -> EndGame {
        EndGame {
            enabled: true,
            window: 64,
            retry_fraction: 0.5,
        }
    }
}

/// The sender's configuration.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// The session (id and MAC key).
    pub session: Session,
    /// The group data goes to.
    pub group: GroupConfig,
    /// The unicast address requests arrive at.
    pub bind: SocketAddrV4,
    /// The path MTU frames are sized to.
    pub mtu: usize,
    /// Pacing and flow control.
    pub rate: RateConfig,
    /// Requests for a block this soon after it was multicast are dropped.
    pub lockstep_window: Duration,
    /// First requests (not retries) for a block this soon after it was
    /// multicast are dropped (they crossed it; a receiver that lost it
    /// retries). At least `lockstep_window`.
    pub first_request_window: Duration,
    /// Longest block sent (longer ones are counted and skipped).
    pub max_block_len: usize,
    /// Requested blocks waiting to be sent.
    pub max_queued: usize,
    /// Pushed blocks waiting to be sent.
    pub max_push: usize,
    /// Recently multicast blocks remembered for lockstep suppression.
    pub max_lockstep: usize,
    /// Receivers whose replay windows are kept.
    pub max_receivers: usize,
    /// The end-game switch to unicast.
    pub end_game: EndGame,
}

impl SenderConfig {
    /// Defaults for the rest.
    pub fn new(session: Session, group: GroupConfig, bind: SocketAddrV4) -> SenderConfig {
        SenderConfig {
            session,
            group,
            bind,
            mtu: frame::DEFAULT_MTU,
            rate: RateConfig::default(),
            lockstep_window: Duration::from_millis(10),
            first_request_window: Duration::from_millis(100),
            max_block_len: 64 << 10,
            max_queued: 1 << 16,
            max_push: 1 << 20,
            max_lockstep: 1 << 16,
            max_receivers: 1024,
            end_game: EndGame::default(),
        }
    }
}

counters! {
    /// What the sender did so far.
    SenderStats, SenderCounters {
        /// Request frames accepted.
        requests,
        /// Block indices in accepted requests.
        blocks_requested,
        /// Of those, re-requests.
        retries_received,
        /// Blocks sent to the group because someone asked.
        blocks_multicast,
        /// Blocks sent by unicast (end game).
        blocks_unicast,
        /// Blocks sent to the group by push mode.
        blocks_pushed,
        /// Pushed blocks skipped (just sent or queued anyway).
        push_skipped,
        /// Requests answered by an earlier or queued multicast.
        lockstep_suppressed,
        /// Requested blocks the source does not have (or too long).
        unknown_blocks,
        /// Requests dropped because the queue was full.
        queue_full,
        /// Data frames sent.
        frames_sent,
        /// Bytes sent, IP and UDP headers included.
        bytes_sent,
        /// Send errors other than a full socket buffer.
        send_errors,
        /// Frames with a bad MAC.
        forged,
        /// Replayed request frames.
        replayed,
        /// Frames of another session.
        foreign,
        /// Malformed frames.
        malformed,
        /// Times the end game started.
        end_game_entered,
        /// Gauge: 1 while in the end game.
        end_game_active,
        /// Gauge: the current sending rate, bytes/s.
        rate,
    }
}

/// Starting the sender failed.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The socket could not be set up.
    #[error("sender socket: {0}")]
    Socket(#[from] GroupError),
    /// Reading the socket's address or making it non-blocking failed.
    #[error("sender socket setup: {0}")]
    Setup(#[source] io::Error),
    /// No origin id could be drawn.
    #[error(transparent)]
    Random(#[from] frame::RandomError),
    /// The thread could not be spawned.
    #[error("spawning the sender thread failed: {0}")]
    Spawn(#[source] io::Error),
}

/// Pushing blocks failed (some may have been queued).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PushError {
    /// The push queue is full: `accepted` blocks were queued, the rest not.
    #[error("push queue full: {accepted} of {offered} blocks queued")]
    QueueFull {
        /// Blocks queued.
        accepted: usize,
        /// Blocks offered.
        offered: usize,
    },
}

struct Shared {
    stop: AtomicBool,
    counters: SenderCounters,
    push: Mutex<VecDeque<u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere does not make a queue of integers inconsistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running sender; dropping it stops its thread.
pub struct Sender {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    local: SocketAddr,
    max_push: usize,
}

impl Sender {
    /// Binds the request socket and starts the sender thread.
    pub fn start<S: BlockSource>(cfg: SenderConfig, source: S) -> Result<Sender, SenderError> {
        let socket = group::sender_socket(cfg.bind, &cfg.group)?;
        socket.set_nonblocking(true).map_err(SenderError::Setup)?;
        let local = socket.local_addr().map_err(SenderError::Setup)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            counters: SenderCounters::default(),
            push: Mutex::new(VecDeque::new()),
        });
        let max_push = cfg.max_push;
        let mut run = Run::new(cfg, socket, Arc::clone(&shared), source)?;
        let thread = std::thread::Builder::new()
            .name("mcast-sender".into())
            .spawn(move || run.run())
            .map_err(SenderError::Spawn)?;
        tracing::debug!(%local, "multicast sender started");
        Ok(Sender {
            shared,
            thread: Some(thread),
            local,
            max_push,
        })
    }

    /// The address requests go to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Queues `blocks` to be multicast before anyone asks (after any
    /// waiting requests).
    pub fn push(&self, blocks: &[u64]) -> Result<(), PushError> {
        let mut q = lock(&self.shared.push);
        let room = self.max_push.saturating_sub(q.len());
        let accepted = room.min(blocks.len());
        q.extend(&blocks[..accepted]);
        if accepted < blocks.len() {
            return Err(PushError::QueueFull {
                accepted,
                offered: blocks.len(),
            });
        }
        Ok(())
    }

    /// Pushed blocks not sent yet.
    pub fn push_pending(&self) -> usize {
        lock(&self.shared.push).len()
    }

    /// The counters so far.
    pub fn stats(&self) -> SenderStats {
        self.shared.counters.snapshot()
    }

    /// Stops the thread and waits for it.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the multicast sender thread panicked");
            }
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.halt();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    Group,
    Unicast(SocketAddr),
}

#[derive(Debug, Clone, Copy)]
struct Job {
    block: u64,
    dest: Dest,
    flags: u16,
}

/// A block being sent fragment by fragment.
struct Current {
    job: Job,
    data: Vec<u8>,
    next: usize,
    count: usize,
}

struct Peer {
    window: ReplayWindow,
    seen: Instant,
}

/// Recently multicast blocks, in send order.
struct Recent {
    order: VecDeque<(u64, Instant)>,
    last: HashMap<u64, Instant>,
    cap: usize,
}

impl Recent {
    fn insert(&mut self, block: u64, now: Instant) {
        while self.order.len() >= self.cap.max(1) {
            if let Some((b, t)) = self.order.pop_front() {
                if self.last.get(&b) == Some(&t) {
                    self.last.remove(&b);
                }
            }
        }
        self.order.push_back((block, now));
        self.last.insert(block, now);
    }

    fn prune(&mut self, window: Duration, now: Instant) {
        while let Some(&(b, t)) = self.order.front() {
            if now.saturating_duration_since(t) < window {
                break;
            }
            self.order.pop_front();
            if self.last.get(&b) == Some(&t) {
                self.last.remove(&b);
            }
        }
    }

    fn within(&self, block: u64, window: Duration, now: Instant) -> bool {
        self.last
            .get(&block)
            .is_some_and(|t| now.saturating_duration_since(*t) < window)
    }
}

/// The end-game detector: retries among the last requested blocks.
struct Detector {
    cfg: EndGame,
    last: VecDeque<bool>,
    retries: usize,
    active: bool,
}

impl Detector {
    fn record(&mut self, retry: bool) -> bool {
        let n = self.cfg.window.max(1);
        if self.last.len() >= n && self.last.pop_front() == Some(true) {
            self.retries -= 1;
        }
        self.last.push_back(retry);
        self.retries += usize::from(retry);
        let was = self.active;
        self.active = self.cfg.enabled
            && self.last.len() * 2 >= n
            && self.retries as f64 >= self.cfg.retry_fraction * self.last.len() as f64;
        self.active && !was
    }
}

struct Run<S> {
    cfg: SenderConfig,
    socket: UdpSocket,
    shared: Arc<Shared>,
    source: S,
    origin: u32,
    seq: u64,
    bucket: TokenBucket,
    flow: FlowControl,
    queue: VecDeque<Job>,
    queued_group: HashSet<u64>,
    current: Option<Current>,
    recent: Recent,
    /// Blocks ever sent to the group (up to `max_lockstep`): push skips
    /// them, the group has had them once.
    multicast_once: HashSet<u64>,
    peers: HashMap<u32, Peer>,
    detector: Detector,
    frag: usize,
    rx: Vec<u8>,
    payload: Vec<u8>,
    tx: Vec<u8>,
}

impl<S: BlockSource> Run<S> {
    fn new(
        cfg: SenderConfig,
        socket: UdpSocket,
        shared: Arc<Shared>,
        source: S,
    ) -> Result<Run<S>, SenderError> {
        let now = Instant::now();
        Ok(Run {
            origin: frame::random_origin()?,
            seq: 0,
            bucket: TokenBucket::new(cfg.rate.max_rate, cfg.rate.burst, now),
            flow: FlowControl::new(cfg.rate.clone()),
            queue: VecDeque::new(),
            queued_group: HashSet::new(),
            current: None,
            recent: Recent {
                order: VecDeque::new(),
                last: HashMap::new(),
                cap: cfg.max_lockstep,
            },
            multicast_once: HashSet::new(),
            peers: HashMap::new(),
            detector: Detector {
                cfg: cfg.end_game.clone(),
                last: VecDeque::new(),
                retries: 0,
                active: false,
            },
            frag: frame::max_fragment(cfg.mtu),
            rx: vec![0u8; frame::MAX_DATAGRAM],
            payload: Vec::with_capacity(frame::MAX_DATAGRAM),
            tx: Vec::with_capacity(frame::MAX_DATAGRAM),
            cfg,
            socket,
            shared,
            source,
        })
    }

    fn c(&self) -> &SenderCounters {
        &self.shared.counters
    }

    fn has_work(&self) -> bool {
        self.current.is_some() || !self.queue.is_empty() || !lock(&self.shared.push).is_empty()
    }

    fn run(&mut self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            let wait = if self.has_work() {
                self.bucket.wait_for(self.cfg.mtu, now).min(MAX_WAIT)
            } else {
                MAX_WAIT
            };
            if !wait.is_zero() {
                if let Err(e) = group::wait_readable([&self.socket], wait) {
                    tracing::warn!(error = %e, "sender poll failed");
                    std::thread::sleep(wait);
                }
            }
            self.read_requests();
            let now = Instant::now();
            let rate = self.flow.target(now);
            self.bucket.set_rate(rate, now);
            stats::set(&self.c().rate, rate);
            self.recent.prune(self.suppress_window(false), now);
            self.send_some();
        }
        tracing::debug!("multicast sender stopped");
    }

    fn read_requests(&mut self) {
        for _ in 0..READ_BATCH {
            let (n, src) = match self.socket.recv_from(&mut self.rx) {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "sender recv failed");
                    return;
                }
            };
            let dgram = std::mem::take(&mut self.rx);
            self.handle(&dgram[..n], src);
            self.rx = dgram;
        }
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

    fn handle(&mut self, dgram: &[u8], src: SocketAddr) {
        let (h, payload) = match frame::decode(&self.cfg.session, dgram) {
            Ok(v) => v,
            Err(e) => {
                tracing::trace!(%src, error = %e, "request rejected");
                return self.reject(Rejection::from(&e));
            }
        };
        if h.kind != Kind::Request {
            return self.reject(Rejection::Malformed);
        }
        let max = frame::max_request_blocks(frame::MAX_DATAGRAM + frame::IP_UDP_OVERHEAD);
        let Ok(req) = Request::decode(payload, max) else {
            return self.reject(Rejection::Malformed);
        };
        let now = Instant::now();
        if !self.replay_ok(h.origin, h.seq, now) {
            return self.reject(Rejection::Replayed);
        }
        stats::bump(&self.c().requests);
        self.flow.report(h.origin, req.rate, now);
        let retry = h.flags & frame::FLAG_RETRY != 0;
        for &block in &req.blocks {
            self.on_block_request(block, retry, src, now);
        }
    }

    fn replay_ok(&mut self, origin: u32, seq: u64, now: Instant) -> bool {
        if !self.peers.contains_key(&origin) && self.peers.len() >= self.cfg.max_receivers.max(1) {
            if let Some(k) = self
                .peers
                .iter()
                .min_by_key(|(_, p)| p.seen)
                .map(|(k, _)| *k)
            {
                self.peers.remove(&k);
            }
        }
        let p = self.peers.entry(origin).or_insert_with(|| Peer {
            window: ReplayWindow::default(),
            seen: now,
        });
        p.seen = now;
        p.window.accept(seq)
    }

    fn on_block_request(&mut self, block: u64, retry: bool, src: SocketAddr, now: Instant) {
        let c = &self.shared.counters;
        stats::bump(&c.blocks_requested);
        if retry {
            stats::bump(&c.retries_received);
        }
        // Queued or being sent to the group: that answers this request too
        // (and a retry of it is not a sign of loss, just of a backlog).
        let in_flight = self
            .current
            .as_ref()
            .is_some_and(|cur| cur.job.block == block && cur.job.dest == Dest::Group);
        if in_flight || self.queued_group.contains(&block) {
            stats::bump(&c.lockstep_suppressed);
            return;
        }
        if self.detector.record(retry) {
            stats::bump(&c.end_game_entered);
            tracing::info!("end game: retries now answered by unicast");
        }
        stats::set(&c.end_game_active, u64::from(self.detector.active));
        let dest = if self.detector.active && retry {
            Dest::Unicast(src)
        } else {
            Dest::Group
        };
        if dest == Dest::Group && self.recent.within(block, self.suppress_window(retry), now) {
            stats::bump(&c.lockstep_suppressed);
            return;
        }
        if self.queue.len() >= self.cfg.max_queued {
            stats::bump(&c.queue_full);
            return;
        }
        if dest == Dest::Group {
            self.queued_group.insert(block);
        }
        self.queue.push_back(Job {
            block,
            dest,
            flags: if dest == Dest::Group {
                0
            } else {
                frame::FLAG_UNICAST
            },
        });
    }

    /// How long after a block was multicast a request for it is dropped.
    fn suppress_window(&self, retry: bool) -> Duration {
        if retry {
            self.cfg.lockstep_window
        } else {
            self.cfg.first_request_window.max(self.cfg.lockstep_window)
        }
    }

    /// The next block to send: requests first, then push.
    fn next_job(&mut self, now: Instant) -> Option<Job> {
        if let Some(job) = self.queue.pop_front() {
            if job.dest == Dest::Group {
                self.queued_group.remove(&job.block);
            }
            return Some(job);
        }
        for _ in 0..SEND_BATCH {
            let block = lock(&self.shared.push).pop_front()?;
            if self.recent.within(block, self.cfg.lockstep_window, now)
                || self.multicast_once.contains(&block)
            {
                stats::bump(&self.c().push_skipped);
                continue;
            }
            return Some(Job {
                block,
                dest: Dest::Group,
                flags: frame::FLAG_PUSH,
            });
        }
        None
    }

    fn start_job(&mut self, job: Job, now: Instant) -> Option<Current> {
        let mut data = Vec::new();
        if !self.source.read_block(job.block, &mut data) || data.len() > self.cfg.max_block_len {
            stats::bump(&self.c().unknown_blocks);
            return None;
        }
        let count = data.len().div_ceil(self.frag).max(1);
        if count > u16::MAX as usize || u32::try_from(data.len()).is_err() {
            stats::bump(&self.c().unknown_blocks);
            return None;
        }
        let c = self.c();
        match job.dest {
            Dest::Group if job.flags & frame::FLAG_PUSH != 0 => stats::bump(&c.blocks_pushed),
            Dest::Group => stats::bump(&c.blocks_multicast),
            Dest::Unicast(_) => stats::bump(&c.blocks_unicast),
        }
        if job.dest == Dest::Group {
            self.recent.insert(job.block, now);
            if self.multicast_once.len() < self.cfg.max_lockstep {
                self.multicast_once.insert(job.block);
            }
        }
        Some(Current {
            job,
            data,
            next: 0,
            count,
        })
    }

    fn send_some(&mut self) {
        for _ in 0..SEND_BATCH {
            let now = Instant::now();
            let mut cur = match self.current.take() {
                Some(c) => c,
                None => match self.next_job(now) {
                    Some(job) => match self.start_job(job, now) {
                        Some(c) => c,
                        None => continue,
                    },
                    None => return,
                },
            };
            match self.send_fragment(&mut cur, now) {
                Sent::Yes if cur.next >= cur.count => {}
                Sent::Yes | Sent::Later => self.current = Some(cur),
            }
            if self.current.is_some() && self.bucket.wait_for(self.cfg.mtu, now) > Duration::ZERO {
                return;
            }
        }
    }

    fn send_fragment(&mut self, cur: &mut Current, now: Instant) -> Sent {
        let start = cur.next * self.frag;
        let end = (start + self.frag).min(cur.data.len());
        let bytes = &cur.data[start..end];
        let wire = frame::HEADER_LEN
            + frame::DATA_HEADER_LEN
            + bytes.len()
            + frame::MAC_LEN
            + frame::IP_UDP_OVERHEAD;
        if !self.bucket.try_take(wire, now) {
            return Sent::Later;
        }
        Fragment {
            block: cur.job.block,
            block_len: cur.data.len() as u32,
            offset: start as u32,
            index: cur.next as u16,
            count: cur.count as u16,
            bytes,
        }
        .encode(&mut self.payload);
        self.seq += 1;
        let h = Header {
            kind: Kind::Data,
            session: self.cfg.session.id,
            origin: self.origin,
            seq: self.seq,
            flags: cur.job.flags,
        };
        frame::encode(&mut self.tx, &self.cfg.session, &h, &self.payload);
        let to = match cur.job.dest {
            Dest::Group => SocketAddr::V4(self.cfg.group.addr()),
            Dest::Unicast(a) => a,
        };
        match self.socket.send_to(&self.tx, to) {
            Ok(_) => {
                stats::bump(&self.c().frames_sent);
                stats::add(&self.c().bytes_sent, wire as u64);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Sent::Later,
            Err(e) => {
                stats::bump(&self.c().send_errors);
                tracing::debug!(%to, error = %e, "send failed");
            }
        }
        cur.next += 1;
        Sent::Yes
    }
}

enum Sent {
    Yes,
    Later,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detector_switches_on_retries() {
        let mut d = Detector {
            cfg: EndGame {
                enabled: true,
                window: 8,
                retry_fraction: 0.5,
            },
            last: VecDeque::new(),
            retries: 0,
            active: false,
        };
        for _ in 0..8 {
            assert!(!d.record(false));
        }
        assert!(!d.record(true));
        assert!(!d.record(true));
        assert!(!d.record(true));
        assert!(d.record(true), "4 of 8 retries");
        assert!(!d.record(true), "already active");
        for _ in 0..8 {
            d.record(false);
        }
        assert!(!d.active);
    }

    #[test]
    fn recent_is_bounded_and_expires() {
        let t0 = Instant::now();
        let w = Duration::from_millis(10);
        let mut r = Recent {
            order: VecDeque::new(),
            last: HashMap::new(),
            cap: 3,
        };
        for b in 0..10 {
            r.insert(b, t0);
        }
        assert_eq!(r.order.len(), 3);
        assert!(r.within(9, w, t0));
        assert!(!r.within(0, w, t0));
        r.prune(w, t0 + w);
        assert!(r.last.is_empty() && r.order.is_empty());
    }
}
