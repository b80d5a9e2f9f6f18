//! The fork part of `forkd run --json`.

use crate::fork::parent::Family;
use crate::vmm::VmExit;
use hdrhistogram::Histogram;
use memserver::server::ServerStats;
use serde_json::{json, Value};
use std::sync::Arc;

/// Quantile `q` of `h`, if it holds any sample.
fn quantile(h: &Histogram<u64>, q: f64) -> Option<u64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q))
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
    // Clone starts in µs; fetch latencies in µs, merged from the clones.
    // Bounded: up to an hour of clone start, a minute of fetch latency.
    let mut starts = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .expect("bounds and 3 significant digits are valid");
    let mut lat = Histogram::<u64>::new_with_bounds(1, 60_000_000, 2)
        .expect("bounds and 2 significant digits are valid");
    let (mut fetched, mut avoided, mut declared, mut faults) = (0u64, 0u64, 0u64, 0u64);
    let mut prefetched = 0u64;
    let mut clones = Vec::new();
    for r in &reports {
        for c in &r.clones {
            if let Some(d) = c.start_latency {
                starts.saturating_record(d.as_micros() as u64);
            }
            // Histograms that do not fit are left out of the merged figure.
            let _ = lat.add(&c.faults.fetch_latency_us);
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
    let us_to_ms = |us: u64| round3(us as f64 / 1e3);
    json!({
        "families": reports.len(),
        "clones": clones.len(),
        "descriptor_bytes": reports.iter().map(|r| r.descriptor_bytes).max(),
        "descriptor_pages": reports.iter().map(|r| r.descriptor_pages).max(),
        "parent_stopped_ms": reports.iter().map(|r| round3(r.parent_stopped.as_secs_f64() * 1e3)).collect::<Vec<_>>(),
        "freeze_ms": reports.iter().map(|r| round3(r.freeze.as_secs_f64() * 1e3)).collect::<Vec<_>>(),
        "clone_start_ms_p50": quantile(&starts, 0.5).map(us_to_ms),
        "clone_start_ms_max": quantile(&starts, 1.0).map(us_to_ms),
        "faults": faults,
        "pages_fetched": fetched,
        "pages_avoided": avoided,
        "pages_declared": declared,
        "pages_prefetched": prefetched,
        "fetch_us_p50": quantile(&lat, 0.5),
        "fetch_us_p99": quantile(&lat, 0.99),
        "memserver_pages_sent": server.pages_sent,
        "memserver_bytes_sent": server.bytes_sent,
        "distribution": reports.last().map(|r| r.distribution.to_string()),
        "clone_done_ms_max": reports.iter().flat_map(|r| &r.clones).filter_map(|c| c.done_latency).max().map(|d| round3(d.as_secs_f64() * 1e3)),
        "memserver_multicast": multicast_json(server),
        "host_receiver": reports.last().and_then(|r| r.host_receiver).map(|h| json!({
            "cache_hits": h.cache_hits, "cache_misses": h.cache_misses, "pages_arrived": h.pages_arrived,
            "pages_pushed": h.pages_pushed, "evicted": h.evicted, "timeouts": h.timeouts,
            "rerequests": h.receiver.rerequests, "forged": h.receiver.forged,
            "replayed": h.receiver.replayed, "foreign": h.receiver.foreign, "bad_blocks": h.bad_blocks,
        })),
        "per_clone": clones,
    })
}

fn multicast_json(server: &ServerStats) -> Value {
    let t = &server.multicast.total;
    json!({
        "bytes_sent": t.bytes_sent, "blocks_multicast": t.blocks_multicast,
        "blocks_unicast": t.blocks_unicast, "blocks_pushed": t.blocks_pushed,
        "lockstep_suppressed": t.lockstep_suppressed, "retries_received": t.retries_received,
        "forged": t.forged, "replayed": t.replayed, "foreign": t.foreign,
    })
}
