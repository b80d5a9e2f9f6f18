//! The figures of one scenario × mode (the JSON object the bench prints),
//! the soak's record, the targets and the readable table. A figure that was
//! not measured is `null`, never made up.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One scenario (guest, state, dirty rate) migrated in one forkd mode, with
/// the same scenario's QEMU migration beside it. Read back
/// (`--plot-input`) with absent fields as their defaults.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Record {
    /// `scenario` (or `soak`: see [`SoakRecord`]).
    pub kind: String,
    /// e.g. `256MiB-mid`.
    pub scenario: String,
    /// Which of `--repeat`'s runs (1 ..).
    pub repeat: u64,
    /// `idle`, `low`, `mid`, `high` (every page every tick, paced) or
    /// `flat` (every page every tick, unpaced).
    pub level: String,
    pub cmdline: String,
    pub mem_mib: u64,
    /// The zone state (`state_mib`): what the guest touched, besides its
    /// own few pages.
    pub touched_mib: u64,
    /// Page writes per second the cmdline asks for (dirty pages, the
    /// client updates' and the inbox's pages, every page with `dirty_all`)
    /// ÷ the tick; null when unpaced.
    pub dirty_pages_per_s: Option<f64>,
    /// forkd's own estimate (`dirty_pages_per_s` of the migration status,
    /// the last one seen before the end).
    pub measured_dirty_pages_per_s: Option<u64>,
    pub mode: String,
    /// committed, aborted, in_doubt (or empty when it did not start).
    pub phase: String,
    pub rounds: Option<u64>,
    pub stop_reason: Option<String>,
    pub bytes_sent: Option<u64>,
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// The checksum of the `zone: done` line the guest printed on the
    /// destination (read from its console through the API).
    pub checksum: Option<String>,
    pub done_line: Option<String>,
    /// Guest's `zone: start` → the migrate request (forkd), ms.
    pub migrated_after_ms: Option<f64>,
    /// The daemon's whole report (postcopy's window and other new fields
    /// too).
    pub report: Option<Value>,
    pub qemu_downtime_ms: Option<f64>,
    pub qemu_total_ms: Option<f64>,
    pub qemu_setup_ms: Option<f64>,
    pub qemu_bytes_sent: Option<u64>,
    /// QEMU's dirty-bitmap syncs (`ram.dirty-sync-count`): its rounds.
    pub qemu_rounds: Option<u64>,
    pub qemu_checksum: Option<String>,
    pub qemu_done_line: Option<String>,
    pub qemu_migrated_after_ms: Option<f64>,
    pub qemu_error: Option<String>,
    /// Both done lines equal (same ticks, clone and checksum).
    pub matches_qemu: Option<bool>,
    /// TCP throughput h1 → h2 over the cluster's bridge (forkd's path),
    /// and over loopback (QEMU's path), measured at the start of the run.
    pub link_mib_s: Option<f64>,
    pub loopback_mib_s: Option<f64>,
    /// The budget and cap both VMMs were given.
    pub downtime_limit_ms: u64,
    pub bandwidth_mib_s: u64,
    /// max(0.5 × `qemu_downtime_ms`, 5).
    pub downtime_target_ms: Option<f64>,
    pub meets_downtime_target: Option<bool>,
    /// Idle only: 1.1 × `bytes_sent` (≈ the populated bytes) ÷ `link_mib_s`.
    pub total_target_ms: Option<f64>,
    pub meets_total_target: Option<bool>,
    pub load_avg_1m: Option<f64>,
    pub error: Option<String>,
}

impl Record {
    /// Fills the comparison fields from the figures.
    pub fn judge(&mut self) {
        self.matches_qemu = match (&self.done_line, &self.qemu_done_line) {
            (Some(a), Some(b)) => Some(a == b),
            _ => None,
        };
        self.downtime_target_ms = self.qemu_downtime_ms.map(|q| (0.5 * q).max(5.0));
        self.meets_downtime_target = match (self.downtime_ms, self.downtime_target_ms) {
            (Some(d), Some(t)) => Some(d <= t),
            _ => None,
        };
        if self.level == "idle" {
            self.total_target_ms = match (self.bytes_sent, self.link_mib_s) {
                (Some(b), Some(l)) if l > 0.0 => Some(1.1 * b as f64 / (l * 1048576.0) * 1e3),
                _ => None,
            };
            self.meets_total_target = match (self.total_ms, self.total_target_ms) {
                (Some(t), Some(x)) => Some(t <= x),
                _ => None,
            };
        }
    }
}

/// `--soak N`: N round trips h1 ↔ h2 of one running guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct SoakRecord {
    /// Always `soak`.
    pub kind: String,
    pub cmdline: String,
    pub mem_mib: u64,
    pub mode: String,
    pub round_trips_asked: u64,
    /// Migrations that committed (two per round trip).
    pub migrations: u64,
    /// Each migration's downtime, in order.
    pub downtimes_ms: Vec<f64>,
    pub downtime_ms_p50: Option<f64>,
    pub downtime_ms_max: Option<f64>,
    pub total_ms_p50: Option<f64>,
    pub total_ms_max: Option<f64>,
    /// Where the guest ended and its done line.
    pub final_host: Option<String>,
    pub checksum: Option<String>,
    pub done_line: Option<String>,
    /// QEMU's straight-line run of the same cmdline (no migration).
    pub qemu_checksum: Option<String>,
    pub qemu_done_line: Option<String>,
    pub matches_qemu: Option<bool>,
    pub load_avg_1m: Option<f64>,
    pub error: Option<String>,
}

/// The checksum of a `zone: done … checksum=X` line.
pub fn checksum(line: &str) -> Option<String> {
    line.strip_prefix("zone: done")?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("checksum="))
        .map(str::to_owned)
}

/// The nearest-rank quantile `q` of `v` (None when empty).
pub fn quantile(v: &[f64], q: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    Some(s[rank - 1])
}

fn f(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

fn yes(v: Option<bool>) -> &'static str {
    match v {
        Some(true) => "yes",
        Some(false) => "NO",
        None => "-",
    }
}

pub fn table_header() -> String {
    format!(
        "{:<14} {:<9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>6} {:>6}",
        "scenario",
        "mode",
        "pages/s",
        "rounds",
        "MiB sent",
        "down ms",
        "total ms",
        "qemu rd",
        "qemu down",
        "qemu tot",
        "match",
        "target"
    )
}

pub fn table_row(r: &Record) -> String {
    if let Some(e) = &r.error {
        return format!("{:<14} {:<9} error: {e}", r.scenario, r.mode);
    }
    let rate = r
        .dirty_pages_per_s
        .or(r.measured_dirty_pages_per_s.map(|x| x as f64));
    format!(
        "{:<14} {:<9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>8} {:>9} {:>9} {:>6} {:>6}",
        r.scenario,
        r.mode,
        f(rate, 0),
        r.rounds.map(|x| x.to_string()).unwrap_or("-".into()),
        f(r.bytes_sent.map(|b| b as f64 / 1048576.0), 1),
        f(r.downtime_ms, 2),
        f(r.total_ms, 1),
        r.qemu_rounds.map(|x| x.to_string()).unwrap_or("-".into()),
        f(r.qemu_downtime_ms, 1),
        f(r.qemu_total_ms, 1),
        yes(r.matches_qemu),
        yes(r.meets_downtime_target),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_come_from_done_lines() {
        assert_eq!(
            checksum("zone: done clone=0 ticks=5 checksum=00ff").as_deref(),
            Some("00ff")
        );
        assert_eq!(checksum("zone: start ticks=5"), None);
    }

    #[test]
    fn targets_follow_the_issue() {
        let mut r = Record {
            level: "idle".into(),
            downtime_ms: Some(4.0),
            qemu_downtime_ms: Some(6.0),
            total_ms: Some(100.0),
            bytes_sent: Some(100 << 20),
            link_mib_s: Some(1000.0),
            done_line: Some("zone: done clone=0 ticks=1 checksum=1".into()),
            qemu_done_line: Some("zone: done clone=0 ticks=1 checksum=1".into()),
            ..Record::default()
        };
        r.judge();
        assert_eq!(r.downtime_target_ms, Some(5.0));
        assert_eq!(r.meets_downtime_target, Some(true));
        assert_eq!(r.matches_qemu, Some(true));
        // 1.1 × 100 MiB at 1000 MiB/s = 110 ms.
        assert!((r.total_target_ms.unwrap() - 110.0).abs() < 1e-9);
        assert_eq!(r.meets_total_target, Some(true));
        r.qemu_downtime_ms = Some(40.0);
        r.downtime_ms = Some(21.0);
        r.judge();
        assert_eq!(r.meets_downtime_target, Some(false));
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.5), Some(2.0));
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 1.0), Some(3.0));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
