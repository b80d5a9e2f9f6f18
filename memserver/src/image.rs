//! A frozen parent image: copy-before-write of a running VM's memory.
//!
//! [`FrozenImage::freeze`] write-protects the parent's guest memory with
//! userfaultfd (`UFFDIO_REGISTER_MODE_WP`). From then on the first write to
//! each protected page raises a WP fault; a handler thread copies the page
//! aside while the writer is blocked (the page still holds its frozen
//! contents), then removes the protection of that one page and wakes the
//! writer. Readers ([`PageSource::read_page`]) get the copy if there is one,
//! else the live page, which is still protected and therefore unchanged.
//!
//! **Which pages were populated at the freeze.** Write protection only
//! sticks to populated page-table entries (pte-none anonymous pages do not
//! fault without `UFFD_FEATURE_WP_UNPOPULATED`, which we do not use: it would
//! make the parent pay a fault for every fresh page it touches after the fork).
//! The freeze instant is the end of `UFFDIO_WRITEPROTECT`. Afterwards
//! `/proc/self/pagemap` is scanned: a page is "populated at the freeze" iff
//! its entry carries the uffd-wp bit (57), or it was already copied by the
//! handler (which removes the bit only after storing the copy). A page
//! populated *after* the protect (no fault, no bit) was pte-none at the
//! instant, so it reads as zeros. This is exact even if VMM threads write
//! during the freeze, and the classification could run with the parent
//! already resumed.
//!
//! **Read/write race.** Page `i` belongs to lock stripe `i % STRIPES`. The
//! handler holds the stripe lock while it copies a page aside and inserts the
//! copy, and removes the page's protection only after unlocking. A reader
//! holds the same lock while it looks for a copy and, finding none, copies
//! the live page. So while a reader holds the lock without seeing a copy, the
//! protection of that page has not been removed (removal happens after an
//! insert that the reader would see), every writer of the page is blocked in
//! the fault, and the live bytes are the frozen bytes. Release and handler
//! failure set the state first, then take and drop every stripe lock (draining
//! readers that are mid-copy), and only then remove the protection.
//!
//! **Discarded pages.** Discarding a page of the range (`MADV_DONTNEED`, or
//! reclaim after `MADV_FREE`) drops its pte and with it the protection: a
//! later write would not fault. The uffd-wp bit never comes back once lost
//! (we write-protect only at the freeze; swap, migration and THP splits keep
//! it). So every copy from the live mapping (reader or handler) re-reads the
//! page's pagemap entry *after* copying: bit still set means the page was
//! protected from the freeze to the check, so the bytes copied are the frozen
//! ones; bit gone means the page was discarded, and the read answers
//! `Unavailable` instead of wrong data (about 1 µs per live read).
//!
//! **Limits** (part of the freeze contract): writes that bypass page tables
//! (DMA into pages pinned before the freeze: VFIO, vhost) are not seen; a
//! discard *during* the freeze call reads back as zeros.

use std::collections::HashMap;
use std::ffi::c_void;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bitvec::vec::BitVec;
use userfaultfd::{
    Event, EventBuffer, FaultKind, FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder,
};

use crate::source::{PageSource, SourceError, PAGE_SIZE};
use crate::sync::lock;

const STRIPES: usize = 64;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_UFFD_WP: u64 = 1 << 57;
/// Pages per pagemap `pread` (8 bytes each: 128 KiB).
const PAGEMAP_CHUNK: usize = 16384;

const LIVE: u8 = 0;
const RELEASED: u8 = 1;
const FAILED: u8 = 2;

type Page = [u8; PAGE_SIZE];
/// One lock stripe's copies, by page index.
type Copies = HashMap<u64, Box<Page>>;
/// Bit `i`: page `i` was populated at the freeze.
type Bitmap = BitVec<u64>;

/// Why a freeze failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("range {addr:#x}+{len:#x} is empty, overflows, or is not page aligned")]
    Misaligned { addr: usize, len: usize },
    #[error("userfaultfd {op} failed: {source}")]
    Uffd {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("unsupported by this kernel: {0}")]
    Unsupported(&'static str),
    #[error("reading /proc/self/pagemap failed: {0}")]
    Pagemap(#[source] io::Error),
    #[error("starting the copy-before-write thread failed: {0}")]
    Thread(#[source] io::Error),
}

fn uffd_error(op: &'static str, e: userfaultfd::Error) -> ImageError {
    let source = match e {
        userfaultfd::Error::SystemError(errno) => io::Error::from_raw_os_error(errno as i32),
        userfaultfd::Error::OpenDevUserfaultfd(e) => e,
        other => io::Error::other(other),
    };
    ImageError::Uffd { op, source }
}

/// Why the copy-before-write handler stopped (it then fails the image).
#[derive(Debug, thiserror::Error)]
enum HandlerError {
    #[error("poll on the userfaultfd failed")]
    Poll(#[source] io::Error),
    #[error("userfaultfd {op} failed")]
    Uffd {
        op: &'static str,
        #[source]
        source: userfaultfd::Error,
    },
    #[error("checking a page's protection in the pagemap failed")]
    Pagemap(#[source] io::Error),
}

impl HandlerError {
    fn uffd(op: &'static str) -> impl FnOnce(userfaultfd::Error) -> HandlerError {
        move |source| HandlerError::Uffd { op, source }
    }
}

/// Displays an error with its chain of sources ("a: b: c").
struct Chain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut next = self.0.source();
        while let Some(e) = next {
            write!(f, ": {e}")?;
            next = e.source();
        }
        Ok(())
    }
}

/// Counters of a frozen image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ImageStats {
    pub pages: u64,
    /// Pages holding data at the freeze; the others read as zeros.
    pub pages_populated_at_freeze: u64,
    /// Pages copied aside so far (first writes after the freeze).
    pub pages_copied: u64,
    /// Bytes of copies held now (0 after release).
    pub bytes_held: u64,
    /// Write-protect fault events handled (>= `pages_copied`).
    pub wp_faults: u64,
    /// Reads or faults that found a page discarded after the freeze.
    pub lost_page_reads: u64,
    /// Register + write-protect: the part the parent must be paused for.
    pub protect_duration: Duration,
    /// The whole freeze, including the pagemap classification.
    pub freeze_duration: Duration,
}

/// State shared by readers and the handler thread.
struct ImageState {
    base: usize,
    len: usize,
    state: AtomicU8,
    /// Protection is set and the range registered (cleared by the one disarm).
    armed: AtomicBool,
    stripes: Box<[Mutex<Copies>]>,
    /// `/proc/self/pagemap`, to check that a page is still protected.
    pagemap: File,
    pages_copied: AtomicU64,
    bytes_held: AtomicU64,
    wp_faults: AtomicU64,
    lost_page_reads: AtomicU64,
    #[cfg(test)]
    stall: AtomicBool,
}

impl ImageState {
    fn stripe(&self, index: u64) -> MutexGuard<'_, Copies> {
        lock(&self.stripes[index as usize % STRIPES])
    }

    fn check_live(&self) -> Result<(), SourceError> {
        match self.state.load(SeqCst) {
            LIVE => Ok(()),
            RELEASED => Err(SourceError::Unavailable("image released".into())),
            _ => Err(SourceError::Unavailable(
                "copy-before-write handler failed".into(),
            )),
        }
    }

    /// Ends the image (`state` is RELEASED or FAILED): drains readers, frees
    /// the copies, then lets every writer go and unregisters.
    fn shut(&self, state: u8, uffd: &Uffd) {
        self.state.store(state, SeqCst);
        for stripe in self.stripes.iter() {
            lock(stripe).clear();
        }
        self.bytes_held.store(0, SeqCst);
        if self.armed.swap(false, SeqCst) {
            if let Err(e) = unprotect(uffd, self.base, self.len) {
                tracing::warn!("frozen image: removing write protection failed: {e}");
            }
            if let Err(e) = uffd.unregister(self.base as *mut c_void, self.len) {
                tracing::warn!("frozen image: unregistering failed: {e}");
            }
        }
    }

    /// Whether page `index` still carries its uffd-wp bit (see module docs).
    fn still_protected(&self, index: u64) -> io::Result<bool> {
        let mut bytes = [0u8; 8];
        let vpn = self.base / PAGE_SIZE + index as usize;
        self.pagemap.read_exact_at(&mut bytes, vpn as u64 * 8)?;
        let kept = u64::from_ne_bytes(bytes) & PM_UFFD_WP != 0;
        if !kept {
            self.lost_page_reads.fetch_add(1, SeqCst);
        }
        Ok(kept)
    }

    fn stalled(&self) -> bool {
        #[cfg(test)]
        return self.stall.load(SeqCst);
        #[cfg(not(test))]
        false
    }
}

/// Removes write protection (waking blocked writers), retrying while the
/// kernel reports EAGAIN (the address space is changing).
fn unprotect(uffd: &Uffd, start: usize, len: usize) -> Result<(), userfaultfd::Error> {
    loop {
        match uffd.remove_write_protection(start as *mut c_void, len, true) {
            Err(userfaultfd::Error::SystemError(e)) if e as i32 == libc::EAGAIN => {
                std::thread::yield_now()
            }
            r => return r,
        }
    }
}

/// The handler thread: serves WP faults until the stop eventfd is written.
fn handler(shared: &ImageState, uffd: &Uffd, stop_fd: RawFd) {
    let mut events = EventBuffer::new(64);
    loop {
        let mut fds = [
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let (nfds, timeout) = if shared.stalled() { (1, 5) } else { (2, -1) };
        // SAFETY: `fds` is a live array of at least `nfds` pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, timeout) };
        let result = if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            Err(HandlerError::Poll(e))
        } else if fds[0].revents != 0 {
            return;
        } else if r == 0 || shared.stalled() {
            continue;
        } else {
            match uffd.read_events(&mut events) {
                Ok(mut iter) => iter.try_for_each(|ev| {
                    let ev = ev.map_err(HandlerError::uffd("read event"))?;
                    handle_event(shared, uffd, ev)
                }),
                Err(e) => Err(HandlerError::uffd("read events")(e)),
            }
        };
        if let Err(e) = result {
            if shared.state.load(SeqCst) == LIVE {
                tracing::error!(
                    "frozen image: copy-before-write handler failed: {}",
                    Chain(&e)
                );
                shared.shut(FAILED, uffd);
            }
            return;
        }
    }
}

fn handle_event(shared: &ImageState, uffd: &Uffd, event: Event) -> Result<(), HandlerError> {
    let unprotect =
        |page| unprotect(uffd, page, PAGE_SIZE).map_err(HandlerError::uffd("unprotect"));
    match event {
        Event::Pagefault { kind, addr, .. } => {
            let page = addr as usize & !(PAGE_SIZE - 1);
            if kind != FaultKind::WriteProtected
                || !(shared.base..shared.base + shared.len).contains(&page)
            {
                // Not registered for these; never leave a thread waiting.
                return uffd
                    .wake(page as *mut c_void, PAGE_SIZE)
                    .map_err(HandlerError::uffd("wake"));
            }
            shared.wp_faults.fetch_add(1, SeqCst);
            let index = ((page - shared.base) / PAGE_SIZE) as u64;
            copy_aside(shared, index)?;
            // Only after the copy is visible to readers (lock released).
            unprotect(page)
        }
        _ => Ok(()),
    }
}

/// Pages copied out per write-protect removal.
const COPY_OUT_RUN: u64 = 64;

/// Copies page `index` aside if it has no copy yet, under its stripe lock
/// (the fault handler and the copy-out thread both come here). Returns
/// false once the image is no longer live.
fn copy_aside(shared: &ImageState, index: u64) -> Result<bool, HandlerError> {
    let mut stripe = shared.stripe(index);
    if shared.state.load(SeqCst) != LIVE {
        return Ok(false);
    }
    if let std::collections::hash_map::Entry::Vacant(slot) = stripe.entry(index) {
        let page = shared.base + index as usize * PAGE_SIZE;
        let mut copy = Box::new([0u8; PAGE_SIZE]);
        // SAFETY: `page` lies in the registered range, which the freeze
        // contract keeps mapped while the image is LIVE (checked above under
        // the lock). It is write protected and not yet unprotected (no copy
        // exists, and protection is removed only after a copy is stored), so
        // every writer is blocked and the 4 KiB cannot change under the copy.
        unsafe { std::ptr::copy_nonoverlapping(page as *const u8, copy.as_mut_ptr(), PAGE_SIZE) };
        if shared
            .still_protected(index)
            .map_err(HandlerError::Pagemap)?
        {
            slot.insert(copy);
            shared.pages_copied.fetch_add(1, SeqCst);
            shared.bytes_held.fetch_add(PAGE_SIZE as u64, SeqCst);
        }
    }
    Ok(true)
}

/// The copy-out thread: runs of populated pages are copied aside, then
/// their protection is removed in one call.
fn copy_out(shared: &ImageState, uffd: &Uffd, populated: &Bitmap) {
    // Background work: yield the cores to vCPUs and clone start-up first.
    // SAFETY: setpriority on this thread's own id (Linux applies nice
    // values per thread); no memory is involved.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 15);
    }
    let pages = (shared.len / PAGE_SIZE) as u64;
    let is_populated = |i: u64| populated.get(i as usize).is_some_and(|b| *b);
    let mut first = 0;
    while first < pages {
        let end = (first + COPY_OUT_RUN).min(pages);
        let mut any = false;
        for i in (first..end).filter(|&i| is_populated(i)) {
            match copy_aside(shared, i) {
                Ok(true) => any = true,
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!("frozen image: copy-out stopped: {}", Chain(&e));
                    return;
                }
            }
        }
        // Every populated page of the run has its copy: let writers in.
        if any {
            let start = shared.base + first as usize * PAGE_SIZE;
            if unprotect(uffd, start, (end - first) as usize * PAGE_SIZE).is_err() {
                return; // released (unregistered) meanwhile
            }
        }
        first = end;
    }
}

/// The handler thread, its stop eventfd and the userfaultfd.
struct Control {
    uffd: Arc<Uffd>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Control {
    fn stop_and_join(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Guest memory frozen at one instant while the parent keeps running.
pub struct FrozenImage {
    shared: Arc<ImageState>,
    /// Bit `i`: page `i` was populated at the freeze (else it reads as zeros).
    populated: Arc<Bitmap>,
    pages_populated: u64,
    protect_duration: Duration,
    freeze_duration: Duration,
    control: Mutex<Option<Control>>,
}

impl FrozenImage {
    /// Freezes `[addr, addr+len)`: from return on, every write to a page that
    /// was populated at the freeze first copies the page's contents aside;
    /// pages not populated at the freeze read back as zeros.
    ///
    /// # Safety
    /// `[addr, addr+len)` is a private anonymous mapping, page aligned, that
    /// stays mapped until the image is released or dropped; nobody else
    /// registers it with userfaultfd; its pages are not discarded
    /// (`MADV_DONTNEED`/`MADV_FREE`) nor written by DMA while the image lives.
    pub unsafe fn freeze(addr: *mut u8, len: usize) -> Result<Arc<FrozenImage>, ImageError> {
        let started = Instant::now();
        let base = addr as usize;
        if base == 0
            || !base.is_multiple_of(PAGE_SIZE)
            || len == 0
            || !len.is_multiple_of(PAGE_SIZE)
            || base.checked_add(len).is_none()
        {
            return Err(ImageError::Misaligned { addr: base, len });
        }
        // Kernel-mode faults must reach us too: KVM writes guest memory
        // through get_user_pages, VMM threads through copy_to_user.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(FeatureFlags::PAGEFAULT_FLAG_WP)
            .create()
            .map_err(|e| uffd_error("create", e))?;
        if !pagemap_reports_wp(&uffd)? {
            return Err(ImageError::Unsupported(
                "pagemap uffd-wp bit (Linux >= 5.13)",
            ));
        }
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(ImageError::Thread(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(fd) };
        let pages = len / PAGE_SIZE;
        let shared = Arc::new(ImageState {
            base,
            len,
            state: AtomicU8::new(LIVE),
            armed: AtomicBool::new(false),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            pagemap: File::open("/proc/self/pagemap").map_err(ImageError::Pagemap)?,
            pages_copied: AtomicU64::new(0),
            bytes_held: AtomicU64::new(0),
            wp_faults: AtomicU64::new(0),
            lost_page_reads: AtomicU64::new(0),
            #[cfg(test)]
            stall: AtomicBool::new(false),
        });
        let uffd = Arc::new(uffd);
        let thread = {
            let (shared, uffd, stop_fd) = (shared.clone(), uffd.clone(), stop.as_raw_fd());
            // `stop` outlives the thread: Control joins before dropping it.
            std::thread::Builder::new()
                .name("memserver-cbw".into())
                .spawn(move || handler(&shared, &uffd, stop_fd))
                .map_err(ImageError::Thread)?
        };
        let mut image = FrozenImage {
            shared,
            populated: Arc::default(),
            pages_populated: 0,
            protect_duration: Duration::ZERO,
            freeze_duration: Duration::ZERO,
            control: Mutex::new(Some(Control {
                uffd: uffd.clone(),
                stop,
                thread: Some(thread),
            })),
        };
        // From here on an error drops `image`, whose release() tears down.
        let ioctls = uffd
            .register_with_mode(addr.cast(), len, RegisterMode::WRITE_PROTECT)
            .map_err(|e| uffd_error("register", e))?;
        image.shared.armed.store(true, SeqCst);
        if !ioctls.contains(IoctlFlags::WRITE_PROTECT) {
            return Err(ImageError::Unsupported("UFFDIO_WRITEPROTECT on this range"));
        }
        uffd.write_protect(addr.cast(), len)
            .map_err(|e| uffd_error("write-protect", e))?;
        image.protect_duration = started.elapsed();
        let populated = classify(&image.shared, base, pages)?;
        image.pages_populated = populated.count_ones() as u64;
        image.populated = Arc::new(populated);
        image.freeze_duration = started.elapsed();
        Ok(Arc::new(image))
    }

    /// Counters so far.
    pub fn stats(&self) -> ImageStats {
        let s = &self.shared;
        ImageStats {
            pages: self.pages(),
            pages_populated_at_freeze: self.pages_populated,
            pages_copied: s.pages_copied.load(SeqCst),
            bytes_held: s.bytes_held.load(SeqCst),
            wp_faults: s.wp_faults.load(SeqCst),
            lost_page_reads: s.lost_page_reads.load(SeqCst),
            protect_duration: self.protect_duration,
            freeze_duration: self.freeze_duration,
        }
    }

    /// Whether page `index` was populated at the freeze.
    pub fn was_populated(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.populated.get(i))
            .is_some_and(|b| *b)
    }

    /// Copies every page populated at the freeze aside in the background,
    /// removing each page's write protection once it is copied, so that the
    /// parent's later writes stop faulting (a write-protect fault under KVM
    /// costs ~0.1 ms of the writer's time; the copy-out ~1–2 µs a page of a
    /// background thread's). Costs memory: the image then holds a copy of
    /// every populated page. Pages the parent writes first are copied by
    /// the fault handler as before.
    pub fn start_copy_out(&self) -> Result<(), ImageError> {
        let control = lock(&self.control);
        let Some(ctl) = control.as_ref() else {
            return Ok(());
        };
        let (shared, uffd, populated) = (
            self.shared.clone(),
            ctl.uffd.clone(),
            self.populated.clone(),
        );
        std::thread::Builder::new()
            .name("memserver-copyout".into())
            .spawn(move || copy_out(&shared, &uffd, &populated))
            .map(|_| ())
            .map_err(ImageError::Thread)
    }

    /// Stops copy-before-write: frees the copies, removes the protection
    /// (waking blocked writers), unregisters, stops the handler thread.
    /// Idempotent; afterwards reads answer `Unavailable("image released")`.
    pub fn release(&self) {
        let mut control = lock(&self.control);
        if let Some(mut ctl) = control.take() {
            self.shared.shut(RELEASED, &ctl.uffd);
            ctl.stop_and_join();
        }
    }
}

impl Drop for FrozenImage {
    fn drop(&mut self) {
        self.release();
    }
}

impl std::fmt::Debug for FrozenImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenImage")
            .field("base", &format_args!("{:#x}", self.shared.base))
            .field("stats", &self.stats())
            .finish()
    }
}

impl PageSource for FrozenImage {
    fn pages(&self) -> u64 {
        (self.shared.len / PAGE_SIZE) as u64
    }

    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        let shared = &*self.shared;
        if index >= self.pages() {
            return Err(SourceError::OutOfRange {
                index,
                pages: self.pages(),
            });
        }
        if !self.was_populated(index) {
            shared.check_live()?;
            buf.fill(0);
            return Ok(());
        }
        let stripe = shared.stripe(index);
        // Checked under the stripe lock: shut() sets the state before it
        // takes this lock, so LIVE here means the range is still protected
        // and mapped until we unlock.
        shared.check_live()?;
        if let Some(copy) = stripe.get(&index) {
            buf.copy_from_slice(&copy[..]);
            return Ok(());
        }
        let page = shared.base + index as usize * PAGE_SIZE;
        // SAFETY: `page` is in the frozen range, mapped while the image is
        // LIVE (checked above under the lock). No copy exists and we hold the
        // stripe lock, so the handler has not removed the page's protection:
        // unless the page was discarded (checked next), writers are blocked
        // and the bytes are the frozen ones.
        unsafe { std::ptr::copy_nonoverlapping(page as *const u8, buf.as_mut_ptr(), PAGE_SIZE) };
        match shared.still_protected(index) {
            Ok(true) => Ok(()),
            Ok(false) => Err(SourceError::Discarded { index }),
            Err(e) => Err(SourceError::Pagemap {
                index,
                source: Arc::new(e),
            }),
        }
    }
}

/// Reads the pagemap entries of `bytes.len() / 8` pages from virtual page
/// `vpn` into `out`.
fn read_pagemap(file: &File, vpn: usize, bytes: &mut [u8], out: &mut Vec<u64>) -> io::Result<()> {
    file.read_exact_at(bytes, vpn as u64 * 8)?;
    out.clear();
    out.extend(
        bytes
            .chunks_exact(8)
            .map(|b| u64::from_ne_bytes(b.try_into().unwrap_or_default())),
    );
    Ok(())
}

/// Returns the populated-at-freeze bitmap.
fn classify(shared: &ImageState, base: usize, pages: usize) -> Result<Bitmap, ImageError> {
    let mut bits = Bitmap::repeat(false, pages);
    let mut bytes = vec![0u8; PAGEMAP_CHUNK.min(pages) * 8];
    let mut entries = Vec::with_capacity(PAGEMAP_CHUNK);
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(PAGEMAP_CHUNK);
        read_pagemap(
            &shared.pagemap,
            base / PAGE_SIZE + done,
            &mut bytes[..n * 8],
            &mut entries,
        )
        .map_err(ImageError::Pagemap)?;
        for (j, &e) in entries.iter().enumerate() {
            let i = done + j;
            // Present without the bit: populated after the protect, unless
            // the handler already copied and unprotected it.
            let populated = e & PM_UFFD_WP != 0
                || (e & (PM_PRESENT | PM_SWAPPED) != 0
                    && shared.stripe(i as u64).contains_key(&(i as u64)));
            bits.set(i, populated);
        }
        done += n;
    }
    Ok(bits)
}

/// Whether pagemap reports the uffd-wp bit (probed once per process on a
/// scratch page registered with `uffd`).
fn pagemap_reports_wp(uffd: &Uffd) -> Result<bool, ImageError> {
    static PROBE: OnceLock<bool> = OnceLock::new();
    if let Some(&ok) = PROBE.get() {
        return Ok(ok);
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
    // SAFETY: a fresh one-page mapping at an address the kernel picks.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE_SIZE, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return Err(ImageError::Pagemap(io::Error::last_os_error()));
    }
    // SAFETY: `p` is the writable page we just mapped.
    unsafe { p.cast::<u8>().write_volatile(1) };
    let probe = || -> Result<bool, ImageError> {
        uffd.register_with_mode(p, PAGE_SIZE, RegisterMode::WRITE_PROTECT)
            .map_err(|e| uffd_error("register", e))?;
        uffd.write_protect(p, PAGE_SIZE)
            .map_err(|e| uffd_error("write-protect", e))?;
        let file = File::open("/proc/self/pagemap").map_err(ImageError::Pagemap)?;
        let mut entry = Vec::new();
        read_pagemap(&file, p as usize / PAGE_SIZE, &mut [0; 8], &mut entry)
            .map_err(ImageError::Pagemap)?;
        Ok(entry[0] & PM_UFFD_WP != 0)
    };
    let result = probe();
    let _ = uffd.unregister(p, PAGE_SIZE);
    // SAFETY: `p` is our scratch mapping; nothing refers to it any more.
    unsafe { libc::munmap(p, PAGE_SIZE) };
    let ok = result?;
    let _ = PROBE.set(ok);
    Ok(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer blocked on a WP fault that nobody serves finishes on release.
    #[test]
    fn release_frees_a_blocked_writer() {
        const LEN: usize = 4 * PAGE_SIZE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), LEN, prot, flags, -1, 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p as usize;
        // SAFETY: `p` is LEN writable bytes.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 7, LEN) };
        // SAFETY: the mapping outlives the image (released below).
        let image = unsafe { FrozenImage::freeze(p.cast(), LEN) }.unwrap();
        image.shared.stall.store(true, SeqCst);
        // SAFETY: page 1 of the live mapping; the write blocks in the fault.
        let writer = std::thread::spawn(move || unsafe {
            ((base + PAGE_SIZE) as *mut u8).write_volatile(9)
        });
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !writer.is_finished(),
            "the write should wait for the stalled handler"
        );
        let mut buf = [0u8; PAGE_SIZE];
        image.read_page(1, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 7));
        image.release();
        writer.join().unwrap();
        assert_eq!(
            image.read_page(1, &mut buf),
            Err(SourceError::Unavailable("image released".into()))
        );
        image.release();
        drop(image);
        // SAFETY: page 1 of our mapping, no longer frozen.
        assert_eq!(
            unsafe { ((base + PAGE_SIZE) as *const u8).read_volatile() },
            9
        );
        // SAFETY: our mapping; the image is gone.
        unsafe { libc::munmap(p, LEN) };
    }
}
