//! Fork figures about clone memory: pages fetched and avoided with the
//! avoidance heuristics on and off, fault service time per read-ahead
//! window, and a clone's run time against the same work in a resident VM.

use crate::fork::{clone_run_time, fork_runs, per_clone, samples, Setup, MEM_MIB, SWEEP_CMDLINE};
use crate::stats::{ms, Report};
use crate::vms::{self, WAIT};
use anyhow::{bail, ensure, Context, Result};
use forkd::vmm::VmExit;
use std::path::Path;
use std::time::Duration;

/// Figure 3: pages fetched and avoided with the heuristics on and off.
pub fn avoidance(report: &mut Report, guest: &Path, runs: usize) -> Result<()> {
    let cmdline = "ticks=6 seed=1 state_mib=16 alloc_mib=8 dirty_pages=20 fork_at=2";
    for on in [true, false] {
        let s = Setup {
            avoidance: on,
            ..Setup::new(cmdline, 4)
        };
        let tag = if on {
            "avoidance on: "
        } else {
            "avoidance off:"
        };
        eprintln!("fork: {runs} runs of `{}`, {tag}", s.cmdline);
        let r = fork_runs(guest, &s, runs)?;
        report.add(
            &format!("{tag} pages fetched/clone"),
            "pages",
            &per_clone(&r, |c| c.faults.pages_fetched as f64),
        );
        report.add(
            &format!("{tag} pages avoided/clone (alloc)"),
            "pages",
            &per_clone(&r, |c| c.faults.pages_avoided as f64),
        );
        report.add(
            &format!("{tag} pages declared/clone"),
            "pages",
            &per_clone(&r, |c| c.pages_declared as f64),
        );
        let faults = per_clone(&r, |c| c.faults.faults as f64);
        report.add(&format!("{tag} uffd faults/clone"), "n", &faults);
        report.add(
            &format!("{tag} memserver pages sent/run"),
            "pages",
            &samples(&r, |x| x.server.pages_sent as f64),
        );
        report.add(
            &format!("{tag} sf_clone→all clones ended"),
            "ms",
            &samples(&r, |x| ms(x.to_clones_ended)),
        );
    }
    Ok(())
}

/// Figure 4: fault service time (one sample = one fetch of up to
/// `readahead` pages) for read-ahead 1 and 32, one clone.
pub fn readahead(report: &mut Report, guest: &Path, runs: usize) -> Result<()> {
    for ra in [1, 32] {
        let s = Setup {
            readahead: ra,
            ..Setup::new(SWEEP_CMDLINE, 1)
        };
        eprintln!("fork: {runs} runs of `{}`, readahead {ra}", s.cmdline);
        let r = fork_runs(guest, &s, runs)?;
        let lat: Vec<f64> = r
            .iter()
            .flat_map(|x| x.family.clones.iter())
            .flat_map(|c| {
                // The histogram's samples, each at its bucket's value.
                c.faults.fetch_latency_us.iter_recorded().flat_map(|v| {
                    std::iter::repeat_n(v.value_iterated_to() as f64, v.count_at_value() as usize)
                })
            })
            .collect();
        let p = format!("readahead {ra:>2}:");
        report.add(&format!("{p} fetch service time"), "us", &lat);
        report.add(
            &format!("{p} fetches per clone"),
            "n",
            &per_clone(&r, |c| c.faults.fetch_requests as f64),
        );
        report.add(
            &format!("{p} pages per fetch"),
            "pages",
            &per_clone(&r, |c| {
                c.faults.pages_fetched as f64 / c.faults.fetch_requests.max(1) as f64
            }),
        );
        report.add(
            &format!("{p} sf_clone→clone ended"),
            "ms",
            &samples(&r, |x| ms(x.to_clones_ended)),
        );
    }
    Ok(())
}

/// The guest of figure 5 (`clones=1` appended; `as_clone=1` for the
/// resident runs).
pub const RUNTIME_CMDLINE: &str = "ticks=40 state_mib=64 seed=2 fork_at=0";
/// A guest that keeps one vCPU busy at CPL 3 (killed when done).
const NEIGHBOUR_CMDLINE: &str = "ticks=1000000000 state_mib=16 seed=3";

/// How often the resident run checks for its zone state being in place.
const STATE_POLL: Duration = Duration::from_micros(20);
/// A resident run counts only if the check that saw the state came within
/// this of the one before (a starved checker would start it late).
const STATE_GAP: Duration = Duration::from_millis(1);
/// Resident runs tried per sample before giving up.
const STATE_TRIES: usize = 5;

/// Figure 5: a clone's run time against the same work in a fully resident
/// VM, both ending at the instant their `zone: done` line reached the
/// console. The clone starts at its first KVM_RUN (it resumes inside
/// `sf_clone` at tick 0 with its state in place); the resident VM at the
/// check that saw its zone state initialised (every [`STATE_POLL`]), from
/// where it does the same: `as_clone=1`'s fork point, the 40 ticks, the
/// fold and the done line. The resident runs alone and next to a busy VM
/// (as the clone runs next to its parent).
pub fn runtime(report: &mut Report, guest: &Path, runs: usize) -> Result<()> {
    let cow = Setup {
        copy_out: false,
        ..Setup::new(RUNTIME_CMDLINE, 1)
    };
    eprintln!("fork: {runs} runs of `{}`, no copy-out", cow.cmdline);
    let r = fork_runs(guest, &cow, runs)?;
    let cow_ms = per_clone(&r, |c| ms(clone_run_time(c)));
    report.add("clone run time, parent copy-on-write only", "ms", &cow_ms);
    let s = Setup::new(RUNTIME_CMDLINE, 1);
    eprintln!("fork: {runs} runs of `{}`", s.cmdline);
    let r = fork_runs(guest, &s, runs)?;
    let clone_ms = per_clone(&r, |c| ms(clone_run_time(c)));
    // What the old end point (the watcher seeing the clone reaped) added.
    let tail = samples(&r, |x| ms(x.to_clones_ended.saturating_sub(x.last_done())));
    let clone_line = r[0].family.clones[0].last_line.clone().unwrap_or_default();
    let plain = format!("{} as_clone=1", s.cmdline);
    let mut rows: [Vec<f64>; 2] = Default::default();
    for (busy, row) in [false, true].into_iter().zip(rows.iter_mut()) {
        eprintln!("fork: {runs} resident runs of `{plain}`, busy neighbour: {busy}");
        for i in 0..runs {
            let (t, line) = resident_sample(guest, &plain, busy)
                .with_context(|| format!("resident run {i} of `{plain}`"))?;
            ensure!(
                line == clone_line,
                "the clone ended with {clone_line:?}, the resident run with {line:?}"
            );
            row.push(t);
        }
    }
    let c = report.add(
        "clone run time (1st run→done line), 64 MiB",
        "ms",
        &clone_ms,
    );
    let alone = report.add("resident run time (state→done line), alone", "ms", &rows[0]);
    let busy = report.add("resident run time, busy neighbour VM", "ms", &rows[1]);
    report.add("clone done line→watcher saw it reaped", "ms", &tail);
    let pages = per_clone(&r, |c| c.faults.pages_fetched as f64);
    report.add("clone pages fetched, 64 MiB", "pages", &pages);
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    for (name, p, row) in [("alone", alone, &rows[0]), ("busy", busy, &rows[1])] {
        if let (Some(c), Some(p)) = (c, p) {
            let name = format!("clone overhead vs resident {name} (p50)");
            report.add(&name, "%", &[(c / p - 1.0) * 100.0]);
        }
        let (cm, pm) = (min(&clone_ms), min(row));
        if cm.is_finite() && pm.is_finite() {
            let name = format!("clone overhead vs resident {name} (min)");
            report.add(&name, "%", &[(cm / pm - 1.0) * 100.0]);
        }
    }
    Ok(())
}

/// One resident sample: a run whose start is known to within
/// [`STATE_GAP`], tried up to [`STATE_TRIES`] times.
fn resident_sample(guest: &Path, cmdline: &str, busy: bool) -> Result<(f64, String)> {
    let mut gaps = Vec::new();
    for _ in 0..STATE_TRIES {
        let (t, line, gap) = resident_run(guest, cmdline, busy)?;
        if gap <= STATE_GAP {
            return Ok((t, line));
        }
        eprintln!("fork: resident run re-run, its state check came {gap:?} after the one before");
        gaps.push(gap);
    }
    bail!("the state check was late in {STATE_TRIES} resident runs: {gaps:?}")
}

/// Boots `cmdline` plainly (next to a busy VM if `busy`); returns the time
/// from the zone state being initialised (checked every [`STATE_POLL`]) to
/// its `zone: done` line, that line, and the gap between the check that saw
/// the state and the one before.
fn resident_run(guest: &Path, cmdline: &str, busy: bool) -> Result<(f64, String, Duration)> {
    let mut neighbour = match busy {
        true => Some(vms::boot_running(guest, MEM_MIB, NEIGHBOUR_CMDLINE)?),
        false => None,
    };
    let run =
        vms::boot_until_state(guest, MEM_MIB, cmdline, STATE_POLL).map(|(mut vm, ready, gap)| {
            let exit = vm.wait(Some(WAIT));
            vm.kill();
            let done = vm.console().line_time("zone: done");
            (
                exit,
                done.map(|d| ms(d.saturating_duration_since(ready))),
                vm.console().last_line().unwrap_or_default(),
                gap,
            )
        });
    if let Some(n) = &mut neighbour {
        let still = n.poll_exit();
        n.kill();
        ensure!(
            still.is_none(),
            "the busy neighbour VM ended early: {still:?}"
        );
    }
    let (exit, t, line, gap) = run?;
    let exit = exit.with_context(|| format!("`{cmdline}`: last line {line:?}"))?;
    ensure!(
        exit == VmExit::Guest(0),
        "`{cmdline}` ended with {exit}, last line {line:?}"
    );
    let t = t.with_context(|| format!("`{cmdline}`: no `zone: done` line"))?;
    Ok((t, line, gap))
}
