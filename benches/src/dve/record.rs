//! What one run yields: its [`Record`] (one JSON line on stdout and in
//! `dve.jsonl`) and its [`Series`] (the per-second samples and the
//! policy's events, one JSON line in `dve-series.jsonl`, for the plots),
//! and the figures computed from the samples.

use serde::{Deserialize, Serialize};

/// One run's figures (the fields first).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub bench: String,
    /// "on" or "off".
    pub policy: String,
    pub zones: u32,
    pub hosts: u32,
    pub clients: u32,
    pub duration_s: f64,
    /// The worst, over the run, of the most loaded host's load ÷ the
    /// cluster's average (per-second samples as the hosts publish them).
    pub max_over_avg_load: f64,
    /// The same on a 5-sample moving average of each host's load.
    pub max_over_avg_load_5s: f64,
    /// The same over the last 30 % of the run (clients arrived).
    pub max_over_avg_load_end: f64,
    pub p99_update_latency_ms: f64,
    pub p50_update_latency_ms: f64,
    /// Updates never acknowledged by the end of the drain.
    pub lost_updates: u64,
    pub migrations: u64,
    pub forks: u64,
    pub joins: u64,
    pub max_downtime_ms: f64,
    /// Decisions the policy took (every outcome).
    pub decisions: u64,
    pub decisions_failed: u64,
    pub updates_sent: u64,
    pub updates_acked: u64,
    pub acked_duplicate: u64,
    pub resent: u64,
    pub redirects: u64,
    pub handovers: u64,
    /// The scale: updates a second per client, guest passes per update,
    /// tick length, each host's capacity (cores) as the policy sees it.
    pub rate_hz: f64,
    pub update_cost: u64,
    pub tick_us: u64,
    pub cpu_capacity: f64,
    /// The average host load (fraction of capacity) over the run.
    pub avg_load: f64,
    /// The whole cluster's CPU (cores) on average over the run.
    pub cluster_cpu_cores: f64,
    /// The machine's 1-minute load average at the end (others' work too).
    pub machine_load_avg: Option<f64>,
    pub policy_config: Option<serde_json::Value>,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
}

/// One host at one sample.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostSample {
    pub host: String,
    /// Fraction of its capacity.
    pub load: f64,
    pub cpu_cores: f64,
    /// Zone VMs running there (parents, local clones, hosted clones).
    pub vms: u32,
    /// Of which clones.
    pub clones: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the clients started.
    pub t_s: f64,
    pub hosts: Vec<HostSample>,
}

/// A policy decision as the bench saw it appear.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    /// Seconds since the clients started, when the bench first saw it
    /// (decisions are polled every second).
    pub t_s: f64,
    /// migrate, fork or join.
    pub action: String,
    pub zone: String,
    pub from: String,
    #[serde(default)]
    pub to: String,
    pub outcome: String,
    pub reason: String,
}

/// The time series of one run (for the plots).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Series {
    pub policy: String,
    pub zones: u32,
    pub hosts: u32,
    pub clients: u32,
    pub duration_s: f64,
    pub started_unix_s: u64,
    pub samples: Vec<Sample>,
    pub events: Vec<Event>,
}

/// Per sample: the most loaded host's load ÷ the average (None when the
/// average is 0 or a host is missing).
pub fn ratios(samples: &[Sample], hosts: usize) -> Vec<(f64, f64)> {
    samples
        .iter()
        .filter(|s| s.hosts.len() == hosts)
        .filter_map(|s| ratio(s.hosts.iter().map(|h| h.load)).map(|r| (s.t_s, r)))
        .collect()
}

fn ratio(loads: impl Iterator<Item = f64> + Clone) -> Option<f64> {
    let n = loads.clone().count();
    let avg = loads.clone().sum::<f64>() / n.max(1) as f64;
    let max = loads.fold(0.0, f64::max);
    (n > 0 && avg > 0.0).then(|| max / avg)
}

/// The worst ratio among samples with `from <= t_s <= to`.
pub fn worst(samples: &[Sample], hosts: usize, from: f64, to: f64) -> f64 {
    ratios(samples, hosts)
        .into_iter()
        .filter(|(t, _)| *t >= from && *t <= to)
        .map(|(_, r)| r)
        .fold(0.0, f64::max)
}

/// The worst ratio on each host's `w`-sample moving average.
pub fn worst_smoothed(samples: &[Sample], hosts: usize, w: usize, from: f64, to: f64) -> f64 {
    let full: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.hosts.len() == hosts && s.t_s >= from && s.t_s <= to)
        .collect();
    let w = w.max(1);
    let mut out: f64 = 0.0;
    for i in (w - 1)..full.len() {
        let win = &full[i + 1 - w..=i];
        let avg_per_host: Vec<f64> = (0..hosts)
            .map(|h| win.iter().map(|s| s.hosts[h].load).sum::<f64>() / w as f64)
            .collect();
        if let Some(r) = ratio(avg_per_host.iter().copied()) {
            out = out.max(r);
        }
    }
    out
}

/// The mean of the cluster's average load and of its CPU over the samples
/// in `[from, to]`.
pub fn mean_load(samples: &[Sample], hosts: usize, from: f64, to: f64) -> (f64, f64) {
    let v: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.hosts.len() == hosts && s.t_s >= from && s.t_s <= to)
        .map(|s| {
            let load = s.hosts.iter().map(|h| h.load).sum::<f64>() / hosts as f64;
            (load, s.hosts.iter().map(|h| h.cpu_cores).sum::<f64>())
        })
        .collect();
    let n = v.len().max(1) as f64;
    (
        v.iter().map(|x| x.0).sum::<f64>() / n,
        v.iter().map(|x| x.1).sum::<f64>() / n,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(t: f64, loads: &[f64]) -> Sample {
        Sample {
            t_s: t,
            hosts: loads
                .iter()
                .enumerate()
                .map(|(i, l)| HostSample {
                    host: format!("h{}", i + 1),
                    load: *l,
                    cpu_cores: *l,
                    vms: 1,
                    clones: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn worst_ratio_over_a_window() {
        let s = vec![
            sample(0.0, &[0.0, 0.0]),
            sample(1.0, &[0.5, 0.5]),
            sample(2.0, &[0.9, 0.3]),
            sample(3.0, &[0.6, 0.6]),
            // A host missing: skipped.
            Sample {
                t_s: 4.0,
                hosts: sample(4.0, &[1.0]).hosts,
            },
        ];
        assert_eq!(ratios(&s, 2).len(), 3);
        assert!((worst(&s, 2, 0.0, 10.0) - 1.5).abs() < 1e-9);
        assert!((worst(&s, 2, 2.5, 10.0) - 1.0).abs() < 1e-9);
        // Smoothed over 2: (0.7, 0.4) → 1.2727; (0.75, 0.45) → 1.25.
        let sm = worst_smoothed(&s, 2, 2, 0.0, 10.0);
        assert!((sm - 0.7 / 0.55).abs() < 1e-9, "{sm}");
        let (load, cpu) = mean_load(&s, 2, 1.0, 3.0);
        assert!((load - 0.566_666).abs() < 1e-3 && (cpu - 1.133_333).abs() < 1e-3);
    }
}
