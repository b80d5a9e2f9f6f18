//! A vCPU thread's CPU time, readable from any thread: the thread's POSIX
//! CPU clock (`pthread_getcpuclockid`), which counts the time it ran —
//! guest code in KVM_RUN and the VMM's exit handling — and not the time
//! it slept (paused, or `OP_SLEEP`). The thread retires the clock under
//! the lock before it ends, so a reader never reads a clock whose thread
//! id was reused.

use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct CpuClock {
    /// The running thread's clock, and the time last read or retired.
    inner: Mutex<(Option<libc::clockid_t>, Duration)>,
}

fn read(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out pointer; an invalid clock id is an
    // error return (EINVAL), not undefined behaviour.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

impl CpuClock {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Option<libc::clockid_t>, Duration)> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Called by the thread itself when it starts.
    pub fn attach_current_thread(&self) {
        let mut id: libc::clockid_t = 0;
        // SAFETY: pthread_self() is this live thread; `id` is a valid out
        // pointer.
        let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
        if rc == 0 {
            self.lock().0 = Some(id);
        }
    }

    /// Called by the thread itself before it ends: the final time stays.
    pub fn retire(&self) {
        let mut g = self.lock();
        if let Some(t) = g.0.take().and_then(read) {
            g.1 = t;
        }
    }

    /// CPU time the thread has used so far (all of it, once it ended).
    pub fn time(&self) -> Duration {
        let mut g = self.lock();
        if let Some(t) = g.0.and_then(read) {
            g.1 = t;
        }
        g.1
    }
}

/// The CPU time of several threads (a VM's vCPUs) so far.
pub fn total(clocks: &[std::sync::Arc<CpuClock>]) -> Duration {
    clocks.iter().map(|c| c.time()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_running_not_sleeping_and_survives_the_thread() {
        let c = Arc::new(CpuClock::default());
        let c2 = c.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            c2.attach_current_thread();
            let start = std::time::Instant::now();
            let mut x = 0u64;
            while start.elapsed() < Duration::from_millis(60) {
                x = x.wrapping_mul(31).wrapping_add(1);
            }
            std::hint::black_box(x);
            tx.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            c2.retire();
        });
        rx.recv().unwrap();
        let busy = c.time();
        assert!(busy >= Duration::from_millis(20), "{busy:?}");
        t.join().unwrap();
        let end = c.time();
        // The sleep added (almost) nothing.
        assert!(
            end >= busy && end < busy + Duration::from_millis(40),
            "{busy:?} {end:?}"
        );
    }
}
