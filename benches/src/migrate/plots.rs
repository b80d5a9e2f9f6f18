//! SVG figures (plotters, SVG backend only, as the snowflock bench: text is
//! SVG `<text>` the viewer renders, so no font library is linked).
//!
//! Per zone state size S: `migrate-downtime-<S>mib.svg` (downtime against
//! the dirty rate, with the target max(0.5 × QEMU's, 5 ms) as crosses) and
//! `migrate-total-<S>mib.svg` (total time, the idle target 1.1 × bytes ÷
//! link as a cross), one series per forkd mode plus
//! QEMU, log y axis, the levels idle → flat out along x.

use crate::record::{quantile, Record};
use crate::scenario::Level;
use anyhow::{anyhow, Result};
use bench_shared::plot::{err, finish, FONT, SIZE};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Series name → level index → value.
type Lines = BTreeMap<String, BTreeMap<usize, f64>>;
/// The same with every run's value (`--repeat`).
type Samples = BTreeMap<String, BTreeMap<usize, Vec<f64>>>;

fn medians(s: Samples) -> Lines {
    s.into_iter()
        .map(|(k, pts)| {
            let pts = pts
                .into_iter()
                .filter_map(|(i, v)| Some((i, quantile(&v, 0.5)?)))
                .collect();
            (k, pts)
        })
        .collect()
}

fn level_index(r: &Record) -> Option<usize> {
    let l = Level::parse(&r.level)?;
    Level::ALL.iter().position(|&x| x == l)
}

/// Writes every figure the records support into `dir`; the files written.
pub fn write_all(dir: &Path, records: &[Record]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot make {}: {e}", dir.display()))?;
    let mut by_state: BTreeMap<u64, Vec<&Record>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.kind == "scenario") {
        by_state.entry(r.touched_mib).or_default().push(r);
    }
    let mut out = Vec::new();
    for (state, rs) in by_state {
        for (what, forkd, qemu) in [
            (
                "downtime",
                (|r: &Record| r.downtime_ms) as fn(&Record) -> Option<f64>,
                (|r: &Record| r.qemu_downtime_ms) as fn(&Record) -> Option<f64>,
            ),
            (
                "total",
                |r: &Record| r.total_ms,
                |r: &Record| r.qemu_total_ms,
            ),
        ] {
            let mut lines = Samples::new();
            let mut targets = Samples::new();
            let mut qemu_seen = std::collections::BTreeSet::new();
            let mut labels: BTreeMap<usize, String> = BTreeMap::new();
            for r in &rs {
                let Some(i) = level_index(r) else { continue };
                let rate = r
                    .dirty_pages_per_s
                    .map(|p| format!("{:.0}k/s", p / 1e3))
                    .unwrap_or_else(|| "unpaced".into());
                labels.insert(i, format!("{} ({rate})", r.level));
                if let Some(y) = forkd(r).filter(|_| r.error.is_none()) {
                    let k = format!("forkd {}", r.mode);
                    lines.entry(k).or_default().entry(i).or_default().push(y);
                }
                if let Some(y) = qemu(r) {
                    // One QEMU run per scenario and repeat, in every
                    // mode's record: counted once.
                    if qemu_seen.insert((i, r.repeat)) {
                        let q = lines.entry("QEMU 7.2".into()).or_default();
                        q.entry(i).or_default().push(y);
                    }
                }
                let target = match what {
                    "downtime" => r.downtime_target_ms,
                    _ => r.total_target_ms,
                };
                if let Some(t) = target {
                    targets
                        .entry(String::new())
                        .or_default()
                        .entry(i)
                        .or_default()
                        .push(t);
                }
            }
            if lines.is_empty() {
                continue;
            }
            let lines = medians(lines);
            let targets = medians(targets).remove("").unwrap_or_default();
            let p = dir.join(format!("migrate-{what}-{state}mib.svg"));
            let title = match what {
                "downtime" => format!("downtime vs dirty rate, 1 GiB guest, {state} MiB state"),
                _ => format!("total migration time vs dirty rate, 1 GiB guest, {state} MiB state"),
            };
            chart(&p, &title, &lines, &targets, &labels)?;
            out.push(p);
        }
    }
    Ok(out)
}

fn chart(
    path: &Path,
    title: &str,
    lines: &Lines,
    targets: &BTreeMap<usize, f64>,
    labels: &BTreeMap<usize, String>,
) -> Result<()> {
    let target_label = match title.starts_with("downtime") {
        true => "target: max(0.5 × QEMU, 5 ms)",
        false => "target (idle): 1.1 × bytes ÷ link",
    };
    let ys = lines
        .values()
        .flat_map(|p| p.values())
        .chain(targets.values());
    let (lo, hi) = ys.fold((f64::MAX, 0.0f64), |(a, b), &y| (a.min(y), b.max(y)));
    // Room above the highest point for the legend.
    let (lo, hi) = (lo.max(1e-3) / 2.0, hi.max(lo * 2.0) * 8.0);
    let n = Level::ALL.len();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, (lo..hi).log_scale())
        .map_err(err)?;
    let names = labels.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&move |x| {
            let i = x.round();
            match (x - i).abs() < 0.01 && i >= 0.0 {
                true => names.get(&(i as usize)).cloned().unwrap_or_default(),
                false => String::new(),
            }
        })
        .y_labels(6)
        .x_desc("dirty rate (page writes/s the cmdline asks for)")
        .y_desc("ms (log)")
        .draw()
        .map_err(err)?;
    for (k, (name, pts)) in lines.iter().enumerate() {
        let color = match name.as_str() {
            "QEMU 7.2" => BLACK.to_rgba(),
            _ => Palette99::pick(k).to_rgba(),
        };
        let xy: Vec<(f64, f64)> = pts.iter().map(|(&i, &y)| (i as f64, y)).collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(xy.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    if !targets.is_empty() {
        let red = RED.mix(0.8);
        chart
            .draw_series(
                targets
                    .iter()
                    .map(|(&i, &t)| Cross::new((i as f64, t), 6, red.stroke_width(2))),
            )
            .map_err(err)?
            .label(target_label)
            .legend(move |(x, y)| Cross::new((x + 10, y), 5, red.stroke_width(2)));
    }
    finish(&mut chart, &root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_written_per_state_size() {
        let dir = tempfile::tempdir().unwrap();
        let mut rs = Vec::new();
        for (i, l) in Level::ALL.iter().enumerate() {
            for state in [16, 256] {
                let mut r = Record {
                    kind: "scenario".into(),
                    level: l.as_str().into(),
                    touched_mib: state,
                    mode: "precopy".into(),
                    downtime_ms: Some(1.0 + i as f64),
                    total_ms: Some(100.0 * (1 + i) as f64),
                    qemu_downtime_ms: Some(3.0),
                    qemu_total_ms: Some(500.0),
                    dirty_pages_per_s: Some(1000.0),
                    ..Record::default()
                };
                r.judge();
                rs.push(r);
            }
        }
        rs.push(Record {
            kind: "soak".into(),
            ..Record::default()
        });
        let files = write_all(dir.path(), &rs).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "migrate-downtime-16mib.svg",
                "migrate-total-16mib.svg",
                "migrate-downtime-256mib.svg",
                "migrate-total-256mib.svg"
            ]
        );
        let s = std::fs::read_to_string(&files[0]).unwrap();
        assert!(s.starts_with("<svg") && s.contains("QEMU 7.2") && s.contains("forkd precopy"));
    }
}
