//! The fork part of `forkd run --json`.

use crate::fork::parent::Family;
use crate::vmm::VmExit;
use memserver::server::ServerStats;
use serde_json::{json, Value};
use std::sync::Arc;

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Clones that did not end with status 0, with why.
pub fn failed_clones(families: &[Arc<Family>]) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for f in families {
        let r = f.report();
        out.extend(r.start_failures.iter().cloned());
        for c in &r.clones {
            if c.exit != VmExit::Guest(0) {
                out.push((c.clone_id, c.exit.to_string()));
            }
        }
    }
    out.sort();
    out
}

pub fn json(families: &[Arc<Family>], server: &ServerStats) -> Value {
    let reports: Vec<_> = families.iter().map(|f| f.report()).collect();
    let mut starts: Vec<f64> = Vec::new();
    let mut lat: Vec<f64> = Vec::new();
    let (mut fetched, mut avoided, mut declared, mut faults) = (0u64, 0u64, 0u64, 0u64);
    let mut prefetched = 0u64;
    let mut clones = Vec::new();
    for r in &reports {
        for c in &r.clones {
            if let Some(d) = c.start_latency {
                starts.push(d.as_secs_f64() * 1e3);
            }
            lat.extend(c.faults.fetch_latency_us.iter().map(|&u| u as f64));
            fetched += c.faults.pages_fetched;
            avoided += c.faults.pages_avoided;
            declared += c.pages_declared;
            faults += c.faults.faults;
            prefetched += c.faults.pages_prefetched;
            clones.push(json!({
                "clone": c.clone_id,
                "ip": c.identity.ip.to_string(),
                "mac": c.identity.mac_string(),
                "exit": c.exit.to_string(),
                "start_ms": c.start_latency.map(|d| round3(d.as_secs_f64() * 1e3)),
                "pages_fetched": c.faults.pages_fetched,
                "pages_avoided": c.faults.pages_avoided,
                "pages_prefetched": c.faults.pages_prefetched,
                "last_line": c.last_line,
            }));
        }
    }
    starts.sort_by(f64::total_cmp);
    lat.sort_by(f64::total_cmp);
    json!({
        "families": reports.len(),
        "clones": clones.len(),
        "descriptor_bytes": reports.iter().map(|r| r.descriptor_bytes).max(),
        "descriptor_pages": reports.iter().map(|r| r.descriptor_pages).max(),
        "parent_stopped_ms": reports.iter().map(|r| round3(r.parent_stopped.as_secs_f64() * 1e3)).collect::<Vec<_>>(),
        "freeze_ms": reports.iter().map(|r| round3(r.freeze.as_secs_f64() * 1e3)).collect::<Vec<_>>(),
        "clone_start_ms_p50": percentile(&starts, 0.5).map(round3),
        "clone_start_ms_max": starts.last().copied().map(round3),
        "faults": faults,
        "pages_fetched": fetched,
        "pages_avoided": avoided,
        "pages_declared": declared,
        "pages_prefetched": prefetched,
        "fetch_us_p50": percentile(&lat, 0.5),
        "fetch_us_p99": percentile(&lat, 0.99),
        "memserver_pages_sent": server.pages_sent,
        "memserver_bytes_sent": server.bytes_sent,
        "per_clone": clones,
    })
}
