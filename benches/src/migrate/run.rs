//! One scenario end to end: the VMMs' speed with its state (measured once
//! per state size), one cmdline both VMMs run, QEMU's migration, then
//! forkd's in every mode the daemon takes; a [`Record`] per mode.

use crate::forkd::{self, Ask, Guest, Started};
use crate::qemu;
use crate::record::{checksum, Record};
use crate::scenario::{plan, Plan, Scenario, Timing};
use anyhow::{Context, Result};
use bench_shared::api::Api;
use bench_shared::cluster::{check_stop, nap};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Unpaced ticks of the second calibration run with 256 MiB of state
/// (about 1.5 s here, well above the build time's noise); proportionally
/// more with less state.
const CAL_TICKS_256: u64 = 41;

/// The link figures of the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Links {
    pub bridge_mib_s: Option<f64>,
    pub loopback_mib_s: Option<f64>,
}

/// What the scenarios share.
pub struct Bench {
    pub apis: Vec<Api>,
    pub qemu: Option<PathBuf>,
    pub guest: PathBuf,
    pub downtime_ms: u64,
    pub bandwidth_mib_s: u64,
    pub links: Links,
    /// (VMM, state MiB) → its speed.
    timings: BTreeMap<(&'static str, u64), Timing>,
    /// Modes the daemon refused (422): not asked again.
    pub skipped: BTreeSet<String>,
}

impl Bench {
    pub fn new(
        apis: Vec<Api>,
        qemu: Option<PathBuf>,
        guest: PathBuf,
        downtime_ms: u64,
        bandwidth_mib_s: u64,
    ) -> Bench {
        Bench {
            apis,
            qemu,
            guest,
            downtime_ms,
            bandwidth_mib_s,
            links: Links::default(),
            timings: BTreeMap::new(),
            skipped: BTreeSet::new(),
        }
    }

    /// The VMM's speed with `state_mib` of state (two unpaced runs).
    fn timing(&mut self, vmm: &'static str, mem_mib: u64, state_mib: u64) -> Result<Timing> {
        if let Some(t) = self.timings.get(&(vmm, state_mib)) {
            return Ok(*t);
        }
        eprintln!("migrate:   {vmm}: timing the zone with {state_mib} MiB of state");
        let cmd = |ticks: u64| format!("ticks={ticks} seed=1 state_mib={state_mib} dirty_all=1");
        let limit = Duration::from_secs(120);
        let run = |ticks: u64| -> Result<Duration> {
            match (vmm, &self.qemu) {
                ("qemu", Some(q)) => {
                    Ok(qemu::straight(q, &self.guest, mem_mib, &cmd(ticks), limit)?.0)
                }
                _ => forkd::time_run(&self.apis, &cmd(ticks), mem_mib, limit),
            }
        };
        let ticks = CAL_TICKS_256 * (256 / state_mib).max(1);
        let one = run(1)?;
        let k = run(ticks)?;
        let t = Timing::from_runs(one, ticks, k);
        eprintln!(
            "migrate:   {vmm}: state built in {:.2} s, one unpaced tick {:.2} ms",
            t.build.as_secs_f64(),
            t.tick.as_secs_f64() * 1e3
        );
        self.timings.insert((vmm, state_mib), t);
        Ok(t)
    }

    /// Runs the scenario: QEMU once, then forkd in each of `modes`.
    pub fn scenario(
        &mut self,
        s: &Scenario,
        modes: &[String],
        emit: &mut dyn FnMut(Record) -> Result<()>,
    ) -> Result<()> {
        let tf = self.timing("forkd", s.mem_mib, s.state_mib)?;
        let pf = plan(s, tf);
        let pq = match self.qemu.is_some() {
            true => Some(plan(s, self.timing("qemu", s.mem_mib, s.state_mib)?)),
            false => None,
        };
        let ticks = pf.ticks.max(pq.as_ref().map_or(0, |p| p.ticks));
        let cmdline = s.cmdline(ticks);
        // Bound on one guest's whole run: paced, its ticks; unpaced, the
        // slower VMM's ticks three times over (migration slows it).
        let tick = match s.tick_us() {
            0 => tf.tick.max(Duration::from_micros(100)) * 3,
            us => Duration::from_micros(us),
        };
        let run_limit = tick * ticks as u32 + s.budget() + Duration::from_secs(60);
        eprintln!("migrate:   cmdline `{cmdline}`, {} MiB", s.mem_mib);
        let mut base = Record {
            kind: "scenario".into(),
            scenario: s.name(),
            level: s.level.as_str().into(),
            cmdline: cmdline.clone(),
            mem_mib: s.mem_mib,
            touched_mib: s.state_mib,
            dirty_pages_per_s: s.dirty_pages_per_s(),
            link_mib_s: self.links.bridge_mib_s,
            loopback_mib_s: self.links.loopback_mib_s,
            downtime_limit_ms: self.downtime_ms,
            bandwidth_mib_s: self.bandwidth_mib_s,
            ..Record::default()
        };
        if let (Some(q), Some(p)) = (&self.qemu, &pq) {
            self.qemu_part(q.clone(), s, p, &cmdline, run_limit, &mut base)?;
        } else {
            base.qemu_error = Some(format!("{} not found", qemu::QEMU));
        }
        for mode in modes {
            if self.skipped.contains(mode) {
                continue;
            }
            check_stop()?;
            eprintln!(
                "migrate:   forkd {mode}: migrating {:.2} s after the start line",
                pf.migrate_after.as_secs_f64()
            );
            let load = bench_shared::load_avg();
            let mut r = Record {
                mode: mode.clone(),
                load_avg_1m: load,
                ..base.clone()
            };
            match self.forkd_part(s, &pf, mode, &cmdline, run_limit, &mut r) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(e) => {
                    check_stop()?;
                    eprintln!("migrate:   forkd {mode} failed: {e:#}");
                    r.error = Some(format!("{e:#}"));
                }
            }
            r.judge();
            emit(r)?;
        }
        Ok(())
    }

    fn qemu_part(
        &self,
        q: PathBuf,
        s: &Scenario,
        p: &Plan,
        cmdline: &str,
        run_limit: Duration,
        base: &mut Record,
    ) -> Result<()> {
        eprintln!(
            "migrate:   qemu: migrating {:.2} s after the start line",
            p.migrate_after.as_secs_f64()
        );
        let job = qemu::Job {
            qemu: &q,
            guest: &self.guest,
            mem_mib: s.mem_mib,
            cmdline,
            migrate_after: p.migrate_after,
            downtime_ms: self.downtime_ms,
            bandwidth_mib_s: self.bandwidth_mib_s,
            budget: s.budget() + Duration::from_secs(10),
            run_limit,
        };
        match qemu::migrate(&job) {
            Ok(m) => {
                base.qemu_downtime_ms = m.downtime_ms;
                base.qemu_total_ms = m.total_ms;
                base.qemu_setup_ms = m.setup_ms;
                base.qemu_bytes_sent = m.bytes;
                base.qemu_rounds = m.rounds;
                base.qemu_checksum = m.checksum();
                base.qemu_migrated_after_ms = Some(m.migrated_after.as_secs_f64() * 1e3);
                base.qemu_done_line = Some(m.done_line);
            }
            Err(e) => {
                check_stop()?;
                eprintln!("migrate:   qemu failed: {e:#}");
                base.qemu_error = Some(format!("{e:#}"));
            }
        }
        Ok(())
    }

    /// forkd's migration in `mode`; false if the daemon refused the mode.
    fn forkd_part(
        &mut self,
        s: &Scenario,
        p: &Plan,
        mode: &str,
        cmdline: &str,
        run_limit: Duration,
        r: &mut Record,
    ) -> Result<bool> {
        let (mut g, started) = Guest::boot(&self.apis, 0, cmdline, s.mem_mib)?;
        nap((started + p.migrate_after).saturating_duration_since(Instant::now()))?;
        r.migrated_after_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        let ask = Ask {
            mode,
            downtime_ms: self.downtime_ms,
            bandwidth_mib_s: self.bandwidth_mib_s,
            budget: s.budget() + Duration::from_secs(30),
        };
        let (st, moved) = forkd::migrate(&mut g, 1, &ask)?;
        if let Started::ModeRefused(why) = st {
            eprintln!("migrate: SKIP mode {mode}: the daemon answered 422 ({why}); not asked again this run");
            self.skipped.insert(mode.to_owned());
            return Ok(false);
        }
        r.phase = moved.phase.clone();
        r.measured_dirty_pages_per_s = moved.dirty_pages_per_s;
        r.downtime_ms = moved.downtime_ms();
        r.total_ms = moved.total_ms();
        if let Some(rep) = moved.report() {
            r.rounds = rep["rounds"].as_u64();
            r.bytes_sent = rep["bytes_sent"].as_u64();
            r.stop_reason = rep["stop_reason"].as_str().map(str::to_owned);
            r.report = Some(rep.clone());
        }
        if let Some(e) = moved.error {
            r.error = Some(e);
        }
        // In doubt: the guest stays paused on h1 (its guard deletes it).
        if moved.phase == "in_doubt" {
            return Ok(true);
        }
        // Committed: it runs on h2; aborted: on h1 again. Its line either way.
        let line = g
            .wait_done(
                run_limit
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_secs(5)),
            )
            .with_context(|| format!("the guest after its migration ({})", moved.phase))?;
        r.checksum = checksum(&line);
        r.done_line = Some(line);
        Ok(true)
    }
}
