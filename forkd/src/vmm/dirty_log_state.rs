//! Who has a VM's KVM dirty log on: nobody, a dirty-rate window
//! ([`crate::vmm::dirty_window`]) or a migration's tracking
//! ([`crate::vmm::dirty`]). Kept by the VM; a leaf of `vmm`.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

/// Who has a VM's dirty log on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogUse {
    #[default]
    Off,
    /// A dirty-rate window, open since then.
    Window(Instant),
    /// Dirty tracking (a migration) owns the log.
    Tracking,
}

/// A VM's dirty-log state (behind one lock in the VM).
#[derive(Debug, Default)]
pub struct LogState {
    pub(crate) using: LogUse,
    /// Manual protection: decided at the first use, `None` before.
    pub(crate) manual: Option<bool>,
    /// The open window's watched pages (KVM bitmap words); `None`: all.
    pub(crate) subset: Option<Vec<u64>>,
}

pub(crate) fn log_state(m: &Mutex<LogState>) -> MutexGuard<'_, LogState> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
