//! A running VM lent by the thread that watches it (a hosted clone's
//! reaper) to a migration worker, and what comes back: the VM (the
//! migration did not commit: the reaper watches it again) or the news that
//! it moved to another host (the reaper ends).
//!
//! ```text
//!  worker                         reaper (watching the VM)
//!  borrow(): request ──────────▶  sees the request within a slice,
//!                                 stops watching (the guest runs on)
//!         ◀────────── (VM, back)  lend()
//!  migrate …
//!  Answer::give_back(vm) ─────▶   watches it again
//!  Answer::moved(host)   ─────▶   records the move, ends
//! ```
//!
//! Nothing is lost on either side: a worker that gave up waiting leaves
//! the VM with the reaper (the hand-over fails and the reaper keeps it),
//! and an [`Answer`] dropped unsaid tells the reaper the VM is gone.

use crate::sync::lock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the VM is lent out already")]
    Busy,
    #[error("the VM's watcher did not hand it over within {0:?} (it may have ended)")]
    Timeout(Duration),
    #[error("the VM has ended")]
    Ended,
}

/// What the borrower did with the VM.
pub enum Returned<T> {
    /// Not migrated: the VM runs here again.
    Back(T),
    /// Migrated to this host; the VM here is destroyed.
    Moved(String),
    /// The answer was dropped unsaid (the worker failed).
    Lost,
}

type Handed<T> = (T, SyncSender<Returned<T>>);

/// The reaper's side: where a borrower's request waits.
pub struct Lender<T> {
    requested: AtomicBool,
    request: Mutex<Option<SyncSender<Handed<T>>>>,
}

impl<T> Default for Lender<T> {
    fn default() -> Self {
        Lender {
            requested: AtomicBool::new(false),
            request: Mutex::new(None),
        }
    }
}

/// The answer a borrower owes once it has dealt with the VM; dropped
/// without one, it tells the reaper the VM is lost.
pub struct Answer<T> {
    back: Option<SyncSender<Returned<T>>>,
}

impl<T> Answer<T> {
    pub fn give_back(mut self, vm: T) {
        self.say(Returned::Back(vm));
    }

    pub fn moved(mut self, host: String) {
        self.say(Returned::Moved(host));
    }

    /// Once: a reaper that is gone (its family dropped) drops it.
    fn say(&mut self, r: Returned<T>) {
        if let Some(tx) = self.back.take() {
            let _ = tx.send(r);
        }
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        self.say(Returned::Lost);
    }
}

impl<T> Lender<T> {
    /// Whether a borrower waits (cheap: the reaper asks every slice).
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Asks the reaper for the VM and waits up to `timeout` for it.
    /// `alive` says whether the reaper still watches a running VM.
    pub fn borrow(
        &self,
        timeout: Duration,
        alive: impl Fn() -> bool,
    ) -> Result<(T, Answer<T>), HandoverError> {
        let (tx, rx): (SyncSender<Handed<T>>, Receiver<Handed<T>>) = sync_channel(1);
        {
            let mut slot = lock(&self.request);
            if slot.is_some() {
                return Err(HandoverError::Busy);
            }
            *slot = Some(tx);
            self.requested.store(true, Ordering::Release);
        }
        let step = Duration::from_millis(20);
        let mut waited = Duration::ZERO;
        let got = loop {
            match rx.recv_timeout(step) {
                Ok(h) => break Ok(h),
                Err(RecvTimeoutError::Disconnected) => break Err(HandoverError::Ended),
                Err(RecvTimeoutError::Timeout) => {
                    waited += step;
                    if !alive() {
                        break Err(HandoverError::Ended);
                    }
                    if waited >= timeout {
                        break Err(HandoverError::Timeout(timeout));
                    }
                }
            }
        };
        // Withdraw the request (the reaper may have taken it already).
        lock(&self.request).take();
        self.requested.store(false, Ordering::Release);
        match got {
            Ok((vm, back)) => Ok((vm, Answer { back: Some(back) })),
            Err(e) => {
                // Handed over just as we gave up: it is ours after all.
                if let Ok((vm, back)) = rx.try_recv() {
                    return Ok((vm, Answer { back: Some(back) }));
                }
                Err(e)
            }
        }
    }

    /// The reaper's side: hands `vm` to the waiting borrower and blocks
    /// until it answers. `Err(vm)`: nobody was waiting any more; the
    /// reaper keeps the VM.
    pub fn lend(&self, vm: T) -> Result<Returned<T>, T> {
        let Some(tx) = lock(&self.request).take() else {
            self.requested.store(false, Ordering::Release);
            return Err(vm);
        };
        self.requested.store(false, Ordering::Release);
        let (back_tx, back_rx) = sync_channel(1);
        match tx.send((vm, back_tx)) {
            Ok(()) => Ok(back_rx.recv().unwrap_or(Returned::Lost)),
            Err(e) => Err(e.0 .0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A reaper stand-in: lends its "VM" when asked, once.
    fn reaper(l: Arc<Lender<String>>) -> std::thread::JoinHandle<Option<Returned<String>>> {
        std::thread::spawn(move || {
            for _ in 0..200 {
                if l.requested() {
                    return l.lend("vm".to_owned()).ok();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            None
        })
    }

    #[test]
    fn lent_and_given_back_or_moved() {
        let l = Arc::new(Lender::default());
        let r = reaper(l.clone());
        let (vm, answer) = l.borrow(Duration::from_secs(2), || true).expect("lent");
        assert_eq!(vm, "vm");
        answer.give_back(vm);
        assert!(matches!(r.join().unwrap(), Some(Returned::Back(v)) if v == "vm"));

        let r = reaper(l.clone());
        let (_vm, answer) = l.borrow(Duration::from_secs(2), || true).expect("lent");
        answer.moved("h3".into());
        assert!(matches!(r.join().unwrap(), Some(Returned::Moved(h)) if h == "h3"));

        let r = reaper(l.clone());
        let (_vm, answer) = l.borrow(Duration::from_secs(2), || true).expect("lent");
        drop(answer);
        assert!(matches!(r.join().unwrap(), Some(Returned::Lost)));
    }

    #[test]
    fn nobody_lends_in_time_and_the_reaper_keeps_it() {
        let l: Lender<String> = Lender::default();
        let e = l.borrow(Duration::from_millis(60), || true);
        assert!(matches!(e, Err(HandoverError::Timeout(_))));
        assert!(!l.requested(), "the request is withdrawn");
        // A reaper that looks only now keeps its VM.
        assert_eq!(l.lend("vm".into()).err().as_deref(), Some("vm"));
        let e = l.borrow(Duration::from_secs(5), || false);
        assert!(matches!(e, Err(HandoverError::Ended)));
    }
}
