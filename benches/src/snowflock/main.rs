//! snowflock: SnowFlock's figures on a local cluster of forkd daemons.
//!
//! The bench makes its own cluster (`forkd cluster up`, taken down at the
//! end whatever happens), boots a zone parent on h1 through h1's API, lets
//! it build its state, forks it into N clones spread over every host and
//! waits for all of them to end; per configuration (distribution ×
//! heuristics × loss × clones) it prints one JSON object (see
//! `record::Record` and BENCHMARKS.md, "SnowFlock figures"). Figures the
//! daemon does not report are null; nothing is made up.

mod api;
mod figures;
mod loss;
mod plots;
mod record;
mod resident;
mod run;

use anyhow::{bail, Result};
use api::{ForkKind, Mode};
use bench_shared::{cluster, forkd_bin};
use clap::{Parser, ValueEnum};
use figures::OneClone;
use record::Record;
use resident::Resident;
use run::Setup;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// The clone counts of `--sweep`.
const SWEEP: [u64; 7] = [1, 2, 4, 8, 16, 32, 64];

#[derive(Parser, Debug)]
#[command(
    name = "snowflock",
    about = "SnowFlock's figures (clone time, memory server egress, multicast vs unicast, \
             avoidance heuristics, loss) on a local forkd cluster; needs root and /dev/kvm"
)]
struct Args {
    /// Clones per fork.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=64))]
    clones: u64,
    /// Hosts of the local cluster (h1 holds the parent; clones spread over all).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    hosts: u32,
    /// Guest memory of every parent (and so of every clone), MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..=3072))]
    mem_mib: u64,
    /// Only this distribution (default: both).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Only this heuristics setting (default: both; `--sweep`: on).
    #[arg(long, value_enum)]
    heuristics: Option<OnOff>,
    /// Drop this % of the UDP datagrams arriving at the clone hosts other
    /// than the parent's (nftables).
    #[arg(long, default_value_t = 0.0)]
    loss_pct: f64,
    /// Clone counts 1, 2, 4, 8, 16, 32, 64 for each mode (instead of --clones).
    #[arg(long)]
    sweep: bool,
    /// Write SVG figures into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Run nothing: make the figures of `--plots` from these JSON-lines
    /// files (earlier `--json` output); repeatable.
    #[arg(long, requires = "plots")]
    plot_input: Vec<PathBuf>,
    /// One JSON object per configuration on stdout (one per line).
    #[arg(long)]
    json: bool,
    /// The forkd binary (default: `forkd` next to this binary).
    #[arg(long)]
    forkd_bin: Option<PathBuf>,
    /// The zone state the parent builds before the fork, MiB (every clone
    /// reads all of it every tick).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1024))]
    state_mib: u64,
    /// Fresh buffers the zone allocates and overwrites per tick, MiB.
    #[arg(long, default_value_t = 4)]
    alloc_mib: u64,
    /// State pages the zone dirties per tick.
    #[arg(long, default_value_t = 64)]
    dirty_pages: u64,
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// The zone's tick length, µs (the parent idles between ticks).
    #[arg(long, default_value_t = 50_000, value_parser = clap::value_parser!(u64).range(1_000..=1_000_000))]
    tick_us: u64,
    /// The tick the fork lands before (the parent builds its state first).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    fork_tick: u64,
    /// Ticks every clone (and the parent) runs after the fork.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    ticks_after: u64,
    /// Bound on one family: fork → every clone ended, s.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

/// One configuration.
#[derive(Debug, Clone, Copy)]
struct Config {
    kind: ForkKind,
    clones: u64,
}

fn configs(a: &Args) -> Vec<Config> {
    let modes = match a.mode {
        Some(m) => vec![m],
        None => vec![Mode::Unicast, Mode::Multicast],
    };
    let heur = match (a.heuristics, a.sweep) {
        (Some(h), _) => vec![h == OnOff::On],
        (None, true) => vec![true],
        (None, false) => vec![false, true],
    };
    let counts: Vec<u64> = match a.sweep {
        true => SWEEP.to_vec(),
        false => vec![a.clones],
    };
    let mut v = Vec::new();
    for &clones in &counts {
        for &mode in &modes {
            for &heuristics in &heur {
                v.push(Config {
                    kind: ForkKind { mode, heuristics },
                    clones,
                });
            }
        }
    }
    v
}

/// What the runs share: the cluster, and per kind the 1-clone run, per
/// fork tick the resident reference.
struct Bench<'c> {
    cluster: &'c cluster::Cluster,
    hosts: Vec<api::Api>,
    setup: Setup,
    loss_pct: f64,
    one: HashMap<(Mode, bool), OneClone>,
    resident: HashMap<u64, Resident>,
}

impl Bench<'_> {
    fn one_clone(&mut self, kind: ForkKind) -> Result<OneClone> {
        if let Some(o) = self.one.get(&(kind.mode, kind.heuristics)) {
            return Ok(o.clone());
        }
        // One clone off the parent's host (h2), or on h1 in a 1-host cluster.
        let host = self
            .setup
            .all_hosts()
            .get(1)
            .cloned()
            .unwrap_or("h1".into());
        eprintln!(
            "snowflock:   1 clone ({}, heuristics {}) on {host}",
            kind.mode.as_str(),
            kind.heuristics
        );
        let r = run::family(
            self.cluster,
            &self.hosts,
            &self.setup,
            1,
            &[host],
            kind,
            0.0,
        )?;
        let o = OneClone::from_run(&r);
        self.one.insert((kind.mode, kind.heuristics), o.clone());
        Ok(o)
    }

    fn resident(&mut self, fork_tick: u64) -> Result<Resident> {
        if let Some(r) = self.resident.get(&fork_tick) {
            return Ok(r.clone());
        }
        eprintln!("snowflock:   resident reference (fork tick {fork_tick})");
        let s = &self.setup;
        let r = resident::run(s.mem_mib, &s.cmdline(), s.tick_us, fork_tick, 1, 1)?;
        if !r.on_schedule {
            eprintln!("snowflock:   note: the resident run was behind its tick schedule at tick {fork_tick}");
        }
        self.resident.insert(fork_tick, r.clone());
        Ok(r)
    }

    fn config(&mut self, c: Config) -> Result<Record> {
        let one = self.one_clone(c.kind)?;
        eprintln!(
            "snowflock:   {} clones over {} hosts",
            c.clones, self.setup.hosts
        );
        let spread = self.setup.all_hosts();
        let run = run::family(
            self.cluster,
            &self.hosts,
            &self.setup,
            c.clones,
            &spread,
            c.kind,
            self.loss_pct,
        )?;
        if run.fork_tick != Some(self.setup.fork_tick) {
            eprintln!(
                "snowflock:   note: the fork landed before tick {:?}, not {}",
                run.fork_tick, self.setup.fork_tick
            );
        }
        let resident = match run.fork_tick {
            Some(t) => Some(self.resident(t)?),
            None => None,
        };
        Ok(figures::record(&figures::Inputs {
            setup: &self.setup,
            kind: c.kind,
            loss_pct: self.loss_pct,
            clones: c.clones,
            run: &run,
            one: Some(&one),
            resident: resident.as_ref(),
        }))
    }
}

fn error_record(a: &Args, s: &Setup, c: Config, e: &anyhow::Error) -> Record {
    Record {
        mode: c.kind.mode.as_str().into(),
        heuristics: c.kind.heuristics,
        loss_pct: a.loss_pct,
        clones: c.clones,
        hosts: a.hosts,
        cmdline: s.cmdline(),
        mem_mib: a.mem_mib,
        error: Some(format!("{e:#}")),
        ..Record::default()
    }
}

fn emit(json: bool, r: &Record) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
    } else {
        println!("{}", record::table_row(r));
    }
    Ok(())
}

fn run_all(a: &Args, records: &mut Vec<Record>) -> Result<()> {
    let forkd = forkd_bin(a.forkd_bin.clone())?;
    bench_shared::need_kvm("snowflock")?;
    let setup = Setup {
        hosts: a.hosts,
        mem_mib: a.mem_mib,
        state_mib: a.state_mib,
        alloc_mib: a.alloc_mib,
        dirty_pages: a.dirty_pages,
        seed: a.seed,
        tick_us: a.tick_us,
        fork_tick: a.fork_tick,
        ticks_after: a.ticks_after,
        timeout: Duration::from_secs(a.timeout_s.max(1)),
    };
    let configs = configs(a);
    let mut cluster = cluster::Cluster::up(&forkd, a.hosts, "snowflock", "sfbench")?;
    let mut bench = Bench {
        hosts: run::apis(&cluster),
        cluster: &cluster,
        setup: setup.clone(),
        loss_pct: a.loss_pct,
        one: HashMap::new(),
        resident: HashMap::new(),
    };
    eprintln!(
        "snowflock: parent cmdline `{}`, {} MiB",
        setup.cmdline(),
        a.mem_mib
    );
    if !a.json {
        println!("{}", record::table_header());
    }
    let mut failed = 0;
    for (i, &c) in configs.iter().enumerate() {
        eprintln!(
            "snowflock: [{}/{}] {}, heuristics {}, {} clones, {}% loss",
            i + 1,
            configs.len(),
            c.kind.mode.as_str(),
            if c.kind.heuristics { "on" } else { "off" },
            c.clones,
            a.loss_pct
        );
        let load = bench_shared::load_avg();
        let r = match bench.config(c) {
            Ok(r) => Record {
                load_avg_1m: load,
                ..r
            },
            Err(e) => {
                cluster::check_stop()?;
                eprintln!("snowflock:   failed: {e:#}");
                failed += 1;
                Record {
                    load_avg_1m: load,
                    ..error_record(a, &setup, c, &e)
                }
            }
        };
        emit(a.json, &r)?;
        records.push(r);
    }
    drop(bench);
    cluster.down()?;
    if failed > 0 {
        bail!("{failed} of {} configurations failed", configs.len());
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !(0.0..=100.0).contains(&a.loss_pct) {
        bail!("--loss-pct must be within 0..=100");
    }
    let mut records = Vec::new();
    let result = if a.plot_input.is_empty() {
        cluster::install_signal_handlers()?;
        run_all(&a, &mut records)
    } else {
        bench_shared::read_jsonl(&a.plot_input, "snowflock").map(|r| records = r)
    };
    if let Some(dir) = &a.plots {
        for f in plots::write_all(dir, &records)? {
            eprintln!("snowflock: wrote {}", f.display());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_follow_the_flags() {
        let a = Args::parse_from(["snowflock"]);
        let c = configs(&a);
        assert_eq!(c.len(), 4);
        assert!(c.iter().all(|c| c.clones == 32));
        let a = Args::parse_from(["snowflock", "--sweep", "--mode", "multicast"]);
        let c = configs(&a);
        assert_eq!(c.len(), 7);
        assert!(c
            .iter()
            .all(|c| c.kind.heuristics && c.kind.mode == Mode::Multicast));
        let a = Args::parse_from(["snowflock", "--sweep"]);
        assert_eq!(configs(&a).len(), 14);
        let a = Args::parse_from(["snowflock", "--heuristics", "off", "--clones", "8"]);
        let c = configs(&a);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| !c.kind.heuristics && c.clones == 8));
        assert!(Args::try_parse_from(["snowflock", "--clones", "65"]).is_err());
    }
}
