//! The page source of a family while its parent is being frozen. It is
//! registered with the memory server before the freeze, so the clones can
//! be built — and even start — while the parent's memory is still being
//! write-protected; a read waits until the frozen image is there.

use memserver::image::FrozenImage;
use memserver::{PageSource, SourceError, PAGE_SIZE};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a read waits for the freeze (which takes milliseconds).
const WAIT: Duration = Duration::from_secs(10);

enum Slot {
    Waiting,
    Ready(Arc<FrozenImage>),
    Gone(String),
}

pub struct PendingImage {
    pages: u64,
    slot: Mutex<Slot>,
    ready: Condvar,
}

impl PendingImage {
    pub fn new(pages: u64) -> Self {
        PendingImage {
            pages,
            slot: Mutex::new(Slot::Waiting),
            ready: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        crate::sync::lock(&self.slot)
    }

    /// The freeze is done: serve from `image`.
    pub fn set(&self, image: Arc<FrozenImage>) {
        *self.lock() = Slot::Ready(image);
        self.ready.notify_all();
    }

    /// The freeze failed, or the family is over: reads fail with `why`.
    pub fn fail(&self, why: &str) {
        let old = std::mem::replace(&mut *self.lock(), Slot::Gone(why.to_string()));
        if let Slot::Ready(image) = old {
            image.release();
        }
        self.ready.notify_all();
    }

    /// The frozen image, once there.
    pub fn image(&self) -> Option<Arc<FrozenImage>> {
        match &*self.lock() {
            Slot::Ready(i) => Some(i.clone()),
            _ => None,
        }
    }

    fn wait(&self) -> Result<Arc<FrozenImage>, SourceError> {
        let deadline = Instant::now() + WAIT;
        let mut slot = self.lock();
        loop {
            match &*slot {
                Slot::Ready(i) => return Ok(i.clone()),
                Slot::Gone(why) => return Err(SourceError::Unavailable(why.clone())),
                Slot::Waiting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(SourceError::Unavailable(
                    "the parent's memory was not frozen in time".into(),
                ));
            }
            slot = match self.ready.wait_timeout(slot, deadline - now) {
                Ok((s, _)) => s,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

impl PageSource for PendingImage {
    fn pages(&self) -> u64 {
        self.pages
    }

    fn read_page(&self, index: u64, buf: &mut [u8; PAGE_SIZE]) -> Result<(), SourceError> {
        self.wait()?.read_page(index, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn reads_wait_for_the_freeze_then_fail_once_gone() {
        let mem = memory::anonymous(2 << 20).unwrap();
        mem.write_slice(&[7u8; 16], GuestAddress(3 * 4096)).unwrap();
        let pending = Arc::new(PendingImage::new(512));
        let region = mem.iter().next().unwrap();
        let (base, len) = (region.as_ptr() as usize, region.len() as usize);
        let setter = {
            let pending = pending.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                // SAFETY: `mem` outlives the image: it is failed (released)
                // below before `mem` is dropped, and nothing else registers
                // this mapping with userfaultfd.
                let image = unsafe { FrozenImage::freeze(base as *mut u8, len) }.unwrap();
                pending.set(image);
            })
        };
        let t = Instant::now();
        let mut buf = [0u8; PAGE_SIZE];
        pending.read_page(3, &mut buf).unwrap();
        assert!(t.elapsed() >= Duration::from_millis(20), "did not wait");
        assert_eq!(&buf[..16], &[7u8; 16]);
        setter.join().unwrap();
        pending.fail("family over");
        assert_eq!(
            pending.read_page(3, &mut buf),
            Err(SourceError::Unavailable("family over".into()))
        );
        drop(mem);
    }
}
