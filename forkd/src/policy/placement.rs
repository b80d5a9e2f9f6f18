//! Where a fork's clones go: the least loaded hosts that have room.
//!
//! A zone split into `clones + 1` VMs carries about `demand / (clones + 1)`
//! cores in each; the parent keeps one share on its host. Clone by clone,
//! the host whose load after taking one more share is lowest, among those
//! that stay at or below `fit_below`, gets it (ties: the zone's own host —
//! its clones read the frozen image directly — then by name); the loads
//! are updated as clones are placed, so several clones spread out. With no
//! host that has room, the least loaded host takes the clone anyway (the
//! fork still relieves the zone's one VM). Room includes memory: a clone
//! may fault in as much as its parent holds, so a host without that (and
//! [`super::snapshot::MEM_HEADROOM`]) to spare gets it only when no host
//! has it.

use std::collections::BTreeMap;

use super::snapshot::{HostLoad, LoadSnapshot, ZoneLoad};

/// Clones per host for forking `zone` into `clones` more VMs (they add up
/// to `clones`). Hosts not in the snapshot (not reporting) get none; with
/// no host at all every clone stays on the zone's host.
pub fn place_clones(
    snap: &LoadSnapshot,
    zone: &ZoneLoad,
    clones: u32,
    fit_below: f64,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    if clones == 0 {
        return out;
    }
    let demand = zone.demand();
    let share = demand / (clones + 1) as f64;
    // Each host after the fork so far: its CPU, and its memory as the
    // clones placed there fill it.
    let mut hosts: Vec<HostLoad> = snap
        .hosts
        .iter()
        .filter(|h| h.capacity > 0.0)
        .map(|h| HostLoad {
            // The parent's VM keeps one share of the zone's demand.
            cpu: if h.name == zone.host {
                (h.cpu - demand + share).max(0.0)
            } else {
                h.cpu
            },
            ..h.clone()
        })
        .collect();
    if hosts.is_empty() {
        out.insert(zone.host.clone(), clones);
        return out;
    }
    for _ in 0..clones {
        let after = |h: &HostLoad| (h.cpu + share) / h.capacity;
        let memory = |h: &HostLoad| h.holds(zone.resident_bytes);
        let better = |a: &HostLoad, b: &HostLoad| {
            after(a)
                .total_cmp(&after(b))
                .then((a.name != zone.host).cmp(&(b.name != zone.host)))
                .then(a.name.cmp(&b.name))
        };
        let best = |room: &dyn Fn(&HostLoad) -> bool| {
            hosts
                .iter()
                .enumerate()
                .filter(|(_, h)| room(h))
                .min_by(|(_, a), (_, b)| better(a, b))
                .map(|(i, _)| i)
        };
        // Room for its CPU share and its memory; else memory at least;
        // else the least loaded host.
        let pick = best(&|h| after(h) <= fit_below && memory(h))
            .or_else(|| best(&memory))
            .or_else(|| best(&|_| true))
            .unwrap_or(0);
        let h = &mut hosts[pick];
        h.cpu += share;
        if let (Some(m), Some(r)) = (h.mem_available.as_mut(), zone.resident_bytes) {
            *m = m.saturating_sub(r);
        }
        *out.entry(h.name.clone()).or_insert(0) += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(hosts: &[(&str, f64)]) -> LoadSnapshot {
        LoadSnapshot {
            at_ms: 0,
            hosts: hosts
                .iter()
                .map(|(n, cpu)| HostLoad::new(n, 4.0, *cpu))
                .collect(),
            zones: Vec::new(),
        }
    }

    fn zone(host: &str, cpu: f64) -> ZoneLoad {
        ZoneLoad::new("vm-1", host, cpu)
    }

    fn placed(p: &BTreeMap<String, u32>) -> Vec<(&str, u32)> {
        p.iter().map(|(h, n)| (h.as_str(), *n)).collect()
    }

    #[test]
    fn clones_go_to_the_least_loaded_hosts() {
        // h1 runs the zone (1.8 cores) and more; h3 is idle, h2 half busy.
        let s = snap(&[("h1", 3.0), ("h2", 2.0), ("h3", 0.0)]);
        let p = place_clones(&s, &zone("h1", 1.8), 2, 0.78);
        // Shares of 0.6: h3 takes the first (0.15), then h3 again (0.30)
        // beats h1 (0.60 after its parent's share) and h2 (0.65).
        assert_eq!(placed(&p), vec![("h3", 2)]);
        // h2 and h3 idle, h1 keeps 0.6 of the zone's 2.4: shares of 0.6
        // alternate between the two idle hosts (names break the tie).
        let s = snap(&[("h1", 3.0), ("h2", 0.0), ("h3", 0.0)]);
        let p = place_clones(&s, &zone("h1", 2.4), 3, 0.78);
        assert_eq!(placed(&p), vec![("h2", 2), ("h3", 1)]);
    }

    /// A clone may fault in what its parent holds: a host whose memory
    /// cannot take another (with headroom) is passed over while another
    /// can; each clone placed uses up a host's memory.
    #[test]
    fn clones_go_where_their_memory_fits() {
        const MIB: u64 = 1 << 20;
        let mut s = snap(&[("h1", 3.0), ("h2", 0.0), ("h3", 1.0)]);
        s.hosts[1].mem_available = Some(1024 * MIB);
        let mut z = zone("h1", 2.4);
        z.resident_bytes = Some(512 * MIB);
        // Idle h2 holds one clone (512 + 256 ≤ 1024), not a second.
        let p = place_clones(&s, &z, 2, 0.78);
        assert_eq!(placed(&p), vec![("h2", 1), ("h3", 1)]);
        // No host with memory to spare: placed by CPU as before.
        for h in &mut s.hosts {
            h.mem_available = Some(100 * MIB);
        }
        let p = place_clones(&s, &z, 2, 0.78);
        assert_eq!(p.values().sum::<u32>(), 2);
    }

    #[test]
    fn only_hosts_with_room_unless_none_has() {
        // h2 would go above fit_below with one share; h1 has room once
        // its parent keeps only a share.
        let s = snap(&[("h1", 2.0), ("h2", 3.0)]);
        let p = place_clones(&s, &zone("h1", 1.0), 1, 0.78);
        assert_eq!(placed(&p), vec![("h1", 1)]);
        // Everything full: still placed, on the least loaded.
        let s = snap(&[("h1", 4.0), ("h2", 3.9)]);
        let p = place_clones(&s, &zone("h1", 0.5), 3, 0.78);
        assert_eq!(p.values().sum::<u32>(), 3);
        // h1 after its parent keeps 0.125: 3.625, below h2's 3.9.
        assert!(p.get("h1").copied().unwrap_or(0) >= 1, "{p:?}");
    }

    #[test]
    fn ties_prefer_the_zones_own_host_then_names() {
        let s = snap(&[("h1", 1.0), ("h2", 0.5), ("h3", 0.5)]);
        // h1 after the parent keeps 0.5 of its 1.0: 0.5, as h2 and h3.
        let p = place_clones(&s, &zone("h1", 1.0), 1, 0.78);
        assert_eq!(placed(&p), vec![("h1", 1)]);
        let s = snap(&[("h1", 2.0), ("h2", 0.5), ("h3", 0.5)]);
        let p = place_clones(&s, &zone("h1", 1.0), 1, 0.78);
        assert_eq!(placed(&p), vec![("h2", 1)]);
    }

    #[test]
    fn no_hosts_or_no_clones() {
        let s = snap(&[]);
        assert_eq!(
            placed(&place_clones(&s, &zone("h9", 2.0), 3, 0.78)),
            vec![("h9", 3)]
        );
        assert!(place_clones(&s, &zone("h9", 2.0), 0, 0.78).is_empty());
        // Deterministic.
        let s = snap(&[("h1", 3.0), ("h2", 1.0), ("h3", 1.0)]);
        let a = place_clones(&s, &zone("h1", 2.0), 4, 0.78);
        assert_eq!(a, place_clones(&s, &zone("h1", 2.0), 4, 0.78));
        assert_eq!(a.values().sum::<u32>(), 4);
    }
}
