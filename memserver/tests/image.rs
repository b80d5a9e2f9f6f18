//! FrozenImage: copy-before-write freezes of plain anonymous mappings,
//! written by ordinary threads (no KVM needed).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use memserver::image::{FrozenImage, ImageError};
use memserver::{PageSource, SourceError, PAGE_SIZE};

const MIB: usize = 1 << 20;
const HUGE: usize = 2 * MIB;

/// A private anonymous MAP_NORESERVE mapping, 2 MiB aligned, unmapped on drop.
struct Mapping {
    raw: *mut libc::c_void,
    raw_len: usize,
    base: usize,
    len: usize,
}

// SAFETY: the mapping is plain memory; tests share its address across threads.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

#[derive(Clone, Copy)]
enum Thp {
    Huge,
    NoHuge,
}

impl Mapping {
    fn new(len: usize, thp: Thp) -> Mapping {
        let raw_len = len + HUGE;
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        // SAFETY: a fresh mapping at an address the kernel picks.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), raw_len, prot, flags, -1, 0) };
        assert_ne!(raw, libc::MAP_FAILED);
        let base = (raw as usize).next_multiple_of(HUGE);
        let advice = match thp {
            Thp::Huge => libc::MADV_HUGEPAGE,
            Thp::NoHuge => libc::MADV_NOHUGEPAGE,
        };
        // SAFETY: [base, base+len) lies inside our mapping.
        assert_eq!(unsafe { libc::madvise(base as *mut _, len, advice) }, 0);
        Mapping {
            raw,
            raw_len,
            base,
            len,
        }
    }

    fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    fn page_ptr(&self, i: usize) -> *mut u64 {
        assert!(i < self.pages());
        (self.base + i * PAGE_SIZE) as *mut u64
    }

    /// Fills page `i` with `pattern(i, generation)`.
    fn fill(&self, i: usize, generation: u64) {
        let p = self.page_ptr(i);
        for w in 0..PAGE_SIZE / 8 {
            // SAFETY: word w of page i of our mapping.
            unsafe { p.add(w).write_volatile(word(i, generation, w)) };
        }
    }

    fn write_word(&self, i: usize, w: usize, value: u64) {
        // SAFETY: word w (< 512) of page i of our mapping.
        unsafe {
            self.page_ptr(i)
                .add(w % (PAGE_SIZE / 8))
                .write_volatile(value)
        };
    }

    fn freeze(&self) -> Arc<FrozenImage> {
        // SAFETY: every test drops or releases the image before the mapping.
        unsafe { FrozenImage::freeze(self.base as *mut u8, self.len) }.expect("freeze")
    }

    /// AnonHugePages of this mapping's VMA, in kB.
    fn anon_huge_kb(&self) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = lo <= self.base && self.base < hi;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    return v.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        0
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: our mapping; images are gone by now.
        unsafe { libc::munmap(self.raw, self.raw_len) };
    }
}

fn word(page: usize, generation: u64, w: usize) -> u64 {
    (page as u64) << 32 ^ generation << 20 ^ w as u64 ^ 0x5a5a_0000_0000_0000
}

fn expected(page: usize, generation: Option<u64>) -> [u8; PAGE_SIZE] {
    let mut buf = [0u8; PAGE_SIZE];
    if let Some(g) = generation {
        for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&word(page, g, w).to_ne_bytes());
        }
    }
    buf
}

/// Checks every page of `image` against generation 0 (`touched`) or zeros.
fn check_all(image: &FrozenImage, touched: impl Fn(usize) -> bool) {
    let mut buf = [0u8; PAGE_SIZE];
    for i in 0..image.pages() as usize {
        image.read_page(i as u64, &mut buf).unwrap();
        let want = expected(i, touched(i).then_some(0));
        assert!(buf == want, "page {i} differs from its frozen contents");
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn overwrite_everything(m: &Arc<Mapping>) {
    let m2 = m.clone();
    std::thread::spawn(move || (0..m2.pages()).for_each(|i| m2.fill(i, 1)))
        .join()
        .unwrap();
}

#[test]
fn writes_after_freeze_keep_frozen_contents() {
    let m = Arc::new(Mapping::new(64 * MIB, Thp::NoHuge));
    let touched = |i: usize| !i.is_multiple_of(3);
    (0..m.pages())
        .filter(|&i| touched(i))
        .for_each(|i| m.fill(i, 0));
    let n_touched = (0..m.pages()).filter(|&i| touched(i)).count() as u64;
    let image = m.freeze();
    let s = image.stats();
    assert_eq!(s.pages, m.pages() as u64);
    assert_eq!(s.pages_populated_at_freeze, n_touched);
    assert_eq!(s.pages_copied, 0);

    overwrite_everything(&m); // including the never-touched pages
    check_all(&image, touched);
    let s = image.stats();
    assert_eq!(s.pages_copied, n_touched);
    assert_eq!(s.bytes_held, n_touched * PAGE_SIZE as u64);
    assert!(s.wp_faults >= s.pages_copied);
    // The live memory moved on.
    // SAFETY: page 3 of our mapping.
    assert_eq!(unsafe { m.page_ptr(3).read_volatile() }, word(3, 1, 0));
    drop(image);
}

/// Background copy-out: once it is done the writer takes no more
/// write-protect faults, and the image still reads the frozen contents,
/// also for pages written while the copy-out ran.
#[test]
fn copy_out_ends_write_faults() {
    let m = Arc::new(Mapping::new(32 * MIB, Thp::NoHuge));
    let touched = |i: usize| !i.is_multiple_of(5);
    (0..m.pages())
        .filter(|&i| touched(i))
        .for_each(|i| m.fill(i, 0));
    let n_touched = (0..m.pages()).filter(|&i| touched(i)).count() as u64;
    let image = m.freeze();
    image.start_copy_out().unwrap();
    // Race the copy-out with a writer on the first pages.
    (0..64).for_each(|i| m.write_word(i, 9, 0xdead));
    let t = Instant::now();
    while image.stats().pages_copied < n_touched {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "copy-out stalled: {:?}",
            image.stats()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let faults = image.stats().wp_faults;
    overwrite_everything(&m);
    assert_eq!(
        image.stats().wp_faults,
        faults,
        "writes faulted after copy-out"
    );
    check_all(&image, touched);
    assert_eq!(image.stats().bytes_held, n_touched * PAGE_SIZE as u64);
    image.release();
}

fn hammer_while_reading(thp: Thp) {
    let m = Arc::new(Mapping::new(16 * MIB, thp));
    let touched = |i: usize| i % 7 != 3;
    (0..m.pages())
        .filter(|&i| touched(i))
        .for_each(|i| m.fill(i, 0));
    let image = m.freeze();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
            let mut writes = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let r = rng.next();
                m.write_word(r as usize % m.pages(), (r >> 40) as usize, r);
                writes += 1;
            }
            writes
        })
    };
    let started = Instant::now();
    let mut rounds = 0;
    while started.elapsed() < Duration::from_millis(300) || rounds == 0 {
        check_all(&image, touched);
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    check_all(&image, touched);
    let s = image.stats();
    eprintln!(
        "hammer {}: {rounds} full read rounds, {writes} writes, {} pages copied, AnonHugePages {} kB",
        if matches!(thp, Thp::Huge) { "THP" } else { "4K" },
        s.pages_copied,
        m.anon_huge_kb()
    );
    assert!(s.pages_copied > 0);
}

#[test]
fn concurrent_writer_and_reader_no_thp() {
    hammer_while_reading(Thp::NoHuge);
}

#[test]
fn concurrent_writer_and_reader_thp() {
    hammer_while_reading(Thp::Huge);
}

#[test]
fn thp_backed_regions() {
    for thp in [Thp::Huge, Thp::NoHuge] {
        let m = Arc::new(Mapping::new(16 * MIB, thp));
        // Touch one page in four: a THP region still gets whole huge pages.
        let touched = |i: usize| i % 4 == 1;
        (0..m.pages())
            .filter(|&i| touched(i))
            .for_each(|i| m.fill(i, 0));
        let huge_before = m.anon_huge_kb();
        let image = m.freeze();
        let s = image.stats();
        overwrite_everything(&m);
        check_all(&image, touched);
        let after = image.stats();
        eprintln!(
            "{}: AnonHugePages {huge_before} kB before, {} kB after; populated {} of {}, copied {}",
            if matches!(thp, Thp::Huge) {
                "MADV_HUGEPAGE"
            } else {
                "MADV_NOHUGEPAGE"
            },
            m.anon_huge_kb(),
            s.pages_populated_at_freeze,
            s.pages,
            after.pages_copied,
        );
        if matches!(thp, Thp::NoHuge) {
            assert_eq!(huge_before, 0);
            assert_eq!(s.pages_populated_at_freeze, (m.pages() / 4) as u64);
        } else if huge_before == 16 * 1024 {
            assert_eq!(s.pages_populated_at_freeze, m.pages() as u64);
        }
        assert_eq!(after.pages_copied, s.pages_populated_at_freeze);
    }
}

#[test]
fn kernel_writes_are_caught() {
    // copy_to_user (read from a pipe) and get_user_pages (process_vm_writev,
    // the path KVM writes guest memory by) must both copy before writing.
    let m = Arc::new(Mapping::new(MIB, Thp::NoHuge));
    (0..m.pages()).for_each(|i| m.fill(i, 0));
    let image = m.freeze();
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let junk = [0xeeu8; PAGE_SIZE];
    // SAFETY: writes a live buffer to our pipe, then reads it into page 5.
    unsafe {
        assert_eq!(
            libc::write(fds[1], junk.as_ptr().cast(), PAGE_SIZE),
            PAGE_SIZE as isize
        );
        assert_eq!(
            libc::read(fds[0], m.page_ptr(5).cast(), PAGE_SIZE),
            PAGE_SIZE as isize
        );
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    let local = libc::iovec {
        iov_base: junk.as_ptr() as *mut _,
        iov_len: PAGE_SIZE,
    };
    let remote = libc::iovec {
        iov_base: m.page_ptr(9).cast(),
        iov_len: PAGE_SIZE,
    };
    // SAFETY: both iovecs describe live memory of this process.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    assert_eq!(n, PAGE_SIZE as isize);
    // SAFETY: pages of our mapping.
    unsafe {
        assert_eq!(m.page_ptr(5).read_volatile(), 0xeeee_eeee_eeee_eeee);
        assert_eq!(m.page_ptr(9).read_volatile(), 0xeeee_eeee_eeee_eeee);
    }
    check_all(&image, |_| true);
    assert_eq!(image.stats().pages_copied, 2);
}

#[test]
fn release_unblocks_writers_and_ends_reads() {
    let m = Arc::new(Mapping::new(32 * MIB, Thp::NoHuge));
    (0..m.pages()).for_each(|i| m.fill(i, 0));
    let image = m.freeze();
    let (tx, rx) = mpsc::channel();
    let writer = {
        let m = m.clone();
        std::thread::spawn(move || {
            (0..m.pages()).for_each(|i| m.fill(i, 2));
            tx.send(()).unwrap();
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    image.release();
    let released_at = image.stats();
    rx.recv_timeout(Duration::from_secs(10))
        .expect("writer left blocked after release");
    writer.join().unwrap();
    let mut buf = [0u8; PAGE_SIZE];
    let unavailable = Err(SourceError::Unavailable("image released".into()));
    assert_eq!(image.read_page(0, &mut buf), unavailable);
    assert_eq!(image.read_page(m.pages() as u64 - 1, &mut buf), unavailable);
    image.release(); // idempotent
    assert_eq!(image.stats().bytes_held, 0);
    eprintln!(
        "release mid-write: {} pages had been copied",
        released_at.pages_copied
    );

    // Drop without release is clean: the memory is writable afterwards.
    let image = m.freeze();
    m.fill(0, 3);
    assert_eq!(image.stats().pages_copied, 1);
    drop(image);
    let (tx, rx) = mpsc::channel();
    let m2 = m.clone();
    std::thread::spawn(move || {
        (0..m2.pages()).for_each(|i| m2.fill(i, 4));
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("writer blocked after drop");
}

#[test]
fn discarded_pages_are_unavailable_not_wrong() {
    let m = Mapping::new(MIB, Thp::NoHuge);
    (0..m.pages()).for_each(|i| m.fill(i, 0));
    let image = m.freeze();
    m.fill(1, 1); // copied aside first
                  // SAFETY: pages 1..3 of our mapping; breaks the freeze contract on purpose.
    let r = unsafe { libc::madvise(m.page_ptr(1).cast(), 2 * PAGE_SIZE, libc::MADV_DONTNEED) };
    assert_eq!(r, 0);
    m.fill(2, 1); // no fault any more: the protection went with the page
    let mut buf = [0u8; PAGE_SIZE];
    image.read_page(1, &mut buf).unwrap();
    assert!(buf == expected(1, Some(0)));
    assert_eq!(
        image.read_page(2, &mut buf),
        Err(SourceError::Discarded { index: 2 })
    );
    image.read_page(3, &mut buf).unwrap();
    assert!(buf == expected(3, Some(0)));
    assert_eq!(image.stats().lost_page_reads, 1);
}

#[test]
fn bad_input_is_an_error() {
    let m = Mapping::new(MIB, Thp::NoHuge);
    for (addr, len) in [
        (m.base + 1, PAGE_SIZE),
        (m.base, 0),
        (m.base, PAGE_SIZE + 1),
        (0, PAGE_SIZE),
        (usize::MAX & !(PAGE_SIZE - 1), 2 * PAGE_SIZE),
    ] {
        // SAFETY: freeze refuses these before touching memory.
        let r = unsafe { FrozenImage::freeze(addr as *mut u8, len) };
        assert!(
            matches!(r, Err(ImageError::Misaligned { .. })),
            "{addr:#x}+{len:#x}: {r:?}"
        );
    }
    let image = m.freeze();
    let mut buf = [0u8; PAGE_SIZE];
    assert_eq!(
        image.read_page(m.pages() as u64, &mut buf),
        Err(SourceError::OutOfRange {
            index: m.pages() as u64,
            pages: m.pages() as u64
        })
    );
}

/// First writes after a freeze copy exactly the pages written, second
/// writes do not fault again, and the image keeps the pre-write contents;
/// a sparsely touched region counts only its touched pages as populated.
/// Prints the costs too (run with --nocapture); timing is not asserted.
#[test]
fn first_writes_copy_once_and_keep_frozen_contents() {
    for thp in [Thp::NoHuge, Thp::Huge] {
        let name = if matches!(thp, Thp::Huge) {
            "THP"
        } else {
            "4K"
        };
        let m = Mapping::new(16 * MIB, thp);
        (0..m.pages()).for_each(|i| m.fill(i, 0));
        let image = m.freeze();
        let s = image.stats();
        assert_eq!(s.pages_populated_at_freeze, m.pages() as u64);
        eprintln!(
            "{name}: freeze 16 MiB all touched: protect {:?}, total {:?}",
            s.protect_duration, s.freeze_duration
        );
        let written = |i: usize| i.is_multiple_of(3);
        let n = (0..m.pages()).filter(|&i| written(i)).count();
        let started = Instant::now();
        (0..m.pages())
            .filter(|&i| written(i))
            .for_each(|i| m.write_word(i, 0, 1));
        let first = started.elapsed() / n as u32;
        let after_first = image.stats();
        assert_eq!(after_first.pages_copied, n as u64, "{name}");
        let started = Instant::now();
        (0..m.pages())
            .filter(|&i| written(i))
            .for_each(|i| m.write_word(i, 1, 1));
        let second = started.elapsed() / n as u32;
        assert_eq!(
            image.stats().wp_faults,
            after_first.wp_faults,
            "{name}: second writes faulted"
        );
        eprintln!("{name}: first write {first:?}, second {second:?} per page ({n} pages)");
        check_all(&image, |_| true);
        // SAFETY: page 3 of our mapping (written above).
        assert_eq!(unsafe { m.page_ptr(3).read_volatile() }, 1);
        image.release();
        assert_eq!(image.stats().bytes_held, 0);
    }
    for thp in [Thp::NoHuge, Thp::Huge] {
        let m = Mapping::new(64 * MIB, thp);
        (0..m.pages()).step_by(16).for_each(|i| m.fill(i, 0));
        let image = m.freeze();
        let s = image.stats();
        let touched = (m.pages() / 16) as u64;
        eprintln!(
            "freeze 64 MiB, every 16th page touched: protect {:?}, total {:?}, {} populated",
            s.protect_duration, s.freeze_duration, s.pages_populated_at_freeze
        );
        check_all(&image, |i| i.is_multiple_of(16));
        if matches!(thp, Thp::NoHuge) {
            assert_eq!(s.pages_populated_at_freeze, touched);
        } else {
            // THP may back the untouched neighbours too (they read as zeros).
            assert!(s.pages_populated_at_freeze >= touched);
        }
    }
}
