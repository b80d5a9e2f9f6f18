//! The policy engine: fork or migrate, decided from measured load, in the
//! style of Gerofi, Fujita and Ishikawa's DVE load balancer (IEEE Cluster
//! 2010). Pure and deterministic: a [`LoadSnapshot`] in, [`Decision`]s out
//! ([`engine::Policy::decide`]); the daemons carry the decisions out behind
//! the [`Actuator`] trait, so the policies are unit-tested without VMs and
//! run unchanged against the real cluster.
//!
//! - **Transfer policy** (when to move, [`transfer`]): a host whose load
//!   is above [`PolicyConfig::high_water`] of its capacity, or above
//!   [`PolicyConfig::above_average`] × the cluster's average, is
//!   overloaded; it stays so (hysteresis) until it is below
//!   [`PolicyConfig::low_water`] and [`PolicyConfig::back_to_average`] ×
//!   the average. It becomes overloaded only once over a mark for
//!   [`PolicyConfig::overload_periods`] periods in a row.
//! - **Location policy** (where to): among the other hosts, those on the
//!   opposite side of the cluster's average load (below it), least loaded
//!   first, where the zone fits: under [`PolicyConfig::fit_below`], not
//!   over the relative mark, and below the source's load before the move,
//!   on the host's CPU and on its zones' weights (every move makes the
//!   pair more even in what can move: a daemon's own work stays).
//! - **Selection policy** (what to move): the zone whose weight (the host
//!   CPU that moves with it: [`ZoneLoad::weight`]) is closest to the
//!   host's excess over the cluster average, among those worth a
//!   migration ([`PolicyConfig::min_move`]); among zones within
//!   [`PolicyConfig::near_equal`] of the excess of the closest, the one
//!   that dirties the fewest pages per second (cheapest to migrate).
//! - **Information policy**: periodic; every host publishes its load (the
//!   snapshot is built from those reports). The engine acts on
//!   exponentially weighted means of the reports ([`smoothing`]), not on
//!   one 1-s sample.
//!
//! Fork: a zone whose load is more than one VM serves
//! ([`PolicyConfig::fork_above`]) is split over clones; its clones are
//! joined back when the zone's whole load falls below
//! [`PolicyConfig::join_below`] of one VM. The clones go to the least
//! loaded hosts that have room ([`placement::place_clones`]). Cool-downs per zone and per
//! host, and a bound on concurrent migrations, keep it from thrashing;
//! every decision carries its inputs and its reason.

pub mod config;
pub mod engine;
pub mod placement;
pub mod smoothing;
pub mod snapshot;
pub mod transfer;

pub use engine::{Policy, PolicyConfig};
pub use placement::place_clones;
pub use snapshot::{HostLoad, LoadSnapshot, ZoneLoad};

use serde::Serialize;
use std::collections::BTreeMap;

/// What the engine asks for.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Live-migrate zone `zone` (its VM) from `from` to `to`.
    Migrate {
        zone: String,
        from: String,
        to: String,
    },
    /// Fork zone `zone` (on `host`) into `clones` more VMs (its clients
    /// are split between the parent and its clones by clone id), placed
    /// as `placement` says (clones per host, adding up to `clones`:
    /// [`placement::place_clones`]).
    Fork {
        zone: String,
        host: String,
        clones: u32,
        placement: BTreeMap<String, u32>,
    },
    /// Join the clones of zone `zone` (on `host`) back into its parent.
    Join { zone: String, host: String },
}

/// One decision: the action, why, and the figures it was taken on.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Decision {
    /// The snapshot's time (ms on the controller's clock).
    pub at_ms: u64,
    #[serde(flatten)]
    pub action: Action,
    pub reason: String,
    pub inputs: Inputs,
}

/// The figures behind a decision.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Inputs {
    /// The cluster's average host load (fraction of capacity).
    pub cluster_avg: f64,
    /// The host the zone is on, and its load.
    pub host: String,
    pub host_load: f64,
    /// The destination's load before the move (migrations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to_load: Option<f64>,
    /// The zone's CPU use (cores), the host CPU that moves with it, and,
    /// for a split zone, its whole load.
    pub zone_cpu: f64,
    pub zone_weight: f64,
    pub zone_demand: f64,
}

/// Carries decisions out: the daemons' API implements it (migrate, fork,
/// join through the cluster's hosts). Errors are the actuator's words,
/// logged with the decision.
pub trait Actuator {
    fn migrate(&self, zone: &str, from: &str, to: &str) -> Result<(), String>;
    /// `placement`: clones per host (`host` itself may be among them).
    fn fork(
        &self,
        zone: &str,
        host: &str,
        clones: u32,
        placement: &BTreeMap<String, u32>,
    ) -> Result<(), String>;
    fn join(&self, zone: &str, host: &str) -> Result<(), String>;

    /// Carries out `d`.
    fn apply(&self, d: &Decision) -> Result<(), String> {
        match &d.action {
            Action::Migrate { zone, from, to } => self.migrate(zone, from, to),
            Action::Fork {
                zone,
                host,
                clones,
                placement,
            } => self.fork(zone, host, *clones, placement),
            Action::Join { zone, host } => self.join(zone, host),
        }
    }
}
