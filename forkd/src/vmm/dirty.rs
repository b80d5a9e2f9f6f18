//! Dirty page tracking: which 4 KiB pages of guest memory changed since the
//! last look. Two sources are OR'd together:
//!
//! - KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` on slot 0, read and reset
//!   with `KVM_GET_DIRTY_LOG`): every page the *guest* wrote;
//! - [`VmmWrites`]: every page the *VMM* wrote through its own mapping
//!   (the hypercall device's answers), which KVM never sees.
//!
//! Bitmaps are `bitvec` ([`PageBitmap`], bit i = page i) and become page
//! range tables ([`ranges`]) for whoever copies the pages (the migration
//! layer). Populated pages ([`populated_pages`], from pagemap) tell what a
//! first full copy must carry: a MAP_NORESERVE page never touched is zero.
//!
//! A dirty-rate sampler counts the pages dirtied over a short window
//! ([`crate::vmm::dirty_window`]); dirty tracking ([`Vm::start_dirty_log`],
//! a migration) owns the log and takes over an open window.

use crate::vmm::memory::{self, GuestMemory};
use crate::vmm::vm::Vm;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use std::io;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vmm::dirty_log_state::log_state;
pub use crate::vmm::dirty_log_state::{LogState, LogUse};
pub use crate::vmm::page_bitmap::{
    from_kvm_words, or_into, ranges, split, PageBitmap, PageRange, VmmWrites, PAGE_SIZE,
};

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("{op} failed: {source}")]
    Ioctl {
        op: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    #[error("dirty tracking is not on for this VM")]
    NotTracking,
    #[error("guest memory has no region")]
    NoRegion,
    #[error("cannot read the populated pages (pagemap)")]
    Pagemap(#[source] io::Error),
}

/// Which pages of guest memory a first full copy must carry: pages in RAM
/// or swap (pagemap). A file-backed (lazily restored) guest's untouched
/// pages are its file's content, so there every page counts.
pub fn populated_pages(mem: &GuestMemory) -> Result<PageBitmap, DirtyError> {
    let region = mem.iter().next().ok_or(DirtyError::NoRegion)?;
    let pages = (region.len() / PAGE_SIZE) as usize;
    if region.file_offset().is_some() {
        return Ok(PageBitmap::repeat(true, pages));
    }
    let mut out = PageBitmap::repeat(false, pages);
    let pagemap = std::fs::File::open("/proc/self/pagemap").map_err(DirtyError::Pagemap)?;
    // 2 MiB at a time: 4 KiB of pagemap per read.
    const STEP: usize = 512;
    let (mut raw, mut chunk) = (Vec::new(), vec![false; STEP]);
    let base = region.as_ptr() as usize;
    let mut first = 0;
    while first < pages {
        let n = STEP.min(pages - first);
        chunk.resize(n, false);
        memory::populated(
            &pagemap,
            base + first * PAGE_SIZE as usize,
            &mut raw,
            &mut chunk,
        )
        .map_err(DirtyError::Pagemap)?;
        // STEP is a multiple of 64: whole words of the bitmap.
        let words = &mut out.as_raw_mut_slice()[first / 64..];
        for (i, p) in chunk.iter().enumerate() {
            if *p {
                words[i / 64] |= 1 << (i % 64);
            }
        }
        first += n;
    }
    Ok(out)
}

pub(crate) fn set_slot_flags(vm: &Vm, flags: u32) -> Result<(), DirtyError> {
    let mem = vm.memory();
    let region = mem.iter().next().ok_or(DirtyError::NoRegion)?;
    let r = kvm_userspace_memory_region {
        slot: 0,
        flags,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the same live mapping slot 0 was registered with (owned by
    // the VM, which outlives its VM fd's use of it); only the flags change.
    unsafe { vm.vm_fd().set_user_memory_region(r) }.map_err(|source| DirtyError::Ioctl {
        op: "KVM_SET_USER_MEMORY_REGION (dirty log)",
        source,
    })
}

impl Vm {
    /// Pages of guest memory (4 KiB).
    pub fn mem_pages(&self) -> usize {
        (self.mem_bytes() / PAGE_SIZE) as usize
    }

    /// Turns dirty tracking on: KVM logs the guest's writes to slot 0 and
    /// the VMM records its own. The log starts empty.
    /// An open dirty-rate window is taken over (it counts nothing).
    pub fn start_dirty_log(&self) -> Result<(), DirtyError> {
        let mut st = log_state(&self.dirty_use);
        self.decide_log_mode(&mut st);
        st.using = LogUse::Tracking;
        st.subset = None;
        self.vmm_writes().start(self.mem_pages());
        set_slot_flags(self, KVM_MEM_LOG_DIRTY_PAGES)?;
        // Empty: every page protected and clear (with manual protection,
        // the initially set log is read and cleared).
        self.dirty_log_kvm(st.manual == Some(true)).map(drop)
    }

    /// Turns dirty tracking off again.
    pub fn stop_dirty_log(&self) -> Result<(), DirtyError> {
        let mut st = log_state(&self.dirty_use);
        st.using = LogUse::Off;
        self.vmm_writes().stop();
        set_slot_flags(self, 0)
    }

    /// KVM's log of slot 0 since the last read; with manual protection
    /// (`manual`) the pages read are cleared and write-protected again, as
    /// `KVM_GET_DIRTY_LOG` does by itself otherwise.
    pub(crate) fn dirty_log_kvm(&self, manual: bool) -> Result<PageBitmap, DirtyError> {
        let words = self.dirty_log_words()?;
        if manual {
            self.clear_dirty_log(&words)?;
        }
        Ok(from_kvm_words(&words, self.mem_pages()))
    }

    pub(crate) fn dirty_log_words(&self) -> Result<Vec<u64>, DirtyError> {
        let bytes = self.mem_bytes() as usize;
        self.vm_fd()
            .get_dirty_log(0, bytes)
            .map_err(|source| DirtyError::Ioctl {
                op: "KVM_GET_DIRTY_LOG",
                source,
            })
    }

    /// Pages written (by the guest or the VMM) since tracking started or
    /// since the last call; the log starts over.
    pub fn dirty_pages(&self) -> Result<PageBitmap, DirtyError> {
        let manual = log_state(&self.dirty_use).manual == Some(true);
        let vmm = self.vmm_writes().take().ok_or(DirtyError::NotTracking)?;
        let mut bits = self.dirty_log_kvm(manual)?;
        or_into(&mut bits, &vmm);
        Ok(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> PageBitmap {
        s.chars().map(|c| c == '1').collect()
    }

    #[test]
    fn bitmap_to_ranges() {
        assert_eq!(ranges(&bits("")), vec![]);
        assert_eq!(ranges(&bits("0000")), vec![]);
        assert_eq!(
            ranges(&bits("1111")),
            vec![PageRange { first: 0, count: 4 }]
        );
        assert_eq!(
            ranges(&bits("0110011101")),
            vec![
                PageRange { first: 1, count: 2 },
                PageRange { first: 5, count: 3 },
                PageRange { first: 9, count: 1 },
            ]
        );
        // Across word boundaries.
        let mut b = PageBitmap::repeat(false, 200);
        b[60..70].fill(true);
        b[127..129].fill(true);
        b.set(199, true);
        assert_eq!(
            ranges(&b),
            vec![
                PageRange {
                    first: 60,
                    count: 10
                },
                PageRange {
                    first: 127,
                    count: 2
                },
                PageRange {
                    first: 199,
                    count: 1
                },
            ]
        );
    }

    #[test]
    fn ranges_match_a_bit_by_bit_scan() {
        let mut seed = 7u64;
        for len in [0usize, 1, 63, 64, 65, 127, 128, 129, 1000] {
            let mut b = PageBitmap::repeat(false, len);
            for i in 0..len {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                b.set(i, (seed >> 61) < 3);
            }
            let mut slow = Vec::new();
            let mut run: Option<u64> = None;
            for (i, bit) in b.iter().by_vals().chain([false]).enumerate() {
                match (bit, run) {
                    (true, None) => run = Some(i as u64),
                    (false, Some(s)) => {
                        slow.push(PageRange {
                            first: s,
                            count: i as u64 - s,
                        });
                        run = None;
                    }
                    _ => {}
                }
            }
            assert_eq!(ranges(&b), slow, "len {len}");
        }
        // Garbage past the end of the last word is ignored.
        let mut b = PageBitmap::from_vec(vec![u64::MAX]);
        b.truncate(3);
        assert_eq!(ranges(&b), vec![PageRange { first: 0, count: 3 }]);
        let mut a = PageBitmap::repeat(false, 130);
        a.set(1, true);
        let mut c = PageBitmap::repeat(false, 130);
        c.set(129, true);
        or_into(&mut a, &c);
        assert_eq!(a.count_ones(), 2);
    }

    #[test]
    fn split_bounds_ranges() {
        let r = [PageRange { first: 3, count: 5 }];
        assert_eq!(
            split(&r, 2),
            vec![
                PageRange { first: 3, count: 2 },
                PageRange { first: 5, count: 2 },
                PageRange { first: 7, count: 1 },
            ]
        );
        assert_eq!(split(&r, 0).len(), 5);
    }

    #[test]
    fn kvm_words_become_pages() {
        let b = from_kvm_words(&[0b101, 1 << 63, u64::MAX], 130);
        assert_eq!(b.len(), 130);
        assert_eq!(
            ranges(&b),
            vec![
                PageRange { first: 0, count: 1 },
                PageRange { first: 2, count: 1 },
                PageRange {
                    first: 127,
                    count: 3
                },
            ]
        );
    }

    #[test]
    fn vmm_writes_only_while_on() {
        let w = VmmWrites::default();
        w.record(0x1000, 8);
        assert!(w.take().is_none());
        w.start(16);
        w.record(0x1ff8, 16); // pages 1 and 2
        w.record(0xf000, 1 << 20); // clipped at the end
        let t = w.take().unwrap();
        assert_eq!(
            ranges(&t),
            vec![
                PageRange { first: 1, count: 2 },
                PageRange {
                    first: 15,
                    count: 1
                }
            ]
        );
        assert!(ranges(&w.take().unwrap()).is_empty());
        w.stop();
        assert!(w.take().is_none());
    }

    #[test]
    fn populated_pages_of_anonymous_memory() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = memory::anonymous(8 << 20).unwrap();
        mem.write_slice(&[1u8; 8], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[1u8; 8], GuestAddress(0x7ff000)).unwrap();
        let p = populated_pages(&mem).unwrap();
        assert_eq!(p.len(), 2048);
        assert!(p[3] && p[2047]);
        // THP may populate neighbours; untouched far pages stay clear.
        assert!(p.count_ones() < 2048);
    }
}
