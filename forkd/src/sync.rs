//! Locking helpers.

use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Locks `m`; a panic of another holder does not poison the data for us
/// (every critical section leaves its data consistent).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Joins every thread in `threads`, also those pushed while joining. The
/// lock is held only to pop: a thread being joined may itself push (a
/// family's launcher registers the clone reapers it starts), and holding
/// it across the join deadlocked a DELETE that came while a fork's clones
/// were still starting. (The guard of a `while let` scrutinee lives until
/// the end of the loop body, hence the separate `let`.)
pub fn join_all(threads: &Mutex<Vec<JoinHandle<()>>>) {
    loop {
        let next = lock(threads).pop();
        let Some(t) = next else {
            return;
        };
        let _ = t.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    /// A thread that registers another one while it is being joined (as a
    /// family's launcher does): join_all joins both and does not deadlock.
    #[test]
    fn join_all_lets_joined_threads_push() {
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let t2 = threads.clone();
        let launcher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let reaper = std::thread::spawn(|| std::thread::sleep(Duration::from_millis(20)));
            lock(&t2).push(reaper);
        });
        lock(&threads).push(launcher);
        let (tx, rx) = std::sync::mpsc::channel();
        let t3 = threads.clone();
        std::thread::spawn(move || {
            join_all(&t3);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("join_all deadlocked");
        assert!(lock(&threads).is_empty());
    }
}
