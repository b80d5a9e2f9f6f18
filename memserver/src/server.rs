//! The page server: one UDP socket, one session per fork family.
//!
//! A receive thread decodes datagrams and answers the cheap cases itself
//! (info requests, unknown families, out-of-range and oversized requests,
//! malformed datagrams are counted and dropped). Valid page requests go
//! through a bounded queue ([`ServerLimits::max_inflight`]) to a few worker
//! threads that read the pages from the family's [`PageSource`] and send one
//! reply datagram per page to the requester. A full queue is answered with
//! [`ErrorCode::Overloaded`]; the requester asks again after its timeout.
//!
//! Memory is bounded: each thread owns one datagram buffer and one page
//! buffer; queued requests are a few words each.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::wire::{Body, ErrorCode, Frame, MAX_DATAGRAM};
use crate::{PageSource, SourceError, PAGE_SIZE};

/// How often the receive thread checks for shutdown.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Socket buffer sizes asked for (the kernel caps them at rmem/wmem_max).
const SOCKET_BUFFER: usize = 4 << 20;

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

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind the page server socket on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot start a page server thread: {0}")]
    Spawn(io::Error),
    #[error("fork family {0} is already served")]
    FamilyExists(u64),
    #[error("the server already serves its maximum of {0} families")]
    TooManyFamilies(usize),
    #[error("invalid server limits: {0}")]
    BadLimits(&'static str),
}

/// Counters of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FamilyStats {
    pub family: u64,
    /// Page requests accepted for this family.
    pub requests: u64,
    pub pages_sent: u64,
}

/// Server counters (monotonic since bind).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerStats {
    /// Well-formed page requests received (any outcome).
    pub requests: u64,
    /// Well-formed info requests received.
    pub info_requests: u64,
    pub pages_sent: u64,
    /// Bytes of all datagrams sent (replies and errors).
    pub bytes_sent: u64,
    /// Datagrams that did not decode, or were not requests; dropped.
    pub malformed: u64,
    pub unknown_family: u64,
    pub out_of_range: u64,
    pub too_large: u64,
    pub overloaded: u64,
    /// Page source failures answered with `Internal`.
    pub internal_errors: u64,
    /// `send_to` failures (the reply is lost; the client asks again).
    pub send_errors: u64,
    /// Families currently served, by id.
    pub families: Vec<FamilyStats>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    info_requests: AtomicU64,
    pages_sent: AtomicU64,
    bytes_sent: AtomicU64,
    malformed: AtomicU64,
    unknown_family: AtomicU64,
    out_of_range: AtomicU64,
    too_large: AtomicU64,
    overloaded: AtomicU64,
    internal_errors: AtomicU64,
    send_errors: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct Family {
    source: Arc<dyn PageSource>,
    requests: AtomicU64,
    pages_sent: AtomicU64,
}

struct Shared {
    socket: UdpSocket,
    families: RwLock<HashMap<u64, Arc<Family>>>,
    counters: Counters,
    limits: ServerLimits,
    stop: AtomicBool,
}

impl Shared {
    fn family(&self, id: u64) -> Option<Arc<Family>> {
        let map = self.families.read().unwrap_or_else(|e| e.into_inner());
        map.get(&id).cloned()
    }

    /// Encodes and sends one frame to `peer`, counting bytes or the failure.
    fn send(&self, buf: &mut [u8; MAX_DATAGRAM], peer: Peer, body: Body<'_>) -> bool {
        let n = Frame::new(peer.family, peer.req_id, body).encode_into(buf);
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

    fn send_error(
        &self,
        buf: &mut [u8; MAX_DATAGRAM],
        peer: Peer,
        code: ErrorCode,
        page: u64,
        detail: u64,
    ) {
        self.send(buf, peer, Body::ErrorReply { code, page, detail });
    }
}

/// Where a reply goes and what it echoes.
#[derive(Debug, Clone, Copy)]
struct Peer {
    to: SocketAddr,
    family: u64,
    req_id: u32,
}

/// A page request accepted for serving.
struct Job {
    family: Arc<Family>,
    peer: Peer,
    first: u64,
    count: u32,
}

/// The page server. Stops on [`MemServer::shutdown`] or drop.
pub struct MemServer {
    shared: Arc<Shared>,
    local: SocketAddr,
    threads: Vec<JoinHandle<()>>,
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

    /// Binds `addr` (port 0 for an ephemeral port) and starts serving.
    pub fn bind(addr: SocketAddr, limits: ServerLimits) -> Result<MemServer, ServerError> {
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

        let shared = Arc::new(Shared {
            socket,
            families: RwLock::new(HashMap::new()),
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

    /// Starts serving `family` from `source`.
    pub fn add_family(&self, family: u64, source: Arc<dyn PageSource>) -> Result<(), ServerError> {
        let mut map = self
            .shared
            .families
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if map.contains_key(&family) {
            return Err(ServerError::FamilyExists(family));
        }
        if map.len() >= self.shared.limits.max_families {
            return Err(ServerError::TooManyFamilies(
                self.shared.limits.max_families,
            ));
        }
        map.insert(
            family,
            Arc::new(Family {
                source,
                requests: AtomicU64::new(0),
                pages_sent: AtomicU64::new(0),
            }),
        );
        Ok(())
    }

    /// Stops serving `family`; returns whether it was served. Requests
    /// already queued for it still complete; the source is dropped after.
    pub fn remove_family(&self, family: u64) -> bool {
        let mut map = self
            .shared
            .families
            .write()
            .unwrap_or_else(|e| e.into_inner());
        map.remove(&family).is_some()
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
                .unwrap_or_else(|e| e.into_inner());
            map.iter()
                .map(|(&family, f)| FamilyStats {
                    family,
                    requests: get(&f.requests),
                    pages_sent: get(&f.pages_sent),
                })
                .collect()
        };
        families.sort_by_key(|f| f.family);
        ServerStats {
            requests: get(&c.requests),
            info_requests: get(&c.info_requests),
            pages_sent: get(&c.pages_sent),
            bytes_sent: get(&c.bytes_sent),
            malformed: get(&c.malformed),
            unknown_family: get(&c.unknown_family),
            out_of_range: get(&c.out_of_range),
            too_large: get(&c.too_large),
            overloaded: get(&c.overloaded),
            internal_errors: get(&c.internal_errors),
            send_errors: get(&c.send_errors),
            families,
        }
    }

    /// Tells the threads to stop serving (they do within about one poll
    /// interval) without waiting for them; for holders of a shared server.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
    }

    /// Stops the threads and waits for them (within about one poll
    /// interval plus the request being served). Idempotent.
    pub fn shutdown(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
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

/// Receives datagrams until stopped; dropping `tx` at the end stops the
/// workers once the queue drains.
fn receive_loop(shared: &Shared, tx: SyncSender<Job>) {
    // One extra byte so an over-long datagram shows as a bad length.
    let mut rbuf = [0u8; MAX_DATAGRAM + 1];
    let mut sbuf = [0u8; MAX_DATAGRAM];
    while !shared.stop.load(Ordering::Acquire) {
        let (n, from) = match shared.socket.recv_from(&mut rbuf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => {
                // E.g. ECONNREFUSED from an ICMP error for an earlier reply.
                tracing::debug!(error = %e, "page server recv error");
                continue;
            }
        };
        let frame = match Frame::decode(&rbuf[..n]) {
            Ok(f) => f,
            Err(e) => {
                bump(&shared.counters.malformed);
                tracing::debug!(%from, error = %e, "dropping malformed datagram");
                continue;
            }
        };
        let peer = Peer {
            to: from,
            family: frame.family,
            req_id: frame.req_id,
        };
        let c = &shared.counters;
        match frame.body {
            Body::InfoRequest => {
                bump(&c.info_requests);
                let Some(f) = shared.family(peer.family) else {
                    bump(&c.unknown_family);
                    shared.send_error(&mut sbuf, peer, ErrorCode::UnknownFamily, 0, 0);
                    continue;
                };
                let body = Body::InfoReply {
                    pages: f.source.pages(),
                    max_window: shared.limits.max_pages_per_request,
                };
                shared.send(&mut sbuf, peer, body);
            }
            Body::PageRequest { first_page, count } => {
                bump(&c.requests);
                if let Err((code, page, detail)) = accept(shared, &tx, peer, first_page, count) {
                    shared.send_error(&mut sbuf, peer, code, page, detail);
                }
            }
            // Replies are not for us: a foreign or looped-back datagram.
            Body::PageReply { .. } | Body::ErrorReply { .. } | Body::InfoReply { .. } => {
                bump(&c.malformed);
            }
        }
    }
}

/// Validates a page request and queues it for a worker; `Err` is the error
/// reply to send (code, page, detail).
fn accept(
    shared: &Shared,
    tx: &SyncSender<Job>,
    peer: Peer,
    first: u64,
    count: u32,
) -> Result<(), (ErrorCode, u64, u64)> {
    let c = &shared.counters;
    if count == 0 {
        bump(&c.malformed);
        return Ok(());
    }
    let Some(family) = shared.family(peer.family) else {
        bump(&c.unknown_family);
        return Err((ErrorCode::UnknownFamily, first, 0));
    };
    bump(&family.requests);
    let limit = shared.limits.max_pages_per_request;
    if count > limit {
        bump(&c.too_large);
        return Err((ErrorCode::TooLarge, first, limit.into()));
    }
    let pages = family.source.pages();
    if first
        .checked_add(count.into())
        .is_none_or(|end| end > pages)
    {
        bump(&c.out_of_range);
        return Err((ErrorCode::OutOfRange, first.max(pages), pages));
    }
    let job = Job {
        family,
        peer,
        first,
        count,
    };
    match tx.try_send(job) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(_)) => {
            bump(&c.overloaded);
            Err((ErrorCode::Overloaded, first, 0))
        }
        Err(TrySendError::Disconnected(_)) => {
            bump(&c.internal_errors);
            Err((ErrorCode::Internal, first, 0))
        }
    }
}

fn worker_loop(shared: &Shared, rx: &Mutex<Receiver<Job>>) {
    let mut sbuf = [0u8; MAX_DATAGRAM];
    let mut page = [0u8; PAGE_SIZE];
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        serve(shared, &job, &mut sbuf, &mut page);
    }
}

fn serve(shared: &Shared, job: &Job, sbuf: &mut [u8; MAX_DATAGRAM], page: &mut [u8; PAGE_SIZE]) {
    let c = &shared.counters;
    for i in job.first..job.first + u64::from(job.count) {
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if let Err(e) = job.family.source.read_page(i, page) {
            let (code, detail) = match e {
                SourceError::OutOfRange { pages, .. } => {
                    bump(&c.out_of_range);
                    (ErrorCode::OutOfRange, pages)
                }
                SourceError::UnknownFamily(_) => {
                    bump(&c.unknown_family);
                    (ErrorCode::UnknownFamily, 0)
                }
                SourceError::Unavailable(msg) => {
                    bump(&c.internal_errors);
                    let family = job.peer.family;
                    tracing::debug!(family, page = i, %msg, "page source failed");
                    (ErrorCode::Internal, 0)
                }
            };
            shared.send_error(sbuf, job.peer, code, i, detail);
            return;
        }
        let body = Body::PageReply {
            page: i,
            data: page,
        };
        if shared.send(sbuf, job.peer, body) {
            bump(&c.pages_sent);
            bump(&job.family.pages_sent);
        }
    }
}

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
    fn families_are_bounded_and_unique() {
        let limits = ServerLimits {
            max_families: 2,
            ..ServerLimits::default()
        };
        let mut s = MemServer::bind(localhost(), limits).expect("bind");
        assert_ne!(s.local_addr().port(), 0);
        s.add_family(1, Arc::new(Zeros(4))).expect("add 1");
        assert!(matches!(
            s.add_family(1, Arc::new(Zeros(4))),
            Err(ServerError::FamilyExists(1))
        ));
        s.add_family(2, Arc::new(Zeros(4))).expect("add 2");
        assert!(matches!(
            s.add_family(3, Arc::new(Zeros(4))),
            Err(ServerError::TooManyFamilies(2))
        ));
        assert!(s.remove_family(1));
        assert!(!s.remove_family(1));
        s.add_family(3, Arc::new(Zeros(4))).expect("add 3");
        let fams: Vec<u64> = s.stats().families.iter().map(|f| f.family).collect();
        assert_eq!(fams, vec![2, 3]);
        s.shutdown();
        s.shutdown();
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
