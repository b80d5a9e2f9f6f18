//! The decisions: [`Policy::decide`] takes a snapshot and returns what to
//! do, remembering only what keeps it from thrashing (the load means,
//! which hosts are overloaded, for the hysteresis; the cool-downs) and its
//! log.

pub use super::config::{ConfigError, PolicyConfig};
use super::placement::place_clones;
use super::smoothing::Smoother;
use super::snapshot::{HostLoad, LoadSnapshot, ZoneLoad};
use super::transfer::Transfer;
use super::{Action, Decision, Inputs};
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Decisions kept for `GET /v1/policy/decisions`.
pub const LOG_KEPT: usize = 1000;

/// The engine: its configuration and the little it remembers.
#[derive(Debug, Clone)]
pub struct Policy {
    pub config: PolicyConfig,
    transfer: Transfer,
    smoother: Smoother,
    /// Per zone: periods in a row its demand was over the fork mark (not
    /// split) or under the join mark (split).
    streaks: BTreeMap<String, u32>,
    zone_quiet_until: BTreeMap<String, u64>,
    host_quiet_until: BTreeMap<String, u64>,
    log: VecDeque<Decision>,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Result<Policy, ConfigError> {
        config.check()?;
        Ok(Policy {
            smoother: Smoother::new(config.smoothing),
            config,
            transfer: Transfer::default(),
            streaks: BTreeMap::new(),
            zone_quiet_until: BTreeMap::new(),
            host_quiet_until: BTreeMap::new(),
            log: VecDeque::new(),
        })
    }

    /// The decisions so far, oldest first (the last [`LOG_KEPT`]).
    pub fn log(&self) -> impl Iterator<Item = &Decision> {
        self.log.iter()
    }

    /// Hosts the transfer policy holds overloaded now.
    pub fn overloaded(&self) -> impl Iterator<Item = &str> {
        self.transfer.overloaded()
    }

    /// What to do about `snap`: fork and join decisions first, then at
    /// most one migration per overloaded host, within the bound on
    /// migrations in flight. It acts on the means of the snapshots so far
    /// ([`Smoother`]). Deterministic: the same snapshots in the same order
    /// give the same decisions.
    pub fn decide(&mut self, snap: &LoadSnapshot) -> Vec<Decision> {
        let snap = self.smoother.smooth(snap);
        self.transfer.update(&self.config, &snap);
        self.update_streaks(&snap);
        let avg = snap.average_load();
        let mut out = Vec::new();
        for z in &snap.zones {
            if let Some(d) = self.fork_or_join(&snap, z, avg) {
                out.push(d);
            }
        }
        out.extend(self.migrations(&snap, avg));
        for d in &out {
            self.remember(d);
        }
        out
    }

    fn zone_quiet(&self, zone: &str, now: u64) -> bool {
        self.zone_quiet_until.get(zone).is_some_and(|t| now < *t)
    }

    fn host_quiet(&self, host: &str, now: u64) -> bool {
        self.host_quiet_until.get(host).is_some_and(|t| now < *t)
    }

    fn inputs(snap: &LoadSnapshot, z: &ZoneLoad, avg: f64) -> Inputs {
        Inputs {
            cluster_avg: avg,
            host: z.host.clone(),
            host_load: snap.host(&z.host).map(HostLoad::load).unwrap_or(0.0),
            to_load: None,
            zone_cpu: z.cpu,
            zone_weight: z.weight(),
            zone_demand: z.demand(),
        }
    }

    /// Like a host's overload, a zone's need for a fork (or a join) counts
    /// once it held for `overload_periods` periods in a row.
    fn update_streaks(&mut self, snap: &LoadSnapshot) {
        let c = &self.config;
        let mut streaks = BTreeMap::new();
        for z in &snap.zones {
            let demand = z.demand();
            let wants = if z.is_split() {
                demand < c.join_below
            } else {
                demand > c.fork_above
            };
            if wants {
                let n = self.streaks.get(&z.zone).copied().unwrap_or(0);
                streaks.insert(z.zone.clone(), n.saturating_add(1));
            }
        }
        self.streaks = streaks;
    }

    fn fork_or_join(&self, snap: &LoadSnapshot, z: &ZoneLoad, avg: f64) -> Option<Decision> {
        let c = &self.config;
        if z.migrating || self.zone_quiet(&z.zone, snap.at_ms) {
            return None;
        }
        if self.streaks.get(&z.zone).copied().unwrap_or(0) < c.overload_periods {
            return None;
        }
        let demand = z.demand();
        let (action, reason) = if !z.is_split() && demand > c.fork_above {
            let vms = (demand / c.fork_target).ceil() as u32;
            let clones = vms.saturating_sub(1).clamp(1, c.max_clones);
            let placement = place_clones(snap, z, clones, c.fit_below);
            let on: Vec<String> = placement.iter().map(|(h, n)| format!("{h}={n}")).collect();
            (
                Action::Fork {
                    zone: z.zone.clone(),
                    host: z.host.clone(),
                    clones,
                    placement,
                },
                format!(
                    "demand {demand:.3} cores is more than one VM serves (fork above {:.3}): {clones} clones for ~{:.3} each, on the least loaded hosts with room ({})",
                    c.fork_above,
                    demand / (clones + 1) as f64,
                    on.join(",")
                ),
            )
        } else if z.is_split() && demand < c.join_below {
            (
                Action::Join {
                    zone: z.zone.clone(),
                    host: z.host.clone(),
                },
                format!(
                    "the split zone's demand fell to {demand:.3} cores (join below {:.3}): one VM serves it",
                    c.join_below
                ),
            )
        } else {
            return None;
        };
        Some(Decision {
            at_ms: snap.at_ms,
            action,
            reason,
            inputs: Self::inputs(snap, z, avg),
        })
    }

    /// Selection and location policies for every overloaded host, the most
    /// loaded first; the loads are updated as moves are chosen.
    fn migrations(&self, snap: &LoadSnapshot, avg: f64) -> Vec<Decision> {
        let c = &self.config;
        let now = snap.at_ms;
        let mut budget = c.max_migrations.saturating_sub(snap.migrations_in_flight());
        let mut cpu: BTreeMap<&str, f64> = snap
            .hosts
            .iter()
            .map(|h| (h.name.as_str(), h.cpu))
            .collect();
        // Each host's zones' weights.
        let mut movable: BTreeMap<&str, f64> =
            snap.hosts.iter().map(|h| (h.name.as_str(), 0.0)).collect();
        for z in &snap.zones {
            if let Some(m) = movable.get_mut(z.host.as_str()) {
                *m += z.weight();
            }
        }
        let load = |cpu: &BTreeMap<&str, f64>, h: &HostLoad| cpu[h.name.as_str()] / h.capacity;
        let mut sources: Vec<&HostLoad> = snap
            .hosts
            .iter()
            .filter(|h| {
                h.capacity > 0.0
                    && self.transfer.is_overloaded(&h.name)
                    && !self.host_quiet(&h.name, now)
            })
            .collect();
        sources.sort_by(|a, b| b.load().total_cmp(&a.load()).then(a.name.cmp(&b.name)));
        let mut out = Vec::new();
        let mut moved: BTreeSet<&str> = BTreeSet::new();
        for src in sources {
            if budget == 0 {
                break;
            }
            if moved.contains(src.name.as_str()) {
                continue;
            }
            // Selection: the zone closest to the host's excess over the
            // average, if it is worth a migration.
            let excess = cpu[src.name.as_str()] - avg * src.capacity;
            if excess <= 0.0 || excess < c.min_move * src.capacity {
                continue;
            }
            let mut zones: Vec<&ZoneLoad> = snap
                .zones
                .iter()
                .filter(|z| {
                    z.host == src.name
                        && !z.migrating
                        && !z.is_split()
                        && z.weight() > 0.0
                        && z.weight() >= c.min_move * src.capacity
                        && !self.zone_quiet(&z.zone, now)
                })
                .collect();
            select_order(&mut zones, excess, c.near_equal * excess);
            // Location: the other side of the average, least loaded
            // first, where the zone fits: under `fit_below`, not over the
            // relative mark, and below the source's load before the move
            // (so every move makes the pair more even), with memory for
            // its resident pages.
            let mut dests: Vec<&HostLoad> = snap
                .hosts
                .iter()
                .filter(|h| {
                    h.name != src.name
                        && h.capacity > 0.0
                        && load(&cpu, h) < avg
                        && !self.host_quiet(&h.name, now)
                        && !moved.contains(h.name.as_str())
                })
                .collect();
            dests.sort_by(|a, b| {
                load(&cpu, a)
                    .total_cmp(&load(&cpu, b))
                    .then(a.name.cmp(&b.name))
            });
            let src_load = load(&cpu, src);
            // Evening the pair is judged on what can move, the zones'
            // weights: a host's other CPU (the daemon booting a VM,
            // copying a migration) stays where it is.
            let movable_src = movable[src.name.as_str()] / src.capacity;
            let fits = |z: &ZoneLoad, d: &HostLoad| {
                let after = (cpu[d.name.as_str()] + z.weight()) / d.capacity;
                let movable_after = (movable[d.name.as_str()] + z.weight()) / d.capacity;
                after <= c.fit_below
                    && after <= c.above_average * avg
                    && after < src_load
                    && movable_after < movable_src
                    && d.holds(z.resident_bytes)
            };
            let choice = zones
                .iter()
                .find_map(|z| dests.iter().find(|d| fits(z, d)).map(|d| (*z, *d)));
            let Some((z, dest)) = choice else {
                continue;
            };
            let to_load = load(&cpu, dest);
            let mut inputs = Self::inputs(snap, z, avg);
            inputs.host_load = src_load;
            inputs.to_load = Some(to_load);
            out.push(Decision {
                at_ms: now,
                action: Action::Migrate {
                    zone: z.zone.clone(),
                    from: src.name.clone(),
                    to: dest.name.clone(),
                },
                reason: format!(
                    "{} is overloaded ({src_load:.2}, average {avg:.2}; marks {:.2} and {:.2} × average); its excess is {excess:.3} cores and {} weighs {:.3}; {} is below the average ({to_load:.2}) and takes it to {:.2}",
                    src.name,
                    c.high_water,
                    c.above_average,
                    z.zone,
                    z.weight(),
                    dest.name,
                    (cpu[dest.name.as_str()] + z.weight()) / dest.capacity
                ),
                inputs,
            });
            for m in [&mut cpu, &mut movable] {
                *m.entry(src.name.as_str()).or_default() -= z.weight();
                *m.entry(dest.name.as_str()).or_default() += z.weight();
            }
            moved.insert(src.name.as_str());
            moved.insert(dest.name.as_str());
            budget -= 1;
        }
        out
    }

    fn remember(&mut self, d: &Decision) {
        let c = &self.config;
        let now = d.at_ms;
        match &d.action {
            Action::Migrate { zone, from, to } => {
                self.smoother.moved(zone, from, to, d.inputs.zone_weight);
                self.zone_quiet_until
                    .insert(zone.clone(), now + c.zone_cooldown_ms);
                for h in [from, to] {
                    self.host_quiet_until
                        .insert(h.clone(), now + c.host_cooldown_ms);
                }
            }
            Action::Fork { zone, .. } | Action::Join { zone, .. } => {
                self.zone_quiet_until
                    .insert(zone.clone(), now + c.zone_cooldown_ms);
            }
        }
        tracing::info!(decision = ?d.action, reason = %d.reason, "policy decision");
        self.log.push_back(d.clone());
        while self.log.len() > LOG_KEPT {
            self.log.pop_front();
        }
    }
}

/// Selection order: closest to `excess` first by weight; the zones
/// within `near` (cores) of the closest go first, the lowest dirty rate
/// among them first (not measured: after the measured ones).
fn select_order(zones: &mut [&ZoneLoad], excess: f64, near: f64) {
    let dist = |z: &ZoneLoad| (z.weight() - excess).abs();
    let best = zones.iter().map(|z| dist(z)).fold(f64::INFINITY, f64::min);
    let dirty = |z: &ZoneLoad| z.dirty_pages_per_s.unwrap_or(f64::INFINITY);
    zones.sort_by(|a, b| {
        let (na, nb) = (dist(a) <= best + near, dist(b) <= best + near);
        nb.cmp(&na)
            .then_with(|| {
                if na && nb {
                    dirty(a).total_cmp(&dirty(b))
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .then(dist(a).total_cmp(&dist(b)))
            .then(a.zone.cmp(&b.zone))
    });
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
