//! The engine's thresholds, and their checks.

use serde::{Deserialize, Serialize};

/// The thresholds. Loads are fractions of a host's capacity; zone figures
/// are cores (one zone VM has one vCPU).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Transfer policy, absolute: a host above this is overloaded…
    pub high_water: f64,
    /// …until it is below this (hysteresis).
    pub low_water: f64,
    /// Transfer policy, relative: a host above this × the cluster's
    /// average load is overloaded…
    pub above_average: f64,
    /// …until it is below this × the average.
    pub back_to_average: f64,
    /// A host is overloaded once over a mark in this many snapshots in a
    /// row (not on one sample); a zone is forked (joined) once its demand
    /// was over the fork (under the join) mark as long.
    pub overload_periods: u32,
    /// Weight of the newest sample in the means the engine acts on
    /// (1: the samples as they are).
    pub smoothing: f64,
    /// Location policy: a zone fits on a host whose load after the move
    /// stays at or below this (and below `above_average` × the average,
    /// and below the source's load before the move).
    pub fit_below: f64,
    /// Selection: a zone lighter than this (fraction of its host's
    /// capacity) is not worth a migration, nor is an excess over the
    /// average smaller than this.
    pub min_move: f64,
    /// Selection: zones within this fraction of the host's excess of the
    /// best match are near-equal; among them the lowest dirty rate goes
    /// first.
    pub near_equal: f64,
    /// Fork a zone whose demand is above this (cores): more than one VM
    /// serves.
    pub fork_above: f64,
    /// Each VM of a split zone should carry about this much (cores).
    pub fork_target: f64,
    pub max_clones: u32,
    /// Join a split zone whose whole demand fell below this (cores).
    pub join_below: f64,
    /// No action on a zone for this long after one (ms).
    pub zone_cooldown_ms: u64,
    /// No migration from or to a host for this long after one (ms).
    pub host_cooldown_ms: u64,
    /// Migrations in flight at most, cluster-wide.
    pub max_migrations: usize,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            high_water: 0.85,
            low_water: 0.70,
            above_average: 1.2,
            back_to_average: 1.08,
            overload_periods: 2,
            smoothing: 0.5,
            fit_below: 0.78,
            min_move: 0.02,
            near_equal: 0.1,
            fork_above: 0.90,
            fork_target: 0.60,
            max_clones: 7,
            join_below: 0.45,
            zone_cooldown_ms: 30_000,
            host_cooldown_ms: 10_000,
            max_migrations: 1,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("thresholds must satisfy 0 < low_water < high_water and low_water <= fit_below < high_water")]
    Waters,
    #[error("relative thresholds must satisfy 1 < back_to_average < above_average")]
    Average,
    #[error("fork thresholds must satisfy 0 < join_below < fork_target < fork_above")]
    Fork,
    #[error("max_clones, max_migrations and overload_periods must be at least 1")]
    Bounds,
    #[error("smoothing must be in (0, 1], min_move and near_equal in [0, 1)")]
    Fractions,
}

impl PolicyConfig {
    pub fn check(&self) -> Result<(), ConfigError> {
        let ok = |b: bool, e: ConfigError| if b { Ok(()) } else { Err(e) };
        ok(
            self.low_water > 0.0
                && self.low_water < self.high_water
                && self.low_water <= self.fit_below
                && self.fit_below < self.high_water,
            ConfigError::Waters,
        )?;
        ok(
            self.back_to_average > 1.0 && self.back_to_average < self.above_average,
            ConfigError::Average,
        )?;
        ok(
            self.join_below > 0.0
                && self.join_below < self.fork_target
                && self.fork_target < self.fork_above,
            ConfigError::Fork,
        )?;
        ok(
            self.max_clones >= 1 && self.max_migrations >= 1 && self.overload_periods >= 1,
            ConfigError::Bounds,
        )?;
        let unit = |x: f64| (0.0..1.0).contains(&x);
        ok(
            self.smoothing > 0.0
                && self.smoothing <= 1.0
                && unit(self.min_move)
                && unit(self.near_equal),
            ConfigError::Fractions,
        )
    }
}
