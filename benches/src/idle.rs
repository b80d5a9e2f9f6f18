//! Idle paced zones: the host CPU that N zones use while they wait for
//! their next tick most of the time, paced asleep in the VMM (`OP_SLEEP`,
//! the default) against spinning on the TSC (`pace_spin=1`, the old
//! pacing). All N VMs run in this process, so its own CPU time (getrusage
//! user + sys, which keeps the time of threads that ended) is theirs.
//! Spinning zones take every core they can get, so their figure is bounded
//! by the host's cores and by whatever else runs on it.

use crate::stats::{ms, Report};
use crate::vms::{config, WAIT};
use anyhow::{bail, Context, Result};
use forkd::vmm::{Vm, VmExit};
use std::path::Path;
use std::time::{Duration, Instant};

/// 200 ticks of 20 ms (4 s) on a 1 MiB zone: idle ~99% of each tick.
pub const IDLE_CMDLINE: &str = "ticks=200 tick_us=20000 state_mib=1";
pub const IDLE_MEM_MIB: u64 = 64;

/// This process's user + system CPU time.
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass, which is plain
    // data and valid when zeroed.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// One run: boots `zones` VMs, then measures CPU and wall time from the
/// last boot to the last exit. Returns (cores used, wall s, done line).
fn run_once(guest: &Path, zones: usize, cmdline: &str) -> Result<(f64, f64, String)> {
    let cfg = config(guest, IDLE_MEM_MIB, cmdline);
    let mut vms = Vec::with_capacity(zones);
    for i in 0..zones {
        vms.push(Vm::boot(&cfg).with_context(|| format!("boot zone {i} of {zones}"))?);
    }
    let (t0, c0) = (Instant::now(), cpu_time());
    let mut line = None;
    for (i, vm) in vms.iter_mut().enumerate() {
        let exit = vm.wait(Some(WAIT));
        vm.kill();
        let exit = exit.with_context(|| format!("zone {i}"))?;
        if exit != VmExit::Guest(0) {
            bail!("zone {i}: {exit}; {:?}", vm.console().last_line());
        }
        let done = vm.console().last_line().unwrap_or_default();
        match &line {
            None => line = Some(done),
            Some(l) if *l != done => bail!("zone {i} printed {done:?}, zone 0 {l:?}"),
            Some(_) => {}
        }
    }
    let (wall, cpu) = (t0.elapsed(), cpu_time() - c0);
    Ok((
        cpu.as_secs_f64() / wall.as_secs_f64(),
        wall.as_secs_f64(),
        line.unwrap_or_default(),
    ))
}

/// `zones` paced zones, `runs` times asleep and `runs` times spinning.
pub fn idle(report: &mut Report, guest: &Path, zones: usize, runs: usize) -> Result<()> {
    eprintln!(
        "idle: {zones} VMs of `{IDLE_CMDLINE}` ({IDLE_MEM_MIB} MiB), {runs} runs, \
         asleep in the VMM and spinning (pace_spin=1)"
    );
    let mut lines = Vec::new();
    for (how, extra) in [("asleep", ""), ("spinning", " pace_spin=1")] {
        let (mut cores, mut per_zone, mut walls) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            let (c, wall, line) = run_once(guest, zones, &format!("{IDLE_CMDLINE}{extra}"))?;
            cores.push(c);
            per_zone.push(c * 100.0 / zones as f64);
            walls.push(ms(Duration::from_secs_f64(wall)));
            lines.push(line);
        }
        report.add(
            &format!("idle x{zones} paced {how}: host CPU"),
            "cores",
            &cores,
        );
        report.add(
            &format!("idle x{zones} paced {how}: CPU per zone"),
            "% core",
            &per_zone,
        );
        report.add(
            &format!("idle x{zones} paced {how}: wall (last boot to end)"),
            "ms",
            &walls,
        );
    }
    if lines.windows(2).any(|w| w[0] != w[1]) {
        bail!("asleep and spinning zones disagree: {lines:?}");
    }
    Ok(())
}
