//! The guest's page allocator. A bump allocator with mark/release over the
//! heap, which records every page it currently hands out in a bitmap (one
//! bit per 4 KiB guest-physical page frame, bit `gpa / 4096`). The guest
//! tells the VMM where the bitmap is (`OP_HELLO`), so the VMM can tell which
//! pages the guest is about to overwrite (the fork avoidance heuristics).

use crate::abi::PAGE_SIZE;

/// A position of the allocator to release back to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(u64);

pub struct PageAllocator<'a> {
    bitmap: &'a mut [u64],
    /// First and one-past-last page frame of the heap.
    start: u64,
    end: u64,
    /// Next free page frame.
    top: u64,
}

/// Sets (`on`) or clears bits `from..to` of `bitmap`.
fn set_bits(bitmap: &mut [u64], from: u64, to: u64, on: bool) {
    let mut i = from;
    while i < to {
        let word = (i / 64) as usize;
        let bit = i % 64;
        let n = (64 - bit).min(to - i);
        let mask = if n == 64 {
            u64::MAX
        } else {
            ((1u64 << n) - 1) << bit
        };
        if on {
            bitmap[word] |= mask;
        } else {
            bitmap[word] &= !mask;
        }
        i += n;
    }
}

impl<'a> PageAllocator<'a> {
    /// An allocator over guest-physical `[start_gpa, end_gpa)` (rounded
    /// inwards to pages, and clipped to what the bitmap covers).
    pub fn new(bitmap: &'a mut [u64], start_gpa: u64, end_gpa: u64) -> Self {
        let covered = bitmap.len() as u64 * 64;
        let start = start_gpa.div_ceil(PAGE_SIZE).min(covered);
        let end = (end_gpa / PAGE_SIZE).clamp(start, covered);
        bitmap.fill(0);
        PageAllocator {
            bitmap,
            start,
            end,
            top: start,
        }
    }

    /// Hands out `pages` contiguous pages; their contents are whatever was
    /// there (the caller overwrites them). `None` when the heap is full.
    pub fn alloc(&mut self, pages: u64) -> Option<u64> {
        if pages == 0 || pages > self.end - self.top {
            return None;
        }
        let first = self.top;
        self.top += pages;
        set_bits(self.bitmap, first, self.top, true);
        Some(first * PAGE_SIZE)
    }

    pub fn mark(&self) -> Mark {
        Mark(self.top)
    }

    /// Returns every page handed out since `mark`.
    pub fn release(&mut self, mark: Mark) {
        if mark.0 >= self.start && mark.0 < self.top {
            set_bits(self.bitmap, mark.0, self.top, false);
            self.top = mark.0;
        }
    }

    pub fn free_pages(&self) -> u64 {
        self.end - self.top
    }

    /// Guest-physical bounds of the heap.
    pub fn heap(&self) -> (u64, u64) {
        (self.start * PAGE_SIZE, self.end * PAGE_SIZE)
    }

    /// Whether the page holding `gpa` is handed out.
    pub fn is_allocated(&self, gpa: u64) -> bool {
        let pfn = gpa / PAGE_SIZE;
        (pfn as usize / 64) < self.bitmap.len()
            && self.bitmap[pfn as usize / 64] & (1 << (pfn % 64)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_release_tracks_bitmap() {
        let mut bits = vec![0u64; 16]; // 1024 pages
        let mut a = PageAllocator::new(&mut bits, 0x1000 * 100 + 1, 0x1000 * 1000);
        assert_eq!(a.heap(), (101 * 4096, 1000 * 4096));
        let state = a.alloc(70).unwrap();
        assert_eq!(state, 101 * 4096);
        let m = a.mark();
        let scratch = a.alloc(200).unwrap();
        assert!(a.is_allocated(scratch + 199 * 4096));
        assert!(!a.is_allocated(scratch + 200 * 4096));
        a.release(m);
        assert!(!a.is_allocated(scratch));
        assert!(a.is_allocated(state + 69 * 4096));
        assert_eq!(a.alloc(1).unwrap(), scratch);
        assert!(a.alloc(10_000).is_none());
        assert!(a.alloc(0).is_none());
        let total: u32 = bits.iter().map(|w| w.count_ones()).sum();
        assert_eq!(total, 71);
    }
}
