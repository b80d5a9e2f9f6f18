//! dve: the game-world simulation of issue 9 on a local cluster — zone
//! VMs on hosts that own equal strips of a grid of zones, simulated clients
//! moving toward two opposite corners, with and without the policy engine
//! (Gerofi, Fujita & Ishikawa, IEEE Cluster 2010: 10×10 zones, 5 nodes × 20
//! zones, 10,000 clients sending 20 updates/s of 256–512 bytes).
//!
//! Per run (`--policy off`, `--policy on`; both, off first, without the
//! flag) it makes its own cluster (`run`), prints one JSON object
//! (`record::Record`) on stdout with `--json` (a summary otherwise),
//! appends it to `DIR/dve.jsonl` and its time series to
//! `DIR/dve-series.jsonl`, and draws the figures (`plots`).
//!
//! **Scale** (this machine has 2 cores for all hosts and other users):
//! each client sends `20 × --rate-scale` updates a second (default 0.05:
//! 1/s, 10,000 updates/s for 10,000 clients; `--quick` 0.2); a zone guest
//! spends `update_cost` passes over each payload (default 50, ~15–50 µs
//! of guest CPU an update here, by the machine's load); zones tick every
//! 200 ms (a tick costs 0.3–0.55 ms of host CPU with 1 MiB of state even
//! when idle, so 100 zones at 50 ms would burn a core doing nothing). A host's capacity
//! (`--cpu-capacity`, what the policy's loads are fractions of) is set so
//! the average host runs at [`TARGET_AVG`] of it: from the off run's
//! measured CPU when both run, else from the costs measured on this
//! machine ([`COST_PER_UPDATE_US`] and the others). The policy's
//! thresholds sit around that average ([`policy_config`]). See
//! BENCHMARKS.md, "Game world (dve)".

mod clients;
mod plots;
mod record;
mod run;
mod world;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use world::{World, WorldConfig};

/// The average host load (fraction of capacity) the capacity aims at.
const TARGET_AVG: f64 = 0.65;
/// Measured here (Dec 1 2026; the default run used 0.46 cores in all):
/// a host's CPU per client update (ingress, ring, acks) plus per pass of
/// `update_cost` over its payload, µs; per zone tick (exits, the state
/// scan of 1 MiB), µs; and a daemon's own, cores. Only a first guess: on
/// a loaded machine the same work costs up to twice the CPU time, which
/// is why the on run takes its capacity from the off run.
const COST_PER_UPDATE_US: f64 = 8.0;
const COST_PER_PASS_US: f64 = 0.35;
const COST_PER_TICK_US: f64 = 300.0;
const COST_PER_HOST_CORES: f64 = 0.01;

#[derive(Parser, Debug)]
#[command(
    name = "dve",
    about = "The game-world simulation (issue 9): zones on a local cluster, clients moving to two \
             corners, with and without the policy engine; needs root and /dev/kvm"
)]
struct Args {
    /// One JSON object per run on stdout (one a line).
    #[arg(long)]
    json: bool,
    /// A small run: 36 zones, 4 hosts, 1000 clients at 4 updates/s, 40 s
    /// (unless given).
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    zones: Option<u32>,
    #[arg(long)]
    hosts: Option<u32>,
    #[arg(long)]
    clients: Option<u32>,
    #[arg(long)]
    duration_s: Option<f64>,
    /// on or off; both (off, then on) without it.
    #[arg(long)]
    policy: Option<String>,
    /// Updates a second per client: 20 × this [default: 0.05, --quick 0.2].
    #[arg(long)]
    rate_scale: Option<f64>,
    /// Passes over each update's payload in the guest.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=100_000))]
    update_cost: u64,
    /// The zones' tick.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1_000..=1_000_000))]
    tick_us: u64,
    /// Each host's capacity in cores, as the policy sees it (default: see
    /// the bench's docs).
    #[arg(long)]
    cpu_capacity: Option<f64>,
    /// The policy's thresholds (JSON, merged over the bench's).
    #[arg(long)]
    policy_config: Option<String>,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60_000))]
    policy_period_ms: u64,
    /// Guest memory and zone state, MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(16..=1024))]
    mem_mib: u64,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    state_mib: u64,
    /// How long the final drain may take.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=600))]
    drain_s: u64,
    /// Write the SVG figures here.
    #[arg(long, default_value = "benches/results")]
    plots: PathBuf,
    /// Run nothing: re-plot from these series files (dve-series.jsonl);
    /// repeatable.
    #[arg(long)]
    plot_input: Vec<PathBuf>,
    /// Append the records and series here.
    #[arg(long, default_value = "benches/results")]
    results: PathBuf,
    /// The forkd binary (default: `forkd` next to this binary).
    #[arg(long)]
    forkd_bin: Option<PathBuf>,
}

/// The policy's thresholds for a run whose average host load is about
/// [`TARGET_AVG`]: the transfer policy relative to the cluster's average
/// (overloaded above 1.1 × it, until under 1.03 ×; the absolute marks sit
/// above anything a host reaches here), the engine's means and
/// two-period confirmation, short cool-downs and two migrations in
/// flight so it keeps up with the clients; the selection's `min_move` and
/// `near_equal` are the engine's (fractions, so they scale with these
/// small zones); fork and join thresholds stay the engine's (a zone VM
/// here never needs more than its vCPU).
fn policy_config(over: Option<&str>) -> Result<String> {
    let mut v = serde_json::json!({
        "high_water": 0.95,
        "low_water": 0.85,
        "fit_below": 0.9,
        "above_average": 1.1,
        "back_to_average": 1.03,
        "host_cooldown_ms": 3000,
        "zone_cooldown_ms": 20000,
        "max_migrations": 2
    });
    if let Some(o) = over {
        let o: serde_json::Value =
            serde_json::from_str(o).context("--policy-config is not JSON")?;
        let (Some(m), Some(add)) = (v.as_object_mut(), o.as_object()) else {
            bail!("--policy-config must be a JSON object");
        };
        for (k, x) in add {
            m.insert(k.clone(), x.clone());
        }
    }
    Ok(v.to_string())
}

/// The capacity that puts the average host at [`TARGET_AVG`], from the
/// cost model.
fn modelled_capacity(w: &WorldConfig, update_cost: u64, tick_us: u64) -> f64 {
    let updates = w.clients as f64 * w.rate_hz;
    let per_update = COST_PER_UPDATE_US + COST_PER_PASS_US * update_cost as f64;
    let ticks = w.zones as f64 * 1e6 / tick_us as f64;
    let cpu = updates * per_update * 1e-6
        + ticks * COST_PER_TICK_US * 1e-6
        + w.hosts as f64 * COST_PER_HOST_CORES;
    round3(cpu / (w.hosts as f64 * TARGET_AVG))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn append(path: &Path, line: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot make {}", d.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

fn summary(r: &record::Record) -> String {
    format!(
        "dve policy {}: max/avg load {:.2} (5 s mean {:.2}, last 30 % {:.2}); p99 latency {:.1} ms; lost {}; migrations {} forks {} joins {}; max downtime {:.1} ms; decisions {} ({} failed); avg load {:.2} of {} cores/host",
        r.policy,
        r.max_over_avg_load,
        r.max_over_avg_load_5s,
        r.max_over_avg_load_end,
        r.p99_update_latency_ms,
        r.lost_updates,
        r.migrations,
        r.forks,
        r.joins,
        r.max_downtime_ms,
        r.decisions,
        r.decisions_failed,
        r.avg_load,
        r.cpu_capacity
    )
}

fn main() -> Result<()> {
    let a = Args::parse();
    if !a.plot_input.is_empty() {
        let series: Vec<record::Series> = bench_shared::read_jsonl(&a.plot_input, "dve series")?;
        let files = plots::draw(&series, &a.plots)?;
        for f in files {
            eprintln!("dve: wrote {}", f.display());
        }
        return Ok(());
    }
    bench_shared::need_kvm("dve")?;
    bench_shared::cluster::install_signal_handlers()?;
    let q = a.quick;
    let rate_scale = a.rate_scale.unwrap_or(if q { 0.2 } else { 0.05 });
    let cfg = WorldConfig {
        zones: a.zones.unwrap_or(if q { 36 } else { 100 }),
        hosts: a.hosts.unwrap_or(if q { 4 } else { 5 }),
        clients: a.clients.unwrap_or(if q { 1000 } else { 10_000 }),
        duration_s: a.duration_s.unwrap_or(if q { 40.0 } else { 240.0 }),
        rate_hz: 20.0 * rate_scale,
    };
    if !(rate_scale.is_finite() && rate_scale > 0.0 && rate_scale <= 1.0) {
        bail!("--rate-scale must be in (0, 1]");
    }
    if cfg.duration_s > 1800.0 {
        bail!("--duration-s: at most 1800");
    }
    let world = World::new(cfg.clone())?;
    let runs: Vec<bool> = match a.policy.as_deref() {
        None => vec![false, true],
        Some("on") => vec![true],
        Some("off") => vec![false],
        Some(x) => bail!("--policy {x}: on or off"),
    };
    let forkd = bench_shared::forkd_bin(a.forkd_bin.clone())?;
    let mut capacity = a
        .cpu_capacity
        .unwrap_or_else(|| modelled_capacity(&cfg, a.update_cost, a.tick_us));
    let mut series = Vec::new();
    for policy in runs {
        let params = run::Params {
            world: world.clone(),
            policy,
            update_cost: a.update_cost,
            tick_us: a.tick_us,
            mem_mib: a.mem_mib,
            state_mib: a.state_mib,
            cpu_capacity: capacity,
            policy_config: policy_config(a.policy_config.as_deref())?,
            policy_period_ms: a.policy_period_ms,
            client_tick: Duration::from_millis(50),
            drain: Duration::from_secs(a.drain_s),
            forkd: forkd.clone(),
        };
        let (rec, s) = run::run(&params)?;
        let line = serde_json::to_string(&rec)?;
        if a.json {
            println!("{line}");
        } else {
            println!("{}", summary(&rec));
        }
        eprintln!("{}", summary(&rec));
        append(&a.results.join("dve.jsonl"), &line)?;
        append(
            &a.results.join("dve-series.jsonl"),
            &serde_json::to_string(&s)?,
        )?;
        series.push(s);
        // The on run's capacity from the off run's measured CPU, unless
        // given: the same average load whatever this machine's speed.
        if !policy && a.cpu_capacity.is_none() && rec.cluster_cpu_cores > 0.0 {
            capacity = round3(rec.cluster_cpu_cores / (cfg.hosts as f64 * TARGET_AVG));
            eprintln!(
                "dve: the off run used {:.3} cores: {capacity} cores per host for the on run",
                rec.cluster_cpu_cores
            );
        }
    }
    let files = plots::draw(&series, &a.plots)?;
    for f in files {
        eprintln!("dve: wrote {}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_config_merges_and_checks() {
        let c: forkd::policy::PolicyConfig =
            serde_json::from_str(&policy_config(None).unwrap()).unwrap();
        c.check().unwrap();
        assert_eq!(c.max_migrations, 2);
        let c: forkd::policy::PolicyConfig =
            serde_json::from_str(&policy_config(Some(r#"{"max_migrations": 1}"#)).unwrap())
                .unwrap();
        assert_eq!(c.max_migrations, 1);
        assert!(policy_config(Some("[1]")).is_err());
        assert!(policy_config(Some("{")).is_err());
    }

    #[test]
    fn capacity_model_scales_with_the_load() {
        let w = WorldConfig {
            zones: 100,
            hosts: 5,
            clients: 10_000,
            duration_s: 60.0,
            rate_hz: 2.0,
        };
        let c = modelled_capacity(&w, 50, 200_000);
        assert!(c > 0.0);
        let more = modelled_capacity(
            &WorldConfig {
                clients: 20_000,
                ..w.clone()
            },
            50,
            200_000,
        );
        assert!(more > c);
        assert!(modelled_capacity(&w, 100, 200_000) > c);
    }
}
