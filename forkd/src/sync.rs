//! Locking helpers.

use std::sync::{Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Locks `m`; a panic of another holder does not poison the data for us
/// (every critical section leaves its data consistent).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Joins every thread in `threads`, also those pushed while joining.
pub fn join_all(threads: &Mutex<Vec<JoinHandle<()>>>) {
    while let Some(t) = lock(threads).pop() {
        let _ = t.join();
    }
}
