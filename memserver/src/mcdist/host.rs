//! The host side of mcdist: one [`HostReceiver`] per family per host,
//! shared by the host's clones of that family.
//!
//! It joins the family's group ([`multicast::Receiver`]) and keeps every
//! page that arrives — asked for here, by another host, or pushed — in a
//! bounded cache (the oldest page is dropped beyond
//! [`HostConfig::cache_pages`]; the cache goes with [`HostReceiver::close`]
//! or the receiver, when the family ends). It is a [`PageSource`]: a read
//! of a cached page is a copy; of a missing one, a request and a bounded
//! wait for its arrival (a clear error after [`HostConfig::wait_timeout`]).
//!
//! Subscribers ([`HostReceiver::subscribe`]: one per local clone) are
//! called with every page as it arrives, on the receiver's thread, so a
//! clone's fault handler can install it (UFFDIO_COPY; a page already there
//! is fine) before the clone faults on it. A callback must not block and
//! must not subscribe or unsubscribe.
//!
//! Once every local clone has subscribed, [`HostReceiver::seal`] says no
//! more will: every subscriber has had each arriving page already, so the
//! cache is only for reads that race an arrival (a fault on a page that
//! is being installed) and for pages reads wait for: it shrinks to the
//! newest [`SEALED_CACHE_PAGES`] — host memory per family drops from the
//! cache's bound to a few MiB.
//!
//! Frames that fail the session's MAC, replays and other sessions' frames
//! are rejected by the crate and counted ([`HostStats::receiver`]); a block
//! that is not one of the family's pages is dropped and counted
//! (`bad_blocks`). Nothing unauthenticated reaches the cache.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use multicast::{
    Event, GroupConfig, LossInjection, Receiver, ReceiverConfig, ReceiverStats, RequestError,
};

use super::{session, McEndpoint};
use crate::auth::FamilyKey;
use crate::sync::lock;
use crate::{PageSource, SourceError, PAGE_SIZE};

/// Smallest cache (a fault's read-ahead must fit while it waits).
pub const MIN_CACHE_PAGES: usize = 256;
/// Pages a sealed receiver keeps (the newest arrivals: a read that raced
/// an arrival finds its page here).
pub const SEALED_CACHE_PAGES: usize = 2048;
/// Pages given up on that are remembered (to fail their waiters fast).
const MAX_GAVE_UP: usize = 4096;
/// How often a waiting read re-asks pages that arrived and were evicted
/// before it took them (the crate re-asks lost ones itself).
const REASK: Duration = Duration::from_millis(100);
/// Longest single wait on the arrival condition.
const WAIT_SLICE: Duration = Duration::from_millis(20);

/// A page as subscribers see it.
pub type PageFn = dyn Fn(u64, &[u8; PAGE_SIZE]) + Send + Sync;

/// The host receiver's configuration.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Local address of the interface the group is joined on.
    pub interface: Ipv4Addr,
    /// Local address requests leave from (ephemeral port).
    pub bind: Ipv4Addr,
    /// Pages kept at most (at least [`MIN_CACHE_PAGES`]).
    pub cache_pages: usize,
    /// Longest a read waits for a page.
    pub wait_timeout: Duration,
    /// Subscribers at once (local clones).
    pub max_subscribers: usize,
    /// First re-request timeout of the crate's receiver.
    pub retry_timeout: Duration,
    /// Test-only loss of arriving frames.
    pub loss: Option<LossInjection>,
    /// The path MTU request frames are sized to.
    pub mtu: usize,
}

impl HostConfig {
    /// Defaults on the interface with local address `ip`.
    pub fn on(ip: Ipv4Addr) -> HostConfig {
        HostConfig {
            interface: ip,
            bind: ip,
            cache_pages: 32 << 10,
            wait_timeout: Duration::from_secs(5),
            max_subscribers: 1024,
            retry_timeout: Duration::from_millis(20),
            loss: None,
            mtu: multicast::interface_mtu(ip).unwrap_or(multicast::frame::DEFAULT_MTU),
        }
    }
}

/// Why the host receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum HostReceiverError {
    #[error("cannot join the multicast group {group}:{port} of family {family}")]
    Receiver {
        family: u64,
        group: Ipv4Addr,
        port: u16,
        #[source]
        source: multicast::ReceiverError,
    },
}

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubscribeError {
    #[error("the family's host receiver already has {0} subscribers")]
    TooMany(usize),
    #[error("the family's host receiver is closed")]
    Closed,
}

/// What the host receiver did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostStats {
    /// Pages read from the cache.
    pub cache_hits: u64,
    /// Pages a read had to ask for.
    pub cache_misses: u64,
    /// Reads that gave up waiting.
    pub timeouts: u64,
    /// Pages that arrived and went into the cache.
    pub pages_arrived: u64,
    /// Of those, pages pushed by the server.
    pub pages_pushed: u64,
    /// Blocks dropped: not one of the family's pages (bad index or length).
    pub bad_blocks: u64,
    /// Pages dropped from the cache for room.
    pub evicted: u64,
    /// Gauge: pages cached now.
    pub cached: u64,
    /// Gauge: subscribers now.
    pub subscribers: u64,
    /// Subscriber calls made.
    pub subscriber_calls: u64,
    /// Pages the crate's receiver gave up on.
    pub gave_up: u64,
    /// The crate's counters: re-requests, forged, replayed, foreign, ...
    pub receiver: ReceiverStats,
}

#[derive(Default)]
struct Counters {
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    timeouts: AtomicU64,
    pages_arrived: AtomicU64,
    pages_pushed: AtomicU64,
    bad_blocks: AtomicU64,
    evicted: AtomicU64,
    subscriber_calls: AtomicU64,
    gave_up: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

struct Cache {
    pages: HashMap<u64, Box<[u8; PAGE_SIZE]>>,
    order: VecDeque<u64>,
    cap: usize,
    gave_up: HashSet<u64>,
    closed: bool,
}

impl Cache {
    /// Keeps a page that arrived; false if it is here already or the
    /// receiver is closed.
    fn insert(&mut self, index: u64, data: Box<[u8; PAGE_SIZE]>, c: &Counters) -> bool {
        if self.closed || self.pages.contains_key(&index) {
            return false;
        }
        self.evict_to(self.cap.saturating_sub(1), c);
        self.pages.insert(index, data);
        self.order.push_back(index);
        self.gave_up.remove(&index);
        true
    }

    /// Drops the oldest pages until at most `keep` are left.
    fn evict_to(&mut self, keep: usize, c: &Counters) {
        while self.pages.len() > keep {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if self.pages.remove(&old).is_some() {
                add(&c.evicted, 1);
            }
        }
    }
}

struct Subscribers {
    list: Vec<(u64, Arc<PageFn>)>,
    next: u64,
}

struct Shared {
    pages: u64,
    cache: Mutex<Cache>,
    arrived: Condvar,
    subscribers: RwLock<Subscribers>,
    counters: Counters,
}

impl Shared {
    fn on_event(&self, e: Event) {
        match e {
            Event::Block(b) => {
                let Ok(page) = <Box<[u8; PAGE_SIZE]>>::try_from(b.data.into_boxed_slice()) else {
                    add(&self.counters.bad_blocks, 1);
                    return;
                };
                if b.index >= self.pages {
                    add(&self.counters.bad_blocks, 1);
                    return;
                }
                // The local clones first: a vCPU may be waiting on it.
                {
                    let subs = self
                        .subscribers
                        .read()
                        .unwrap_or_else(PoisonError::into_inner);
                    for (_, f) in &subs.list {
                        f(b.index, &page);
                    }
                    add(&self.counters.subscriber_calls, subs.list.len() as u64);
                }
                if lock(&self.cache).insert(b.index, page, &self.counters) {
                    add(&self.counters.pages_arrived, 1);
                    if b.pushed {
                        add(&self.counters.pages_pushed, 1);
                    }
                }
                self.arrived.notify_all();
            }
            Event::GaveUp(i) => {
                add(&self.counters.gave_up, 1);
                let mut c = lock(&self.cache);
                if c.gave_up.len() < MAX_GAVE_UP {
                    c.gave_up.insert(i);
                }
                drop(c);
                self.arrived.notify_all();
            }
        }
    }
}

/// A family's receiver on this host (see the module docs).
pub struct HostReceiver {
    family: u64,
    endpoint: McEndpoint,
    cfg: HostConfig,
    shared: Arc<Shared>,
    receiver: RwLock<Option<Receiver>>,
    /// The crate's counters when the receiver was closed.
    last: Mutex<ReceiverStats>,
}

impl std::fmt::Debug for HostReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostReceiver")
            .field("family", &self.family)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl HostReceiver {
    /// Joins `endpoint`'s group for `key`'s family of `pages` pages.
    pub fn start(
        endpoint: McEndpoint,
        key: &FamilyKey,
        pages: u64,
        cfg: HostConfig,
    ) -> Result<HostReceiver, HostReceiverError> {
        let shared = Arc::new(Shared {
            pages,
            cache: Mutex::new(Cache {
                pages: HashMap::new(),
                order: VecDeque::new(),
                cap: cfg.cache_pages.max(MIN_CACHE_PAGES),
                gave_up: HashSet::new(),
                closed: false,
            }),
            arrived: Condvar::new(),
            subscribers: RwLock::new(Subscribers {
                list: Vec::new(),
                next: 0,
            }),
            counters: Counters::default(),
        });
        let group = GroupConfig {
            interface: cfg.interface,
            ..GroupConfig::new(endpoint.group, endpoint.port)
        };
        let mut rcfg = ReceiverConfig::new(session(key), group, endpoint.server);
        rcfg.bind = SocketAddrV4::new(cfg.bind, 0);
        rcfg.max_block_len = PAGE_SIZE;
        rcfg.retry_timeout = cfg.retry_timeout;
        rcfg.loss = cfg.loss.clone();
        rcfg.mtu = cfg.mtu;
        let sink = {
            let s = Arc::clone(&shared);
            move |e| s.on_event(e)
        };
        let receiver =
            Receiver::start(rcfg, sink).map_err(|source| HostReceiverError::Receiver {
                family: key.id(),
                group: endpoint.group,
                port: endpoint.port,
                source,
            })?;
        Ok(HostReceiver {
            family: key.id(),
            endpoint,
            cfg,
            shared,
            receiver: RwLock::new(Some(receiver)),
            last: Mutex::new(ReceiverStats::default()),
        })
    }

    pub fn endpoint(&self) -> McEndpoint {
        self.endpoint
    }

    /// Calls `f` with every page that arrives from now on (and first, if
    /// `backfill`, with every page cached now, on this thread) until the
    /// [`Subscription`] is dropped. Dropping it waits for a call in
    /// progress, so `f` may refer to memory that lives as long as it.
    pub fn subscribe(
        &self,
        f: Arc<PageFn>,
        backfill: bool,
    ) -> Result<Subscription, SubscribeError> {
        if lock(&self.shared.cache).closed {
            return Err(SubscribeError::Closed);
        }
        let id = {
            let mut subs = self
                .shared
                .subscribers
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if subs.list.len() >= self.cfg.max_subscribers {
                return Err(SubscribeError::TooMany(self.cfg.max_subscribers));
            }
            subs.next += 1;
            let id = subs.next;
            subs.list.push((id, f.clone()));
            id
        };
        if backfill {
            let cached: Vec<u64> = lock(&self.shared.cache).order.iter().copied().collect();
            let mut buf = [0u8; PAGE_SIZE];
            for i in cached {
                let hit = lock(&self.shared.cache).pages.get(&i).map(|p| buf = **p);
                if hit.is_some() {
                    f(i, &buf);
                }
            }
        }
        Ok(Subscription {
            shared: Arc::downgrade(&self.shared),
            id,
        })
    }

    /// No more subscribers will come (every local clone has one): the
    /// cache shrinks to the newest [`SEALED_CACHE_PAGES`] (see the module
    /// docs).
    pub fn seal(&self) {
        let mut c = lock(&self.shared.cache);
        c.cap = c.cap.min(SEALED_CACHE_PAGES);
        let keep = c.cap;
        c.evict_to(keep, &self.shared.counters);
    }

    /// Stops receiving and drops the cache (the family has ended); later
    /// reads fail. Idempotent.
    pub fn close(&self) {
        let r = self
            .receiver
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(r) = r {
            *lock(&self.last) = r.stats();
            r.stop();
        }
        let mut c = lock(&self.shared.cache);
        c.closed = true;
        c.pages = HashMap::new();
        c.order = VecDeque::new();
        drop(c);
        self.shared.arrived.notify_all();
    }

    /// The counters so far.
    pub fn stats(&self) -> HostStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let receiver = match &*self.receiver.read().unwrap_or_else(PoisonError::into_inner) {
            Some(r) => r.stats(),
            None => *lock(&self.last),
        };
        HostStats {
            cache_hits: get(&c.cache_hits),
            cache_misses: get(&c.cache_misses),
            timeouts: get(&c.timeouts),
            pages_arrived: get(&c.pages_arrived),
            pages_pushed: get(&c.pages_pushed),
            bad_blocks: get(&c.bad_blocks),
            evicted: get(&c.evicted),
            cached: lock(&self.shared.cache).pages.len() as u64,
            subscribers: self
                .shared
                .subscribers
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .list
                .len() as u64,
            subscriber_calls: get(&c.subscriber_calls),
            gave_up: get(&c.gave_up),
            receiver,
        }
    }

    fn request(&self, pages: &[u64]) -> Result<(), SourceError> {
        let guard = self.receiver.read().unwrap_or_else(PoisonError::into_inner);
        let Some(r) = guard.as_ref() else {
            return Err(self.closed());
        };
        match r.request(pages) {
            // A failed send is retried by the receiver's timeout.
            Ok(()) | Err(RequestError::Send(_)) => Ok(()),
            Err(e @ RequestError::TooMany { .. }) => Err(SourceError::Unavailable(format!(
                "multicast receiver of family {}: {e}",
                self.family
            ))),
        }
    }

    fn closed(&self) -> SourceError {
        SourceError::Unavailable(format!(
            "the multicast receiver of family {} is closed (the family has ended)",
            self.family
        ))
    }

    fn timed_out(&self, page: u64, waited: Duration) -> SourceError {
        add(&self.shared.counters.timeouts, 1);
        let frames = self.stats().receiver.frames;
        let hint = if frames == 0 {
            "; no data frame has arrived at all: does the group reach this host \
             (interface up with MULTICAST, a 224.0.0.0/4 route)?"
        } else {
            ""
        };
        SourceError::Unavailable(format!(
            "page {page} of family {} did not arrive from {} by multicast ({}:{}) \
             within {} ms ({frames} data frames received){hint}",
            self.family,
            self.endpoint.server,
            self.endpoint.group,
            self.endpoint.port,
            waited.as_millis()
        ))
    }

    fn check_range(&self, first: u64, count: u64) -> Result<u64, SourceError> {
        let pages = self.shared.pages;
        match first.checked_add(count) {
            Some(end) if end <= pages && count > 0 => Ok(end),
            _ => Err(SourceError::OutOfRange {
                index: first.saturating_add(count.saturating_sub(1)),
                pages,
            }),
        }
    }
}

impl PageSource for HostReceiver {
    fn pages(&self) -> u64 {
        self.shared.pages
    }

    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        self.read_pages(index, 1, &mut |_, data| *buf = *data)
    }

    fn read_pages(
        &self,
        first: u64,
        count: u64,
        out: &mut dyn FnMut(u64, &[u8; PAGE_SIZE]),
    ) -> Result<(), SourceError> {
        let end = self.check_range(first, count)?;
        let started = Instant::now();
        let c = &self.shared.counters;
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        let mut missing: Vec<u64> = Vec::new();
        // Hits go out at once (copied out of the lock first).
        for i in first..end {
            let hit = lock(&self.shared.cache).pages.get(&i).map(|p| *buf = **p);
            match hit {
                Some(()) => {
                    add(&c.cache_hits, 1);
                    out(i, &buf);
                }
                None => missing.push(i),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        add(&c.cache_misses, missing.len() as u64);
        {
            let mut cache = lock(&self.shared.cache);
            for i in &missing {
                cache.gave_up.remove(i);
            }
        }
        self.request(&missing)?;
        let deadline = started + self.cfg.wait_timeout;
        let mut next_ask = Instant::now() + REASK;
        // Bounded by the deadline: each round waits at most WAIT_SLICE.
        while !missing.is_empty() {
            let mut got = Vec::new();
            {
                let mut cache = lock(&self.shared.cache);
                if cache.closed {
                    return Err(self.closed());
                }
                if let Some(&p) = missing.iter().find(|p| cache.gave_up.contains(p)) {
                    drop(cache);
                    return Err(self.timed_out(p, started.elapsed()));
                }
                missing.retain(|i| match cache.pages.get(i) {
                    Some(p) => {
                        got.push((*i, p.clone()));
                        false
                    }
                    None => true,
                });
                if got.is_empty() && !missing.is_empty() {
                    let now = Instant::now();
                    if now >= deadline {
                        drop(cache);
                        return Err(self.timed_out(missing[0], started.elapsed()));
                    }
                    let wait = (deadline - now).min(WAIT_SLICE);
                    cache = match self.shared.arrived.wait_timeout(cache, wait) {
                        Ok((g, _)) => g,
                        Err(e) => e.into_inner().0,
                    };
                    drop(cache);
                }
            }
            for (i, p) in got {
                out(i, &p);
            }
            if !missing.is_empty() && Instant::now() >= next_ask {
                // Pages that came and were evicted before we took them are
                // no longer wanted by the receiver: ask again.
                self.request(&missing)?;
                next_ask = Instant::now() + REASK;
            }
        }
        Ok(())
    }
}

impl Drop for HostReceiver {
    fn drop(&mut self) {
        self.close();
    }
}

/// A subscriber's registration; dropping it unsubscribes (waiting for a
/// call in progress).
pub struct Subscription {
    shared: Weak<Shared>,
    id: u64,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(s) = self.shared.upgrade() {
            s.subscribers
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .list
                .retain(|(id, _)| *id != self.id);
        }
    }
}

/// The local address a host receiver for a server at `server` uses: the
/// address of the interface the route to the server leaves by (a UDP
/// socket connected to it says; nothing is sent). On the server's own
/// host that is the server's address; loopback if there is no route.
pub fn local_ip_for(server: SocketAddr) -> Ipv4Addr {
    let SocketAddr::V4(a) = server else {
        return Ipv4Addr::LOCALHOST;
    };
    if a.ip().is_unspecified() || a.ip().is_loopback() {
        return Ipv4Addr::LOCALHOST;
    }
    let routed = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .and_then(|s| s.connect(a).and_then(|()| s.local_addr()));
    match routed {
        Ok(SocketAddr::V4(l)) if !l.ip().is_unspecified() => *l.ip(),
        _ => *a.ip(),
    }
}
