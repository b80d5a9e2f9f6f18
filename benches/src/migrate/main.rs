//! migrate: forkd's live migration against QEMU 7.2's, on a local cluster.
//!
//! The bench makes its own 2-host cluster (`forkd cluster up`, taken down
//! at the end whatever happens), measures the link, and per scenario (a
//! 1 GiB zone guest with 16 or 256 MiB of state at a dirty rate from idle to
//! flat out, see `scenario`) migrates the same ELF and cmdline between two
//! QEMU processes and then h1 → h2 through forkd's API in each mode; per
//! scenario × mode it prints one JSON object (`record::Record`, with
//! `--json` one a line) or a table row, and progress on stderr. `--soak N`
//! runs N round trips of one guest instead. See BENCHMARKS.md, "Migration
//! figures".

mod forkd;
mod link;
mod plots;
mod qemu;
mod record;
mod run;
mod scenario;
mod soak;

use anyhow::{bail, Context, Result};
use bench_shared::api::Api;
use bench_shared::cluster::{self, Cluster};
use clap::Parser;
use record::Record;
use run::{Bench, Links};
use scenario::{Level, Scenario};
use std::path::PathBuf;

const MODES: [&str; 3] = ["precopy", "postcopy", "auto"];

#[derive(Parser, Debug)]
#[command(
    name = "migrate",
    about = "forkd's live migration (every mode the daemon takes) against QEMU 7.2's, \
             on a local 2-host forkd cluster; needs root and /dev/kvm"
)]
struct Args {
    /// One JSON object per scenario × mode on stdout (one per line).
    #[arg(long)]
    json: bool,
    /// One small scenario (256 MiB guest, 16 MiB state, the mid rate, the
    /// first of --modes): under a minute.
    #[arg(long)]
    quick: bool,
    /// forkd's modes, comma-separated; a mode the daemon refuses (422) is
    /// skipped with a note.
    #[arg(long, value_delimiter = ',', default_values_t = MODES.map(String::from))]
    modes: Vec<String>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(64..=4096))]
    mem_mib: u64,
    /// Zone state sizes, MiB, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [16u64, 256])]
    state_mib: Vec<u64>,
    /// Dirty rates: idle, low, mid, high, flat (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = Level::ALL.map(|l| l.as_str().to_owned()))]
    levels: Vec<String>,
    /// The downtime budget, both VMMs (QEMU's downtime-limit).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    downtime_ms: u64,
    /// Bandwidth cap, both VMMs; 0: none (QEMU then gets 100 GiB/s).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1_048_576))]
    bandwidth_mib_s: u64,
    /// Write SVG figures into this directory.
    #[arg(long)]
    plots: Option<PathBuf>,
    /// Run nothing: make the figures of `--plots` from these JSON-lines
    /// files (earlier `--json` output); repeatable.
    #[arg(long, requires = "plots")]
    plot_input: Vec<PathBuf>,
    /// Instead of the scenarios: N round trips h1 <-> h2 of one running
    /// guest (the first of --modes).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    soak: Option<u64>,
    /// Run every scenario this many times (the plots show the medians).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=20))]
    repeat: u64,
    /// The forkd binary (default: `forkd` next to this binary).
    #[arg(long)]
    forkd_bin: Option<PathBuf>,
}

fn scenarios(a: &Args) -> Result<Vec<Scenario>> {
    if a.quick {
        return Ok(vec![Scenario {
            mem_mib: 256,
            state_mib: 16,
            level: Level::Mid,
        }]);
    }
    let mut levels = Vec::new();
    for l in &a.levels {
        levels.push(Level::parse(l).with_context(|| format!("--levels: unknown level {l:?}"))?);
    }
    let mut v = Vec::new();
    for &state_mib in &a.state_mib {
        if state_mib == 0 || state_mib * 2 > a.mem_mib {
            bail!(
                "--state-mib {state_mib}: 1..={} for a {} MiB guest",
                a.mem_mib / 2,
                a.mem_mib
            );
        }
        for &level in &levels {
            v.push(Scenario {
                mem_mib: a.mem_mib,
                state_mib,
                level,
            });
        }
    }
    Ok(v)
}

fn modes(a: &Args) -> Result<Vec<String>> {
    for m in &a.modes {
        if !MODES.contains(&m.as_str()) {
            bail!("--modes: unknown mode {m:?} (precopy, postcopy, auto)");
        }
    }
    let mut m = a.modes.clone();
    if a.quick || a.soak.is_some() {
        m.truncate(1);
    }
    if m.is_empty() {
        bail!("--modes: none given");
    }
    Ok(m)
}

fn measure_links(c: &Cluster) -> Links {
    let (h1, h2) = (&c.hosts[0], &c.hosts[1]);
    let bridge = match h2.address {
        Some(ip) => link::measure(Some(h1.netns.clone()), Some(h2.netns.clone()), ip.into()),
        None => Err(anyhow::anyhow!("h2 has no address in the cluster status")),
    };
    let lo = link::measure(None, None, std::net::Ipv4Addr::LOCALHOST.into());
    let show = |r: &Result<f64>| match r {
        Ok(v) => format!("{v:.0} MiB/s"),
        Err(e) => format!("not measured ({e:#})"),
    };
    eprintln!(
        "migrate: link h1 -> h2 {}, loopback {}",
        show(&bridge),
        show(&lo)
    );
    Links {
        bridge_mib_s: bridge.ok(),
        loopback_mib_s: lo.ok(),
    }
}

fn run_all(a: &Args, records: &mut Vec<Record>) -> Result<()> {
    let forkd = bench_shared::forkd_bin(a.forkd_bin.clone())?;
    bench_shared::need_kvm("migrate")?;
    let scen = scenarios(a)?;
    let modes = modes(a)?;
    let guest = ::forkd::guest::default_guest();
    let qemu = qemu::find();
    if qemu.is_none() {
        eprintln!(
            "migrate: {} not found: the QEMU figures are left out",
            qemu::QEMU
        );
    }
    let mut cluster = Cluster::up(&forkd, 2, "migrate", "mgbench")?;
    let apis: Vec<Api> = cluster
        .hosts
        .iter()
        .map(|h| Api::new(&h.name, h.endpoint()))
        .collect();
    eprintln!(
        "migrate: load average {:?} (2 cores)",
        bench_shared::load_avg()
    );
    if let Some(n) = a.soak {
        let s = soak::Soak {
            apis: &apis,
            qemu: qemu.as_deref(),
            guest: &guest,
            mem_mib: a.mem_mib,
            mode: &modes[0],
            downtime_ms: a.downtime_ms,
            bandwidth_mib_s: a.bandwidth_mib_s,
        };
        let r = soak::run(&s, n)?;
        println!("{}", serde_json::to_string(&r)?);
        drop(apis);
        cluster.down()?;
        if let Some(e) = &r.error {
            bail!("soak: {e}");
        }
        return Ok(());
    }
    let mut bench = Bench::new(apis, qemu, guest, a.downtime_ms, a.bandwidth_mib_s);
    bench.links = measure_links(&cluster);
    if !a.json {
        println!("{}", record::table_header());
    }
    let mut failed = 0;
    let runs: Vec<(u64, &Scenario)> = (1..=a.repeat)
        .flat_map(|k| scen.iter().map(move |s| (k, s)))
        .collect();
    for (i, &(repeat, s)) in runs.iter().enumerate() {
        eprintln!(
            "migrate: [{}/{}] {} ({} MiB guest), run {repeat}",
            i + 1,
            runs.len(),
            s.name(),
            s.mem_mib
        );
        let mut emit = |r: Record| -> Result<()> {
            let r = Record { repeat, ..r };
            failed += usize::from(r.error.is_some());
            match a.json {
                true => println!("{}", serde_json::to_string(&r)?),
                false => println!("{}", record::table_row(&r)),
            }
            records.push(r);
            Ok(())
        };
        if let Err(e) = bench.scenario(s, &modes, &mut emit) {
            cluster::check_stop()?;
            eprintln!("migrate:   scenario {} failed: {e:#}", s.name());
            failed += 1;
        }
    }
    if bench.skipped.len() == modes.len() {
        eprintln!("migrate: every mode was refused: no forkd figures");
    }
    drop(bench);
    cluster.down()?;
    if failed > 0 {
        bail!("{failed} scenario runs failed");
    }
    Ok(())
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut records = Vec::new();
    let result = if a.plot_input.is_empty() {
        cluster::install_signal_handlers()?;
        run_all(&a, &mut records)
    } else {
        bench_shared::read_jsonl(&a.plot_input, "migrate").map(|r| records = r)
    };
    if let Some(dir) = &a.plots {
        for f in plots::write_all(dir, &records)? {
            eprintln!("migrate: wrote {}", f.display());
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_and_modes_follow_the_flags() {
        let a = Args::parse_from(["migrate"]);
        assert_eq!(scenarios(&a).unwrap().len(), 10);
        assert_eq!(modes(&a).unwrap(), MODES);
        let a = Args::parse_from(["migrate", "--quick", "--modes", "auto,precopy"]);
        let s = scenarios(&a).unwrap();
        assert_eq!((s.len(), s[0].mem_mib, s[0].state_mib), (1, 256, 16));
        assert_eq!(modes(&a).unwrap(), ["auto"]);
        let a = Args::parse_from(["migrate", "--levels", "idle,flat", "--state-mib", "16"]);
        assert_eq!(scenarios(&a).unwrap().len(), 2);
        let a = Args::parse_from(["migrate", "--modes", "fast"]);
        assert!(modes(&a).is_err());
        let a = Args::parse_from(["migrate", "--levels", "warp"]);
        assert!(scenarios(&a).is_err());
        let a = Args::parse_from(["migrate", "--mem-mib", "256", "--state-mib", "256"]);
        assert!(scenarios(&a).is_err());
        assert!(Args::try_parse_from(["migrate", "--plot-input", "x.jsonl"]).is_err());
    }
}
