//! Dirty-rate windows: how many distinct pages a running guest dirties per
//! second, counted over a short window of KVM's dirty log that is off
//! again afterwards ([`Vm::open_dirty_window`], [`Vm::close_dirty_window`]).
//!
//! While the log watches a page, the guest's first write to it traps (on
//! shadow paging, and again after the window for a page it protected and
//! the guest writes only later). So a window watches a sample: where KVM
//! has manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
//! with `INITIALLY_SET`: turning the log on protects nothing), only one
//! page in `one_in`, chosen by a hash with a fresh seed per window, is
//! cleared and write-protected (`KVM_CLEAR_DIRTY_LOG`), and the count is
//! scaled up; without it every page is watched.
//!
//! Dirty tracking ([`Vm::start_dirty_log`]: a migration) owns the log: it
//! takes over an open window (which then counts nothing), and no window
//! opens while it is on. Manual protection, once chosen for a VM (at its
//! first window or tracking), stays; the tracker's reads clear what they
//! return, so its semantics are the same either way.

use crate::vmm::dirty::{from_kvm_words, or_into, set_slot_flags, DirtyError};
use crate::vmm::dirty_log_state::{log_state, LogState, LogUse};
use crate::vmm::vm::Vm;
use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_MEM_LOG_DIRTY_PAGES,
};
use std::time::{Duration, Instant};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// What a window saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DirtyWindow {
    /// Distinct pages written (by the guest or the VMM) in the window:
    /// counted, or estimated from the watched sample.
    pub pages: u64,
    /// Pages the window watched (all of memory without a sample).
    pub watched: u64,
    pub elapsed: Duration,
}

impl DirtyWindow {
    /// Distinct pages dirtied per second of the window. A page written
    /// twice counts once.
    pub fn pages_per_s(&self) -> f64 {
        self.pages as f64 / self.elapsed.as_secs_f64().max(1e-3)
    }
}

/// One page in `one_in` (at least one page), by a hash of the page number
/// and `seed`, as KVM bitmap words for `pages` pages.
pub fn sample_words(pages: usize, one_in: u32, seed: u64) -> Vec<u64> {
    let one_in = u64::from(one_in.max(1));
    let mut words = vec![0u64; pages.div_ceil(64)];
    let mut any = false;
    for p in 0..pages {
        let mut x = (p as u64) ^ seed;
        // splitmix64's finalizer.
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d049bb133111eb);
        x ^= x >> 31;
        if x.is_multiple_of(one_in) {
            words[p / 64] |= 1 << (p % 64);
            any = true;
        }
    }
    if !any && pages > 0 {
        words[0] |= 1;
    }
    words
}

/// The estimate of a window: `hits` of `watched` pages dirty, out of
/// `total`.
fn scaled(hits: u64, watched: u64, total: u64) -> u64 {
    if watched == 0 || watched >= total {
        return hits;
    }
    ((hits as u128 * total as u128 + watched as u128 / 2) / watched as u128) as u64
}

impl Vm {
    /// Manual protection for this VM, decided once (the log is off here).
    pub(crate) fn decide_log_mode(&self, st: &mut LogState) {
        if st.manual.is_some() {
            return;
        }
        let want = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET;
        let have = self
            .vm_fd()
            .check_extension_raw(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
        let mut on = false;
        if have > 0 && (have as u32) & want == want {
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(want);
            on = self.vm_fd().enable_cap(&cap).is_ok();
        }
        st.manual = Some(on);
    }

    /// Clears (and write-protects) the pages set in `words`.
    pub(crate) fn clear_dirty_log(&self, words: &[u64]) -> Result<(), DirtyError> {
        let mut bits = words.to_vec();
        let arg = kvm_clear_dirty_log {
            slot: 0,
            num_pages: self.mem_pages() as u32,
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: bits.as_mut_ptr().cast(),
            },
        };
        // SAFETY: a KVM VM fd; `arg` points at `bits`, one bit per page of
        // slot 0 (`num_pages` of them, rounded up to whole words), alive
        // for the call; the kernel only reads it.
        let rc = unsafe { ioctl_with_ref(self.vm_fd(), KVM_CLEAR_DIRTY_LOG(), &arg) };
        if rc < 0 {
            return Err(DirtyError::Ioctl {
                op: "KVM_CLEAR_DIRTY_LOG",
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(())
    }

    /// Who has the dirty log on now.
    pub fn dirty_log_use(&self) -> LogUse {
        log_state(&self.dirty_use).using
    }

    /// Whether windows watch a sample (manual protection), once decided.
    pub fn dirty_log_manual(&self) -> Option<bool> {
        log_state(&self.dirty_use).manual
    }

    /// Opens a dirty-rate window watching one page in `one_in` (1: every
    /// page; without manual protection always every page). `false`
    /// (nothing done) while dirty tracking owns the log or a window is
    /// open.
    pub fn open_dirty_window(&self, one_in: u32) -> Result<bool, DirtyError> {
        let mut st = log_state(&self.dirty_use);
        if st.using != LogUse::Off {
            return Ok(false);
        }
        self.decide_log_mode(&mut st);
        let manual = st.manual == Some(true);
        let pages = self.mem_pages();
        self.vmm_writes().start(pages);
        let subset = manual.then(|| {
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            sample_words(pages, one_in, seed)
        });
        let on = set_slot_flags(self, KVM_MEM_LOG_DIRTY_PAGES).and_then(|()| match &subset {
            // The log is initially all set and protects nothing: watch the
            // sample only.
            Some(words) => self.clear_dirty_log(words),
            None => self.dirty_log_words().map(drop),
        });
        if let Err(e) = on {
            self.vmm_writes().stop();
            let _ = set_slot_flags(self, 0);
            return Err(e);
        }
        st.using = LogUse::Window(Instant::now());
        st.subset = subset;
        Ok(true)
    }

    /// Closes the open window: the pages dirtied since it opened, and the
    /// log off again. `None` (nothing touched) when no window is open —
    /// never opened, or dirty tracking took the log over meanwhile.
    pub fn close_dirty_window(&self) -> Result<Option<DirtyWindow>, DirtyError> {
        let mut st = log_state(&self.dirty_use);
        let LogUse::Window(since) = st.using else {
            return Ok(None);
        };
        // Whatever fails below, the window is over.
        st.using = LogUse::Off;
        let subset = st.subset.take();
        let elapsed = since.elapsed();
        let kvm = self.dirty_log_words();
        let vmm = self.vmm_writes().take();
        self.vmm_writes().stop();
        let off = set_slot_flags(self, 0);
        let pages = self.mem_pages();
        let mut bits = from_kvm_words(&kvm?, pages);
        off?;
        if let Some(v) = vmm {
            or_into(&mut bits, &v);
        }
        let total = pages as u64;
        let (hits, watched) = match &subset {
            Some(words) => {
                let watch = from_kvm_words(words, pages);
                let hits = bits
                    .as_raw_slice()
                    .iter()
                    .zip(watch.as_raw_slice())
                    .map(|(d, w)| (d & w).count_ones() as u64)
                    .sum();
                (hits, watch.count_ones() as u64)
            }
            None => (bits.count_ones() as u64, total),
        };
        Ok(Some(DirtyWindow {
            pages: scaled(hits, watched, total),
            watched,
            elapsed,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_watch_about_one_page_in_n() {
        let pages = 131_072; // 512 MiB
        for n in [1u32, 2, 8, 64] {
            let w = sample_words(pages, n, 42);
            let c: u64 = w.iter().map(|x| x.count_ones() as u64).sum();
            let want = pages as f64 / n as f64;
            assert!((c as f64 - want).abs() < want * 0.05 + 1.0, "1 in {n}: {c}");
        }
        // A fresh seed watches other pages.
        assert_ne!(sample_words(4096, 8, 1), sample_words(4096, 8, 2));
        // Never nothing, never past the end.
        assert_eq!(sample_words(1, 1_000_000, 7), vec![1]);
        let w = sample_words(70, 1, 3);
        assert_eq!((w.len(), w[1]), (2, (1 << 6) - 1));
    }

    #[test]
    fn estimates_scale_the_sample() {
        assert_eq!(scaled(10, 100, 800), 80);
        assert_eq!(scaled(0, 100, 800), 0);
        assert_eq!(scaled(7, 800, 800), 7);
        assert_eq!(scaled(3, 0, 800), 3);
    }
}
