//! Locking helpers.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`; a panic of another holder does not poison the data for us
/// (every critical section leaves its data consistent).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
