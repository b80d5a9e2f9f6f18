//! Page bitmaps (`bitvec`, bit i = page i of guest memory), the page-range
//! tables made from them, and [`VmmWrites`]: the pages the VMM itself
//! wrote through its own mapping while tracking is on. Pure data: the
//! dirty log that fills them is `vmm::dirty`.

use bitvec::prelude::{BitVec, Lsb0};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const PAGE_SIZE: u64 = 4096;

/// One bit per 4 KiB page of guest memory.
pub type PageBitmap = BitVec<u64, Lsb0>;

/// `count` pages from page `first`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PageRange {
    pub first: u64,
    pub count: u64,
}

impl PageRange {
    pub fn gpa(&self) -> u64 {
        self.first * PAGE_SIZE
    }

    pub fn bytes(&self) -> u64 {
        self.count * PAGE_SIZE
    }
}

/// The runs of set bits of `bits`, in order. Works a word at a time
/// (zero words skipped, runs found with trailing-zero counts), so a mostly
/// clean bitmap of a large guest costs little even unoptimized.
pub fn ranges(bits: &PageBitmap) -> Vec<PageRange> {
    let len = bits.len() as u64;
    let mut out: Vec<PageRange> = Vec::new();
    let mut push = |first: u64, count: u64| match out.last_mut() {
        Some(last) if last.first + last.count == first => last.count += count,
        _ => out.push(PageRange { first, count }),
    };
    for (w, &word) in bits.as_raw_slice().iter().enumerate() {
        let base = w as u64 * 64;
        if base >= len {
            break;
        }
        // Bits past the end are not the bitmap's.
        let mut word = if len - base < 64 {
            word & ((1u64 << (len - base)) - 1)
        } else {
            word
        };
        while word != 0 {
            let start = word.trailing_zeros() as u64;
            let run = (!(word >> start)).trailing_zeros() as u64;
            push(base + start, run);
            word = if start + run >= 64 {
                0
            } else {
                word & !(((1u64 << run) - 1) << start)
            };
        }
    }
    out
}

/// `into |= other`, a word at a time (the shorter length wins).
pub fn or_into(into: &mut PageBitmap, other: &PageBitmap) {
    for (a, b) in into.as_raw_mut_slice().iter_mut().zip(other.as_raw_slice()) {
        *a |= *b;
    }
}

/// Splits ranges so that none is longer than `max` pages (a message's
/// bound); `max` of 0 is taken as 1.
pub fn split(ranges: &[PageRange], max: u64) -> Vec<PageRange> {
    let max = max.max(1);
    let mut out = Vec::with_capacity(ranges.len());
    for r in ranges {
        let mut first = r.first;
        let end = r.first + r.count;
        while first < end {
            let count = (end - first).min(max);
            out.push(PageRange { first, count });
            first += count;
        }
    }
    out
}

/// A bitmap of `pages` pages from KVM's words (bit i of word w = page
/// 64w + i); bits past `pages` are dropped.
pub fn from_kvm_words(words: &[u64], pages: usize) -> PageBitmap {
    let mut bits = PageBitmap::from_vec(words.to_vec());
    bits.resize(pages, false);
    bits
}

/// Pages the VMM wrote itself while tracking is on. Cheap to clone (one
/// shared bitmap); recording costs an atomic load when tracking is off.
#[derive(Debug, Clone, Default)]
pub struct VmmWrites {
    on: Arc<AtomicBool>,
    pages: Arc<Mutex<PageBitmap>>,
}

impl VmmWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, PageBitmap> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts recording, for a guest of `pages` pages.
    pub fn start(&self, pages: usize) {
        *self.lock() = PageBitmap::repeat(false, pages);
        self.on.store(true, Ordering::Release);
    }

    pub fn stop(&self) {
        self.on.store(false, Ordering::Release);
        *self.lock() = PageBitmap::new();
    }

    /// The VMM wrote `len` bytes at `gpa`.
    pub fn record(&self, gpa: u64, len: u64) {
        if !self.on.load(Ordering::Acquire) || len == 0 {
            return;
        }
        let mut pages = self.lock();
        let first = (gpa / PAGE_SIZE) as usize;
        let end = (gpa.saturating_add(len).div_ceil(PAGE_SIZE) as usize).min(pages.len());
        if first < end {
            pages[first..end].fill(true);
        }
    }

    /// What was recorded since the last take; the record starts over.
    pub fn take(&self) -> Option<PageBitmap> {
        if !self.on.load(Ordering::Acquire) {
            return None;
        }
        let mut pages = self.lock();
        let len = pages.len();
        Some(std::mem::replace(
            &mut *pages,
            PageBitmap::repeat(false, len),
        ))
    }
}
