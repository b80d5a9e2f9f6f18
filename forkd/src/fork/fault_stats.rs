//! A clone's fault counters: what its handler did, shared with reports
//! (a fixed-size latency histogram, whatever the number of faults), and
//! the plain counts that travel between hosts.

use std::sync::{Arc, Mutex};

/// Largest fetch latency the histogram records (longer ones are clamped).
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// Counters of one clone's faults.
#[derive(Debug, Clone)]
pub struct FaultStats {
    pub faults: u64,
    pub pages_fetched: u64,
    /// Zero-filled because the guest allocator handed them out after the
    /// fork (heuristic a).
    pub pages_avoided: u64,
    /// Zero-filled because the guest declared it will overwrite them
    /// (heuristic b).
    pub pages_declared: u64,
    pub fetch_requests: u64,
    /// Service time of the faults that needed a fetch, in µs (a fixed-size
    /// histogram, whatever the number of faults).
    pub fetch_latency_us: hdrhistogram::Histogram<u64>,
    /// Pages installed ahead of demand by the prefetcher.
    pub pages_prefetched: u64,
}

impl Default for FaultStats {
    fn default() -> Self {
        FaultStats {
            faults: 0,
            pages_fetched: 0,
            pages_avoided: 0,
            pages_declared: 0,
            fetch_requests: 0,
            // 2 significant digits up to a minute: a few KiB.
            fetch_latency_us: hdrhistogram::Histogram::new_with_bounds(1, MAX_LATENCY_US, 2)
                .unwrap_or_else(|_| hdrhistogram::Histogram::new(2).expect("2 sig figs is valid")),
            pages_prefetched: 0,
        }
    }
}

/// A clone's fault counters without the histogram: what crosses hosts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FaultCounts {
    pub faults: u64,
    pub pages_fetched: u64,
    pub pages_avoided: u64,
    pub pages_declared: u64,
    pub pages_prefetched: u64,
    pub fetch_requests: u64,
}

impl FaultStats {
    pub fn counts(&self) -> FaultCounts {
        FaultCounts {
            faults: self.faults,
            pages_fetched: self.pages_fetched,
            pages_avoided: self.pages_avoided,
            pages_declared: self.pages_declared,
            pages_prefetched: self.pages_prefetched,
            fetch_requests: self.fetch_requests,
        }
    }

    /// Counters from another host (no latency histogram).
    pub fn from_counts(c: FaultCounts) -> FaultStats {
        FaultStats {
            faults: c.faults,
            pages_fetched: c.pages_fetched,
            pages_avoided: c.pages_avoided,
            pages_declared: c.pages_declared,
            pages_prefetched: c.pages_prefetched,
            fetch_requests: c.fetch_requests,
            ..FaultStats::default()
        }
    }
}

/// A live view of one clone's fault counters.
#[derive(Clone, Default)]
pub struct FaultStatsView(pub(crate) Arc<Mutex<FaultStats>>);

impl FaultStatsView {
    pub fn get(&self) -> FaultStats {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
