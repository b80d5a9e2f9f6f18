//! VM fork figures, in process through forkd's library API: a parent booted
//! with a [`ForkHub`] forks at `fork_at` (the guest calls `sf_clone`), the
//! clones fault their memory in from a [`MemServer`] on loopback. Every run
//! is bounded, every VM ends, and a run whose parent or any clone does not
//! end with status 0 and its `zone: done` line is an error, never a figure.

use crate::stats::{ms, Report};
use crate::vms::config;
use anyhow::{bail, ensure, Context, Result};
use forkd::fork::parent::{FamilyReport, ForkHub, ForkOptions};
use forkd::vmm::{Vm, VmExit};
use memserver::server::{MemServer, ServerStats};
use std::path::Path;
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// The guest of the clone-count sweep (`clones=N` appended).
pub const SWEEP_CMDLINE: &str = "ticks=6 seed=1 state_mib=16 alloc_mib=2 dirty_pages=20 fork_at=2";
pub const MEM_MIB: u64 = 512;
pub const CLONE_COUNTS: [u64; 6] = [1, 2, 4, 8, 16, 32];
/// Longest a whole fork run may take (parent and clones).
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// How long clones may outlive their parent's exit.
const CLONE_GRACE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_micros(100);

/// How a fork run is set up.
#[derive(Debug, Clone)]
pub struct Setup {
    pub mem_mib: u64,
    pub cmdline: String,
    pub clones: u64,
    pub avoidance: bool,
    pub readahead: u64,
    /// Background copy-out of the parent's pages after the freeze.
    pub copy_out: bool,
    /// Clones prefetch the pages allocated at the fork.
    pub prefetch: bool,
}

impl Setup {
    pub fn new(cmdline: &str, clones: u64) -> Setup {
        Setup {
            mem_mib: MEM_MIB,
            cmdline: format!("{cmdline} clones={clones}"),
            clones,
            avoidance: true,
            readahead: 32,
            copy_out: true,
            prefetch: true,
        }
    }
}

/// One finished fork run.
pub struct ForkRun {
    pub family: FamilyReport,
    pub server: ServerStats,
    /// `sf_clone` (estimated, see [`watch`]) → every clone has ended.
    pub to_clones_ended: Duration,
    /// `sf_clone` → the parent's exit (its `sf_join` returned first).
    pub to_parent_exit: Duration,
}

impl ForkRun {
    /// `sf_clone` → the last clone's first KVM_RUN.
    pub fn last_start(&self) -> Duration {
        let starts = self.family.clones.iter().filter_map(|c| c.start_latency);
        starts.max().unwrap_or_default()
    }

    /// `sf_clone` → the last clone's `zone: done` line (console time).
    pub fn last_done(&self) -> Duration {
        let done = self.family.clones.iter().filter_map(|c| c.done_latency);
        done.max().unwrap_or_default()
    }
}

/// One clone's run: its first KVM_RUN → its `zone: done` line.
pub fn clone_run_time(c: &forkd::fork::parent::CloneReport) -> Duration {
    match (c.start_latency, c.done_latency) {
        (Some(s), Some(d)) => d.saturating_sub(s),
        _ => Duration::ZERO,
    }
}

/// What the parent's watcher saw.
struct Watched {
    exit: VmExit,
    fork_seen: Instant,
    clones_ended: Option<Instant>,
    parent_end: Instant,
}

/// Boots the parent, waits for it and its clones, and checks that every
/// VM ended well.
pub fn fork_run(guest: &Path, s: &Setup) -> Result<ForkRun> {
    let server = Arc::new(MemServer::loopback().context("cannot start the memory server")?);
    let hub = ForkHub::new(
        ForkOptions {
            avoidance: s.avoidance,
            readahead: s.readahead,
            max_clones: 64,
            echo: false,
            name_prefix: String::new(),
            copy_out: s.copy_out,
            prefetch: s.prefetch,
            warm_pool: true,
            // Through the memory server: these figures are of the fault
            // path remote clones take.
            local_direct: false,
            ..ForkOptions::default()
        },
        server.clone(),
    );
    let cfg = config(guest, s.mem_mib, &s.cmdline);
    let watched = Vm::boot_with(&cfg, Some(hub.clone()))
        .with_context(|| format!("cannot boot the parent `{}`", s.cmdline))
        .and_then(|mut vm| {
            let w = watch(&mut vm, &hub);
            vm.kill();
            let last = vm.console().last_line();
            w.map(|w| (w, last))
        });
    // Clones normally ended before the parent's join returned.
    let all_ended = watched.is_ok() && hub.wait_clones(CLONE_GRACE);
    if !all_ended {
        hub.end_families();
    }
    server.stop();
    let (w, last) = watched?;
    ensure!(
        all_ended,
        "clones still running {CLONE_GRACE:?} after the parent ended (killed)"
    );
    let families = hub.families();
    ensure!(
        families.len() == 1,
        "{} fork families, expected 1",
        families.len()
    );
    let family = families[0].report();
    check(s, &w.exit, last.as_deref(), &family)?;
    let fork_at = w
        .fork_seen
        .checked_sub(family.parent_stopped)
        .unwrap_or(w.fork_seen);
    let clones_ended = w.clones_ended.unwrap_or(w.parent_end);
    Ok(ForkRun {
        server: server.stats(),
        to_clones_ended: clones_ended.saturating_duration_since(fork_at),
        to_parent_exit: w.parent_end.saturating_duration_since(fork_at),
        family,
    })
}

/// Polls (every ~100 µs, bounded by [`RUN_LIMIT`]) for: the family
/// appearing (the hub publishes it when the parent may resume, so the fork
/// instant is that moment minus `parent_stopped`), every clone having ended,
/// and the parent's exit.
fn watch(vm: &mut Vm, hub: &ForkHub) -> Result<Watched> {
    let deadline = Instant::now() + RUN_LIMIT;
    let (mut fork_seen, mut clones_ended) = (None, None);
    loop {
        let now = Instant::now();
        let families = hub.families();
        if fork_seen.is_none() && !families.is_empty() {
            fork_seen = Some(now);
        }
        if fork_seen.is_some()
            && clones_ended.is_none()
            && families.iter().all(|f| f.running() == 0)
        {
            clones_ended = Some(now);
        }
        if let Some(exit) = vm.poll_exit() {
            let Some(fork_seen) = fork_seen else {
                bail!(
                    "the parent ended ({exit}) without forking; last line: {:?}",
                    vm.console().last_line()
                );
            };
            return Ok(Watched {
                exit,
                fork_seen,
                clones_ended,
                parent_end: now,
            });
        }
        if now >= deadline {
            bail!(
                "fork run not finished within {RUN_LIMIT:?} (forked: {}); last parent line: {:?}",
                fork_seen.is_some(),
                vm.console().last_line()
            );
        }
        sleep(POLL);
    }
}

/// The parent and every clone ended with 0 and their `zone: done` line.
fn check(s: &Setup, exit: &VmExit, last: Option<&str>, f: &FamilyReport) -> Result<()> {
    let what = format!("`{}`", s.cmdline);
    let done = |line: Option<&str>, id: u64| {
        line.is_some_and(|l| l.starts_with(&format!("zone: done clone={id} ")))
    };
    ensure!(
        *exit == VmExit::Guest(0) && done(last, 0),
        "{what}: parent ended with {exit}, last line {last:?}"
    );
    ensure!(
        f.start_failures.is_empty(),
        "{what}: clones failed to start: {:?}",
        f.start_failures
    );
    ensure!(
        f.clones_granted == s.clones && f.clones.len() as u64 == s.clones,
        "{what}: {} clones granted, {} reported, {} wanted",
        f.clones_granted,
        f.clones.len(),
        s.clones
    );
    for c in &f.clones {
        ensure!(
            c.exit == VmExit::Guest(0) && done(c.last_line.as_deref(), c.clone_id),
            "{what}: clone {} ended with {}, last line {:?}",
            c.clone_id,
            c.exit,
            c.last_line
        );
        ensure!(
            c.start_latency.is_some(),
            "{what}: clone {} never ran",
            c.clone_id
        );
        ensure!(
            c.done_latency.is_some(),
            "{what}: clone {} has no time for its done line",
            c.clone_id
        );
    }
    Ok(())
}

/// `runs` fork runs of `s`.
pub fn fork_runs(guest: &Path, s: &Setup, runs: usize) -> Result<Vec<ForkRun>> {
    (0..runs)
        .map(|i| fork_run(guest, s).with_context(|| format!("fork run {i} of `{}`", s.cmdline)))
        .collect()
}

pub fn samples(runs: &[ForkRun], f: impl Fn(&ForkRun) -> f64) -> Vec<f64> {
    runs.iter().map(f).collect()
}

/// Per-clone samples over all runs.
pub fn per_clone(
    runs: &[ForkRun],
    f: impl Fn(&forkd::fork::parent::CloneReport) -> f64,
) -> Vec<f64> {
    runs.iter()
        .flat_map(|r| r.family.clones.iter().map(&f))
        .collect()
}

/// The name of the clone start figure for `n` clones.
pub fn clone_start_name(n: u64) -> String {
    format!("fork {n:>2}c: clone start (sf_clone→1st run)")
}

/// Figures 1 and 2: clone start, fork time, parent stop and freeze for 1 to
/// 32 clones; descriptor size for a 512 MiB and a 1 GiB guest.
pub fn sweep(report: &mut Report, guest: &Path, runs: usize) -> Result<()> {
    for n in CLONE_COUNTS {
        let s = Setup::new(SWEEP_CMDLINE, n);
        eprintln!("fork: {runs} runs of `{}` ({} MiB)", s.cmdline, s.mem_mib);
        let r = fork_runs(guest, &s, runs)?;
        let p = format!("fork {n:>2}c:");
        let start = per_clone(&r, |c| ms(c.start_latency.unwrap_or_default()));
        report.add(&clone_start_name(n), "ms", &start);
        report.add(
            &format!("{p} sf_clone→last clone started"),
            "ms",
            &samples(&r, |x| ms(x.last_start())),
        );
        report.add(
            &format!("{p} sf_clone→last clone done line"),
            "ms",
            &samples(&r, |x| ms(x.last_done())),
        );
        report.add(
            &format!("{p} sf_clone→all clones ended"),
            "ms",
            &samples(&r, |x| ms(x.to_clones_ended)),
        );
        report.add(
            &format!("{p} sf_clone→parent exit (joined)"),
            "ms",
            &samples(&r, |x| ms(x.to_parent_exit)),
        );
        report.add(
            &format!("{p} parent stopped at sf_clone"),
            "ms",
            &samples(&r, |x| ms(x.family.parent_stopped)),
        );
        report.add(
            &format!("{p} freeze (uffd write-protect)"),
            "ms",
            &samples(&r, |x| ms(x.family.freeze)),
        );
        let fetched = per_clone(&r, |c| c.faults.pages_fetched as f64);
        report.add(&format!("{p} pages fetched per clone"), "pages", &fetched);
        let prefetched = per_clone(&r, |c| c.faults.pages_prefetched as f64);
        report.add(
            &format!("{p} pages prefetched per clone"),
            "pages",
            &prefetched,
        );
        // Pages the server sent beyond what the clones installed (on demand
        // or by prefetch): replies to requests repeated after a timeout,
        // and prefetched pages a fault had installed first.
        let resent = samples(&r, |x| {
            let installed: u64 = x
                .family
                .clones
                .iter()
                .map(|c| c.faults.pages_fetched + c.faults.pages_prefetched)
                .sum();
            x.server.pages_sent.saturating_sub(installed) as f64
        });
        report.add(&format!("{p} pages sent, not installed"), "pages", &resent);
    }
    for mem_mib in [MEM_MIB, 1024] {
        let s = Setup {
            mem_mib,
            ..Setup::new(SWEEP_CMDLINE, 1)
        };
        eprintln!("fork: descriptor of `{}` ({mem_mib} MiB)", s.cmdline);
        let r = fork_run(guest, &s)?;
        let d = &r.family;
        report.add(
            &format!("descriptor bytes, {mem_mib} MiB guest"),
            "bytes",
            &[d.descriptor_bytes as f64],
        );
        report.add(
            &format!("descriptor pages, {mem_mib} MiB guest"),
            "pages",
            &[d.descriptor_pages as f64],
        );
    }
    Ok(())
}
