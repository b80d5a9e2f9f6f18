//! VM ids (`vm-N`): unique across a cluster, so a VM keeps its id when it
//! migrates.
//!
//! A daemon without peers counts 1, 2, 3, …; the daemons of a cluster
//! interleave: the host at place `p` among the sorted names of itself and
//! its `n − 1` peers (the same share its clone addresses come from,
//! [`super::peers::Peers::share`]) hands out `p + 1`, `p + 1 + n`,
//! `p + 1 + 2n`, … — so h1 of two hosts counts 1, 3, 5 and h2 2, 4, 6, and
//! no two daemons of one cluster ever allocate the same id. A VM that
//! arrives by migration is registered under its source's id, which the
//! destination reserves when it opens the migration: refused while a VM of
//! that id exists here or another incoming migration holds it. A daemon
//! that restarts counts over, so when it registers in etcd it skips every
//! id of its share that the cluster's hosts report (a VM it made before
//! the restart that runs elsewhere now); the counter skips every id in use
//! or reserved here.

use std::collections::BTreeMap;

/// Why an id cannot be reserved for an incoming VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdTaken {
    #[error("a VM with this id exists on this host")]
    Exists,
    #[error("another incoming migration holds this id")]
    Reserved,
}

/// This daemon's share of the id space and the ids incoming migrations
/// hold.
#[derive(Debug)]
pub(super) struct VmIds {
    /// The first id of this host's share (1-based).
    first: u64,
    /// Distance between two ids of the share (the cluster's host count).
    stride: u64,
    /// Ids of the share handed out so far.
    issued: u64,
    /// Incoming VM id → the migration holding it.
    incoming: BTreeMap<u64, u64>,
}

impl Default for VmIds {
    fn default() -> Self {
        VmIds::share(0, 1)
    }
}

impl VmIds {
    /// Place `part` of `parts` hosts (0-based; a single daemon is 0 of 1).
    pub(super) fn share(part: usize, parts: usize) -> VmIds {
        let stride = parts.max(1) as u64;
        VmIds {
            first: (part as u64).min(stride - 1) + 1,
            stride,
            issued: 0,
            incoming: BTreeMap::new(),
        }
    }

    /// The next id of this host's share that is neither `in_use` nor held
    /// by an incoming migration.
    pub(super) fn next(&mut self, in_use: impl Fn(u64) -> bool) -> u64 {
        loop {
            let id = self
                .first
                .saturating_add(self.issued.saturating_mul(self.stride));
            self.issued += 1;
            if !in_use(id) && !self.incoming.contains_key(&id) {
                return id;
            }
        }
    }

    /// Hands out no id of this share up to the largest of `taken` (ids in
    /// use elsewhere in the cluster); other shares' ids are ignored.
    pub(super) fn skip_through(&mut self, taken: impl IntoIterator<Item = u64>) {
        for id in taken {
            if id >= self.first && (id - self.first).is_multiple_of(self.stride) {
                self.issued = self.issued.max((id - self.first) / self.stride + 1);
            }
        }
    }

    /// Holds `id` for incoming migration `mig`; `exists`: a VM of that id
    /// is registered here.
    pub(super) fn reserve(&mut self, id: u64, mig: u64, exists: bool) -> Result<(), IdTaken> {
        if exists {
            return Err(IdTaken::Exists);
        }
        if self.incoming.contains_key(&id) {
            return Err(IdTaken::Reserved);
        }
        self.incoming.insert(id, mig);
        Ok(())
    }

    /// Lets go of `id` if migration `mig` still holds it (a later
    /// migration of the same id keeps its own hold).
    pub(super) fn release(&mut self, id: u64, mig: u64) {
        if self.incoming.get(&id) == Some(&mig) {
            self.incoming.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn take(ids: &mut VmIds, n: usize) -> Vec<u64> {
        (0..n).map(|_| ids.next(|_| false)).collect()
    }

    #[test]
    fn a_single_daemon_counts_from_one() {
        assert_eq!(take(&mut VmIds::default(), 4), [1, 2, 3, 4]);
    }

    #[test]
    fn cluster_shares_interleave_and_never_meet() {
        let mut all: Vec<u64> = (0..3)
            .flat_map(|p| take(&mut VmIds::share(p, 3), 50))
            .collect();
        assert_eq!(take(&mut VmIds::share(0, 3), 3), [1, 4, 7]);
        assert_eq!(take(&mut VmIds::share(2, 3), 3), [3, 6, 9]);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 150);
        // A place beyond the count is clamped to the last share.
        assert_eq!(take(&mut VmIds::share(5, 2), 2), [2, 4]);
    }

    /// A restarted h1 of two (ids 1, 3, 5, …) that finds vm-5 and vm-4 in
    /// the cluster goes on at 7; ids below what it handed out stay behind.
    #[test]
    fn ids_the_cluster_reports_are_not_handed_out_again() {
        let mut ids = VmIds::share(0, 2);
        ids.skip_through([4, 5, 2]);
        assert_eq!(take(&mut ids, 2), [7, 9]);
        ids.skip_through([1, 3, 0]);
        assert_eq!(take(&mut ids, 1), [11]);
        let mut solo = VmIds::default();
        solo.skip_through([3]);
        assert_eq!(take(&mut solo, 1), [4]);
    }

    #[test]
    fn ids_in_use_or_reserved_are_skipped() {
        let mut ids = VmIds::share(0, 2);
        ids.reserve(3, 1, false).unwrap();
        assert_eq!(ids.next(|id| id == 1), 5);
        assert_eq!(ids.reserve(3, 2, false), Err(IdTaken::Reserved));
        assert_eq!(ids.reserve(4, 2, true), Err(IdTaken::Exists));
        // Only the holder releases.
        ids.release(3, 2);
        assert_eq!(ids.reserve(3, 2, false), Err(IdTaken::Reserved));
        ids.release(3, 1);
        ids.reserve(3, 2, false).unwrap();
    }
}
