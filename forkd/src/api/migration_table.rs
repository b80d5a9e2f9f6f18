//! The registry's table of migrations, out of and into this host: one
//! record per migration (its progress, or its commit gate), bounded (the
//! finished ones beyond [`KEPT`] per direction are dropped). The handlers
//! and the worker are in `api::migration`.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::migrate::receiver::{CommitGate, ReceiveProgress};
use crate::migrate::Progress;

/// Records kept per direction (finished ones beyond this are dropped).
pub(super) const KEPT: usize = 64;

pub(super) struct OutRecord {
    pub(super) vm: String,
    pub(super) destination: String,
    pub(super) mode: String,
    pub(super) downtime_ms: u64,
    pub(super) bandwidth_mib_s: u64,
    pub(super) populated_bytes: u64,
    pub(super) progress: Progress,
}

pub(super) struct InRecord {
    pub(super) id: u64,
    pub(super) source: String,
    pub(super) vm: String,
    pub(super) gate: CommitGate,
    pub(super) progress: ReceiveProgress,
    pub(super) error: Mutex<Option<String>>,
}

/// The registry's migrations, both ways.
#[derive(Default)]
pub struct Migrations {
    pub(super) out: Mutex<BTreeMap<u64, Arc<OutRecord>>>,
    pub(super) incoming: Mutex<BTreeMap<u64, Arc<InRecord>>>,
    pub(super) next_in: AtomicU64,
}

pub(super) fn trim<T>(map: &mut BTreeMap<u64, Arc<T>>, done: impl Fn(&T) -> bool) {
    while map.len() > KEPT {
        let Some(k) = map.iter().find(|(_, v)| done(v)).map(|(k, _)| *k) else {
            return;
        };
        map.remove(&k);
    }
}
