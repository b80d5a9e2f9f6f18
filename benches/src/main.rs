//! forkd-bench: measures and prints forkd's boot, pause, snapshot/restore
//! and VM fork figures, the host CPU of idle paced zones, and QEMU's boot and restore of the same guest for
//! comparison. It prints
//! figures only; it asserts nothing about them.

mod fork;
mod fork_faults;
mod fork_qemu;
mod idle;
mod integrity;
mod qemu;
mod stats;
mod vms;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use stats::Report;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Only {
    Boot,
    Pause,
    Snapshot,
    /// QEMU runs; also runs the forkd boot runs the ratio needs.
    Qemu,
    /// VM fork: clone start, fork time, descriptor, avoidance, read-ahead,
    /// clone run time, and QEMU -incoming restore of the same guest.
    Fork,
    /// Host CPU of many paced, mostly idle zones: asleep in the VMM
    /// against spinning on the TSC.
    Idle,
    /// Memory file integrity check: write, eager and lazy verify, ms/GiB.
    Integrity,
}

/// One part of the fork figures (`--only fork`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ForkPart {
    /// Clone start and fork time for 1..32 clones; descriptor size.
    Sweep,
    /// Pages fetched and avoided, heuristics on and off.
    Avoidance,
    /// Fault service time for read-ahead 1 and 32.
    Readahead,
    /// Clone run time against a resident VM.
    Runtime,
    /// QEMU -incoming restore against forkd (uses the sweep's 1-clone
    /// start for one ratio).
    Qemu,
}

#[derive(Parser, Debug)]
#[command(
    name = "forkd-bench",
    about = "Measure forkd (and QEMU) boot, pause, snapshot, restore and VM fork"
)]
struct Args {
    /// Runs per boot figure (default: 20 forkd boots, 10 QEMU boots).
    #[arg(long)]
    runs: Option<usize>,
    /// Restores per snapshot size (and QEMU -incoming restores).
    #[arg(long, default_value_t = 5)]
    restores: usize,
    /// Fork runs per fork setup (each clone count, avoidance, read-ahead).
    #[arg(long, default_value_t = 3)]
    fork_runs: usize,
    /// With `--only fork`: run only this part of the fork figures.
    #[arg(long, value_enum)]
    fork_part: Option<ForkPart>,
    /// Paced zones run at once for the idle figure.
    #[arg(long, default_value_t = 32)]
    idle_zones: usize,
    /// Runs of the idle figure (each way: asleep and spinning).
    #[arg(long, default_value_t = 2)]
    idle_runs: usize,
    /// Pause/resume cycles for the pause figure.
    #[arg(long, default_value_t = 100)]
    pause_cycles: usize,
    /// Print all figures as one JSON object at the end.
    #[arg(long)]
    json: bool,
    /// Run only one group of figures.
    #[arg(long, value_enum)]
    only: Option<Only>,
    /// Guest ELF (default: the zone guest built with forkd).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// forkd CLI binary to time as a process next to QEMU (default: `forkd`
    /// next to this binary, if it exists).
    #[arg(long)]
    forkd_bin: Option<PathBuf>,
}

fn forkd_bin(arg: Option<PathBuf>) -> Option<PathBuf> {
    arg.or_else(|| {
        let p = std::env::current_exe().ok()?.parent()?.join("forkd");
        p.is_file().then_some(p)
    })
}

fn run(args: Args, guest: &Path, report: &mut Report) -> Result<()> {
    let want = |o: Only| args.only.is_none_or(|x| x == o);
    let boot_runs = args.runs.unwrap_or(20).max(1);
    let qemu_runs = args.runs.unwrap_or(10).max(1);
    if want(Only::Boot) || args.only == Some(Only::Qemu) {
        vms::boot(report, guest, boot_runs)?;
    }
    if want(Only::Pause) {
        vms::pause(report, guest, args.pause_cycles.max(1))?;
    }
    if want(Only::Snapshot) {
        for state_mib in [16, 256] {
            vms::snapshot(report, guest, state_mib, args.restores.max(1))?;
        }
    }
    if want(Only::Integrity) {
        integrity::integrity(report, args.restores.max(1))?;
    }
    if want(Only::Qemu) {
        let forkd = forkd_bin(args.forkd_bin.clone());
        qemu::qemu(report, guest, qemu_runs, forkd.as_deref())?;
    }
    if want(Only::Idle) {
        idle::idle(report, guest, args.idle_zones.max(1), args.idle_runs.max(1))?;
    }
    if want(Only::Fork) {
        let runs = args.fork_runs.max(1);
        let part = |p: ForkPart| args.fork_part.is_none_or(|x| x == p);
        if part(ForkPart::Sweep) {
            fork::sweep(report, guest, runs)?;
        }
        if part(ForkPart::Avoidance) {
            fork_faults::avoidance(report, guest, runs)?;
        }
        if part(ForkPart::Readahead) {
            fork_faults::readahead(report, guest, runs)?;
        }
        if part(ForkPart::Runtime) {
            fork_faults::runtime(report, guest, runs)?;
        }
        if part(ForkPart::Qemu) {
            fork_qemu::compare(report, guest, args.restores.max(1))?;
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: forkd-bench needs KVM");
    }
    let guest = args
        .guest
        .clone()
        .unwrap_or_else(forkd::guest::default_guest);
    if !guest.is_file() {
        bail!("guest ELF {} not found", guest.display());
    }
    eprintln!("guest: {}", guest.display());
    let json = args.json;
    let mut report = Report::default();
    Report::header();
    let result = run(args, &guest, &mut report);
    if json {
        println!("{}", report.to_json());
    }
    result
}
