//! The resident reference of `runtime_overhead_pct`: the same work in a VM
//! that was never forked. The bench boots, in its own process (forkd's
//! library, as forkd-bench does), the straight-line stand-in of clone I:
//! the parent's cmdline plus `fork_at=T clones=C as_clone=I`, same memory,
//! same pacing. It does what clone I does after the fork — ticks T..N on
//! the same tick schedule — and must end with clone I's line.
//!
//! End points: from its scheduled tick-T boundary (its `zone: start` line's
//! console instant + T × tick_us: the guest's tick clock starts right after
//! that line) to its `zone: done` line's console instant. Both instants are
//! exact (taken when the line reaches the console), not polled. The run
//! counts as on schedule only if its zone state was initialised (checked
//! every millisecond) before half of those T ticks had passed.

use crate::cluster::check_stop;
use anyhow::{anyhow, bail, ensure, Context, Result};
use forkd::vmm::{Vm, VmConfig, VmExit};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// Longest a resident run may take.
const WAIT: Duration = Duration::from_secs(120);

/// What one resident run measured.
#[derive(Debug, Clone)]
pub struct Resident {
    /// Scheduled tick-T boundary → done line, ms.
    pub run_ms: f64,
    pub done_line: String,
    /// Its state was in place before half of the T ticks had passed.
    pub on_schedule: bool,
}

/// Runs `cmdline fork_at=T clones=C as_clone=I` (with `tick_us` as in
/// `cmdline`) to its end.
pub fn run(
    mem_mib: u64,
    cmdline: &str,
    tick_us: u64,
    fork_tick: u64,
    clones: u64,
    clone_id: u64,
) -> Result<Resident> {
    let cmdline = format!("{cmdline} fork_at={fork_tick} clones={clones} as_clone={clone_id}");
    let cfg = VmConfig {
        guest: forkd::guest::default_guest(),
        mem_mib,
        vcpus: 1,
        cmdline: cmdline.clone(),
        echo: false,
        name: None,
    };
    let mut vm = Vm::boot(&cfg).with_context(|| format!("cannot boot `{cmdline}`"))?;
    let r = measure(&mut vm, tick_us, fork_tick);
    vm.kill();
    r.with_context(|| format!("resident run of `{cmdline}`"))
}

fn measure(vm: &mut Vm, tick_us: u64, fork_tick: u64) -> Result<Resident> {
    let ready = state_ready(vm)?;
    let deadline = Instant::now() + WAIT;
    let exit = loop {
        check_stop()?;
        if let Some(e) = vm.poll_exit() {
            break e;
        }
        ensure!(Instant::now() < deadline, "no end within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let last = vm.console().last_line().unwrap_or_default();
    ensure!(
        exit == VmExit::Guest(0),
        "ended with {exit}, last line {last:?}"
    );
    let start = vm
        .console()
        .line_time("zone: start")
        .context("no `zone: start` line")?;
    let done = vm
        .console()
        .line_time("zone: done")
        .context("no `zone: done` line")?;
    let boundary = start + Duration::from_micros(tick_us.saturating_mul(fork_tick));
    ensure!(
        done > boundary,
        "the done line came before the tick-{fork_tick} boundary: the run was not on schedule"
    );
    let half = Duration::from_micros(tick_us.saturating_mul(fork_tick) / 2);
    Ok(Resident {
        run_ms: (done - boundary).as_secs_f64() * 1e3,
        done_line: last,
        on_schedule: ready.saturating_duration_since(start) <= half,
    })
}

/// Waits until the guest has initialised its zone state (filled front to
/// back: the last page turning non-zero); the instant a check saw it.
fn state_ready(vm: &mut Vm) -> Result<Instant> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut page = vec![0u8; 4096];
    loop {
        check_stop()?;
        if let Some(info) = vm.guest_info() {
            if info.state_bytes >= 4096 {
                let last = GuestAddress(info.state_gpa + info.state_bytes - 4096);
                vm.memory()
                    .read_slice(&mut page, last)
                    .map_err(|e| anyhow!("cannot read the guest's state page: {e}"))?;
                if page.iter().any(|&b| b != 0) {
                    return Ok(Instant::now());
                }
            }
        }
        if let Some(exit) = vm.poll_exit() {
            bail!("the guest ended ({exit}) while initialising its state");
        }
        ensure!(
            Instant::now() < deadline,
            "the zone state was not initialised within 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
