//! A clone's userfaultfd fault handler. Guest memory is empty anonymous
//! memory registered with userfaultfd (MISSING); every first touch of a
//! page — by a vCPU through KVM or by the VMM — stops the toucher and sends
//! us an event. We resolve it with UFFDIO_COPY of zeros when the avoidance
//! heuristics say the guest will overwrite the page, and otherwise with
//! UFFDIO_COPY of the page (and a read-ahead window of following missing
//! pages) fetched from the [`PageSource`]. Two vCPUs faulting on one page
//! are served once: the second event finds the page present and only wakes.
//!
//! The handler is the clone VM's `MemoryServer`: when it cannot serve (the
//! memory server is gone, an ioctl fails, its thread died) it records why,
//! and unregisters the memory so that no thread — a vCPU, or a VMM thread
//! reading guest memory — stays blocked on a fault nobody will serve; the
//! VM then fails with that error.

use crate::errors::chain;
use crate::fork::descriptor::AllocAtFork;
use crate::vmm::memory::GuestMemory;
use crate::vmm::services::MemoryServer;
use bitvec::prelude::{BitVec, Lsb0};
use memserver::mcdist::host::{HostReceiver, PageFn, SubscribeError, Subscription};

pub use crate::fork::fault_stats::{FaultCounts, FaultStats, FaultStatsView, MAX_LATENCY_US};
use memserver::{PageSource, PAGE_SIZE};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

const PAGE: u64 = PAGE_SIZE as u64;
/// UFFDIO_COPY answers EAGAIN while the address space is changing; retry
/// this often before calling it a failure.
const EAGAIN_TRIES: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    #[error("the clone's guest memory has no region")]
    NoRegion,
    #[error("userfaultfd create")]
    Create(#[source] userfaultfd::Error),
    #[error("userfaultfd register")]
    Register(#[source] userfaultfd::Error),
    #[error("page {0} is outside the clone's memory")]
    OutOfRange(u64),
    #[error("UFFDIO_COPY of pages {first}..{end}")]
    Copy {
        first: u64,
        end: u64,
        #[source]
        source: userfaultfd::Error,
    },
}
/// Pages zero-filled in one go at most.
const ZERO_RUN: usize = 64;

/// Which pages of the clone's memory are present (installed by us): one
/// bit per page, set and read concurrently by the handler, the prefetcher
/// and the vCPU thread's `will_overwrite`.
pub struct Presence {
    bits: BitVec<AtomicU64, Lsb0>,
}

impl Presence {
    pub fn new(pages: u64) -> Self {
        Presence {
            bits: BitVec::repeat(false, pages as usize),
        }
    }

    pub fn test(&self, page: u64) -> bool {
        self.bits.get(page as usize).is_some_and(|b| *b)
    }

    pub fn set(&self, page: u64) {
        if (page as usize) < self.bits.len() {
            self.bits.set_aliased(page as usize, true);
        }
    }

    pub fn count(&self) -> u64 {
        self.bits.count_ones() as u64
    }

    /// Marks every page set in `pages` present, a word at a time (a
    /// bitmap of the same page numbering; bits beyond this one's end land
    /// in the last word's dead bits, which no test or count reads).
    pub fn set_all(&self, pages: &crate::vmm::dirty::PageBitmap) {
        for (w, add) in self.bits.as_raw_slice().iter().zip(pages.as_raw_slice()) {
            if *add != 0 {
                w.fetch_or(*add, std::sync::atomic::Ordering::AcqRel);
            }
        }
    }
}

/// A clone's memory, as the handler sees it.
pub struct CloneMemory {
    pub uffd: Arc<Uffd>,
    /// Host address of guest-physical 0, and the size.
    pub base: usize,
    pub len: u64,
    pub presence: Arc<Presence>,
}

impl CloneMemory {
    /// Registers `memory` (its one region) with a fresh userfaultfd in
    /// MISSING mode, kernel-mode faults included: KVM touches guest memory
    /// through get_user_pages.
    pub fn register(memory: &GuestMemory) -> Result<CloneMemory, UffdError> {
        let region = memory.iter().next().ok_or(UffdError::NoRegion)?;
        let (base, len) = (region.as_ptr() as usize, region.len());
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        uffd.register(base as *mut libc::c_void, len as usize)
            .map_err(UffdError::Register)?;
        Ok(CloneMemory {
            uffd: Arc::new(uffd),
            base,
            len,
            presence: Arc::new(Presence::new(len / PAGE)),
        })
    }

    fn host(&self, page: u64) -> *mut libc::c_void {
        (self.base + (page * PAGE) as usize) as *mut libc::c_void
    }

    fn pages(&self) -> u64 {
        self.len / PAGE
    }

    /// Stops serving: unregisters the memory, which wakes every thread
    /// waiting on a fault (they then see zero pages; the VM is failed).
    fn release_waiters(&self) {
        let _ = self
            .uffd
            .unregister(self.host(0), self.len as usize)
            .map_err(|e| tracing::warn!("userfaultfd unregister: {e}"));
    }

    /// UFFDIO_COPY of `len` bytes to page `page`, retried on EAGAIN.
    /// `page .. page + len` must lie inside the memory (callers check).
    fn copy(&self, src: *const u8, page: u64, len: usize) -> userfaultfd::Result<usize> {
        let mut tries = 0;
        loop {
            // SAFETY: `host(page)` .. + len lies inside the clone's
            // registered region (the callers check the page range), and they
            // pass a source of at least `len` bytes.
            let r = unsafe { self.uffd.copy(src.cast(), self.host(page), len, true) };
            match r {
                Err(userfaultfd::Error::CopyFailed(e))
                    if e as i32 == libc::EAGAIN && tries < EAGAIN_TRIES =>
                {
                    tries += 1;
                    std::thread::yield_now();
                }
                r => return r,
            }
        }
    }

    /// Installs `data` as page `page`; a page someone else installed
    /// first is left alone (EEXIST).
    pub fn install(&self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), UffdError> {
        if page >= self.pages() {
            return Err(UffdError::OutOfRange(page));
        }
        let r = self.copy(data.as_ptr(), page, PAGE_SIZE);
        match r {
            Ok(_) => {
                self.presence.set(page);
                Ok(())
            }
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                self.presence.set(page);
                Ok(())
            }
            Err(source) => Err(UffdError::Copy {
                first: page,
                end: page + 1,
                source,
            }),
        }
    }

    /// Installs zero-filled pages `first..first + count` (those missing).
    /// UFFDIO_COPY of zeros rather than UFFDIO_ZEROPAGE: the shared zero
    /// page would cost the guest a second (copy-on-write) fault on its first
    /// write, and these are pages the guest is about to write.
    pub fn zero_range(&self, first: u64, count: u64) -> Result<(), UffdError> {
        static ZEROS: [u8; ZERO_RUN * PAGE_SIZE] = [0; ZERO_RUN * PAGE_SIZE];
        let mut p = first;
        let end = (first + count).min(self.pages());
        while p < end {
            let n = (end - p).min(ZERO_RUN as u64);
            // ZEROS holds n pages.
            let r = self.copy(ZEROS.as_ptr(), p, n as usize * PAGE_SIZE);
            match r {
                Ok(_) => (p..p + n).for_each(|q| self.presence.set(q)),
                // Someone installed one of them meanwhile: go page by page.
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    for q in p..p + n {
                        if !self.presence.test(q) {
                            self.install(q, &[0u8; PAGE_SIZE])?;
                        }
                    }
                }
                Err(userfaultfd::Error::PartiallyCopied(bytes)) => {
                    (p..p + (bytes / PAGE_SIZE) as u64).for_each(|q| self.presence.set(q));
                    p += (bytes / PAGE_SIZE) as u64;
                    continue;
                }
                Err(source) => {
                    return Err(UffdError::Copy {
                        first: p,
                        end: p + n,
                        source,
                    })
                }
            }
            p += n;
        }
        Ok(())
    }

    /// Reads a u64 of guest memory, only if its page is present (a read
    /// of a missing page from this thread would wait for this thread).
    fn read_present_u64(&self, gpa: u64) -> Option<u64> {
        if gpa + 8 > self.len || !self.presence.test(gpa / PAGE) || !gpa.is_multiple_of(8) {
            return None;
        }
        // SAFETY: the page is present in our own mapping, in bounds and the
        // address is 8-byte aligned; the guest may write it concurrently,
        // which a volatile read tolerates (we want any recent value).
        Some(unsafe { ((self.base + gpa as usize) as *const u64).read_volatile() })
    }
}

/// Heuristic (a): the page was handed out by the guest allocator after
/// the fork (its bit is set now, and was clear at the fork).
fn allocated_after_fork(mem: &CloneMemory, alloc: &AllocAtFork, page: u64) -> bool {
    if page >= alloc.bitmap_bytes * 8 {
        return false;
    }
    let word_gpa = alloc.bitmap_gpa + (page / 64) * 8;
    let now = mem
        .read_present_u64(word_gpa)
        .is_some_and(|w| w & (1 << (page % 64)) != 0);
    now && !alloc.was_allocated(page)
}

pub struct FaultHandlerConfig {
    pub memory: Arc<CloneMemory>,
    pub source: Arc<dyn PageSource>,
    /// `None`: heuristics off, every missing page is fetched.
    pub avoidance: Option<AllocAtFork>,
    /// Pages known to be zero at the source (post-copy: the pages the
    /// source had not populated): zero-filled here, never fetched.
    pub known_zero: Option<Arc<BitVec<u64, Lsb0>>>,
    /// Pages fetched per request at most (1 = no read-ahead).
    pub readahead: u64,
    /// Push ahead of demand: fetch these page ranges in the background.
    pub prefetch: Option<Prefetch>,
    /// The family's host receiver (multicast): every page that arrives on
    /// this host is installed into this clone as it comes.
    pub feed: Option<Arc<HostReceiver>>,
}

/// Background fetching of the pages a clone will want (SnowFlock's push
/// mode, pulled by the clone): with its own page source so demand faults
/// never queue behind it.
pub struct Prefetch {
    pub source: Arc<dyn PageSource>,
    /// (first page, count) ranges, in order.
    pub ranges: Vec<(u64, u64)>,
}

/// Pages per prefetch request.
const PREFETCH_RUN: u64 = 64;

/// Subscribes a clone's memory to `receiver`: every page that arrives and
/// is missing in the clone is installed (counted as prefetched). Pages
/// cached already are installed now.
fn subscribe_clone(
    receiver: &HostReceiver,
    memory: Arc<CloneMemory>,
    stats: Arc<Mutex<FaultStats>>,
) -> Result<Subscription, SubscribeError> {
    let f: Arc<PageFn> = Arc::new(move |page, data| {
        // Errors are left to the fault path: it fetches and reports.
        if !memory.presence.test(page) && memory.install(page, data).is_ok() {
            crate::sync::lock(&stats).pages_prefetched += 1;
        }
    });
    receiver.subscribe(f, true)
}

pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    prefetcher: Option<JoinHandle<()>>,
    /// The subscription to the host receiver; dropped first on stop (it
    /// waits for an install in progress), before the memory goes.
    feed: Option<Subscription>,
    /// Wakes the handler thread out of its poll at once when stopping.
    wake: Arc<EventFd>,
    stats: Arc<Mutex<FaultStats>>,
    error: Arc<Mutex<Option<String>>>,
    memory: Arc<CloneMemory>,
}

impl FaultHandler {
    pub fn spawn(mut cfg: FaultHandlerConfig, name: &str) -> std::io::Result<Self> {
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?);
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(FaultStats::default()));
        let error = Arc::new(Mutex::new(None));
        let memory = cfg.memory.clone();
        let feed = cfg.feed.take().and_then(|r| {
            subscribe_clone(&r, memory.clone(), stats.clone())
                .map_err(|e| tracing::warn!("clone {name}: not fed by the host receiver: {e}"))
                .ok()
        });
        let prefetcher = match cfg.prefetch.take() {
            Some(p) => {
                let (m, s, st) = (memory.clone(), stop.clone(), stats.clone());
                Some(
                    std::thread::Builder::new()
                        .name(format!("prefetch-{name}"))
                        .spawn(move || prefetch_loop(&m, &p, &s, &st))?,
                )
            }
            None => None,
        };
        let (s, st, er, w) = (stop.clone(), stats.clone(), error.clone(), wake.clone());
        let thread = std::thread::Builder::new()
            .name(format!("uffd-{name}"))
            .spawn(move || handler_loop(cfg, &w, s, st, er))?;
        Ok(FaultHandler {
            stop,
            wake,
            thread: Some(thread),
            prefetcher,
            feed,
            stats,
            error,
            memory,
        })
    }

    pub fn stats(&self) -> FaultStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A view of the counters that outlives the handler.
    pub fn stats_view(&self) -> FaultStatsView {
        FaultStatsView(self.stats.clone())
    }

    /// Why the handler gave up serving (e.g. the memory server is gone, or
    /// its thread died).
    pub fn error(&self) -> Option<String> {
        if let Some(e) = self.error.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(e);
        }
        let died = self.thread.as_ref().is_some_and(|t| t.is_finished());
        (died && !self.stop.load(Ordering::Acquire))
            .then(|| "the fault handler thread has ended".to_string())
    }

    pub fn memory(&self) -> &Arc<CloneMemory> {
        &self.memory
    }

    /// Where the handler records why it gave up: readable after the
    /// handler has moved into its VM.
    pub fn error_slot(&self) -> Arc<Mutex<Option<String>>> {
        self.error.clone()
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        drop(self.feed.take());
        let _ = self.wake.write(1);
        for t in [self.thread.take(), self.prefetcher.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop();
    }
}

impl MemoryServer for FaultHandler {
    fn error(&self) -> Option<String> {
        FaultHandler::error(self)
    }

    fn stop(&mut self) {
        FaultHandler::stop(self)
    }

    fn faults(&self) -> u64 {
        crate::sync::lock(&self.stats).faults
    }
}

fn handler_loop(
    cfg: FaultHandlerConfig,
    wake: &EventFd,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<FaultStats>>,
    error: Arc<Mutex<Option<String>>>,
) {
    let mem = &cfg.memory;
    let fail = |why: String| {
        set_error(&error, why);
        // Nobody serves this memory any more: wake every waiter.
        mem.release_waiters();
    };
    while !stop.load(Ordering::Acquire) {
        let mut pfds = [
            libc::pollfd {
                fd: mem.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 1000) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            fail(format!("poll: {}", std::io::Error::last_os_error()));
            return;
        }
        if n <= 0 || pfds[0].revents == 0 {
            continue;
        }
        loop {
            let event = match mem.uffd.read_event() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    fail(format!("reading userfaultfd events: {e}"));
                    return;
                }
            };
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let offset = (addr as usize).wrapping_sub(mem.base) as u64;
            if offset >= mem.len {
                continue;
            }
            let page = offset / PAGE;
            if let Err(e) = serve(&cfg, page, &stats) {
                fail(chain(&e));
                return;
            }
        }
    }
}

/// Fetches the missing pages of `p.ranges` in runs; stops quietly on any
/// error (demand faults still fetch, and report, on their own).
fn prefetch_loop(mem: &CloneMemory, p: &Prefetch, stop: &AtomicBool, stats: &Mutex<FaultStats>) {
    for &(first, count) in &p.ranges {
        let end = (first + count).min(mem.pages());
        let mut page = first;
        while page < end {
            if stop.load(Ordering::Acquire) {
                return;
            }
            if mem.presence.test(page) {
                page += 1;
                continue;
            }
            let mut n = 1;
            while n < PREFETCH_RUN && page + n < end && !mem.presence.test(page + n) {
                n += 1;
            }
            let mut installed = 0;
            let r = p.source.read_pages(page, n, &mut |i, data| {
                if !mem.presence.test(i) && mem.install(i, data).is_ok() {
                    installed += 1;
                }
            });
            stats
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pages_prefetched += installed;
            if r.is_err() {
                return;
            }
            page += n;
        }
    }
}

fn set_error(slot: &Mutex<Option<String>>, e: String) {
    let mut s = slot.lock().unwrap_or_else(|p| p.into_inner());
    if s.is_none() {
        tracing::warn!("clone fault handler: {e}");
        *s = Some(e);
    }
}

/// Why a fault could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Uffd(#[from] UffdError),
    #[error("fetching pages {first}..{end}")]
    Fetch {
        first: u64,
        end: u64,
        #[source]
        source: memserver::SourceError,
    },
    #[error("the page source did not deliver page {0}")]
    NotDelivered(u64),
}

fn serve(cfg: &FaultHandlerConfig, page: u64, stats: &Mutex<FaultStats>) -> Result<(), ServeError> {
    let mem = &cfg.memory;
    let lock = || stats.lock().unwrap_or_else(|e| e.into_inner());
    lock().faults += 1;
    if mem.presence.test(page) {
        let _ = mem.uffd.wake(mem.host(page), PAGE_SIZE);
        return Ok(());
    }
    let avoid = |p: u64| {
        let zero = cfg.known_zero.as_ref().is_some_and(|z| {
            usize::try_from(p)
                .ok()
                .and_then(|i| z.get(i).map(|b| *b))
                .unwrap_or(false)
        });
        zero || cfg
            .avoidance
            .as_ref()
            .is_some_and(|a| allocated_after_fork(mem, a, p))
    };
    if avoid(page) {
        // The allocator hands out runs of pages: fill the run at once.
        let mut count = 1;
        while count < ZERO_RUN as u64
            && page + count < mem.pages()
            && !mem.presence.test(page + count)
            && avoid(page + count)
        {
            count += 1;
        }
        mem.zero_range(page, count)?;
        lock().pages_avoided += count;
        return Ok(());
    }
    let mut count = 1;
    while count < cfg.readahead.max(1)
        && page + count < mem.pages()
        && !mem.presence.test(page + count)
        && !avoid(page + count)
    {
        count += 1;
    }
    let t = Instant::now();
    let mut installed = 0u64;
    let mut install_error = None;
    cfg.source
        .read_pages(page, count, &mut |p, data| {
            if p >= page && p < page + count && install_error.is_none() {
                match mem.install(p, data) {
                    Ok(()) => installed += 1,
                    Err(e) => install_error = Some(e),
                }
            }
        })
        .map_err(|source| ServeError::Fetch {
            first: page,
            end: page + count,
            source,
        })?;
    if let Some(e) = install_error {
        return Err(e.into());
    }
    if !mem.presence.test(page) {
        return Err(ServeError::NotDelivered(page));
    }
    let mut s = lock();
    s.pages_fetched += installed;
    s.fetch_requests += 1;
    let us = (t.elapsed().as_micros() as u64).clamp(1, MAX_LATENCY_US);
    s.fetch_latency_us.saturating_record(us);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;
    use memserver::SourceError;

    #[test]
    fn presence_set_all_marks_the_pages_of_a_bitmap() {
        let p = Presence::new(100);
        p.set(3);
        let mut pages = crate::vmm::dirty::PageBitmap::repeat(false, 128);
        for i in [0, 63, 64, 99, 127] {
            pages.set(i, true);
        }
        p.set_all(&pages);
        let set: Vec<u64> = (0..100).filter(|i| p.test(*i)).collect();
        assert_eq!(set, [0, 3, 63, 64, 99]);
        assert_eq!(p.count(), 5, "nothing beyond the end counts");
    }

    /// Pages whose bytes say which page they are.
    struct Pattern(u64);

    impl PageSource for Pattern {
        fn pages(&self) -> u64 {
            self.0
        }
        fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
            if index >= self.0 {
                return Err(SourceError::OutOfRange {
                    index,
                    pages: self.0,
                });
            }
            for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
                chunk.copy_from_slice(&(index * 1000 + i as u64).to_le_bytes());
            }
            Ok(())
        }
    }

    /// Threads racing on the same missing pages (as two vCPUs would) all
    /// read the right bytes, and every page is fetched once.
    #[test]
    fn concurrent_faults_on_the_same_pages_are_served_once() {
        const PAGES: u64 = 1024;
        let mem = memory::anonymous(PAGES * PAGE).unwrap();
        let cmem = Arc::new(CloneMemory::register(&mem).expect("userfaultfd (are you root?)"));
        let base = cmem.base;
        let handler = FaultHandler::spawn(
            FaultHandlerConfig {
                known_zero: None,
                memory: cmem,
                source: Arc::new(Pattern(PAGES)),
                avoidance: None,
                readahead: 4,
                prefetch: None,
                feed: None,
            },
            "test",
        )
        .unwrap();
        let readers: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut bad = 0;
                    for p in 0..PAGES {
                        let word = 7;
                        // SAFETY: inside the live mapping owned by `mem`,
                        // which outlives the threads (joined below).
                        let v = unsafe {
                            ((base + (p * PAGE) as usize + word * 8) as *const u64).read_volatile()
                        };
                        if v != p * 1000 + word as u64 {
                            bad += 1;
                        }
                    }
                    bad
                })
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().unwrap(), 0, "a reader saw wrong bytes");
        }
        // The handler counts a fetch after waking the faulting threads.
        let t = Instant::now();
        while handler.stats().pages_fetched < PAGES && t.elapsed().as_secs() < 5 {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let stats = handler.stats();
        assert_eq!(stats.pages_fetched, PAGES, "{stats:?}");
        assert!(stats.faults >= PAGES / 4, "{stats:?}");
        assert_eq!(handler.memory().presence.count(), PAGES);
        assert!(handler.error().is_none());
        drop(handler);
        drop(mem);
    }

    /// A source that can no longer serve (the memory server is gone).
    struct Gone(u64);

    impl PageSource for Gone {
        fn pages(&self) -> u64 {
            self.0
        }
        fn read_page(&self, _: u64, _: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
            Err(SourceError::Unavailable("the memory server is gone".into()))
        }
    }

    /// A thread of the VMM (not a vCPU) touching a clone page the source
    /// cannot deliver is not left blocked: the handler records why and
    /// releases it within a bound; the VM is then failed with that error.
    #[test]
    fn a_failing_source_releases_every_waiter() {
        const PAGES: u64 = 64;
        let mem = memory::anonymous(PAGES * PAGE).unwrap();
        let cmem = Arc::new(CloneMemory::register(&mem).expect("userfaultfd (are you root?)"));
        let base = cmem.base;
        let mut handler = FaultHandler::spawn(
            FaultHandlerConfig {
                known_zero: None,
                memory: cmem,
                source: Arc::new(Gone(PAGES)),
                avoidance: None,
                readahead: 1,
                prefetch: None,
                feed: None,
            },
            "gone",
        )
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the live mapping owned by `mem`, which
            // outlives the thread (joined below).
            let v = unsafe { ((base + 5 * PAGE as usize) as *const u64).read_volatile() };
            let _ = tx.send(v);
        });
        let v = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the faulting thread is still blocked");
        assert_eq!(v, 0, "a released waiter sees an empty page");
        reader.join().unwrap();
        let err = handler.error().expect("the handler reports why");
        assert!(err.contains("memory server is gone"), "{err}");
        let t = Instant::now();
        handler.stop();
        assert!(t.elapsed().as_secs() < 2, "stop took {:?}", t.elapsed());
        drop(mem);
    }
}
