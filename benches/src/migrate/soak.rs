//! `--soak N`: one running zone guest migrated h1 → h2 → h1 … N round
//! trips, each migration's downtime kept; then the guest's last line
//! against QEMU's straight-line run of the same cmdline.

use crate::forkd::{self, Ask, Guest, Started};
use crate::qemu;
use crate::record::{checksum, quantile, SoakRecord};
use anyhow::{bail, Result};
use bench_shared::cluster::{check_stop, nap};
use std::time::{Duration, Instant};

/// The soak guest: 16 MiB of state, 1/8 of it dirtied per 20 ms tick.
const STATE_MIB: u64 = 16;
const TICK_US: u64 = 20_000;
/// What one migration (request → the guest runs on the other host, with
/// the bench's polls) is given in the guest's run time: about twice what
/// one took here (~70 ms).
const PER_MIGRATION: Duration = Duration::from_millis(150);

pub fn cmdline(round_trips: u64) -> String {
    let run = Duration::from_secs(3) + PER_MIGRATION * (2 * round_trips) as u32;
    let ticks = run.as_micros() as u64 / TICK_US;
    format!(
        "ticks={ticks} seed=13 state_mib={STATE_MIB} dirty_pages={} tick_us={TICK_US}",
        STATE_MIB * 256 / 8
    )
}

pub struct Soak<'a> {
    pub apis: &'a [bench_shared::api::Api],
    pub qemu: Option<&'a std::path::Path>,
    pub guest: &'a std::path::Path,
    pub mem_mib: u64,
    pub mode: &'a str,
    pub downtime_ms: u64,
    pub bandwidth_mib_s: u64,
}

pub fn run(s: &Soak, round_trips: u64) -> Result<SoakRecord> {
    let cmdline = cmdline(round_trips);
    let mut rec = SoakRecord {
        kind: "soak".into(),
        cmdline: cmdline.clone(),
        mem_mib: s.mem_mib,
        mode: s.mode.into(),
        round_trips_asked: round_trips,
        load_avg_1m: bench_shared::load_avg(),
        ..SoakRecord::default()
    };
    eprintln!("migrate: soak: {round_trips} round trips h1 <-> h2 of `{cmdline}`");
    let (mut g, started) = Guest::boot(s.apis, 0, &cmdline, s.mem_mib)?;
    nap(Duration::from_millis(500))?;
    let ask = Ask {
        mode: s.mode,
        downtime_ms: s.downtime_ms,
        bandwidth_mib_s: s.bandwidth_mib_s,
        budget: Duration::from_secs(60),
    };
    let mut totals = Vec::new();
    for leg in 0..2 * round_trips {
        check_stop()?;
        let to = 1 - g.host;
        let t = Instant::now();
        match forkd::migrate(&mut g, to, &ask) {
            Ok((Started::Yes, m)) if m.phase == "committed" => {
                rec.migrations += 1;
                rec.downtimes_ms.extend(m.downtime_ms());
                totals.extend(m.total_ms());
            }
            Ok((Started::Yes, m)) => {
                rec.error = Some(format!(
                    "migration {}: {}",
                    leg + 1,
                    m.error.unwrap_or_default()
                ));
                break;
            }
            Ok((Started::ModeRefused(why), _)) => {
                bail!("mode {}: the daemon refused it: {why}", s.mode)
            }
            Err(e) => {
                check_stop()?;
                rec.error = Some(format!("migration {}: {e:#}", leg + 1));
                break;
            }
        }
        if leg % 20 == 19 {
            eprintln!(
                "migrate: soak: {} migrations, last {:.0} ms, guest at {:.1} s",
                rec.migrations,
                t.elapsed().as_secs_f64() * 1e3,
                started.elapsed().as_secs_f64()
            );
        }
    }
    rec.final_host = Some(s.apis[g.host].host.clone());
    rec.downtime_ms_p50 = quantile(&rec.downtimes_ms, 0.5);
    rec.downtime_ms_max = quantile(&rec.downtimes_ms, 1.0);
    rec.total_ms_p50 = quantile(&totals, 0.5);
    rec.total_ms_max = quantile(&totals, 1.0);
    let limit = PER_MIGRATION * (2 * round_trips) as u32 + Duration::from_secs(120);
    match g.wait_done(limit) {
        Ok(line) => {
            rec.checksum = checksum(&line);
            rec.done_line = Some(line);
        }
        Err(e) => {
            check_stop()?;
            rec.error.get_or_insert(format!("{e:#}"));
        }
    }
    drop(g);
    if let Some(q) = s.qemu {
        eprintln!("migrate: soak: QEMU's straight-line run of the same cmdline");
        match qemu::straight(q, s.guest, s.mem_mib, &cmdline, limit) {
            Ok((_, line)) => {
                rec.qemu_checksum = checksum(&line);
                rec.qemu_done_line = Some(line);
            }
            Err(e) => {
                check_stop()?;
                rec.error.get_or_insert(format!("qemu: {e:#}"));
            }
        }
    }
    rec.matches_qemu = match (&rec.done_line, &rec.qemu_done_line) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    };
    Ok(rec)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soak_guest_outlives_its_migrations() {
        let c = super::cmdline(100);
        // 3 s + 200 × 0.15 s at 20 ms a tick.
        assert!(c.starts_with("ticks=1650 "), "{c}");
        assert!(c.contains("dirty_pages=512 tick_us=20000"));
    }
}
