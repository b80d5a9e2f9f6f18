//! From a family run (and the 1-clone run and resident reference of the
//! same kind) to the configuration's [`Record`].

use crate::api::ForkKind;
use crate::record::{self, checksum, clones, max, median, note, pct, per_clone, Record};
use crate::resident::Resident;
use crate::run::{FamilyRun, Setup};

/// The 1-clone fork of a configuration: what a single clone needs.
#[derive(Debug, Clone)]
pub struct OneClone {
    pub bytes: Option<u64>,
    /// Its clone's `done_us − start_us`.
    pub run_ms: Option<f64>,
    pub fork_tick: Option<u64>,
    pub line: Option<String>,
}

impl OneClone {
    pub fn from_run(r: &FamilyRun) -> OneClone {
        let mut missing = Vec::new();
        OneClone {
            bytes: bytes_sent(r),
            run_ms: run_times(&r.fam, &mut missing).and_then(|v| v.first().copied()),
            fork_tick: r.fork_tick,
            line: clones(&r.fam)
                .first()
                .and_then(|c| c["last_line"].as_str().map(str::to_owned)),
        }
    }
}

fn bytes_sent(r: &FamilyRun) -> Option<u64> {
    r.memserver.as_ref()?["bytes_sent"].as_u64()
}

/// Every clone's `done_us − start_us` in ms.
fn run_times(fam: &serde_json::Value, missing: &mut Vec<String>) -> Option<Vec<f64>> {
    let starts = per_clone(fam, "clones[].start_us", missing, |c| {
        c["start_us"].as_f64()
    })?;
    let dones = per_clone(fam, "clones[].done_us", missing, |c| c["done_us"].as_f64())?;
    Some(
        starts
            .iter()
            .zip(&dones)
            .map(|(s, d)| (d - s) / 1e3)
            .collect(),
    )
}

/// Everything a configuration reports.
pub struct Inputs<'a> {
    pub setup: &'a Setup,
    pub kind: ForkKind,
    pub loss_pct: f64,
    pub clones: u64,
    pub run: &'a FamilyRun,
    pub one: Option<&'a OneClone>,
    pub resident: Option<&'a Resident>,
}

pub fn record(i: &Inputs) -> Record {
    let (s, run, fam) = (i.setup, i.run, &i.run.fam);
    let mut missing = Vec::new();
    let mut r = Record {
        mode: i.kind.mode.as_str().into(),
        heuristics: i.kind.heuristics,
        loss_pct: i.loss_pct,
        clones: i.clones,
        hosts: s.hosts,
        cmdline: s.cmdline(),
        mem_mib: s.mem_mib,
        fork_tick: run.fork_tick,
        ticks_after_fork: run
            .fork_tick
            .map(|t| (s.fork_tick + s.ticks_after).saturating_sub(t)),
        all_ended_polled_ms: Some(run.polled_ended.as_secs_f64() * 1e3),
        loss_dropped_packets: run.dropped,
        ..Record::default()
    };
    if !run.kind_sent {
        note(&mut missing, "fork body: distribution, heuristics");
    }
    if fam["distribution"].as_str() != Some(r.mode.as_str())
        || fam["heuristics"].as_bool() != Some(r.heuristics)
    {
        note(&mut missing, "families[].distribution/heuristics as asked");
    }
    r.clone_time_ms = per_clone(fam, "clones[].start_us", &mut missing, |c| {
        c["start_us"].as_f64()
    })
    .and_then(|v| max(&v))
    .map(|us| us / 1e3);
    let done = per_clone(fam, "clones[].done_us", &mut missing, |c| {
        c["done_us"].as_f64()
    });
    match done.as_deref().and_then(max) {
        Some(us) => {
            r.all_ended_ms = Some(us / 1e3);
            r.all_ended_from = Some("done_us".into());
        }
        None => {
            r.all_ended_ms = r.all_ended_polled_ms;
            r.all_ended_from = Some("polled".into());
        }
    }
    r.parent_stopped_ms = fam["parent_stopped_us"].as_f64().map(|us| us / 1e3);
    if r.parent_stopped_ms.is_none() {
        note(&mut missing, "families[].parent_stopped_us");
    }
    r.memserver_delta = run.memserver.clone();
    r.memserver_bytes_sent = bytes_sent(run);
    if r.memserver_bytes_sent.is_none() {
        note(&mut missing, "GET /v1/memserver bytes_sent");
    }
    r.one_clone_bytes = i.one.and_then(|o| o.bytes);
    r.egress_vs_one_clone = match (r.memserver_bytes_sent, r.one_clone_bytes) {
        (Some(n), Some(one)) if one > 0 => Some(n as f64 / one as f64),
        _ => None,
    };
    r.pages_requested = record::sum_faults(fam, "pages_fetched", &mut missing);
    r.pages_prefetched = record::sum_faults(fam, "pages_prefetched", &mut missing);
    r.pages_avoided = match (
        record::sum_faults(fam, "pages_avoided", &mut missing),
        record::sum_faults(fam, "pages_declared", &mut missing),
    ) {
        (Some(a), Some(d)) => Some(a + d),
        _ => None,
    };
    r.retransmits = retransmits(fam, i.kind, &mut missing);
    let runs = run_times(fam, &mut missing);
    r.clone_run_ms_p50 = runs.as_deref().and_then(median);
    r.clone_run_ms_max = runs.as_deref().and_then(max);
    if let Some(res) = i.resident {
        r.resident_run_ms = Some(res.run_ms);
        r.runtime_overhead_pct = r.clone_run_ms_p50.and_then(|c| pct(c, res.run_ms));
        r.one_clone_run_ms = i.one.and_then(|o| o.run_ms);
        r.one_clone_overhead_pct = r.one_clone_run_ms.and_then(|c| pct(c, res.run_ms));
        let clone1 = clones(fam)
            .iter()
            .find(|c| c["clone_id"] == 1)
            .and_then(|c| c["last_line"].as_str());
        r.clone1_matches_resident = clone1.map(|l| l == res.done_line);
        r.one_clone_matches_resident = i
            .one
            .filter(|o| o.fork_tick == run.fork_tick)
            .and_then(|o| o.line.as_deref())
            .map(|l| l == res.done_line);
    }
    r.rss_growth_by_host = run.rss_growth.clone();
    if !run.rss_growth.is_empty() && i.clones > 0 {
        r.rss_per_clone_bytes = Some(run.rss_growth.values().sum::<u64>() / i.clones);
    }
    for c in clones(fam) {
        let line = c["last_line"].as_str().unwrap_or_default();
        let (Some(id), Some(sum)) = (c["clone_id"].as_u64(), checksum(line)) else {
            continue;
        };
        r.checksums.insert(id, sum.to_owned());
        if c["exit"]["code"] == 0 {
            r.clones_ok += 1;
        }
    }
    r.parent_checksum = run
        .parent_line
        .as_deref()
        .and_then(checksum)
        .map(str::to_owned);
    r.missing = missing;
    round_ms(&mut r);
    r
}

/// Times to the microsecond (their resolution), ratios to 0.001.
fn round_ms(r: &mut Record) {
    let round = |v: &mut Option<f64>| *v = v.map(|x| (x * 1e3).round() / 1e3);
    for v in [
        &mut r.clone_time_ms,
        &mut r.all_ended_ms,
        &mut r.all_ended_polled_ms,
        &mut r.parent_stopped_ms,
        &mut r.egress_vs_one_clone,
        &mut r.runtime_overhead_pct,
        &mut r.clone_run_ms_p50,
        &mut r.clone_run_ms_max,
        &mut r.resident_run_ms,
        &mut r.one_clone_run_ms,
        &mut r.one_clone_overhead_pct,
    ] {
        round(v);
    }
}

/// Σ `re_requests` of the family's receivers (multicast); for unicast the
/// contract has no re-request counter, so it stays null.
fn retransmits(fam: &serde_json::Value, kind: ForkKind, missing: &mut Vec<String>) -> Option<u64> {
    let Some(rs) = fam["receivers"].as_array() else {
        if kind.mode == crate::api::Mode::Multicast {
            note(missing, "families[].receivers");
        }
        return None;
    };
    let v: Option<Vec<u64>> = rs.iter().map(|r| r["re_requests"].as_u64()).collect();
    if v.is_none() {
        note(missing, "families[].receivers[].re_requests");
    }
    v.map(|v| v.iter().sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Mode;
    use serde_json::json;
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn setup() -> Setup {
        Setup {
            hosts: 2,
            mem_mib: 512,
            state_mib: 8,
            alloc_mib: 0,
            dirty_pages: 0,
            seed: 1,
            tick_us: 10_000,
            fork_tick: 10,
            ticks_after: 4,
            timeout: Duration::from_secs(1),
        }
    }

    fn run(fam: serde_json::Value, memserver: Option<serde_json::Value>) -> FamilyRun {
        FamilyRun {
            fam,
            fork_tick: Some(10),
            parent_line: Some("zone: done clone=0 ticks=14 checksum=00000000000000aa".into()),
            polled_ended: Duration::from_millis(321),
            memserver,
            rss_growth: BTreeMap::from([("h1".into(), 4000), ("h2".into(), 2000)]),
            kind_sent: true,
            dropped: None,
        }
    }

    #[test]
    fn an_old_daemon_gives_nulls_not_numbers() {
        let fam = json!({"family": 1, "running": 0, "clones": [
            {"clone_id": 1, "state": "exited", "exit": {"code": 0},
             "last_line": "zone: done clone=1 ticks=14 checksum=0000000000000001"},
            {"clone_id": 2, "state": "exited", "exit": {"code": 0}, "host": "h2",
             "last_line": "zone: done clone=2 ticks=14 checksum=0000000000000002"}
        ]});
        let kind = ForkKind {
            mode: Mode::Unicast,
            heuristics: true,
        };
        let r = run(fam, None);
        let rec = record(&Inputs {
            setup: &setup(),
            kind,
            loss_pct: 0.0,
            clones: 2,
            run: &r,
            one: None,
            resident: None,
        });
        assert_eq!(rec.clone_time_ms, None);
        assert_eq!(rec.all_ended_ms, Some(321.0));
        assert_eq!(rec.all_ended_from.as_deref(), Some("polled"));
        assert_eq!(rec.memserver_bytes_sent, None);
        assert_eq!(rec.pages_requested, None);
        assert_eq!(rec.retransmits, None);
        assert_eq!(rec.rss_per_clone_bytes, Some(3000));
        assert_eq!(rec.clones_ok, 2);
        assert_eq!(rec.checksums[&2], "0000000000000002");
        assert_eq!(rec.parent_checksum.as_deref(), Some("00000000000000aa"));
        assert_eq!(rec.ticks_after_fork, Some(4));
        for m in [
            "clones[].start_us",
            "GET /v1/memserver bytes_sent",
            "families[].parent_stopped_us",
        ] {
            assert!(rec.missing.iter().any(|x| x == m), "{m}: {:?}", rec.missing);
        }
    }

    #[test]
    fn the_contracts_fields_become_figures() {
        let c = |id: u64, start: u64, done: u64| {
            json!({"clone_id": id, "state": "exited", "exit": {"code": 0},
                "start_us": start, "done_us": done,
                "faults": {"faults": 5, "pages_fetched": 100, "pages_avoided": 10,
                           "pages_declared": 1, "pages_prefetched": 90},
                "last_line": format!("zone: done clone={id} ticks=14 checksum=000000000000000{id}")})
        };
        let fam = json!({"family": 1, "running": 0, "distribution": "multicast",
            "heuristics": true, "parent_stopped_us": 2500,
            "receivers": [{"host": "h1", "re_requests": 3}, {"host": "h2", "re_requests": 4}],
            "clones": [c(1, 1000, 201_000), c(2, 3000, 303_000)]});
        let r = run(fam, Some(json!({"bytes_sent": 1100})));
        let one = OneClone {
            bytes: Some(1000),
            run_ms: Some(150.0),
            fork_tick: Some(10),
            line: None,
        };
        let res = Resident {
            run_ms: 100.0,
            done_line: "zone: done clone=1 ticks=14 checksum=0000000000000001".into(),
            on_schedule: true,
        };
        let rec = record(&Inputs {
            setup: &setup(),
            kind: ForkKind {
                mode: Mode::Multicast,
                heuristics: true,
            },
            loss_pct: 10.0,
            clones: 2,
            run: &r,
            one: Some(&one),
            resident: Some(&res),
        });
        assert!(rec.missing.is_empty(), "{:?}", rec.missing);
        assert_eq!(rec.clone_time_ms, Some(3.0));
        assert_eq!(rec.all_ended_ms, Some(303.0));
        assert_eq!(rec.parent_stopped_ms, Some(2.5));
        assert_eq!(rec.egress_vs_one_clone, Some(1.1));
        assert_eq!(rec.pages_requested, Some(200));
        assert_eq!(rec.pages_avoided, Some(22));
        assert_eq!(rec.retransmits, Some(7));
        assert_eq!(rec.clone_run_ms_p50, Some(200.0));
        assert_eq!(rec.runtime_overhead_pct, Some(100.0));
        assert_eq!(rec.one_clone_overhead_pct, Some(50.0));
        assert_eq!(rec.clone1_matches_resident, Some(true));
        assert_eq!(rec.one_clone_matches_resident, None);
    }
}
