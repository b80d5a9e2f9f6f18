//! The page server: one UDP socket, one session per fork family.
//!
//! A receive thread decodes datagrams and answers the cheap cases itself
//! (info requests, out-of-range and oversized requests). Valid page
//! requests go through a bounded queue ([`ServerLimits::max_inflight`]) to
//! a few worker threads that read the pages from the family's
//! [`PageSource`] and send one reply datagram per page to the requester. A
//! full queue is answered with [`ErrorCode::Overloaded`]; the requester
//! asks again after its timeout.
//!
//! **Who gets an answer (no amplification).** The server answers a
//! datagram only if it *proves* that its sender holds the family's secret:
//! its family is one the server knows, its MAC ([`crate::auth`]) verifies
//! under that family's key, and its (client, sequence number) has not been
//! seen before (the replay window). Everything else is dropped without a
//! reply and counted: [`ServerStats::dropped_unknown_family`],
//! [`ServerStats::dropped_bad_mac`], [`ServerStats::dropped_replay`],
//! [`ServerStats::dropped_unproven`] (requests of the old unauthenticated
//! wire version), [`ServerStats::dropped_too_many_clients`],
//! [`ServerStats::malformed`]. So a party without the secret cannot make
//! the server send a single byte, to its own address or to a spoofed one,
//! and a captured request cannot be resent. We chose this over a cookie
//! handshake (prove the address first) because every requester must hold
//! the secret anyway (the pages are secret), and it costs clones no round
//! trip before their first page. What remains: the MAC does not cover the
//! source address (so NAT and proxies work), so an on-path attacker who
//! captures a request *and keeps it from reaching the server* can deliver
//! it once from a spoofed address; that needs a position from which it
//! could flood the victim itself. Replies that are not pages (errors, info)
//! are never larger than a request ([`crate::wire`]).
//!
//! A removed family's key is kept a while ([`TOMBSTONES`] families), so its
//! clients get an authenticated `UnknownFamily` at once instead of a
//! timeout.
//!
//! Memory is bounded: each thread owns one datagram buffer and one page
//! buffer; queued requests are a few words each; replay windows are
//! bounded per family ([`crate::auth::MAX_CLIENTS_PER_FAMILY`]).

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::auth::{FamilyKey, RandomError, Refusal, ReplayGuard};
use crate::mcdist::{McEndpoint, Mcdist, McdistConfig, McdistError, McdistStats, StartPushError};
use crate::sync::lock;
use crate::wire::{self, Body, ErrorCode, Frame, WireError, MAX_DATAGRAM, VERSION};
use crate::{PageSource, SourceError, PAGE_SIZE};

/// How often the receive thread checks for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Socket buffer sizes asked for (the kernel caps them at rmem/wmem_max).
const SOCKET_BUFFER: usize = 4 << 20;
/// Removed families whose keys are kept to answer `UnknownFamily`.
pub const TOMBSTONES: usize = 64;
/// Tries at a family id nobody uses (64 random bits: one is plenty).
const ID_TRIES: usize = 8;

/// Bounds on what one server takes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    /// Families served at once.
    pub max_families: usize,
    /// Largest `count` of a page request; larger ones get `TooLarge`.
    pub max_pages_per_request: u32,
    /// Page requests queued or being served; beyond it, `Overloaded`.
    pub max_inflight: usize,
    /// Worker threads reading pages and sending replies (at least 1).
    pub workers: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_families: 64,
            max_pages_per_request: 64,
            max_inflight: 256,
            workers: 2,
        }
    }
}

/// Why binding a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the page server socket on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a page server thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("invalid server limits: {0}")]
    BadLimits(&'static str),
    #[error("invalid multicast distribution settings")]
    Mcdist(#[source] McdistError),
}

/// Why a family could not be added.
#[derive(Debug, thiserror::Error)]
pub enum AddFamilyError {
    #[error("fork family {0} is already served")]
    FamilyExists(u64),
    #[error("the server already serves its maximum of {0} families")]
    TooManyFamilies(usize),
    #[error("cannot make a family key")]
    Key(#[source] RandomError),
    #[error("cannot distribute the family by multicast")]
    Mcdist(#[source] McdistError),
}

/// Counters of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FamilyStats {
    pub family: u64,
    /// Authenticated page requests accepted for this family.
    pub requests: u64,
    pub pages_sent: u64,
    /// Clients with a replay window.
    pub clients: usize,
}

/// Server counters (monotonic since bind).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Authenticated page requests received (any outcome).
    pub requests: u64,
    /// Authenticated info requests received.
    pub info_requests: u64,
    pub pages_sent: u64,
    /// Bytes of all datagrams sent: unicast replies and errors (UDP
    /// payload) plus the multicast senders' (IP and UDP headers included,
    /// `multicast.total.bytes_sent`).
    pub bytes_sent: u64,
    /// Datagrams that did not decode, were not requests, or asked for no
    /// pages; dropped.
    pub malformed: u64,
    /// Requests for a family id the server does not know; dropped.
    pub dropped_unknown_family: u64,
    /// Requests whose MAC did not verify under their family's key; dropped.
    pub dropped_bad_mac: u64,
    /// Authenticated requests whose sequence number was seen before or is
    /// older than the replay window; dropped.
    pub dropped_replay: u64,
    /// Requests without authentication (older wire versions); dropped.
    pub dropped_unproven: u64,
    /// Authenticated requests of a new client of a family that has its
    /// maximum of clients; dropped.
    pub dropped_too_many_clients: u64,
    /// Authenticated requests for a removed family, answered `UnknownFamily`.
    pub family_gone: u64,
    pub out_of_range: u64,
    pub too_large: u64,
    pub overloaded: u64,
    /// Page source failures answered with `Internal`.
    pub internal_errors: u64,
    /// `send_to` failures (the reply is lost; the client asks again).
    pub send_errors: u64,
    /// Families currently served, by id.
    pub families: Vec<FamilyStats>,
    /// Multicast distribution (mcdist): live families and totals.
    pub multicast: McdistStats,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    info_requests: AtomicU64,
    pages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    malformed: AtomicU64,
    dropped_unknown_family: AtomicU64,
    dropped_bad_mac: AtomicU64,
    dropped_replay: AtomicU64,
    dropped_unproven: AtomicU64,
    dropped_too_many_clients: AtomicU64,
    family_gone: AtomicU64,
    out_of_range: AtomicU64,
    too_large: AtomicU64,
    overloaded: AtomicU64,
    internal_errors: AtomicU64,
    send_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// What authenticates a family's datagrams; outlives the family a while.
struct Auth {
    key: FamilyKey,
    replay: ReplayGuard,
}

struct ServedFamily {
    auth: Arc<Auth>,
    source: Arc<dyn PageSource>,
    requests: AtomicU64,
    pages_sent: AtomicU64,
}

/// A family id's standing on the server.
enum Lookup {
    Live(Arc<ServedFamily>),
    Gone(Arc<Auth>),
    Unknown,
}

struct ServerState {
    socket: UdpSocket,
    families: RwLock<HashMap<u64, Arc<ServedFamily>>>,
    /// Keys of recently removed families, oldest first.
    gone: Mutex<VecDeque<Arc<Auth>>>,
    counters: Counters,
    limits: ServerLimits,
    stop: AtomicBool,
}

impl ServerState {
    fn lookup(&self, id: u64) -> Lookup {
        let map = self.families.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = map.get(&id) {
            return Lookup::Live(f.clone());
        }
        drop(map);
        match lock(&self.gone).iter().find(|a| a.key.id() == id) {
            Some(a) => Lookup::Gone(a.clone()),
            None => Lookup::Unknown,
        }
    }

    /// Encodes and sends one frame to `peer`, counting bytes or the failure.
    fn send(&self, buf: &mut [u8; MAX_DATAGRAM], peer: &Peer, body: Body<'_>) -> bool {
        let frame = Frame::new(peer.auth.key.id(), peer.client, peer.seq, body);
        let n = frame.encode_into(&peer.auth.key, buf);
        match self.socket.send_to(&buf[..n], peer.to) {
            Ok(sent) => {
                let c = &self.counters.bytes_sent;
                c.fetch_add(sent as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                bump(&self.counters.send_errors);
                tracing::debug!(to = %peer.to, error = %e, "page server send failed");
                false
            }
        }
    }

    fn send_error(&self, buf: &mut [u8; MAX_DATAGRAM], peer: &Peer, refusal: Refused) {
        let (code, page, detail) = refusal;
        self.send(buf, peer, Body::ErrorReply { code, page, detail });
    }
}

/// An error reply: code, page, detail.
type Refused = (ErrorCode, u64, u64);

/// Where a reply goes, what it echoes and the key it is tagged with.
#[derive(Clone)]
struct Peer {
    to: SocketAddr,
    auth: Arc<Auth>,
    client: u64,
    seq: u64,
}

/// A page request accepted for serving.
struct Job {
    family: Arc<ServedFamily>,
    peer: Peer,
    first: u64,
    count: u32,
}

/// The page server. Stops on [`MemServer::shutdown`] or drop.
pub struct MemServer {
    shared: Arc<ServerState>,
    local: SocketAddr,
    threads: Vec<JoinHandle<()>>,
    mcdist: Mcdist,
}

impl MemServer {
    /// A server with default limits on an ephemeral port of 127.0.0.1: what
    /// a single host's fork families use.
    pub fn loopback() -> Result<MemServer, ServerError> {
        MemServer::bind(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            ServerLimits::default(),
        )
    }

    /// Binds `addr` (port 0 for an ephemeral port) and starts serving;
    /// multicast families go out on the interface of `addr` (loopback if
    /// unspecified) with default settings.
    pub fn bind(addr: SocketAddr, limits: ServerLimits) -> Result<MemServer, ServerError> {
        let ip = crate::mcdist::host::local_ip_for(addr);
        MemServer::bind_with(addr, limits, McdistConfig::on(ip))
    }

    /// [`MemServer::bind`] with multicast distribution settings.
    pub fn bind_with(
        addr: SocketAddr,
        limits: ServerLimits,
        mcdist: McdistConfig,
    ) -> Result<MemServer, ServerError> {
        let mcdist = Mcdist::new(mcdist).map_err(ServerError::Mcdist)?;
        if limits.workers == 0 || limits.max_inflight == 0 || limits.max_pages_per_request == 0 {
            return Err(ServerError::BadLimits(
                "workers, max_inflight and max_pages_per_request must be at least 1",
            ));
        }
        let bind_err = |source| ServerError::Bind { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
            .map_err(bind_err)?;
        // Larger buffers absorb request bursts from many clones; the kernel
        // caps the size, so failures here are not fatal.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        socket.bind(&addr.into()).map_err(bind_err)?;
        let socket: UdpSocket = socket.into();
        socket
            .set_read_timeout(Some(POLL_INTERVAL))
            .map_err(bind_err)?;
        let local = socket.local_addr().map_err(bind_err)?;

        let shared = Arc::new(ServerState {
            socket,
            families: RwLock::new(HashMap::new()),
            gone: Mutex::new(VecDeque::new()),
            counters: Counters::default(),
            limits,
            stop: AtomicBool::new(false),
        });
        let (tx, rx) = sync_channel::<Job>(limits.max_inflight);
        let rx = Arc::new(Mutex::new(rx));
        let mut server = MemServer {
            shared: shared.clone(),
            local,
            threads: Vec::new(),
            mcdist,
        };
        for i in 0..limits.workers {
            let (shared, rx) = (shared.clone(), rx.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("memserver-w{i}"))
                .spawn(move || worker_loop(&shared, &rx));
            match spawned {
                Ok(t) => server.threads.push(t),
                Err(e) => {
                    // Dropping the sender first lets the started workers
                    // exit when `server` is dropped and joins them.
                    drop(tx);
                    return Err(ServerError::Spawn(e));
                }
            }
        }
        let t = std::thread::Builder::new()
            .name("memserver-rx".into())
            .spawn(move || receive_loop(&shared, tx))
            .map_err(ServerError::Spawn)?;
        server.threads.push(t);
        tracing::debug!(%local, ?limits, "page server listening");
        Ok(server)
    }

    /// The bound address (with the actual port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Starts serving a new family from `source`, under a fresh random key
    /// (id and secret). Its clients need the key ([`crate::client`]).
    pub fn add_family(&self, source: Arc<dyn PageSource>) -> Result<FamilyKey, AddFamilyError> {
        let mut last = None;
        for _ in 0..ID_TRIES {
            let key = FamilyKey::generate().map_err(AddFamilyError::Key)?;
            match self.add_family_with_key(key.clone(), source.clone()) {
                Ok(()) => return Ok(key),
                Err(AddFamilyError::FamilyExists(id)) => last = Some(id),
                Err(e) => return Err(e),
            }
        }
        Err(AddFamilyError::FamilyExists(last.unwrap_or_default()))
    }

    /// Starts serving `key.id()` from `source` under a key made elsewhere
    /// (e.g. by the host that froze the parent).
    pub fn add_family_with_key(
        &self,
        key: FamilyKey,
        source: Arc<dyn PageSource>,
    ) -> Result<(), AddFamilyError> {
        let id = key.id();
        let mut map = self
            .shared
            .families
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let tombstoned = lock(&self.shared.gone).iter().any(|a| a.key.id() == id);
        if map.contains_key(&id) || tombstoned {
            return Err(AddFamilyError::FamilyExists(id));
        }
        if map.len() >= self.shared.limits.max_families {
            return Err(AddFamilyError::TooManyFamilies(
                self.shared.limits.max_families,
            ));
        }
        let auth = Arc::new(Auth {
            key,
            replay: ReplayGuard::default(),
        });
        map.insert(
            id,
            Arc::new(ServedFamily {
                auth,
                source,
                requests: AtomicU64::new(0),
                pages_sent: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Serves `key.id()` from `source` by unicast and by multicast (mcdist):
    /// the family gets a group and port of the pool and a sender; `push`
    /// are the (first page, count) ranges [`MemServer::start_push`] streams
    /// to the group. Hosts join with the returned endpoint and the key
    /// ([`crate::mcdist::host::HostReceiver`]).
    pub fn add_family_multicast(
        &self,
        key: FamilyKey,
        source: Arc<dyn PageSource>,
        push: Vec<(u64, u64)>,
    ) -> Result<McEndpoint, AddFamilyError> {
        let id = key.id();
        self.add_family_with_key(key.clone(), source.clone())?;
        self.mcdist.add_family(&key, source, push).map_err(|e| {
            self.remove_family(id);
            AddFamilyError::Mcdist(e)
        })
    }

    /// Streams a multicast family's push ranges to its group (once), when
    /// its receivers have joined; returns the pages queued.
    pub fn start_push(&self, family: u64) -> Result<u64, StartPushError> {
        self.mcdist.start_push(family)
    }

    /// The multicast side of the server.
    pub fn mcdist(&self) -> &Mcdist {
        &self.mcdist
    }

    /// Stops serving `family` (by unicast, and by multicast if it was:
    /// its sender stops, its group is freed); returns whether it was
    /// served. Requests already queued for it still complete; the source
    /// is dropped after. Its key is kept for a while to answer late
    /// requests `UnknownFamily`.
    pub fn remove_family(&self, family: u64) -> bool {
        self.mcdist.remove_family(family);
        let mut map = self
            .shared
            .families
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(f) = map.remove(&family) else {
            return false;
        };
        let mut gone = lock(&self.shared.gone);
        if gone.len() >= TOMBSTONES {
            gone.pop_front();
        }
        gone.push_back(f.auth.clone());
        true
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ServerStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut families: Vec<FamilyStats> = {
            let map = self
                .shared
                .families
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            map.iter()
                .map(|(&family, f)| FamilyStats {
                    family,
                    requests: get(&f.requests),
                    pages_sent: get(&f.pages_sent),
                    clients: f.auth.replay.clients(),
                })
                .collect()
        };
        families.sort_by_key(|f| f.family);
        let multicast = self.mcdist.stats();
        ServerStats {
            requests: get(&c.requests),
            info_requests: get(&c.info_requests),
            pages_sent: get(&c.pages_sent),
            bytes_sent: get(&c.bytes_sent) + multicast.total.bytes_sent,
            malformed: get(&c.malformed),
            dropped_unknown_family: get(&c.dropped_unknown_family),
            dropped_bad_mac: get(&c.dropped_bad_mac),
            dropped_replay: get(&c.dropped_replay),
            dropped_unproven: get(&c.dropped_unproven),
            dropped_too_many_clients: get(&c.dropped_too_many_clients),
            family_gone: get(&c.family_gone),
            out_of_range: get(&c.out_of_range),
            too_large: get(&c.too_large),
            overloaded: get(&c.overloaded),
            internal_errors: get(&c.internal_errors),
            send_errors: get(&c.send_errors),
            families,
            multicast,
        }
    }

    /// Tells the threads to stop serving (at once: the receiver is woken
    /// by an empty datagram) without waiting for them; for holders of a
    /// shared server.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake_receiver();
    }

    /// Sends the receive loop an empty datagram so it sees the stop flag
    /// now rather than at its next poll timeout.
    fn wake_receiver(&self) {
        let mut to = self.local;
        if to.ip().is_unspecified() {
            to.set_ip(match to {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let from: SocketAddr = match to {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        // Best effort: without it the loop still stops at its timeout.
        if let Ok(sock) = std::net::UdpSocket::bind(from) {
            let _ = sock.send_to(&[], to);
        }
    }

    /// Stops the threads and waits for them (at once, plus the request
    /// being served). Idempotent.
    pub fn shutdown(&mut self) {
        self.stop();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for MemServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for MemServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemServer")
            .field("local", &self.local)
            .field("limits", &self.shared.limits)
            .finish_non_exhaustive()
    }
}

mod loops;
use loops::{receive_loop, worker_loop};

#[cfg(test)]
mod tests {
    use super::*;

    struct Zeros(u64);
    impl PageSource for Zeros {
        fn pages(&self) -> u64 {
            self.0
        }
        fn read_page(&self, _: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
            buf.fill(0);
            Ok(())
        }
    }

    fn localhost() -> SocketAddr {
        "127.0.0.1:0".parse().expect("addr")
    }

    #[test]
    fn families_are_bounded_unique_and_random() {
        let limits = ServerLimits {
            max_families: 2,
            ..ServerLimits::default()
        };
        let mut s = MemServer::bind(localhost(), limits).expect("bind");
        assert_ne!(s.local_addr().port(), 0);
        let k1 = FamilyKey::from_parts(1, [1; 32]);
        s.add_family_with_key(k1.clone(), Arc::new(Zeros(4)))
            .expect("add 1");
        assert!(matches!(
            s.add_family_with_key(k1, Arc::new(Zeros(4))),
            Err(AddFamilyError::FamilyExists(1))
        ));
        let k2 = s.add_family(Arc::new(Zeros(4))).expect("add random");
        assert!(matches!(
            s.add_family(Arc::new(Zeros(4))),
            Err(AddFamilyError::TooManyFamilies(2))
        ));
        assert!(s.remove_family(1));
        assert!(!s.remove_family(1));
        // A removed family's id is not reused while its key is kept.
        assert!(matches!(
            s.add_family_with_key(FamilyKey::from_parts(1, [9; 32]), Arc::new(Zeros(4))),
            Err(AddFamilyError::FamilyExists(1))
        ));
        let k3 = s.add_family(Arc::new(Zeros(4))).expect("add 3");
        assert_ne!(k2.id(), k3.id());
        assert_ne!(k2.secret(), k3.secret());
        let fams: Vec<u64> = s.stats().families.iter().map(|f| f.family).collect();
        let mut want = vec![k2.id(), k3.id()];
        want.sort_unstable();
        assert_eq!(fams, want);
        s.shutdown();
        s.shutdown();
    }

    #[test]
    fn tombstones_are_bounded() {
        let s = MemServer::bind(localhost(), ServerLimits::default()).expect("bind");
        for _ in 0..TOMBSTONES + 5 {
            let k = s.add_family(Arc::new(Zeros(1))).expect("add");
            assert!(s.remove_family(k.id()));
        }
        assert_eq!(lock(&s.shared.gone).len(), TOMBSTONES);
    }

    #[test]
    fn bad_limits_are_refused() {
        let limits = ServerLimits {
            workers: 0,
            ..ServerLimits::default()
        };
        assert!(matches!(
            MemServer::bind(localhost(), limits),
            Err(ServerError::BadLimits(_))
        ));
    }

    #[test]
    fn shutdown_is_prompt() {
        let s = MemServer::bind(localhost(), ServerLimits::default()).expect("bind");
        let t = std::time::Instant::now();
        drop(s);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}
