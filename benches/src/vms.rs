//! In-process forkd figures: boot, pause and snapshot/restore, through the
//! forkd library API. Every VM started here is killed or waited for; every
//! wait and poll is bounded.

use crate::stats::{ms, Report};
use anyhow::{anyhow, bail, Context, Result};
use forkd::vmm::{RestoreMemory, RestoreOptions, Vm, VmConfig, VmExit};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Longest wait for a guest to finish.
pub const WAIT: Duration = Duration::from_secs(60);
/// Tiny guest for the boot figures (same cmdline as the QEMU runs).
pub const TINY_CMDLINE: &str = "ticks=1 state_mib=1";
pub const TINY_MEM_MIB: u64 = 512;

pub fn config(guest: &Path, mem_mib: u64, cmdline: &str) -> VmConfig {
    VmConfig {
        guest: guest.to_path_buf(),
        mem_mib,
        vcpus: 1,
        cmdline: cmdline.to_string(),
        echo: false,
        name: None,
    }
}

fn since_ms(later: Option<Instant>, earlier: Instant) -> Option<f64> {
    later.map(|t| ms(t.saturating_duration_since(earlier)))
}

fn describe(vm: &Vm) -> String {
    vm.console()
        .last_line()
        .map(|l| format!("last console line: {l:?}"))
        .unwrap_or_else(|| "no console output".into())
}

/// Boots the tiny guest `runs` times and runs it to the end.
pub fn boot(report: &mut Report, guest: &Path, runs: usize) -> Result<()> {
    eprintln!("boot: {runs} runs of `{TINY_CMDLINE}` ({TINY_MEM_MIB} MiB)");
    let cfg = config(guest, TINY_MEM_MIB, TINY_CMDLINE);
    let (mut first_out, mut first_insn, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    let (mut first_line, mut per_byte) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let mut vm = Vm::boot(&cfg).with_context(|| format!("boot run {i}: cannot boot"))?;
        if let Some((t, len)) = poll_first_line(&mut vm) {
            let started = vm.times.started;
            first_line.push(ms(t - started));
            if let Some(byte0) = vm.console().first_output() {
                // Bytes after the first one, up to and including the newline.
                per_byte.push((t - byte0).as_secs_f64() * 1e6 / len.max(1) as f64);
            }
        }
        let exit = vm.wait(Some(WAIT));
        let end = Instant::now();
        vm.kill();
        let exit = exit.with_context(|| format!("boot run {i}: {}", describe(&vm)))?;
        if exit != VmExit::Guest(0) {
            bail!("boot run {i}: {exit}; {}", describe(&vm));
        }
        let started = vm.times.started;
        first_out.extend(since_ms(vm.console().first_output(), started));
        first_insn.extend(since_ms(vm.times.first_run.get().copied(), started));
        whole.push(ms(end - started));
    }
    report.add("forkd boot to first instruction", "ms", &first_insn);
    report.add("forkd boot to first output", "ms", &first_out);
    report.add("forkd boot to first console line", "ms", &first_line);
    report.add("forkd boot whole run (to guest exit)", "ms", &whole);
    report.add("console cost per byte (guest out)", "us", &per_byte);
    Ok(())
}

/// Polls (every 50 µs, bounded by [`WAIT`]) until the first console line
/// is complete; returns when that was seen and the line's length. None if
/// the guest ended first or the bound passed (the caller's wait reports it).
fn poll_first_line(vm: &mut Vm) -> Option<(Instant, usize)> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(l) = vm.console().log().lines.first() {
            return Some((Instant::now(), l.len()));
        }
        if vm.poll_exit().is_some() {
            return None;
        }
        sleep(Duration::from_micros(50));
    }
    None
}

/// Polls the console until a line starts with `prefix`, the guest ends or
/// `timeout` passes.
fn wait_for_line(vm: &mut Vm, prefix: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if vm.console().lines().iter().any(|l| l.starts_with(prefix)) {
            return Ok(());
        }
        if let Some(exit) = vm.poll_exit() {
            bail!(
                "guest ended ({exit}) before printing {prefix:?}; {}",
                describe(vm)
            );
        }
        if Instant::now() >= deadline {
            bail!("no {prefix:?} line within {timeout:?}; {}", describe(vm));
        }
        sleep(Duration::from_millis(1));
    }
}

/// Waits until the guest has initialised its whole zone state: the state
/// is filled front to back, so the last page turning non-zero marks the end.
/// Checks every `poll`; returns the instant the read that saw it ended and
/// how long after the end of the previous read (which did not see it) that
/// was: the state was complete within that gap before the returned instant
/// (`Duration::MAX` if the first read saw it).
fn wait_state_touched(
    vm: &mut Vm,
    timeout: Duration,
    poll: Duration,
) -> Result<(Instant, Duration)> {
    let deadline = Instant::now() + timeout;
    let mut page = vec![0u8; 4096];
    // When the latest read of the last state page (still zero) ended.
    let mut prev: Option<Instant> = None;
    loop {
        if let Some(info) = vm.guest_info() {
            if info.state_bytes >= 4096 {
                let last = GuestAddress(info.state_gpa + info.state_bytes - 4096);
                vm.memory()
                    .read_slice(&mut page, last)
                    .map_err(|e| anyhow!("cannot read guest state page: {e}"))?;
                let read = Instant::now();
                if page.iter().any(|&b| b != 0) {
                    let gap = prev.map_or(Duration::MAX, |p| read - p);
                    return Ok((read, gap));
                }
                prev = Some(read);
            }
        }
        if let Some(exit) = vm.poll_exit() {
            bail!("guest ended ({exit}) during init; {}", describe(vm));
        }
        if Instant::now() >= deadline {
            bail!("zone state not initialised within {timeout:?}");
        }
        sleep(poll);
    }
}

/// Boots a long paced guest and waits until it is running its ticks.
pub fn boot_running(guest: &Path, mem_mib: u64, cmdline: &str) -> Result<Vm> {
    boot_until_state(guest, mem_mib, cmdline, Duration::from_millis(1)).map(|(vm, ..)| vm)
}

/// Boots `cmdline` and waits until its zone state is initialised, checking
/// every `poll`; returns the VM, the instant the check saw it and the gap
/// since the check before (see [`wait_state_touched`]).
pub fn boot_until_state(
    guest: &Path,
    mem_mib: u64,
    cmdline: &str,
    poll: Duration,
) -> Result<(Vm, Instant, Duration)> {
    let mut vm = Vm::boot(&config(guest, mem_mib, cmdline))
        .with_context(|| format!("cannot boot `{cmdline}`"))?;
    let ready = wait_for_line(&mut vm, "zone: start", Duration::from_secs(10))
        .and_then(|_| wait_state_touched(&mut vm, Duration::from_secs(30), poll));
    match ready {
        Ok((at, gap)) => Ok((vm, at, gap)),
        Err(e) => {
            vm.kill();
            Err(e)
        }
    }
}

/// Pause latency of a running paced guest, `cycles` pause/resume pairs.
pub fn pause(report: &mut Report, guest: &Path, cycles: usize) -> Result<()> {
    let cmdline = "ticks=100000 tick_us=100 state_mib=16";
    eprintln!("pause: {cycles} pause/resume cycles of `{cmdline}`");
    let mut vm = boot_running(guest, TINY_MEM_MIB, cmdline)?;
    let result = pause_cycles(&mut vm, cycles);
    vm.kill();
    let (pauses, resumes) = result?;
    report.add("pause latency", "us", &pauses);
    report.add("resume call", "us", &resumes);
    Ok(())
}

fn pause_cycles(vm: &mut Vm, cycles: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut pauses, mut resumes) = (Vec::new(), Vec::new());
    for i in 0..cycles {
        if Instant::now() >= deadline {
            eprintln!("pause: stopped after {i} cycles (30 s bound)");
            break;
        }
        sleep(Duration::from_millis(3));
        let d = vm.pause().with_context(|| format!("pause {i}"))?;
        pauses.push(d.as_secs_f64() * 1e6);
        sleep(Duration::from_micros(200));
        let t = Instant::now();
        vm.resume().with_context(|| format!("resume {i}"))?;
        resumes.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok((pauses, resumes))
}

/// Snapshot write and restore of a 1 GiB guest with `state_mib` touched.
pub fn snapshot(report: &mut Report, guest: &Path, state_mib: u64, restores: usize) -> Result<()> {
    let cmdline = format!("ticks=10000000 tick_us=1000 state_mib={state_mib}");
    eprintln!("snapshot: 1024 MiB guest, `{cmdline}`, {restores} restores");
    let tmp = tempfile::Builder::new()
        .prefix("forkd-bench-snap")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = tmp.path().join("snap");
    let mut vm = boot_running(guest, 1024, &cmdline)?;
    // About one 1 ms tick after the state is in place.
    sleep(Duration::from_millis(2));
    let written = vm
        .pause()
        .context("pause before snapshot")
        .and_then(|_| vm.snapshot(&dir).context("snapshot"));
    vm.kill();
    // Free the parent's memory before restoring.
    drop(vm);
    let stats = written?;
    let tag = format!("{state_mib} MiB touched");
    report.add(
        &format!("snapshot write, 1 GiB guest, {tag}"),
        "ms",
        &[ms(stats.duration)],
    );
    let mib = (stats.state_bytes + stats.memory_bytes) as f64 / (1u64 << 20) as f64;
    report.add(&format!("snapshot bytes, {tag}"), "MiB", &[mib]);
    for (mode, label) in [
        (RestoreMemory::Lazy, "lazy"),
        (RestoreMemory::Eager, "eager"),
    ] {
        let samples = restore_runs(&dir, restores, mode)?;
        report.add(
            &format!("restore {label} to first insn, {tag}"),
            "ms",
            &samples,
        );
    }
    drop(tmp);
    Ok(())
}

/// Restores `dir` `restores` times; the time to the first KVM_RUN of each,
/// killing each restored VM right after.
pub fn restore_runs(dir: &Path, restores: usize, memory: RestoreMemory) -> Result<Vec<f64>> {
    let opts = RestoreOptions {
        memory,
        ..RestoreOptions::default()
    };
    let mut samples = Vec::new();
    for i in 0..restores {
        let mut vm = Vm::restore_with(dir, &opts, None).with_context(|| format!("restore {i}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = loop {
            if let Some(t) = vm.times.first_run.get() {
                break Some(*t);
            }
            if Instant::now() >= deadline || vm.poll_exit().is_some() {
                break None;
            }
            sleep(Duration::from_micros(100));
        };
        vm.kill();
        let first = first.ok_or_else(|| anyhow!("restore {i}: the vCPU never ran"))?;
        samples.push(ms(first - vm.times.started));
    }
    Ok(samples)
}
