//! The scenarios (guest memory, zone state, dirty rate) and when, in a
//! run, the migration starts.
//!
//! The zone guest builds its whole state after its `zone: start` line (its
//! tick clock starts at that line), so a paced guest first runs its ticks
//! back to back until it has caught up with its schedule. A migration
//! started then would see a faster writer than the cmdline asks for, so the
//! bench measures, per VMM and state size, the build time `I` and the time
//! of one unpaced tick `w` ([`Timing`]), and starts the migration once the
//! guest is on schedule: `(I + w) · tick / (tick − w)` after its start line,
//! plus two ticks. The guest runs on long enough for the migration to end
//! within a generous budget and then ends on the destination.

use std::time::Duration;

/// Client updates (256 random entities) and the 64 KiB inbox: pages the
/// zone writes every tick whatever the cmdline says.
pub const BASE_PAGES_PER_TICK: u64 = 256 + 16;
/// The tick of the paced levels.
pub const TICK_US: u64 = 200_000;
/// The seed every scenario runs with.
pub const SEED: u64 = 11;

/// How fast the guest dirties its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Level {
    /// Only the client updates and the inbox (`dirty_pages=0`).
    Idle,
    /// 1/64 of the state's pages per tick.
    Low,
    /// 1/8 of the state's pages per tick.
    Mid,
    /// Every page every tick, paced (`dirty_all=1`).
    High,
    /// Every page every tick, unpaced (`dirty_all=1 tick_us=0`).
    Flat,
}

impl Level {
    pub const ALL: [Level; 5] = [
        Level::Idle,
        Level::Low,
        Level::Mid,
        Level::High,
        Level::Flat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Idle => "idle",
            Level::Low => "low",
            Level::Mid => "mid",
            Level::High => "high",
            Level::Flat => "flat",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.as_str() == s)
    }
}

/// One guest workload to migrate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub mem_mib: u64,
    pub state_mib: u64,
    pub level: Level,
}

impl Scenario {
    pub fn name(&self) -> String {
        format!("{}MiB-{}", self.state_mib, self.level.as_str())
    }

    fn state_pages(&self) -> u64 {
        self.state_mib * 256
    }

    fn dirty_pages(&self) -> u64 {
        match self.level {
            Level::Idle | Level::High | Level::Flat => 0,
            Level::Low => self.state_pages() / 64,
            Level::Mid => self.state_pages() / 8,
        }
    }

    pub fn tick_us(&self) -> u64 {
        match self.level {
            Level::Flat => 0,
            _ => TICK_US,
        }
    }

    /// Page writes per second the cmdline asks for (null when unpaced).
    pub fn dirty_pages_per_s(&self) -> Option<f64> {
        let tick = self.tick_us();
        if tick == 0 {
            return None;
        }
        let all = match self.level {
            Level::High => self.state_pages(),
            _ => 0,
        };
        Some((self.dirty_pages() + BASE_PAGES_PER_TICK + all) as f64 * 1e6 / tick as f64)
    }

    /// The dirtying keys of the cmdline.
    fn dirty_keys(&self) -> String {
        let mut k = format!(
            "dirty_pages={} tick_us={}",
            self.dirty_pages(),
            self.tick_us()
        );
        if matches!(self.level, Level::High | Level::Flat) {
            k.push_str(" dirty_all=1");
        }
        k
    }

    pub fn cmdline(&self, ticks: u64) -> String {
        format!(
            "ticks={ticks} seed={SEED} state_mib={} {}",
            self.state_mib,
            self.dirty_keys()
        )
    }

    /// What the migration may take before the guest would end under it:
    /// generous, since a writer the link cannot outrun runs many rounds.
    pub fn budget(&self) -> Duration {
        let rounds = match self.level {
            Level::High | Level::Flat => 4.0,
            _ => 1.0,
        };
        // At a pessimistic 100 MiB/s per round's state.
        Duration::from_secs(2) + Duration::from_secs_f64(rounds * self.state_mib as f64 / 100.0)
    }
}

/// A VMM's speed with this state, from two unpaced runs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// `zone: start` → the state built (about).
    pub build: Duration,
    /// One unpaced tick with every page written (`dirty_all=1`).
    pub tick: Duration,
}

impl Timing {
    /// From the start → done times of a 1-tick and a `k`-tick unpaced run.
    pub fn from_runs(one: Duration, k_ticks: u64, k: Duration) -> Timing {
        let extra = k_ticks.saturating_sub(1).max(1) as u32;
        let tick = k.saturating_sub(one) / extra;
        Timing {
            build: one.saturating_sub(tick),
            tick,
        }
    }
}

/// When the migration starts and how long the guest runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub ticks: u64,
    /// After the guest's start line.
    pub migrate_after: Duration,
}

/// Ticks the guest runs after the migration's budget (so it always ends on
/// the destination, and the last line is worth comparing).
const TAIL: Duration = Duration::from_millis(1000);

pub fn plan(s: &Scenario, t: Timing) -> Plan {
    let w = t.tick.as_secs_f64();
    let built = t.build.as_secs_f64() + w;
    let (migrate_after, tick) = match s.tick_us() {
        0 => (built + 10.0 * w + 0.3, w.max(1e-4)),
        us => {
            let tick = us as f64 / 1e6;
            // A tick that does not fit its slot never catches up: migrate
            // after the build and a few ticks, as unpaced.
            let on_schedule = match tick > 1.5 * w {
                true => built * tick / (tick - w),
                false => built + 3.0 * w,
            };
            (on_schedule + 2.0 * tick, tick)
        }
    };
    let run = migrate_after + (s.budget() + TAIL).as_secs_f64();
    let ticks = ((run - t.build.as_secs_f64()).max(tick) / tick).ceil() as u64;
    Plan {
        ticks: ticks.max(2),
        migrate_after: Duration::from_secs_f64(migrate_after),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdlines_and_rates_follow_the_level() {
        let s = Scenario {
            mem_mib: 1024,
            state_mib: 16,
            level: Level::Mid,
        };
        assert_eq!(
            s.cmdline(50),
            "ticks=50 seed=11 state_mib=16 dirty_pages=512 tick_us=200000"
        );
        assert_eq!(s.dirty_pages_per_s(), Some((512.0 + 272.0) * 5.0));
        let f = Scenario {
            level: Level::Flat,
            ..s.clone()
        };
        assert!(f
            .cmdline(9)
            .ends_with("dirty_pages=0 tick_us=0 dirty_all=1"));
        assert_eq!(f.dirty_pages_per_s(), None);
        let h = Scenario {
            level: Level::High,
            ..s
        };
        assert_eq!(h.dirty_pages_per_s(), Some((4096.0 + 272.0) * 5.0));
        assert_eq!(Level::parse("flat"), Some(Level::Flat));
    }

    #[test]
    fn the_migration_waits_for_the_schedule() {
        let t = Timing::from_runs(Duration::from_millis(1040), 11, Duration::from_millis(1440));
        assert_eq!(t.tick, Duration::from_millis(40));
        assert_eq!(t.build, Duration::from_millis(1000));
        let s = Scenario {
            mem_mib: 1024,
            state_mib: 256,
            level: Level::Idle,
        };
        let p = plan(&s, t);
        // (1.04 s) · 0.2 / 0.16 = 1.3 s on schedule, + 2 ticks.
        assert!((p.migrate_after.as_secs_f64() - 1.7).abs() < 1e-6, "{p:?}");
        // The guest runs past the migration's budget.
        let run = p.ticks as f64 * 0.2 + 1.0;
        assert!(run > 1.7 + s.budget().as_secs_f64(), "{p:?}");
        let f = plan(
            &Scenario {
                level: Level::Flat,
                ..s
            },
            t,
        );
        assert!(f.ticks as f64 * 0.04 > f.migrate_after.as_secs_f64());
    }
}
