//! One configuration's figures (the JSON object the bench prints), and
//! reading them out of the daemon's family report. A figure the daemon does
//! not report is `null`, never made up; `missing` names what was absent.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The figures of one configuration (mode × heuristics × loss × clones).
/// Read back (`--plot-input`) with absent fields as their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    pub mode: String,
    pub heuristics: bool,
    pub loss_pct: f64,
    pub clones: u64,
    pub hosts: u32,
    /// The parent's cmdline (the fork lands before tick `fork_tick`).
    pub cmdline: String,
    pub mem_mib: u64,
    pub fork_tick: Option<u64>,
    /// Ticks every clone runs after the fork (`ticks` − `fork_tick`).
    pub ticks_after_fork: Option<u64>,
    /// Fork request → the last clone's first KVM_RUN (max `start_us`).
    pub clone_time_ms: Option<f64>,
    /// Fork request → the last clone's `zone: done` line (max `done_us`),
    /// else `all_ended_polled_ms`; `all_ended_from` says which.
    pub all_ended_ms: Option<f64>,
    pub all_ended_from: Option<String>,
    /// Fork request → the bench's poll (every 10 ms) seeing no clone run.
    pub all_ended_polled_ms: Option<f64>,
    pub parent_stopped_ms: Option<f64>,
    /// Delta of the parent host's `GET /v1/memserver` `bytes_sent`.
    pub memserver_bytes_sent: Option<u64>,
    /// The whole counter delta (every field of `GET /v1/memserver`).
    pub memserver_delta: Option<Value>,
    /// The same delta for a fork of 1 clone (on h2) of a parent of the same
    /// cmdline, same mode and heuristics, no loss, in the same run.
    pub one_clone_bytes: Option<u64>,
    /// `memserver_bytes_sent` / `one_clone_bytes`.
    pub egress_vs_one_clone: Option<f64>,
    /// Σ over clones of `faults.pages_fetched` (fetched on demand).
    pub pages_requested: Option<u64>,
    /// Σ over clones of `faults.pages_prefetched` (installed ahead of
    /// demand: prefetched, pushed or multicast to the host).
    pub pages_prefetched: Option<u64>,
    /// Σ over clones of `faults.pages_avoided` + `faults.pages_declared`.
    pub pages_avoided: Option<u64>,
    /// Σ over the family's receivers of `re_requests` (multicast).
    pub retransmits: Option<u64>,
    /// Median clone run time against the resident reference, in %.
    pub runtime_overhead_pct: Option<f64>,
    /// Median over clones of `done_us − start_us`.
    pub clone_run_ms_p50: Option<f64>,
    pub clone_run_ms_max: Option<f64>,
    /// The resident VM (straight-line `as_clone=1` of the same cmdline,
    /// same pacing): its scheduled tick-`fork_tick` boundary → done line.
    pub resident_run_ms: Option<f64>,
    /// The 1-clone fork's clone: `done_us − start_us`, and against the
    /// resident.
    pub one_clone_run_ms: Option<f64>,
    pub one_clone_overhead_pct: Option<f64>,
    /// Σ over clone-hosting daemons of (peak VmRSS during the family −
    /// VmRSS just before the fork), / clones.
    pub rss_per_clone_bytes: Option<u64>,
    pub rss_growth_by_host: BTreeMap<String, u64>,
    /// Clone id → the checksum of its `zone: done` line.
    pub checksums: BTreeMap<u64, String>,
    pub parent_checksum: Option<String>,
    /// Clones that ended with exit 0 and a done line.
    pub clones_ok: u64,
    /// Clone 1's line equals the resident straight-line run's.
    pub clone1_matches_resident: Option<bool>,
    /// The 1-clone fork's clone ended with the same line (when it forked
    /// at the same tick).
    pub one_clone_matches_resident: Option<bool>,
    /// Datagrams the loss rules dropped (nftables counters, clone hosts).
    pub loss_dropped_packets: Option<u64>,
    /// The machine's 1-minute load average when the configuration started
    /// (/proc/loadavg; 2 cores here: above ~2 other work shared them).
    pub load_avg_1m: Option<f64>,
    /// Contract fields the daemon did not report (their figures are null).
    pub missing: Vec<String>,
    /// Why this configuration has no figures.
    pub error: Option<String>,
}

/// A family's clones.
pub fn clones(fam: &Value) -> &[Value] {
    fam["clones"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// `f` of every clone, or None (and `field` noted as missing) if any
/// clone lacks it.
pub fn per_clone<T>(
    fam: &Value,
    field: &str,
    missing: &mut Vec<String>,
    f: impl Fn(&Value) -> Option<T>,
) -> Option<Vec<T>> {
    let cs = clones(fam);
    let v: Option<Vec<T>> = cs.iter().map(f).collect();
    if v.is_none() || cs.is_empty() {
        note(missing, field);
        return None;
    }
    v
}

pub fn note(missing: &mut Vec<String>, field: &str) {
    if !missing.iter().any(|m| m == field) {
        missing.push(field.to_owned());
    }
}

pub fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

/// The lower median (nearest rank).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len().saturating_sub(1) / 2).copied()
}

/// Σ over clones of `faults.<key>`.
pub fn sum_faults(fam: &Value, key: &str, missing: &mut Vec<String>) -> Option<u64> {
    per_clone(fam, &format!("clones[].faults.{key}"), missing, |c| {
        c["faults"][key].as_u64()
    })
    .map(|v| v.iter().sum())
}

/// The checksum of a `zone: done clone=I ticks=N checksum=X` line.
pub fn checksum(line: &str) -> Option<&str> {
    let rest = line.strip_prefix("zone: done ")?;
    rest.split_whitespace()
        .find_map(|w| w.strip_prefix("checksum="))
}

/// `new − old` for every unsigned counter of two `GET /v1/memserver`
/// answers, nested objects included.
pub fn counter_delta(old: &Value, new: &Value) -> Value {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => Value::Object(
            n.iter()
                .map(|(k, nv)| {
                    let d = match o.get(k) {
                        Some(ov) => counter_delta(ov, nv),
                        None => nv.clone(),
                    };
                    (k.clone(), d)
                })
                .collect(),
        ),
        (Value::Number(o), Value::Number(n)) => match (o.as_u64(), n.as_u64()) {
            (Some(o), Some(n)) => Value::from(n.saturating_sub(o)),
            _ => new.clone(),
        },
        _ => new.clone(),
    }
}

/// The 1-minute load average.
pub fn pct(clone: f64, resident: f64) -> Option<f64> {
    (resident > 0.0).then(|| (clone / resident - 1.0) * 100.0)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |x| format!("{x:.digits$}"))
}

fn mb(v: Option<u64>) -> String {
    v.map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6))
}

/// The human table's header.
pub fn table_header() -> String {
    format!(
        "{:<9} {:>4} {:>5} {:>6} {:>10} {:>10} {:>8} {:>10} {:>10} {:>6} {:>9} {:>9} {:>7}",
        "mode",
        "heur",
        "loss%",
        "clones",
        "clone ms",
        "ended ms",
        "stop ms",
        "egress MB",
        "1-clone MB",
        "ratio",
        "overhead%",
        "RSS/cl MB",
        "ok"
    )
}

/// One row of the human table.
pub fn table_row(r: &Record) -> String {
    if let Some(e) = &r.error {
        return format!(
            "{:<9} {:>4} {:>5} {:>6}  error: {e}",
            r.mode,
            if r.heuristics { "on" } else { "off" },
            r.loss_pct,
            r.clones
        );
    }
    format!(
        "{:<9} {:>4} {:>5} {:>6} {:>10} {:>10} {:>8} {:>10} {:>10} {:>6} {:>9} {:>9} {:>7}",
        r.mode,
        if r.heuristics { "on" } else { "off" },
        r.loss_pct,
        r.clones,
        opt(r.clone_time_ms, 1),
        opt(r.all_ended_ms, 1),
        opt(r.parent_stopped_ms, 2),
        mb(r.memserver_bytes_sent),
        mb(r.one_clone_bytes),
        opt(r.egress_vs_one_clone, 2),
        opt(r.runtime_overhead_pct, 0),
        mb(r.rss_per_clone_bytes),
        format!("{}/{}", r.clones_ok, r.clones)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_fields_give_none_and_are_named() {
        let fam = json!({"clones": [
            {"start_us": 100, "faults": {"pages_fetched": 3}},
            {"faults": {"pages_fetched": 4}}
        ]});
        let mut missing = Vec::new();
        let s = per_clone(&fam, "clones[].start_us", &mut missing, |c| {
            c["start_us"].as_f64()
        });
        assert!(s.is_none());
        assert_eq!(sum_faults(&fam, "pages_fetched", &mut missing), Some(7));
        assert_eq!(sum_faults(&fam, "pages_avoided", &mut missing), None);
        assert_eq!(
            missing,
            ["clones[].start_us", "clones[].faults.pages_avoided"]
        );
    }

    #[test]
    fn checksums_medians_and_deltas() {
        assert_eq!(
            checksum("zone: done clone=3 ticks=44 checksum=00ff00ff00ff00ff"),
            Some("00ff00ff00ff00ff")
        );
        assert_eq!(checksum("zone: start ticks=4"), None);
        assert_eq!(median(&[3.0, 1.0, 2.0, 4.0]), Some(2.0));
        assert_eq!(median(&[]), None);
        assert_eq!(max(&[3.0, 9.0, 2.0]), Some(9.0));
        let d = counter_delta(
            &json!({"bytes_sent": 10, "multicast": {"frames_sent": 2}}),
            &json!({"bytes_sent": 25, "multicast": {"frames_sent": 7}, "requests": 4}),
        );
        assert_eq!(
            d,
            json!({"bytes_sent": 15, "multicast": {"frames_sent": 5}, "requests": 4})
        );
    }

    #[test]
    fn records_round_trip_through_json() {
        let mut r = Record {
            mode: "multicast".into(),
            clones: 2,
            ..Record::default()
        };
        r.checksums.insert(2, "ab".into());
        r.checksums.insert(10, "cd".into());
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains(r#""checksums":{"2":"ab","10":"cd"}"#), "{s}");
        let back: Record = serde_json::from_str(&s).unwrap();
        assert_eq!(back.checksums, r.checksums);
        assert!(table_row(&back).contains("multicast"));
    }
}
