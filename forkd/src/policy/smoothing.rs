//! The information policy's filter: hosts publish a 1-s sample of their
//! CPU, which swings with the machine's other work, a boot, a migration's
//! own copying. The engine acts on an exponentially weighted mean of each
//! host's and each zone's samples instead (`smoothing`: the weight of the
//! newest sample; 1 keeps the samples as they are).
//!
//! A migration the engine decides moves the zone's weight from the
//! source's mean to the destination's at once, so the next periods do not
//! see the old imbalance in the means and move a second zone for it.

use std::collections::BTreeMap;

use super::snapshot::LoadSnapshot;

#[derive(Debug, Clone, Default)]
pub struct Smoother {
    /// Weight of the newest sample, in (0, 1].
    alpha: f64,
    /// Each host's mean CPU (cores).
    hosts: BTreeMap<String, f64>,
    /// Each zone's mean CPU and weight (cores), by (host, zone): a zone
    /// that moved starts a mean of its own on its new host.
    zones: BTreeMap<(String, String), (f64, f64)>,
}

impl Smoother {
    pub fn new(alpha: f64) -> Smoother {
        Smoother {
            alpha,
            ..Smoother::default()
        }
    }

    fn mix(&self, mean: Option<f64>, sample: f64) -> f64 {
        match mean {
            Some(m) => m + self.alpha * (sample - m),
            None => sample,
        }
    }

    /// `snap` with every host's CPU and every zone's CPU and weight
    /// replaced by their means (the first sample of one is its own mean).
    /// Hosts and zones not in `snap` are forgotten. A split zone's clones
    /// are left as reported (a split zone is never migrated).
    pub fn smooth(&mut self, snap: &LoadSnapshot) -> LoadSnapshot {
        let mut out = snap.clone();
        let mut hosts = BTreeMap::new();
        for h in &mut out.hosts {
            let m = self.mix(self.hosts.get(&h.name).copied(), h.cpu);
            hosts.insert(h.name.clone(), m);
            h.cpu = m;
        }
        let mut zones = BTreeMap::new();
        for z in &mut out.zones {
            let key = (z.host.clone(), z.zone.clone());
            let old = self.zones.get(&key).copied();
            let cpu = self.mix(old.map(|o| o.0), z.cpu);
            let weight = self.mix(old.map(|o| o.1), z.weight());
            zones.insert(key, (cpu, weight));
            z.cpu = cpu;
            z.weight = Some(weight);
        }
        self.hosts = hosts;
        self.zones = zones;
        out
    }

    /// The engine decided to move `zone` (weight `w`) from `from` to `to`.
    pub fn moved(&mut self, zone: &str, from: &str, to: &str, w: f64) {
        if let Some(m) = self.hosts.get_mut(from) {
            *m = (*m - w).max(0.0);
        }
        if let Some(m) = self.hosts.get_mut(to) {
            *m += w;
        }
        self.zones.remove(&(from.to_owned(), zone.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::snapshot::{HostLoad, ZoneLoad};

    fn snap(h1: f64, z: f64) -> LoadSnapshot {
        LoadSnapshot {
            at_ms: 0,
            hosts: vec![HostLoad::new("h1", 1.0, h1)],
            zones: vec![ZoneLoad::new("vm-1", "h1", z)],
        }
    }

    /// A one-sample spike moves the mean by alpha of it; a steady level
    /// is reached; a vanished host is forgotten; a decided move shifts the
    /// mean at once.
    #[test]
    fn means_follow_the_samples() {
        let mut s = Smoother::new(0.5);
        assert_eq!(s.smooth(&snap(0.4, 0.2)).hosts[0].cpu, 0.4);
        let spiked = s.smooth(&snap(1.2, 0.2));
        assert!((spiked.hosts[0].cpu - 0.8).abs() < 1e-9);
        assert_eq!(spiked.zones[0].weight, Some(0.2));
        for _ in 0..30 {
            s.smooth(&snap(0.4, 0.2));
        }
        assert!((s.smooth(&snap(0.4, 0.2)).hosts[0].cpu - 0.4).abs() < 1e-6);
        s.moved("vm-1", "h1", "h2", 0.1);
        assert!((s.hosts["h1"] - 0.3).abs() < 1e-6);
        assert!(!s.zones.contains_key(&("h1".into(), "vm-1".into())));
        s.smooth(&LoadSnapshot::default());
        assert!(s.hosts.is_empty() && s.zones.is_empty());
        // alpha 1: the samples as they are.
        let mut raw = Smoother::new(1.0);
        raw.smooth(&snap(0.4, 0.2));
        assert_eq!(raw.smooth(&snap(1.2, 0.3)).hosts[0].cpu, 1.2);
    }
}
