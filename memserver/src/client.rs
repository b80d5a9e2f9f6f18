//! A [`PageSource`] that fetches pages from a [`MemServer`] over UDP.
//!
//! The protocol is unreliable by design: the client sends a page request,
//! collects the replies carrying the request ids it issued for the current
//! call, and on a timeout re-requests only the pages still missing (each
//! contiguous run of them under a fresh request id). Each timeout without
//! a new page doubles the next wait (from [`ClientOptions::timeout`] up to
//! [`ClientOptions::max_timeout`]), so a busy server is not flooded with
//! re-requests; progress resets it. After [`ClientOptions::retries`]
//! timeouts in a row without a new page (3 once the server's port is
//! known closed: ICMP port unreachable), it gives up with
//! [`SourceError::NoAnswer`]. Replies from earlier calls, duplicates and
//! foreign datagrams are dropped and counted.
//!
//! The socket is connected to the server, so the kernel drops datagrams
//! from any other address.
//!
//! Authentication ([`crate::auth`]): the client holds its family's
//! [`FamilyKey`], picks a random client id, numbers every request datagram
//! (1, 2, 3, …; the server drops numbers it has seen) and tags it. A reply
//! counts only if its tag verifies under the key and it echoes this
//! client's id and a sequence number of the current call; forged replies
//! are dropped and counted ([`ClientStats::forged_dropped`]).
//!
//! [`MemServer`]: crate::server::MemServer

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::auth::{random_u64, FamilyKey, RandomError};
use crate::sync::lock;
use crate::wire::{self, Body, ErrorCode, Frame, MAX_DATAGRAM};
use crate::{PageSource, SourceError, PAGE_SIZE};

/// Receive buffer asked for: a few full windows of replies (the kernel
/// caps it at `net.core.rmem_max`).
const RECV_BUFFER: usize = 4 << 20;

/// Timeouts and window of a [`PageClient`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// How long to wait for replies before the first re-request.
    pub timeout: Duration,
    /// The longest wait between re-requests (each timeout without
    /// progress doubles the wait up to this).
    pub max_timeout: Duration,
    /// Re-requests without progress before giving up (with the defaults a
    /// silent server is given up on after about 8 s).
    pub retries: u32,
    /// Most pages asked for in one request (capped by the server's limit).
    pub max_window: u32,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            timeout: Duration::from_millis(50),
            max_timeout: Duration::from_millis(400),
            retries: 20,
            max_window: 64,
        }
    }
}

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot set up the page client socket for {server}: {source}")]
    Socket {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("invalid client options: {0}")]
    BadOptions(&'static str),
    #[error("cannot pick a client id")]
    Random(#[source] RandomError),
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// Client counters (monotonic since creation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    /// Request datagrams sent (first tries and re-requests).
    pub requests_sent: u64,
    /// Re-requests after a timeout (a subset of `requests_sent`).
    pub retries: u64,
    /// Distinct pages received and handed out.
    pub pages_received: u64,
    /// Page replies for a page already received in the same call.
    pub duplicates_dropped: u64,
    /// Replies to request ids of earlier calls, or for another family.
    pub stale_dropped: u64,
    /// Datagrams that did not decode, or were not replies.
    pub malformed: u64,
    /// Replies of this family whose MAC did not verify; dropped.
    pub forged_dropped: u64,
    /// `Overloaded` answers (handled like a timeout).
    pub overloaded: u64,
}

#[derive(Default)]
struct Counters {
    requests_sent: AtomicU64,
    retries: AtomicU64,
    pages_received: AtomicU64,
    duplicates_dropped: AtomicU64,
    stale_dropped: AtomicU64,
    malformed: AtomicU64,
    forged_dropped: AtomicU64,
    overloaded: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Per-call scratch, reused: the receive buffer and the received-set of
/// the current window.
struct State {
    /// Sequence number of the next request datagram (from 1).
    next_seq: u64,
    buf: Box<[u8; MAX_DATAGRAM]>,
    got: Vec<bool>,
}

/// Fetches one family's pages from a memory server. `Send + Sync`; calls
/// are serialized by an internal lock.
pub struct PageClient {
    server: SocketAddr,
    key: FamilyKey,
    /// This client's random id (the server's replay windows are per id).
    client: u64,
    pages: u64,
    window: u32,
    opts: ClientOptions,
    socket: UdpSocket,
    state: Mutex<State>,
    counters: Counters,
}

impl std::fmt::Debug for PageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageClient")
            .field("server", &self.server)
            .field("family", &self.key.id())
            .field("pages", &self.pages)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// What a reply means to the call waiting for it.
enum Outcome<'a> {
    Nothing,
    Page(u64, &'a [u8; PAGE_SIZE]),
    Info { pages: u64, max_window: u32 },
    Overloaded,
    Failed(SourceError),
}

impl PageClient {
    /// Binds an ephemeral UDP port, asks the server for the image size of
    /// the family of `key`, and fails if the family is gone, or if the
    /// server is silent (as it is to a key it does not know).
    pub fn new(
        server: SocketAddr,
        key: FamilyKey,
        opts: ClientOptions,
    ) -> Result<PageClient, ClientError> {
        Self::build(server, key, opts, None)
    }

    /// Like [`PageClient::new`] for a caller that knows the image size
    /// (`pages`) and the server's window: no round trip. A removed family
    /// then shows on the first read (`SourceError::UnknownFamily`), an
    /// unknown key as `SourceError::NoAnswer`.
    pub fn with_pages(
        server: SocketAddr,
        key: FamilyKey,
        pages: u64,
        opts: ClientOptions,
    ) -> Result<PageClient, ClientError> {
        Self::build(server, key, opts, Some(pages))
    }

    fn build(
        server: SocketAddr,
        key: FamilyKey,
        opts: ClientOptions,
        pages: Option<u64>,
    ) -> Result<PageClient, ClientError> {
        if opts.timeout.is_zero() || opts.max_window == 0 || opts.max_timeout < opts.timeout {
            return Err(ClientError::BadOptions(
                "timeout and max_window must be non-zero, max_timeout at least timeout",
            ));
        }
        let sock_err = |source| ClientError::Socket { server, source };
        let socket = Socket::new(
            Domain::for_address(server),
            Type::DGRAM,
            Some(Protocol::UDP),
        )
        .map_err(sock_err)?;
        let _ = socket.set_recv_buffer_size(RECV_BUFFER);
        let any: SocketAddr = if server.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        socket.bind(&any.into()).map_err(sock_err)?;
        socket.connect(&server.into()).map_err(sock_err)?;
        let socket: UdpSocket = socket.into();
        // A random id per client: a new client on a recycled port does not
        // take an old client's late replies, and gets its own replay window.
        let id = random_u64().map_err(ClientError::Random)?;
        let family = key.id();
        let mut client = PageClient {
            server,
            key,
            client: id,
            pages: 0,
            window: 1,
            opts,
            socket,
            state: Mutex::new(State {
                next_seq: 1,
                buf: Box::new([0u8; MAX_DATAGRAM]),
                got: Vec::new(),
            }),
            counters: Counters::default(),
        };
        let (pages, max_window) = match pages {
            Some(p) => (p, opts.max_window),
            None => client.fetch_info()?,
        };
        client.pages = pages;
        client.window = opts.max_window.min(max_window).max(1);
        let state = client
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.got = vec![false; client.window as usize];
        tracing::debug!(%server, family, pages, window = client.window, "page client ready");
        Ok(client)
    }

    /// The server this client asks.
    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The family id (of the key).
    pub fn family(&self) -> u64 {
        self.key.id()
    }

    /// This client's random id.
    pub fn client_id(&self) -> u64 {
        self.client
    }

    /// Pages per request actually used.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ClientStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ClientStats {
            requests_sent: get(&c.requests_sent),
            retries: get(&c.retries),
            pages_received: get(&c.pages_received),
            duplicates_dropped: get(&c.duplicates_dropped),
            stale_dropped: get(&c.stale_dropped),
            malformed: get(&c.malformed),
            forged_dropped: get(&c.forged_dropped),
            overloaded: get(&c.overloaded),
        }
    }

    fn no_answer(&self, page: u64, tries: u32, started: Instant, refused: bool) -> SourceError {
        SourceError::NoAnswer {
            server: self.server,
            family: self.key.id(),
            page,
            tries,
            elapsed_ms: started.elapsed().as_millis(),
            refused,
        }
    }

    fn refused(&self, page: u64, code: ErrorCode, detail: u64) -> SourceError {
        SourceError::Refused {
            server: self.server,
            family: self.key.id(),
            page,
            code,
            detail,
        }
    }

    fn send(&self, buf: &mut [u8; MAX_DATAGRAM], seq: u64, body: Body<'_>, retry: bool) {
        let frame = Frame::new(self.key.id(), self.client, seq, body);
        let n = frame.encode_into(&self.key, buf);
        bump(&self.counters.requests_sent);
        if retry {
            bump(&self.counters.retries);
        }
        // A lost request is like a lost reply: the timeout re-sends it.
        if let Err(e) = self.socket.send(&buf[..n]) {
            tracing::debug!(server = %self.server, error = %e, "page request send failed");
        }
    }

    /// Waits for one datagram until `deadline`; `None` on timeout. ICMP
    /// errors (server port closed) are remembered in `refused`.
    fn recv_until(
        &self,
        buf: &mut [u8; MAX_DATAGRAM],
        deadline: Instant,
        refused: &mut bool,
    ) -> Option<usize> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            if self.socket.set_read_timeout(Some(left)).is_err() {
                return None;
            }
            match self.socket.recv(&mut buf[..]) {
                Ok(n) => return Some(n),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => *refused = true,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    tracing::debug!(server = %self.server, error = %e, "page client recv error");
                    // Avoid spinning on a persistent error: wait out the try.
                    std::thread::sleep(left.min(Duration::from_millis(5)));
                }
            }
        }
    }

    /// Classifies a datagram against the sequence numbers `first ..= last`
    /// sent by the current call.
    fn classify<'a>(&self, dgram: &'a [u8], first: u64, last: u64) -> Outcome<'a> {
        let frame = match Frame::decode(dgram) {
            Ok(f) => f,
            Err(_) => {
                bump(&self.counters.malformed);
                return Outcome::Nothing;
            }
        };
        if frame.family != self.key.id() {
            bump(&self.counters.stale_dropped);
            return Outcome::Nothing;
        }
        if wire::verify(dgram, &self.key).is_err() {
            bump(&self.counters.forged_dropped);
            return Outcome::Nothing;
        }
        if frame.client != self.client || !(first..=last).contains(&frame.seq) {
            bump(&self.counters.stale_dropped);
            return Outcome::Nothing;
        }
        match frame.body {
            Body::PageReply { page, data } => Outcome::Page(page, data),
            Body::InfoReply { pages, max_window } => Outcome::Info { pages, max_window },
            Body::ErrorReply { code, page, detail } => match code {
                ErrorCode::UnknownFamily => {
                    Outcome::Failed(SourceError::UnknownFamily(self.key.id()))
                }
                ErrorCode::OutOfRange => Outcome::Failed(SourceError::OutOfRange {
                    index: page,
                    pages: detail,
                }),
                ErrorCode::Overloaded => {
                    bump(&self.counters.overloaded);
                    Outcome::Overloaded
                }
                ErrorCode::TooLarge | ErrorCode::Internal => {
                    Outcome::Failed(self.refused(page, code, detail))
                }
            },
            Body::PageRequest { .. } | Body::InfoRequest => {
                bump(&self.counters.malformed);
                Outcome::Nothing
            }
        }
    }

    fn fetch_info(&self) -> Result<(u64, u32), SourceError> {
        let mut st = lock(&self.state);
        let State { next_seq, buf, .. } = &mut *st;
        let started = Instant::now();
        let first = *next_seq;
        let mut refused = false;
        let mut tries = 0;
        while !self.give_up(tries, refused) {
            let seq = *next_seq;
            *next_seq += 1;
            self.send(buf, seq, Body::InfoRequest, tries > 0);
            let deadline = Instant::now() + self.wait(tries);
            tries += 1;
            while let Some(n) = self.recv_until(buf, deadline, &mut refused) {
                match self.classify(&buf[..n], first, seq) {
                    Outcome::Info { pages, max_window } => return Ok((pages, max_window)),
                    Outcome::Failed(e) => return Err(e),
                    Outcome::Page(..) | Outcome::Overloaded | Outcome::Nothing => {}
                }
            }
        }
        Err(self.no_answer(0, tries, started, refused))
    }

    /// The wait after `idle` tries without progress: doubling from the
    /// first timeout, capped.
    fn wait(&self, idle: u32) -> Duration {
        let grown = self.opts.timeout.saturating_mul(1 << idle.min(16));
        grown.min(self.opts.max_timeout)
    }

    /// Whether `idle` tries without progress are enough.
    fn give_up(&self, idle: u32, refused: bool) -> bool {
        let limit = if refused {
            self.opts.retries.min(3)
        } else {
            self.opts.retries
        };
        idle > limit
    }

    /// Fetches `first .. first + count` (count <= window) into `out`.
    fn fetch_window(
        &self,
        st: &mut State,
        first: u64,
        count: u32,
        out: &mut dyn FnMut(u64, &[u8; PAGE_SIZE]),
    ) -> Result<(), SourceError> {
        let State { next_seq, buf, got } = st;
        let n_pages = count as usize;
        got[..n_pages].fill(false);
        let mut missing = n_pages;
        let started = Instant::now();
        let first_seq = *next_seq;
        let mut last_seq = first_seq;
        let mut refused = false;
        let mut idle_tries = 0u32;
        let mut tries = 0u32;
        loop {
            // (Re-)request each run of missing pages under a fresh id.
            let mut i = 0;
            while i < n_pages {
                if got[i] {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < n_pages && !got[i] {
                    i += 1;
                }
                last_seq = *next_seq;
                *next_seq += 1;
                let body = Body::PageRequest {
                    first_page: first + start as u64,
                    count: (i - start) as u32,
                };
                self.send(buf, last_seq, body, tries > 0);
            }
            tries += 1;
            let deadline = Instant::now() + self.wait(idle_tries);
            let before = missing;
            while let Some(n) = self.recv_until(buf, deadline, &mut refused) {
                match self.classify(&buf[..n], first_seq, last_seq) {
                    Outcome::Page(p, data) => {
                        let Some(off) = p.checked_sub(first).filter(|&o| o < count.into()) else {
                            bump(&self.counters.stale_dropped);
                            continue;
                        };
                        let off = off as usize;
                        if got[off] {
                            bump(&self.counters.duplicates_dropped);
                            continue;
                        }
                        got[off] = true;
                        missing -= 1;
                        bump(&self.counters.pages_received);
                        out(p, data);
                        if missing == 0 {
                            return Ok(());
                        }
                    }
                    Outcome::Failed(e) => return Err(e),
                    // Wait out this try, then ask again.
                    Outcome::Overloaded | Outcome::Info { .. } | Outcome::Nothing => {}
                }
            }
            idle_tries = if missing < before { 0 } else { idle_tries + 1 };
            if self.give_up(idle_tries, refused) {
                let first_missing = got[..n_pages].iter().position(|g| !g).unwrap_or(0);
                let page = first + first_missing as u64;
                return Err(self.no_answer(page, tries, started, refused));
            }
        }
    }
}

impl PageSource for PageClient {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        self.read_pages(index, 1, &mut |_, data| buf.copy_from_slice(data))
    }

    /// Calls `out` exactly once per page, in arrival order (not necessarily
    /// ascending). On an error, pages already handed out stay valid. `out`
    /// must not call back into this client (it runs under its lock).
    fn read_pages(
        &self,
        first: u64,
        count: u64,
        out: &mut dyn FnMut(u64, &[u8; PAGE_SIZE]),
    ) -> Result<(), SourceError> {
        let end = first.saturating_add(count);
        if end > self.pages || (count > 0 && first >= self.pages) {
            return Err(SourceError::OutOfRange {
                index: first.max(self.pages),
                pages: self.pages,
            });
        }
        let mut st = lock(&self.state);
        let mut at = first;
        while at < end {
            let n = (end - at).min(self.window.into()) as u32;
            self.fetch_window(&mut st, at, n, out)?;
            at += u64::from(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<PageClient>();
    }

    #[test]
    fn silent_server_fails_new_quickly() {
        let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let opts = ClientOptions {
            timeout: Duration::from_millis(20),
            retries: 4,
            ..ClientOptions::default()
        };
        let t = Instant::now();
        let key = FamilyKey::from_parts(3, [3; 32]);
        let err =
            PageClient::new(silent.local_addr().expect("addr"), key, opts).expect_err("silent");
        let el = t.elapsed();
        assert!(
            el >= Duration::from_millis(90) && el < Duration::from_secs(2),
            "{el:?}"
        );
        match err {
            ClientError::Source(
                e @ SourceError::NoAnswer {
                    family: 3,
                    tries: 5,
                    ..
                },
            ) => {
                let msg = e.to_string();
                assert!(msg.contains("family 3") && msg.contains("5 tries"), "{msg}");
            }
            e => panic!("unexpected {e:?}"),
        }
    }

    #[test]
    fn bad_options_are_refused() {
        let opts = ClientOptions {
            max_window: 0,
            ..ClientOptions::default()
        };
        let addr = "127.0.0.1:9".parse().expect("addr");
        assert!(matches!(
            PageClient::new(addr, FamilyKey::from_parts(1, [1; 32]), opts),
            Err(ClientError::BadOptions(_))
        ));
    }
}
