//! The game world, pure: a grid of zones (10×10 for 100 zones; a zone
//! count that is no square is `rows × cols` with `cols` its smallest
//! divisor at or above its square root, e.g. 20 = 4 × 5),
//! hosts owning equal strips of it at the start (row-major: 5 hosts × 20
//! zones, two rows each, as in Gerofi, Fujita & Ishikawa, IEEE Cluster
//! 2010), and the clients: where each one is at any time, which zone that
//! is, when it sends and what.
//!
//! Everything is a function of the configuration, the client id, the time
//! and the update's index, so two runs drive the same world:
//! - a client starts at a point spread uniformly over the world and moves
//!   in a straight line toward its target, arriving at
//!   [`ARRIVE_FRACTION`] of the run and staying there; half the clients
//!   (even ids) head for the upper-left corner, half for the lower-right;
//!   a target lies in a quarter disc of radius [`TARGET_RADIUS`] (of the
//!   world's side) around its corner, so the corners' zones fill and
//!   the hosts holding them overload without balancing;
//! - a client sends `rate_hz` updates a second, evenly, with a phase of
//!   its own (so sends spread over the tick); update `k` (0, 1, … of the
//!   client's whole run, across zones) has 256–512 bytes whose size and
//!   contents depend only on the client id and `k`;
//! - a client whose position crosses into another zone is handed over:
//!   its next update goes to the new zone.

use anyhow::{bail, Result};
use guest_agent::mix::mix64;

/// Clients arrive at their targets at this fraction of the run.
pub const ARRIVE_FRACTION: f64 = 0.7;
/// A target's distance from its corner, at most (fraction of the side).
pub const TARGET_RADIUS: f64 = 0.3;
/// Update payload sizes.
pub const PAYLOAD_MIN: usize = 256;
pub const PAYLOAD_MAX: usize = 512;

const START_STREAM: u64 = 0x57a2_7000_0000_0001;
const TARGET_STREAM: u64 = 0x7a26_e700_0000_0002;
const PHASE_STREAM: u64 = 0x9a5e_0000_0000_0003;
const SIZE_STREAM: u64 = 0x512e_0000_0000_0004;

/// The world's shape and its clients.
#[derive(Debug, Clone, PartialEq)]
pub struct WorldConfig {
    pub zones: u32,
    pub hosts: u32,
    pub clients: u32,
    pub duration_s: f64,
    /// Updates per second per client.
    pub rate_hz: f64,
}

/// A point of the world: x to the right, y down, both in [0, 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pos {
    pub x: f64,
    pub y: f64,
}

#[derive(Debug, Clone)]
pub struct World {
    cfg: WorldConfig,
    rows: u32,
    cols: u32,
}

/// A uniform number in [0, 1) from a hash.
fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn hash(stream: u64, client: u32, k: u64) -> u64 {
    mix64(mix64(stream ^ client as u64) ^ k)
}

impl World {
    pub fn new(cfg: WorldConfig) -> Result<World> {
        if cfg.zones == 0 {
            bail!("--zones must be at least 1");
        }
        let root = (cfg.zones as f64).sqrt().ceil() as u32;
        let cols = (root..=cfg.zones)
            .find(|c| cfg.zones.is_multiple_of(*c))
            .unwrap_or(cfg.zones);
        let rows = cfg.zones / cols;
        if rows * 4 < cols {
            bail!(
                "--zones {} makes a {rows}×{cols} grid: too thin for a world (use a square or near-square count)",
                cfg.zones
            );
        }
        if cfg.hosts == 0 || cfg.hosts > cfg.zones {
            bail!(
                "--hosts {}: 1..={} (every host owns zones)",
                cfg.hosts,
                cfg.zones
            );
        }
        if cfg.clients == 0 {
            bail!("--clients must be at least 1");
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if !positive(cfg.duration_s) || !positive(cfg.rate_hz) {
            bail!("the duration and the update rate must be positive");
        }
        Ok(World { cfg, rows, cols })
    }

    pub fn config(&self) -> &WorldConfig {
        &self.cfg
    }

    /// The grid: rows and columns of zones.
    pub fn grid(&self) -> (u32, u32) {
        (self.rows, self.cols)
    }

    /// The zone holding `p` (row-major: zone `row * cols + col`).
    pub fn zone_at(&self, p: Pos) -> u32 {
        let col = ((p.x * self.cols as f64).floor().max(0.0) as u32).min(self.cols - 1);
        let row = ((p.y * self.rows as f64).floor().max(0.0) as u32).min(self.rows - 1);
        row * self.cols + col
    }

    /// The host (0-based) owning `zone` at the start: equal row-major
    /// strips (host `i` has zones `i*n/h .. (i+1)*n/h`).
    pub fn initial_host(&self, zone: u32) -> u32 {
        ((zone as u64 * self.cfg.hosts as u64) / self.cfg.zones as u64) as u32
    }

    pub fn start(&self, client: u32) -> Pos {
        Pos {
            x: unit(hash(START_STREAM, client, 0)),
            y: unit(hash(START_STREAM, client, 1)),
        }
    }

    /// Where `client` is heading: a quarter disc around its corner.
    pub fn target(&self, client: u32) -> Pos {
        let r = TARGET_RADIUS * unit(hash(TARGET_STREAM, client, 0)).sqrt();
        let a = std::f64::consts::FRAC_PI_2 * unit(hash(TARGET_STREAM, client, 1));
        let (dx, dy) = (r * a.cos(), r * a.sin());
        // Keep targets strictly inside the world.
        let edge = 1.0 - 1e-9;
        if client.is_multiple_of(2) {
            Pos { x: dx, y: dy }
        } else {
            Pos {
                x: (edge - dx).max(0.0),
                y: (edge - dy).max(0.0),
            }
        }
    }

    /// Where `client` is `t_s` seconds into the run.
    pub fn position(&self, client: u32, t_s: f64) -> Pos {
        let f = (t_s / (ARRIVE_FRACTION * self.cfg.duration_s)).clamp(0.0, 1.0);
        let (a, b) = (self.start(client), self.target(client));
        Pos {
            x: a.x + (b.x - a.x) * f,
            y: a.y + (b.y - a.y) * f,
        }
    }

    pub fn zone_of(&self, client: u32, t_s: f64) -> u32 {
        self.zone_at(self.position(client, t_s))
    }

    /// The client's phase: its updates are due at `(k + phase) / rate`.
    fn phase(&self, client: u32) -> f64 {
        unit(hash(PHASE_STREAM, client, 0))
    }

    /// Updates of `client` due by `t_s` (seconds into the run).
    pub fn due_by(&self, client: u32, t_s: f64) -> u64 {
        let x = t_s * self.cfg.rate_hz - self.phase(client);
        if x < 0.0 {
            0
        } else {
            x.floor() as u64 + 1
        }
    }

    /// Update `k`'s payload size (256–512 bytes).
    pub fn payload_len(client: u32, k: u64) -> usize {
        PAYLOAD_MIN
            + (hash(SIZE_STREAM, client, k) % (PAYLOAD_MAX - PAYLOAD_MIN + 1) as u64) as usize
    }

    /// Update `k`'s payload (deterministic in the client and `k`).
    pub fn payload(client: u32, k: u64) -> Vec<u8> {
        guest_agent::reference::payload_for(client, k, Self::payload_len(client, k))
    }

    /// Clients per zone at `t_s`.
    pub fn census(&self, t_s: f64) -> Vec<u32> {
        let mut v = vec![0u32; self.cfg.zones as usize];
        for c in 0..self.cfg.clients {
            v[self.zone_of(c, t_s) as usize] += 1;
        }
        v
    }

    /// Clients per initial host at `t_s` (the load without balancing).
    pub fn host_census(&self, t_s: f64) -> Vec<u32> {
        let mut v = vec![0u32; self.cfg.hosts as usize];
        for (z, n) in self.census(t_s).iter().enumerate() {
            v[self.initial_host(z as u32) as usize] += n;
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(zones: u32, hosts: u32, clients: u32) -> World {
        World::new(WorldConfig {
            zones,
            hosts,
            clients,
            duration_s: 100.0,
            rate_hz: 20.0,
        })
        .unwrap()
    }

    #[test]
    fn shapes_are_checked() {
        assert!(World::new(WorldConfig {
            zones: 97,
            ..world(100, 5, 1).cfg
        })
        .is_err());
        assert_eq!(world(20, 3, 1).grid(), (4, 5));
        assert_eq!(world(16, 4, 1).grid(), (4, 4));
        assert!(World::new(WorldConfig {
            hosts: 0,
            ..world(100, 5, 1).cfg
        })
        .is_err());
        assert!(World::new(WorldConfig {
            clients: 0,
            ..world(100, 5, 1).cfg
        })
        .is_err());
    }

    #[test]
    fn hosts_own_equal_strips() {
        let w = world(100, 5, 10);
        assert_eq!(w.grid(), (10, 10));
        let mut per = [0; 5];
        for z in 0..100 {
            per[w.initial_host(z) as usize] += 1;
        }
        assert_eq!(per, [20; 5]);
        // Two rows each: zone 19 (row 1) is h1's, zone 20 (row 2) h2's.
        assert_eq!((w.initial_host(19), w.initial_host(20)), (0, 1));
        assert_eq!(w.initial_host(99), 4);
        assert_eq!(w.zone_at(Pos { x: 0.0, y: 0.0 }), 0);
        assert_eq!(w.zone_at(Pos { x: 0.999, y: 0.999 }), 99);
        assert_eq!(w.zone_at(Pos { x: 0.55, y: 0.25 }), 25);
        // Out of range clamps.
        assert_eq!(w.zone_at(Pos { x: 1.5, y: -1.0 }), 9);
    }

    #[test]
    fn clients_start_spread_and_end_in_the_corners() {
        let w = world(100, 5, 10_000);
        let start = w.host_census(0.0);
        for n in &start {
            // 2000 each, give or take the spread.
            assert!((1800..=2200).contains(n), "start {start:?}");
        }
        let occupied = w.census(0.0).iter().filter(|n| **n > 0).count();
        assert_eq!(occupied, 100);
        let end = w.host_census(100.0);
        // The first and last strips hold the corners: most clients; the
        // next ones some.
        assert!(end[0] > 3500 && end[4] > 3500, "end {end:?}");
        assert!(end[1] > 500 && end[3] > 500, "end {end:?}");
        assert!(end[2] < 200, "the middle strip empties: {end:?}");
        assert_eq!(end.iter().sum::<u32>(), 10_000);
        // Arrived at 70% of the run, then still.
        assert_eq!(w.census(70.0), w.census(100.0));
        // Half each way.
        for c in 0..100 {
            let t = w.target(c);
            if c % 2 == 0 {
                assert!(t.x < 0.31 && t.y < 0.31, "{c}: {t:?}");
            } else {
                assert!(t.x > 0.69 && t.y > 0.69, "{c}: {t:?}");
            }
        }
    }

    #[test]
    fn movement_is_continuous_and_deterministic() {
        let (a, b) = (world(100, 5, 50), world(100, 5, 50));
        for c in 0..50 {
            assert_eq!(a.position(c, 33.3), b.position(c, 33.3));
            let mut last = a.position(c, 0.0);
            for i in 1..=100 {
                let p = a.position(c, i as f64);
                let step = ((p.x - last.x).powi(2) + (p.y - last.y).powi(2)).sqrt();
                assert!(step < 0.03, "client {c} jumps {step}");
                last = p;
            }
        }
    }

    #[test]
    fn sends_are_paced_and_payloads_deterministic() {
        let w = world(100, 5, 10);
        for c in 0..10 {
            assert_eq!(w.due_by(c, 0.0), if w.phase(c) == 0.0 { 1 } else { 0 });
            // 20 a second.
            let n = w.due_by(c, 10.0);
            assert!((199..=201).contains(&n), "{n}");
            assert!(w.due_by(c, 5.0) <= w.due_by(c, 5.05));
        }
        let mut sizes = std::collections::BTreeSet::new();
        for k in 0..2000 {
            let l = World::payload_len(3, k);
            assert!((PAYLOAD_MIN..=PAYLOAD_MAX).contains(&l));
            sizes.insert(l);
            assert_eq!(World::payload(3, k).len(), l);
        }
        assert!(sizes.len() > 200, "sizes spread over the range");
        assert_eq!(World::payload(7, 9), World::payload(7, 9));
        assert_ne!(World::payload(7, 9), World::payload(7, 10));
        assert_ne!(World::payload(7, 9), World::payload(8, 9));
    }
}
