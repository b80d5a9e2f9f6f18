//! SVG figures (plotters, SVG backend only: its text is SVG `<text>` that
//! the viewer renders, so no font library is linked; layout uses plotters'
//! built-in size estimate).
//!
//! - `clone-time-vs-clones.svg`: fork request → last clone running, per
//!   clone count, unicast against multicast (SnowFlock's clone-time figure);
//!   `all-ended-vs-clones.svg` the same for fork → all clones ended.
//! - `bytes-sent-<N>-clones.svg`, `bytes-sent-<N>-clones-<P>pct-loss.svg`:
//!   the memory server's bytes sent for each mode × heuristics at N clones,
//!   beside what one clone of that kind needed (SnowFlock's SHRiMP figure);
//!   made for every (clones, loss) that has both heuristics settings.

use crate::record::Record;
use anyhow::{anyhow, Result};
use bench_shared::plot::{err, finish, FONT, SIZE};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Issue 7's target: 32 clones over 4 hosts running within 60 ms.
const CLONE_TIME_TARGET_MS: f64 = 60.0;

/// One record per (mode, heuristics).
type Kinds<'a> = BTreeMap<(String, bool), &'a Record>;

fn usable(r: &Record) -> bool {
    r.error.is_none()
}

/// Writes every figure the records support into `dir`; the files written.
pub fn write_all(dir: &Path, records: &[Record]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot make {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    let rs: Vec<&Record> = records.iter().filter(|r| usable(r)).collect();
    // The sweep: loss 0, one heuristics setting, several clone counts.
    for (name, title, pick, target) in [
        (
            "clone-time-vs-clones.svg",
            "fork request → last clone running",
            (|r: &Record| r.clone_time_ms) as fn(&Record) -> Option<f64>,
            Some(CLONE_TIME_TARGET_MS),
        ),
        (
            "all-ended-vs-clones.svg",
            "fork request → all clones ended",
            |r: &Record| r.all_ended_ms,
            None,
        ),
    ] {
        let p = dir.join(name);
        if sweep(&p, title, &rs, pick, target)? {
            out.push(p);
        }
    }
    // Bytes sent: one figure per (clones, loss) with both heuristics
    // settings (a sweep, heuristics on only, makes none).
    let mut groups: BTreeMap<(u64, u64), Kinds> = BTreeMap::new();
    for r in &rs {
        if r.memserver_bytes_sent.is_some() {
            let key = (r.clones, (r.loss_pct * 100.0).round() as u64);
            groups
                .entry(key)
                .or_default()
                .insert((r.mode.clone(), r.heuristics), r);
        }
    }
    for ((clones, loss), kinds) in groups {
        if !(kinds.keys().any(|k| k.1) && kinds.keys().any(|k| !k.1)) {
            continue;
        }
        let name = match loss {
            0 => format!("bytes-sent-{clones}-clones.svg"),
            l => format!(
                "bytes-sent-{clones}-clones-{}pct-loss.svg",
                l as f64 / 100.0
            ),
        };
        let p = dir.join(name);
        let kinds: Vec<&Record> = kinds.into_values().collect();
        bytes(&p, clones, loss as f64 / 100.0, &kinds)?;
        out.push(p);
    }
    Ok(out)
}

/// Line per mode of `pick` against the clone count (log2 x axis); false if
/// the records hold no sweep (fewer than 2 clone counts for any mode).
/// `target`: a dashed line at that value (the 32-clone target).
fn sweep(
    path: &Path,
    title: &str,
    rs: &[&Record],
    pick: fn(&Record) -> Option<f64>,
    target: Option<f64>,
) -> Result<bool> {
    let mut lines: BTreeMap<String, BTreeMap<u64, f64>> = BTreeMap::new();
    for r in rs.iter().filter(|r| r.loss_pct == 0.0 && r.heuristics) {
        if let Some(y) = pick(r) {
            lines.entry(r.mode.clone()).or_default().insert(r.clones, y);
        }
    }
    lines.retain(|_, pts| pts.len() >= 2);
    if lines.is_empty() {
        return Ok(false);
    }
    let xmax = lines
        .values()
        .flat_map(|p| p.keys())
        .map(|&n| (n as f64).log2())
        .fold(1.0, f64::max);
    let ymax = lines
        .values()
        .flat_map(|p| p.values())
        .fold(target.unwrap_or(1.0), |a: f64, &b| a.max(b))
        * 1.1;
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("{title} (heuristics on, no loss)"), (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.2..xmax + 0.2, 0.0..ymax)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("clones (spread over the hosts)")
        .y_desc("ms")
        .x_labels(xmax as usize + 1)
        .x_label_formatter(&|x| format!("{}", 2f64.powf(x.round()) as u64))
        .draw()
        .map_err(err)?;
    for (i, (mode, pts)) in lines.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let xy: Vec<(f64, f64)> = pts.iter().map(|(&n, &y)| ((n as f64).log2(), y)).collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(err)?
            .label(mode.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(xy.iter().map(|&p| Circle::new(p, 4, color.filled())))
            .map_err(err)?;
    }
    if let Some(t) = target {
        let x32 = 32f64.log2();
        chart
            .draw_series(DashedLineSeries::new(
                [(-0.2, t), (xmax + 0.2, t)],
                6,
                4,
                BLACK.mix(0.5).stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("target: {t} ms at 32 clones"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
        chart
            .draw_series([Cross::new((x32, t), 6, BLACK.stroke_width(2))])
            .map_err(err)?;
    }
    finish(&mut chart, &root)?;
    Ok(true)
}

/// Bars: the memory server's bytes for each kind, and one clone's need.
fn bytes(path: &Path, clones: u64, loss: f64, kinds: &[&Record]) -> Result<()> {
    let mb = |b: u64| b as f64 / 1e6;
    let ymax = kinds
        .iter()
        .flat_map(|r| [r.memserver_bytes_sent, r.one_clone_bytes])
        .flatten()
        .map(mb)
        .fold(1.0, f64::max)
        * 1.3;
    let names: Vec<String> = kinds
        .iter()
        .map(|r| {
            format!(
                "{}, heuristics {}",
                r.mode,
                if r.heuristics { "on" } else { "off" }
            )
        })
        .collect();
    let n = kinds.len();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let caption = match loss {
        l if l > 0.0 => format!("memory server bytes sent, {clones} clones, {l}% loss"),
        _ => format!("memory server bytes sent, {clones} clones"),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, (FONT, 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(-0.5..n as f64 - 0.5, 0.0..ymax)
        .map_err(err)?;
    let labels = names.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&move |x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("MB sent")
        .draw()
        .map_err(err)?;
    let all = BLUE.mix(0.8);
    let one = RGBColor(230, 140, 0).mix(0.9);
    let bars = |i: usize, off: f64, v: Option<u64>| {
        v.map(|b| (i as f64 + off, mb(b)))
            .map(|(x, y)| Rectangle::new([(x - 0.17, 0.0), (x + 0.17, y)], all.filled()))
    };
    chart
        .draw_series(
            kinds
                .iter()
                .enumerate()
                .filter_map(|(i, r)| bars(i, -0.18, r.memserver_bytes_sent)),
        )
        .map_err(err)?
        .label(format!("{clones} clones"))
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], all.filled()));
    chart
        .draw_series(kinds.iter().enumerate().filter_map(|(i, r)| {
            r.one_clone_bytes.map(|b| {
                let x = i as f64 + 0.18;
                Rectangle::new([(x - 0.17, 0.0), (x + 0.17, mb(b))], one.filled())
            })
        }))
        .map_err(err)?
        .label("1 clone (no loss)")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], one.filled()));
    chart
        .draw_series(kinds.iter().enumerate().filter_map(|(i, r)| {
            let y = mb(r.memserver_bytes_sent?);
            let ratio = r.egress_vs_one_clone?;
            Some(Text::new(
                format!("{ratio:.2}×"),
                (i as f64 - 0.3, y + ymax * 0.02),
                (FONT, 14),
            ))
        }))
        .map_err(err)?;
    finish(&mut chart, &root)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(mode: &str, heuristics: bool, clones: u64, loss: f64) -> Record {
        Record {
            mode: mode.into(),
            heuristics,
            clones,
            loss_pct: loss,
            clone_time_ms: Some(clones as f64 * 1.5),
            all_ended_ms: Some(clones as f64 * 20.0),
            memserver_bytes_sent: Some(clones * 1_000_000),
            one_clone_bytes: Some(1_000_000),
            egress_vs_one_clone: Some(clones as f64),
            ..Record::default()
        }
    }

    #[test]
    fn every_figure_is_written_as_svg() {
        let dir = tempfile::tempdir().unwrap();
        let mut rs = Vec::new();
        for n in [1, 2, 4, 8] {
            rs.push(rec("unicast", true, n, 0.0));
            rs.push(rec("multicast", true, n, 0.0));
        }
        for (m, h) in [("unicast", false), ("multicast", false)] {
            rs.push(rec(m, h, 8, 0.0));
            rs.push(rec(m, h, 8, 10.0));
        }
        rs.push(rec("unicast", true, 8, 10.0));
        let mut bad = rec("multicast", true, 8, 10.0);
        bad.error = Some("failed".into());
        rs.push(bad);
        let files = write_all(dir.path(), &rs).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "clone-time-vs-clones.svg",
                "all-ended-vs-clones.svg",
                "bytes-sent-8-clones.svg",
                "bytes-sent-8-clones-10pct-loss.svg"
            ]
        );
        for f in &files {
            let s = std::fs::read_to_string(f).unwrap();
            assert!(
                s.starts_with("<svg") && s.contains("</svg>"),
                "{}",
                f.display()
            );
        }
        let loss = std::fs::read_to_string(&files[3]).unwrap();
        assert!(loss.contains("10% loss") && loss.contains("unicast, heuristics off"));
    }
}
