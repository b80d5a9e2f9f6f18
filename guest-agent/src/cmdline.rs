//! The zone guest's command line (`key=value` words, see DESIGN.md's guest
//! contract). Unknown keys, malformed values and inconsistent combinations
//! are errors that name the offending word.

use core::fmt;

/// What the zone workload is asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneConfig {
    /// Simulation ticks to run.
    pub ticks: u64,
    /// Seed of every pseudo-random stream.
    pub seed: u64,
    /// Size of the zone state in MiB; all of it is scanned every tick.
    pub state_mib: u64,
    /// MiB of fresh buffers allocated and fully overwritten per tick.
    pub alloc_mib: u64,
    /// Pages of zone state dirtied per tick.
    pub dirty_pages: u64,
    /// Every page of the zone state dirtied every tick, in order (besides
    /// `dirty_pages` random ones): a writer as fast as the guest goes,
    /// which pre-copy migration cannot outrun when unpaced.
    pub dirty_all: bool,
    /// Pace ticks to this many microseconds by the TSC (0: flat out).
    pub tick_us: u64,
    /// Wait for the next tick by spinning on the TSC even when the VMM
    /// could sleep the vCPU (`OP_SLEEP`): the old behaviour, for
    /// measurements. Timing only.
    pub pace_spin: bool,
    /// Tick at which the zone forks (before that tick runs).
    pub fork_at: Option<u64>,
    /// Clones requested at `fork_at`.
    pub clones: Option<u64>,
    /// Straight-line stand-in for clone I: no hypercall at `fork_at`.
    pub as_clone: Option<u64>,
    /// Test hook: announce a hostile HELLO to the VMM (1: a 1 TiB
    /// allocator bitmap, 2: addresses past the end of memory), to check
    /// that the VMM contains it. 0: the real HELLO.
    pub hostile_hello: u64,
    /// `clients=host`: the zone takes its client updates from the inbox
    /// ring the daemon fills (`abi::INBOX_*`) instead of generating 256
    /// per tick itself (`clients=self`, the default).
    pub host_clients: bool,
    /// `update_cost=K`: passes over each host update's payload when it is
    /// applied (the CPU an update costs; default 1).
    pub update_cost: u64,
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig {
            ticks: 100,
            seed: 1,
            state_mib: 16,
            alloc_mib: 0,
            dirty_pages: 0,
            dirty_all: false,
            tick_us: 0,
            pace_spin: false,
            fork_at: None,
            clones: None,
            as_clone: None,
            hostile_hello: 0,
            host_clients: false,
            update_cost: 1,
        }
    }
}

/// Largest values accepted per key.
pub const MAX_TICKS: u64 = 1_000_000_000;
pub const MAX_STATE_MIB: u64 = 3072;
pub const MAX_ALLOC_MIB: u64 = 1024;
pub const MAX_TICK_US: u64 = 10_000_000;
pub const MAX_CLONES: u64 = 4096;

/// Why a command line was refused. Borrowed slices point into the cmdline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    UnknownKey(&'a str),
    MissingValue(&'a str),
    BadNumber { key: &'a str, value: &'a str },
    OutOfRange { key: &'static str, max: u64 },
    Duplicate(&'a str),
    Inconsistent(&'static str),
}

impl fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdlineError::UnknownKey(k) => write!(f, "unknown cmdline key '{k}'"),
            CmdlineError::MissingValue(w) => write!(f, "cmdline word '{w}' is not key=value"),
            CmdlineError::BadNumber { key, value } if *key == "clients" => {
                write!(
                    f,
                    "cmdline key 'clients' is 'host' or 'self', got '{value}'"
                )
            }
            CmdlineError::BadNumber { key, value } => {
                write!(f, "cmdline key '{key}' needs a number, got '{value}'")
            }
            CmdlineError::OutOfRange { key, max } => {
                write!(f, "cmdline key '{key}' is out of range (1..={max} or less)")
            }
            CmdlineError::Duplicate(k) => write!(f, "cmdline key '{k}' given twice"),
            CmdlineError::Inconsistent(why) => write!(f, "cmdline: {why}"),
        }
    }
}

fn parse_number(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn check(key: &'static str, v: u64, min: u64, max: u64) -> Result<u64, CmdlineError<'static>> {
    if v < min || v > max {
        Err(CmdlineError::OutOfRange { key, max })
    } else {
        Ok(v)
    }
}

/// Parses a whole command line.
pub fn parse(cmdline: &str) -> Result<ZoneConfig, CmdlineError<'_>> {
    let mut cfg = ZoneConfig::default();
    let mut seen = 0u32;
    for word in cmdline.split_ascii_whitespace() {
        let (key, value) = word
            .split_once('=')
            .ok_or(CmdlineError::MissingValue(word))?;
        let n = parse_number(value).ok_or(CmdlineError::BadNumber { key, value });
        let bit = match key {
            "ticks" => {
                cfg.ticks = check("ticks", n?, 1, MAX_TICKS)?;
                0
            }
            "seed" => {
                cfg.seed = n?;
                1
            }
            "state_mib" => {
                cfg.state_mib = check("state_mib", n?, 1, MAX_STATE_MIB)?;
                2
            }
            "alloc_mib" => {
                cfg.alloc_mib = check("alloc_mib", n?, 0, MAX_ALLOC_MIB)?;
                3
            }
            "dirty_pages" => {
                cfg.dirty_pages = check("dirty_pages", n?, 0, u32::MAX as u64)?;
                4
            }
            "tick_us" => {
                cfg.tick_us = check("tick_us", n?, 0, MAX_TICK_US)?;
                5
            }
            "fork_at" => {
                cfg.fork_at = Some(check("fork_at", n?, 0, MAX_TICKS)?);
                6
            }
            "clones" => {
                cfg.clones = Some(check("clones", n?, 1, MAX_CLONES)?);
                7
            }
            "as_clone" => {
                cfg.as_clone = Some(check("as_clone", n?, 0, MAX_CLONES)?);
                8
            }
            "hostile_hello" => {
                cfg.hostile_hello = check("hostile_hello", n?, 0, 2)?;
                9
            }
            "pace_spin" => {
                cfg.pace_spin = check("pace_spin", n?, 0, 1)? == 1;
                10
            }
            "dirty_all" => {
                cfg.dirty_all = check("dirty_all", n?, 0, 1)? == 1;
                11
            }
            "clients" => {
                cfg.host_clients = match value {
                    "host" => true,
                    "self" => false,
                    _ => return Err(CmdlineError::BadNumber { key, value }),
                };
                12
            }
            "update_cost" => {
                cfg.update_cost = check("update_cost", n?, 0, crate::clients::MAX_UPDATE_COST)?;
                13
            }
            _ => return Err(CmdlineError::UnknownKey(key)),
        };
        if seen & (1 << bit) != 0 {
            return Err(CmdlineError::Duplicate(key));
        }
        seen |= 1 << bit;
    }
    if let Some(f) = cfg.fork_at {
        if f > cfg.ticks {
            return Err(CmdlineError::Inconsistent("fork_at must not exceed ticks"));
        }
    }
    if cfg.clones.is_some() != cfg.fork_at.is_some() {
        return Err(CmdlineError::Inconsistent("fork_at and clones go together"));
    }
    if cfg.as_clone.is_some() && cfg.fork_at.is_none() {
        return Err(CmdlineError::Inconsistent(
            "as_clone needs fork_at and clones",
        ));
    }
    if let (Some(i), Some(c)) = (cfg.as_clone, cfg.clones) {
        if i > c {
            return Err(CmdlineError::Inconsistent(
                "as_clone must not exceed clones",
            ));
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_keys() {
        assert_eq!(parse("").unwrap(), ZoneConfig::default());
        let c =
            parse("ticks=5 seed=0x10 state_mib=256 alloc_mib=2 dirty_pages=7 tick_us=100").unwrap();
        assert_eq!((c.ticks, c.seed, c.state_mib), (5, 16, 256));
        assert_eq!((c.alloc_mib, c.dirty_pages, c.tick_us), (2, 7, 100));
        let c = parse("ticks=9 fork_at=3 clones=4 as_clone=2").unwrap();
        assert_eq!(
            (c.fork_at, c.clones, c.as_clone),
            (Some(3), Some(4), Some(2))
        );
        assert!(parse("tick_us=5 pace_spin=1").unwrap().pace_spin);
        assert!(parse("dirty_all=1").unwrap().dirty_all);
        let c = parse("clients=host update_cost=50").unwrap();
        assert!(c.host_clients);
        assert_eq!(c.update_cost, 50);
        assert!(!parse("clients=self").unwrap().host_clients);
        assert!(parse("clients=bogus").is_err());
        assert!(parse("update_cost=100001").is_err());
        assert!(parse("dirty_all=2").is_err());
        assert!(!parse("pace_spin=0").unwrap().pace_spin);
        assert!(matches!(
            parse("pace_spin=2"),
            Err(CmdlineError::OutOfRange { .. })
        ));
    }

    #[test]
    fn errors_name_the_word() {
        assert_eq!(parse("bogus=1"), Err(CmdlineError::UnknownKey("bogus")));
        assert_eq!(parse("ticks"), Err(CmdlineError::MissingValue("ticks")));
        assert_eq!(
            parse("seed=x"),
            Err(CmdlineError::BadNumber {
                key: "seed",
                value: "x"
            })
        );
        assert!(matches!(
            parse("state_mib=0"),
            Err(CmdlineError::OutOfRange { .. })
        ));
        assert_eq!(
            parse("ticks=1 ticks=2"),
            Err(CmdlineError::Duplicate("ticks"))
        );
        assert!(matches!(
            parse("fork_at=3"),
            Err(CmdlineError::Inconsistent(_))
        ));
        assert!(matches!(
            parse("as_clone=1"),
            Err(CmdlineError::Inconsistent(_))
        ));
        assert!(matches!(
            parse("ticks=2 fork_at=3 clones=1"),
            Err(CmdlineError::Inconsistent(_))
        ));
    }
}
