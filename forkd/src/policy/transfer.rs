//! The transfer policy: which hosts are overloaded, with hysteresis on
//! two thresholds.
//!
//! - **Absolute**: above `high_water` of its capacity a host is
//!   overloaded until it is below `low_water`.
//! - **Relative to the cluster**: above `above_average` × the cluster's
//!   average load it is overloaded until it is below `back_to_average` ×
//!   the average. A cluster whose hosts are all busy has no host over the
//!   relative mark; one whose load gathers on a few hosts has them over
//!   it, however light the cluster is as a whole.
//!
//! The loads are the means of the hosts' samples (`smoothing`), and a
//! host becomes overloaded only once over a mark in `overload_periods`
//! periods in a row: a single sample (a burst, a migration's own copying)
//! does not move a zone.

use std::collections::BTreeMap;

use super::config::PolicyConfig;
use super::snapshot::LoadSnapshot;

#[derive(Debug, Clone, Copy, Default)]
struct Mark {
    /// Over `high_water`, not yet below `low_water`.
    absolute: bool,
    /// Over `above_average`, not yet below `back_to_average`.
    relative: bool,
    /// Snapshots in a row over either mark.
    over_for: u32,
}

#[derive(Debug, Clone, Default)]
pub struct Transfer {
    marks: BTreeMap<String, Mark>,
}

impl Transfer {
    /// Takes in a period's snapshot (its host loads the means of their
    /// samples). A host becomes overloaded once over a mark in
    /// `overload_periods` periods in a row; it is released below the
    /// marks' lower halves. A host that stopped reporting is forgotten:
    /// not overloaded, nor a destination.
    pub fn update(&mut self, c: &PolicyConfig, snap: &LoadSnapshot) {
        let avg = snap.average_load();
        let mut marks = BTreeMap::new();
        for h in &snap.hosts {
            let mut m = self.marks.get(&h.name).copied().unwrap_or_default();
            let load = h.load();
            let over_abs = load > c.high_water;
            let over_rel = avg > 0.0 && load > c.above_average * avg;
            m.over_for = if over_abs || over_rel {
                m.over_for.saturating_add(1)
            } else {
                0
            };
            let sustained = m.over_for >= c.overload_periods;
            if over_abs && sustained {
                m.absolute = true;
            } else if load < c.low_water {
                m.absolute = false;
            }
            if over_rel && sustained {
                m.relative = true;
            } else if load < c.back_to_average * avg {
                m.relative = false;
            }
            marks.insert(h.name.clone(), m);
        }
        self.marks = marks;
    }

    pub fn is_overloaded(&self, host: &str) -> bool {
        self.marks
            .get(host)
            .is_some_and(|m| m.absolute || m.relative)
    }

    pub fn overloaded(&self) -> impl Iterator<Item = &str> {
        self.marks
            .iter()
            .filter(|(_, m)| m.absolute || m.relative)
            .map(|(n, _)| n.as_str())
    }
}
