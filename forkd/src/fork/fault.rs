//! A clone's userfaultfd fault handler. Guest memory is empty anonymous
//! memory registered with userfaultfd (MISSING); every first touch of a
//! page — by a vCPU through KVM or by the VMM — stops the toucher and sends
//! us an event. We resolve it with UFFDIO_ZEROPAGE when the avoidance
//! heuristics say the guest will overwrite the page, and otherwise with
//! UFFDIO_COPY of the page (and a read-ahead window of following missing
//! pages) fetched from the [`PageSource`]. Two vCPUs faulting on one page
//! are served once: the second event finds the page present and only wakes.

use crate::fork::descriptor::AllocAtFork;
use crate::vmm::memory::GuestMemory;
use memserver::{PageSource, PAGE_SIZE};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;
use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

const PAGE: u64 = PAGE_SIZE as u64;
/// Fault latencies kept per clone (for median / p99).
const MAX_SAMPLES: usize = 100_000;
/// Pages zero-filled in one go at most.
const ZERO_RUN: usize = 64;

/// Which pages of the clone's memory are present (installed by us).
pub struct Presence {
    words: Vec<AtomicU64>,
}

impl Presence {
    pub fn new(pages: u64) -> Self {
        Presence {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    pub fn test(&self, page: u64) -> bool {
        self.words
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    pub fn set(&self, page: u64) {
        if let Some(w) = self.words.get((page / 64) as usize) {
            w.fetch_or(1 << (page % 64), Ordering::AcqRel);
        }
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }
}

/// Counters of one clone's faults.
#[derive(Debug, Clone, Default)]
pub struct FaultStats {
    pub faults: u64,
    pub pages_fetched: u64,
    /// Zero-filled because the guest allocator handed them out after the
    /// fork (heuristic a).
    pub pages_avoided: u64,
    /// Zero-filled because the guest declared it will overwrite them
    /// (heuristic b).
    pub pages_declared: u64,
    pub fetch_requests: u64,
    /// Service time of each fault that needed a fetch, in µs.
    pub fetch_latency_us: Vec<u32>,
    /// Pages installed ahead of demand by the prefetcher.
    pub pages_prefetched: u64,
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
    pub fn register(memory: &GuestMemory) -> Result<CloneMemory, String> {
        let region = memory.iter().next().ok_or("no memory region")?;
        let (base, len) = (region.as_ptr() as usize, region.len());
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| format!("userfaultfd create: {e:?}"))?;
        uffd.register(base as *mut libc::c_void, len as usize)
            .map_err(|e| format!("userfaultfd register: {e:?}"))?;
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

    /// Installs `data` as page `page`; a page someone else installed
    /// first is left alone (EEXIST).
    pub fn install(&self, page: u64, data: &[u8; PAGE_SIZE]) -> Result<(), String> {
        // SAFETY: `host(page)` is a page-aligned address inside the clone's
        // registered region (page < pages()), and `data` is a full page.
        let r = unsafe {
            self.uffd
                .copy(data.as_ptr().cast(), self.host(page), PAGE_SIZE, true)
        };
        match r {
            Ok(_) => {
                self.presence.set(page);
                Ok(())
            }
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                self.presence.set(page);
                Ok(())
            }
            Err(e) => Err(format!("UFFDIO_COPY of page {page}: {e:?}")),
        }
    }

    /// Installs zero-filled pages `first..first + count` (those missing).
    /// UFFDIO_COPY of zeros rather than UFFDIO_ZEROPAGE: the shared zero
    /// page would cost the guest a second (copy-on-write) fault on its first
    /// write, and these are pages the guest is about to write.
    pub fn zero_range(&self, first: u64, count: u64) -> Result<(), String> {
        static ZEROS: [u8; ZERO_RUN * PAGE_SIZE] = [0; ZERO_RUN * PAGE_SIZE];
        let mut p = first;
        let end = (first + count).min(self.pages());
        while p < end {
            let n = (end - p).min(ZERO_RUN as u64);
            // SAFETY: `host(p)` .. + n pages lies inside the registered
            // region (p + n <= pages()), and ZEROS holds n pages.
            let r = unsafe {
                self.uffd.copy(
                    ZEROS.as_ptr().cast(),
                    self.host(p),
                    n as usize * PAGE_SIZE,
                    true,
                )
            };
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
                Err(e) => return Err(format!("zero-filling pages {p}..{}: {e:?}", p + n)),
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
    /// Pages fetched per request at most (1 = no read-ahead).
    pub readahead: u64,
    /// Push ahead of demand: fetch these page ranges in the background.
    pub prefetch: Option<Prefetch>,
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

pub struct FaultHandler {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    prefetcher: Option<JoinHandle<()>>,
    stats: Arc<Mutex<FaultStats>>,
    error: Arc<Mutex<Option<String>>>,
    memory: Arc<CloneMemory>,
}

impl FaultHandler {
    pub fn spawn(mut cfg: FaultHandlerConfig, name: &str) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(FaultStats::default()));
        let error = Arc::new(Mutex::new(None));
        let memory = cfg.memory.clone();
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
        let (s, st, er) = (stop.clone(), stats.clone(), error.clone());
        let thread = std::thread::Builder::new()
            .name(format!("uffd-{name}"))
            .spawn(move || handler_loop(cfg, s, st, er))?;
        Ok(FaultHandler {
            stop,
            thread: Some(thread),
            prefetcher,
            stats,
            error,
            memory,
        })
    }

    pub fn stats(&self) -> FaultStats {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Why the handler gave up serving (e.g. the memory server is gone).
    pub fn error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn memory(&self) -> &Arc<CloneMemory> {
        &self.memory
    }

    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
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

fn handler_loop(
    cfg: FaultHandlerConfig,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<FaultStats>>,
    error: Arc<Mutex<Option<String>>>,
) {
    let mem = &cfg.memory;
    let fd = mem.uffd.as_raw_fd();
    let mut failed = false;
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 50) };
        if n <= 0 {
            continue;
        }
        loop {
            let event = match mem.uffd.read_event() {
                Ok(Some(e)) => e,
                Ok(None) => break,
                Err(e) => {
                    set_error(&error, format!("reading userfaultfd events: {e:?}"));
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
            if failed {
                // Leave the faulting vCPU waiting; the VM is being stopped.
                continue;
            }
            if let Err(e) = serve(&cfg, page, &stats) {
                set_error(&error, e);
                failed = true;
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

fn serve(cfg: &FaultHandlerConfig, page: u64, stats: &Mutex<FaultStats>) -> Result<(), String> {
    let mem = &cfg.memory;
    let lock = || stats.lock().unwrap_or_else(|e| e.into_inner());
    lock().faults += 1;
    if mem.presence.test(page) {
        let _ = mem.uffd.wake(mem.host(page), PAGE_SIZE);
        return Ok(());
    }
    let avoid = |p: u64| {
        cfg.avoidance
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
        .map_err(|e| format!("fetching page {page} (+{}): {e}", count - 1))?;
    if let Some(e) = install_error {
        return Err(e);
    }
    if !mem.presence.test(page) {
        return Err(format!("the page source did not deliver page {page}"));
    }
    let mut s = lock();
    s.pages_fetched += installed;
    s.fetch_requests += 1;
    if s.fetch_latency_us.len() < MAX_SAMPLES {
        s.fetch_latency_us
            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;
    use memserver::SourceError;

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
                memory: cmem,
                source: Arc::new(Pattern(PAGES)),
                avoidance: None,
                readahead: 4,
                prefetch: None,
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
}
