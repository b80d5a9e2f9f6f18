//! The daemon's ingress of client updates: one UDP socket and one thread
//! that owns every zone's queue. It routes each update (a [`Directory`]
//! the API layer implements says where a zone and its fork family run),
//! admits it in per-client order, writes it into the zone's inbox ring
//! when there is room, and acknowledges it once the guest's consumer has
//! passed it and the guest said applied (or applied before).
//!
//! **Order and loss.** The guest skips an update whose sequence number is
//! not above the client's last applied one, so an update must never enter
//! a ring after a later one of the same client unless every earlier one
//! is already in or applied. Each update carries the client's *floor* (its
//! oldest unacknowledged sequence number): a target admits update `s` of
//! client `c` if `s` is at most what it last admitted for `c` (a
//! duplicate: it goes into the ring again and is acknowledged as such),
//! if `s` follows that directly, or if `s == floor` (nothing earlier is
//! outstanding). Anything else (an earlier datagram was lost, or the
//! queue was full) is dropped unacknowledged and the client re-sends.
//! A ring this daemon did not fill (after a migration or fork) is taken
//! over at its producer position: what was in it is applied by the guest
//! but acknowledged only when the client re-sends it.
//!
//! **Routing.** An update for a forked zone goes to family member
//! `client % (n + 1)`: this host's VM or local clone, or — **forwarded**
//! by this daemon to the clone host's ingress (`Forward` datagram, which
//! names the client's address and carries a MAC under the cluster's key:
//! the clone host acknowledges the client directly). A zone that migrated away answers `Redirect` to its new
//! host; an unknown zone, `Refused`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use guest_agent::abi;
use serde::Serialize;

use super::ring::{GuestView, Ring};
use super::wire::{self, Ack, Datagram, Forward, UpdatesEncoder, WireUpdate};
use crate::sync::lock;

/// A ring on this host: a VM's own, or a clone's of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// A VM registered here (member 0 of its family, or never forked).
    Vm(u64),
    /// Clone `clone_id` of family `family` whose parent is VM `parent`
    /// here.
    LocalClone {
        parent: u64,
        family: u64,
        clone_id: u64,
    },
    /// Clone `clone_id` of family `family`, hosted here for a parent on
    /// another host.
    HostedClone { family: u64, clone_id: u64 },
}

/// Where one update of a zone goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Here(Target),
    Forward {
        to: SocketAddr,
        family: u64,
        clone_id: u64,
    },
    /// The zone migrated to the daemon at this ingress.
    Moved(SocketAddr),
    Unknown,
}

/// How a zone's updates are routed: by client among its family members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    Single(Route),
    /// Member `i` of the family handles clients with `client % n == i`.
    Family(Vec<Route>),
}

impl Routing {
    fn route(&self, client: u32) -> &Route {
        match self {
            Routing::Single(r) => r,
            Routing::Family(m) if m.is_empty() => &Route::Unknown,
            Routing::Family(m) => &m[client as usize % m.len()],
        }
    }
}

/// What came of asking for a target's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Done,
    /// Not now (forking, migrating): try again later.
    Busy,
    /// The target is gone (ended, removed, migrated away).
    Gone,
}

/// Where zones run, as the API layer knows it.
pub trait Directory: Send + Sync {
    fn routing(&self, vm: u64) -> Routing;
    /// The clone of a forwarded batch, if it runs here.
    fn forwarded(&self, family: u64, clone_id: u64) -> Option<Target>;
    /// Runs `f` on the target's guest memory while nobody else may take
    /// the VM (migration, fork) and while it cannot end.
    fn with_guest(&self, t: Target, f: &mut dyn FnMut(&GuestView)) -> Access;
}

#[derive(Debug, Clone)]
pub struct IngressConfig {
    pub bind: SocketAddr,
    /// Updates waiting for ring room per target; more are dropped.
    pub queue_per_target: usize,
    /// How often rings are filled and acknowledged while work waits.
    pub pump_every: Duration,
    /// The MAC key of `Forward` datagrams (`wire::forward_key` of the
    /// cluster's secret); without one, forwards are neither sent nor taken.
    pub forward_key: Option<[u8; 32]>,
}

impl IngressConfig {
    pub fn new(bind: SocketAddr) -> Self {
        IngressConfig {
            bind,
            queue_per_target: 8192,
            pump_every: Duration::from_millis(1),
            forward_key: None,
        }
    }
}

/// Per-target counters (`load.clients` in `GET /v1/vms/{id}`, `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ClientCounters {
    /// Updates that arrived for this target.
    pub received: u64,
    /// Written into its ring.
    pub enqueued: u64,
    /// The guest applied them, or skipped them as applied before.
    pub applied: u64,
    pub duplicates: u64,
    /// Acknowledgements sent.
    pub acked: u64,
    /// Dropped unacknowledged: queue full, out of order, another
    /// member's client, the target gone (the client re-sends).
    pub dropped: u64,
    /// Updates waiting for ring room, and in the ring unacknowledged.
    pub queued: u64,
    pub in_ring: u64,
}

/// The ingress's daemon-wide figures.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngressStats {
    pub address: String,
    pub datagrams: u64,
    /// Datagrams that did not decode (dropped).
    pub bad_datagrams: u64,
    pub forwarded: u64,
    pub redirected: u64,
    pub refused: u64,
    #[serde(skip)]
    pub targets: BTreeMap<Target, ClientCounters>,
}

struct Queued {
    client: u32,
    seq: u64,
    ts: u64,
    vm: u64,
    reply: SocketAddr,
    payload: Vec<u8>,
}

struct InRing {
    client: u32,
    seq: u64,
    ts: u64,
    vm: u64,
    reply: SocketAddr,
}

#[derive(Default)]
struct TargetState {
    ring: Option<Ring>,
    /// Positions below this are handled (acknowledged or dropped).
    handled: u64,
    /// Updates in the ring from `handled` on, in position order.
    in_ring: VecDeque<InRing>,
    queue: VecDeque<Queued>,
    /// The last sequence number admitted per client.
    admitted: HashMap<u32, u64>,
    /// (client, seq) queued or in the ring: a re-send of one is not
    /// queued again (its acknowledgement comes when the guest passes it).
    pending: HashSet<(u32, u64)>,
    counters: ClientCounters,
}

impl TargetState {
    /// Everything queued is dropped (unacknowledged): what was admitted no
    /// longer says what is in the ring, so the order starts over (each
    /// client again from its floor).
    fn drop_queue(&mut self) {
        self.counters.dropped += self.queue.len() as u64;
        for q in self.queue.drain(..) {
            self.pending.remove(&(q.client, q.seq));
        }
        self.admitted.clear();
    }

    /// The per-client order rule (see the module docs). Its invariant: for
    /// `admitted[c] = L`, every update of `c` up to `L` the client has not
    /// had acknowledged is in the ring or applied by this guest.
    fn admit(&mut self, u: &WireUpdate) -> bool {
        match self.admitted.get(&u.client).copied() {
            Some(last) if u.seq <= last => true,
            Some(last) if u.seq == last + 1 => {
                self.admitted.insert(u.client, u.seq);
                true
            }
            _ if u.seq == u.floor => {
                self.admitted.insert(u.client, u.seq);
                true
            }
            _ => false,
        }
    }
}

/// The running ingress: its address, its figures, and a stop.
pub struct Ingress {
    addr: SocketAddr,
    stats: Arc<Mutex<IngressStats>>,
    /// Targets (and the zone VM ids they are routed under) whose state
    /// the thread drops before its next datagram.
    forget: Arc<Mutex<Vec<(u64, Target)>>>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Ingress {
    /// Binds the socket and starts the thread.
    pub fn start(cfg: IngressConfig, dir: Arc<dyn Directory>) -> std::io::Result<Ingress> {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(cfg.bind),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // Room for bursts of many clients; the kernel caps it.
        let _ = sock.set_recv_buffer_size(8 << 20);
        let _ = sock.set_send_buffer_size(4 << 20);
        sock.bind(&cfg.bind.into())?;
        let sock: UdpSocket = sock.into();
        let addr = sock.local_addr()?;
        let stats = Arc::new(Mutex::new(IngressStats {
            address: addr.to_string(),
            ..IngressStats::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let forget = Arc::new(Mutex::new(Vec::new()));
        let mut worker = Worker {
            sock,
            dir,
            cfg,
            forget: forget.clone(),
            targets: BTreeMap::new(),
            routes: HashMap::new(),
            stats: stats.clone(),
            local: IngressStats::default(),
            acks: HashMap::new(),
        };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("client-ingress".into())
            .spawn(move || worker.run(&s))?;
        Ok(Ingress {
            addr,
            stats,
            forget,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stats(&self) -> IngressStats {
        lock(&self.stats).clone()
    }

    /// The counters of one target, if updates ever came for it.
    pub fn counters(&self, t: Target) -> Option<ClientCounters> {
        lock(&self.stats).targets.get(&t).copied()
    }

    /// Target `t` of zone VM `vm` left this host or arrived on it (a
    /// migration): what this ingress knew of its ring — positions,
    /// admitted sequence numbers, updates queued or in the ring, the
    /// zone's cached route — no longer holds (the ring travelled with the
    /// guest and moved on elsewhere). The thread drops it before its next
    /// datagram (anything queued or in the ring unacknowledged: the
    /// clients re-send) and takes the ring over afresh when updates come
    /// again.
    pub fn forget(&self, vm: u64, t: Target) {
        lock(&self.forget).push((vm, t));
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = lock(&self.thread).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A zone's routing is looked up again after this long.
const ROUTE_TTL: Duration = Duration::from_millis(20);
/// The longest the thread waits for a datagram when nothing is pending.
const IDLE_WAIT: Duration = Duration::from_millis(50);

struct Worker {
    sock: UdpSocket,
    dir: Arc<dyn Directory>,
    cfg: IngressConfig,
    forget: Arc<Mutex<Vec<(u64, Target)>>>,
    targets: BTreeMap<Target, TargetState>,
    routes: HashMap<u64, (Instant, Routing)>,
    stats: Arc<Mutex<IngressStats>>,
    /// The figures as this thread keeps them (published after each pump).
    local: IngressStats,
    /// Acknowledgements to send, per client address and zone.
    acks: HashMap<(SocketAddr, u64), Vec<Ack>>,
}

impl Worker {
    fn run(&mut self, stop: &AtomicBool) {
        let mut buf = vec![0u8; wire::DATAGRAM_MAX + 1];
        let mut last_pump = Instant::now();
        while !stop.load(Ordering::Acquire) {
            self.forget_targets();
            let busy = self
                .targets
                .values()
                .any(|t| !t.queue.is_empty() || !t.in_ring.is_empty());
            let wait = if busy { self.cfg.pump_every } else { IDLE_WAIT };
            let _ = self.sock.set_read_timeout(Some(wait));
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => self.datagram(&buf[..n.min(wire::DATAGRAM_MAX)], from),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => {
                    tracing::debug!("client ingress: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            if last_pump.elapsed() >= self.cfg.pump_every {
                self.pump();
                last_pump = Instant::now();
            }
        }
    }

    /// Drops the state of the targets [`Ingress::forget`] named.
    fn forget_targets(&mut self) {
        let ts = std::mem::take(&mut *lock(&self.forget));
        for (vm, t) in ts {
            if let Some(st) = self.targets.remove(&t) {
                let mut c = st.counters;
                c.dropped += (st.queue.len() + st.in_ring.len()) as u64;
                c.queued = 0;
                c.in_ring = 0;
                lock(&self.stats).targets.insert(t, c);
            }
            self.routes.remove(&vm);
        }
    }

    fn send(&self, bytes: &[u8], to: SocketAddr) {
        if let Err(e) = self.sock.send_to(bytes, to) {
            tracing::debug!("client ingress: send to {to}: {e}");
        }
    }

    fn routing(&mut self, vm: u64) -> Routing {
        if let Some((at, r)) = self.routes.get(&vm) {
            if at.elapsed() < ROUTE_TTL {
                return r.clone();
            }
        }
        let r = self.dir.routing(vm);
        if self.routes.len() > 4096 {
            self.routes.clear();
        }
        self.routes.insert(vm, (Instant::now(), r.clone()));
        r
    }

    fn datagram(&mut self, b: &[u8], from: SocketAddr) {
        self.local.datagrams += 1;
        let d = match wire::decode(b) {
            Ok(d) => d,
            Err(e) => {
                self.local.bad_datagrams += 1;
                tracing::debug!("client ingress: bad datagram from {from}: {e}");
                return;
            }
        };
        match d {
            Datagram::Updates {
                vm,
                forward: None,
                updates,
            } => self.updates(vm, &updates, from),
            Datagram::Updates {
                forward: Some(_), ..
            } if !self
                .cfg
                .forward_key
                .is_some_and(|k| wire::forward_verifies(b, &k)) =>
            {
                self.local.bad_datagrams += 1;
            }
            Datagram::Updates {
                vm,
                forward: Some(f),
                updates,
            } => match self.dir.forwarded(f.family, f.clone_id) {
                Some(t) => {
                    for u in &updates {
                        self.enqueue(t, vm, u, SocketAddr::V4(f.reply_to));
                    }
                }
                // The clone ended or is not here (yet): the client re-sends.
                None => self.local.refused += updates.len() as u64,
            },
            // Acks, redirects and refusals are for clients.
            _ => self.local.bad_datagrams += 1,
        }
    }

    fn updates(&mut self, vm: u64, updates: &[WireUpdate], from: SocketAddr) {
        let routing = self.routing(vm);
        let mut forwards: BTreeMap<(SocketAddr, u64, u64), UpdatesEncoder> = BTreeMap::new();
        let (mut moved, mut unknown) = (None, false);
        for u in updates {
            match routing.route(u.client) {
                Route::Here(t) => self.enqueue(*t, vm, u, from),
                Route::Forward {
                    to,
                    family,
                    clone_id,
                } => {
                    let (Ok(reply_to), Some(_)) = (wire::v4(from), self.cfg.forward_key) else {
                        continue;
                    };
                    let key = (*to, *family, *clone_id);
                    let fwd = Forward {
                        family: *family,
                        clone_id: *clone_id,
                        reply_to,
                    };
                    let enc = forwards
                        .entry(key)
                        .or_insert_with(|| UpdatesEncoder::new(vm, Some(fwd)));
                    if enc.len() + UpdatesEncoder::cost(u) + wire::TAG_BYTES > wire::DATAGRAM_MAX {
                        let full = std::mem::replace(enc, UpdatesEncoder::new(vm, Some(fwd)));
                        if let Some(k) = &self.cfg.forward_key {
                            self.send(&full.finish_signed(k), *to);
                        }
                    }
                    if enc.push(u).is_ok() {
                        self.local.forwarded += 1;
                    }
                }
                Route::Moved(to) => moved = Some(*to),
                Route::Unknown => unknown = true,
            }
        }
        if let Some(k) = self.cfg.forward_key {
            for ((to, _, _), enc) in forwards {
                self.send(&enc.finish_signed(&k), to);
            }
        }
        if let Some(to) = moved.and_then(|a| wire::v4(a).ok()) {
            self.local.redirected += 1;
            self.send(&wire::encode_redirect(vm, to), from);
        }
        if unknown {
            self.local.refused += 1;
            self.send(&wire::encode_refused(vm, wire::REFUSED_UNKNOWN_VM), from);
        }
    }

    fn enqueue(&mut self, t: Target, vm: u64, u: &WireUpdate, reply: SocketAddr) {
        let max = self.cfg.queue_per_target;
        let st = self.targets.entry(t).or_default();
        st.counters.received += 1;
        if st.pending.contains(&(u.client, u.seq)) {
            // A re-send of one on its way: its acknowledgement will come.
            return;
        }
        if st.queue.len() >= max || !st.admit(u) {
            st.counters.dropped += 1;
            // A refused update must not count as admitted.
            return;
        }
        st.pending.insert((u.client, u.seq));
        st.queue.push_back(Queued {
            client: u.client,
            seq: u.seq,
            ts: u.ts,
            vm,
            reply,
            payload: u.payload.to_vec(),
        });
    }

    /// Fills rings from the queues and acknowledges what the guests
    /// consumed.
    fn pump(&mut self) {
        let keys: Vec<Target> = self
            .targets
            .iter()
            .filter(|(_, s)| !s.queue.is_empty() || !s.in_ring.is_empty())
            .map(|(k, _)| *k)
            .collect();
        let mut gone = Vec::new();
        for t in keys {
            let Some(mut st) = self.targets.remove(&t) else {
                continue;
            };
            let mut acks: Vec<(SocketAddr, u64, Ack)> = Vec::new();
            let access = self
                .dir
                .with_guest(t, &mut |v| service(&mut st, v, &mut acks));
            if access == Access::Gone {
                gone.push(t);
                st.counters.dropped += st.in_ring.len() as u64;
                st.in_ring.clear();
                st.pending.clear();
                st.ring = None;
                st.drop_queue();
            }
            st.counters.acked += acks.len() as u64;
            for (reply, vm, a) in acks {
                self.acks.entry((reply, vm)).or_default().push(a);
            }
            st.counters.queued = st.queue.len() as u64;
            st.counters.in_ring = st.in_ring.len() as u64;
            self.targets.insert(t, st);
        }
        for ((to, vm), acks) in std::mem::take(&mut self.acks) {
            for chunk in acks.chunks(wire::ACKS_PER_DATAGRAM.min(2048)) {
                self.send(&wire::encode_acks(vm, chunk), to);
            }
        }
        self.publish(&gone);
    }

    fn publish(&mut self, gone: &[Target]) {
        let mut s = lock(&self.stats);
        s.datagrams = self.local.datagrams;
        s.bad_datagrams = self.local.bad_datagrams;
        s.forwarded = self.local.forwarded;
        s.redirected = self.local.redirected;
        s.refused = self.local.refused;
        for (t, st) in &self.targets {
            s.targets.insert(*t, st.counters);
        }
        drop(s);
        // Targets gone and idle are forgotten (their counters stay).
        for t in gone {
            if self
                .targets
                .get(t)
                .is_some_and(|s| s.queue.is_empty() && s.in_ring.is_empty())
            {
                self.targets.remove(t);
            }
        }
    }
}

/// One target's turn with its guest memory: acknowledge what the guest
/// consumed, then write what fits.
fn service(st: &mut TargetState, v: &GuestView, acks: &mut Vec<(SocketAddr, u64, Ack)>) {
    let ring = match st.ring {
        Some(r) => r,
        None => match Ring::attach(v) {
            Ok(r) => {
                // Take the ring over where it stands (module docs).
                let p = r.producer(v).unwrap_or(0);
                st.handled = p;
                st.ring = Some(r);
                r
            }
            Err(e) => {
                tracing::debug!("client ring: {e}");
                st.drop_queue();
                return;
            }
        },
    };
    // The producer position is ours (the guest's memory may say anything):
    // the slots from `handled` on are `in_ring`, in order.
    let ours = st.handled + st.in_ring.len() as u64;
    let Ok(guest_consumer) = ring.word(v, abi::INBOX_WORD_CONSUMER) else {
        return;
    };
    // Acknowledge what the guest passed (never past what we wrote).
    let consumer = guest_consumer.min(ours);
    while st.handled < consumer {
        let pos = st.handled;
        st.handled += 1;
        let Some(e) = st.in_ring.pop_front() else {
            break;
        };
        st.pending.remove(&(e.client, e.seq));
        let status = match ring.status(v, pos) {
            Ok(abi::SLOT_APPLIED) => {
                st.counters.applied += 1;
                wire::ACK_APPLIED
            }
            Ok(abi::SLOT_DUPLICATE) => {
                st.counters.duplicates += 1;
                wire::ACK_DUPLICATE
            }
            // Another member's client (or malformed): not applied here,
            // so this client's order here starts over from its floor.
            _ => {
                st.counters.dropped += 1;
                st.admitted.remove(&e.client);
                continue;
            }
        };
        acks.push((
            e.reply,
            e.vm,
            Ack {
                client: e.client,
                status,
                seq: e.seq,
                ts: e.ts,
            },
        ));
    }
    // Room: what the guest has not consumed of what we wrote (a consumer
    // behind the ring's width — a ring taken over, or a confused guest —
    // leaves none).
    let base = st.handled + st.in_ring.len() as u64;
    let free = ring
        .slots()
        .saturating_sub(base.saturating_sub(guest_consumer.min(base)));
    let mut pos = base;
    for _ in 0..free {
        let Some(q) = st.queue.pop_front() else {
            break;
        };
        let u = WireUpdate {
            client: q.client,
            seq: q.seq,
            floor: 0,
            ts: q.ts,
            payload: &q.payload,
        };
        if ring.write_slot(v, pos, &u).is_err() {
            st.counters.dropped += 1;
            st.pending.remove(&(q.client, q.seq));
            st.drop_queue();
            break;
        }
        st.in_ring.push_back(InRing {
            client: q.client,
            seq: q.seq,
            ts: q.ts,
            vm: q.vm,
            reply: q.reply,
        });
        pos += 1;
    }
    if pos != base {
        st.counters.enqueued += pos - base;
        if ring.publish(v, pos).is_err() {
            tracing::debug!("client ring: cannot publish");
        }
    }
}
