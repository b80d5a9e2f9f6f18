//! SVG figures of the runs' time series, like the paper's: per run (the
//! last series per policy and world size) `dve-load-<policy>-<Z>z.svg`
//! (each host's load over time, the policy's migrations, forks and joins
//! as marks along the top), `dve-vms-<policy>-<Z>z.svg` (zone VMs per host
//! over time, clones included) and, with the policy on,
//! `dve-events-on-<Z>z.svg` (migrations, forks and joins counted over
//! time). plotters, SVG backend only (see `bench_shared::plot`).

use super::record::{Event, Series};
use anyhow::{anyhow, Result};
use bench_shared::plot::{err, finish, FONT, SIZE};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Draws every figure; the files written.
pub fn draw(series: &[Series], dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow!("cannot make {}: {e}", dir.display()))?;
    // The last series per policy and world size.
    let mut last: BTreeMap<(String, u32), &Series> = BTreeMap::new();
    for s in series {
        last.insert((s.policy.clone(), s.zones), s);
    }
    let mut out = Vec::new();
    for ((policy, zones), s) in last {
        if s.samples.is_empty() {
            continue;
        }
        let p = dir.join(format!("dve-load-{policy}-{zones}z.svg"));
        host_chart(&p, s, Metric::Load)?;
        out.push(p);
        let p = dir.join(format!("dve-vms-{policy}-{zones}z.svg"));
        host_chart(&p, s, Metric::Vms)?;
        out.push(p);
        if policy == "on" {
            let p = dir.join(format!("dve-events-on-{zones}z.svg"));
            events_chart(&p, s)?;
            out.push(p);
        }
    }
    Ok(out)
}

#[derive(Clone, Copy, PartialEq)]
enum Metric {
    Load,
    Vms,
}

fn host_names(s: &Series) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for smp in &s.samples {
        for h in &smp.hosts {
            if !v.contains(&h.host) {
                v.push(h.host.clone());
            }
        }
    }
    v.sort_by_key(|h| (h.len(), h.clone()));
    v
}

const MARKS: [(&str, RGBColor); 3] = [
    ("migrate", RGBColor(200, 0, 0)),
    ("fork", RGBColor(0, 120, 0)),
    ("join", RGBColor(0, 0, 200)),
];

fn host_chart(path: &Path, s: &Series, m: Metric) -> Result<()> {
    let names = host_names(s);
    let pts = |h: &str| -> Vec<(f64, f64)> {
        s.samples
            .iter()
            .filter_map(|smp| {
                let x = smp.hosts.iter().find(|x| x.host == h)?;
                Some((
                    smp.t_s,
                    match m {
                        Metric::Load => x.load,
                        Metric::Vms => x.vms as f64,
                    },
                ))
            })
            .collect()
    };
    let t_max = s.samples.iter().map(|x| x.t_s).fold(s.duration_s, f64::max);
    let t_min = s.samples.iter().map(|x| x.t_s).fold(0.0, f64::min);
    // The scale from the run itself: the boot's spike before the start
    // is cut off at the top.
    let y_max = names
        .iter()
        .flat_map(|h| pts(h))
        .filter(|p| p.0 >= 0.0)
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.3;
    let pts = |h: &str| -> Vec<(f64, f64)> {
        pts(h).into_iter().map(|(t, y)| (t, y.min(y_max))).collect()
    };
    let what = match m {
        Metric::Load => "load per host (fraction of capacity)",
        Metric::Vms => "zone VMs per host (clones included)",
    };
    let title = format!(
        "{what}, policy {}: {} zones, {} hosts, {} clients",
        s.policy, s.zones, s.hosts, s.clients
    );
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 16))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(t_min..t_max, 0.0..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the clients started (before: the hosts settle after the boot)")
        .y_desc(match m {
            Metric::Load => "load",
            Metric::Vms => "VMs",
        })
        .draw()
        .map_err(err)?;
    for (k, h) in names.iter().enumerate() {
        let color = Palette99::pick(k).to_rgba();
        chart
            .draw_series(LineSeries::new(pts(h), color.stroke_width(2)))
            .map_err(err)?
            .label(h.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if m == Metric::Load {
        // The cluster's average, dashed grey.
        let avg: Vec<(f64, f64)> = s
            .samples
            .iter()
            .filter(|x| !x.hosts.is_empty())
            .map(|x| {
                let n = x.hosts.len() as f64;
                (x.t_s, x.hosts.iter().map(|h| h.load).sum::<f64>() / n)
            })
            .collect();
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(DashedLineSeries::new(avg, 6, 4, grey.stroke_width(1)))
            .map_err(err)?
            .label("cluster average")
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
    }
    for (action, color) in MARKS {
        let ev: Vec<&Event> = s
            .events
            .iter()
            .filter(|e| e.action == action && e.outcome == "done")
            .collect();
        if ev.is_empty() {
            continue;
        }
        let y = y_max * 0.96;
        chart
            .draw_series(
                ev.iter()
                    .map(|e| TriangleMarker::new((e.t_s, y), 6, color.filled())),
            )
            .map_err(err)?
            .label(format!("{action} ({})", ev.len()))
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 5, color.filled()));
    }
    finish(&mut chart, &root)
}

fn events_chart(path: &Path, s: &Series) -> Result<()> {
    let t_max = s
        .duration_s
        .max(s.events.iter().map(|e| e.t_s).fold(0.0, f64::max));
    let t_min = s.events.iter().map(|e| e.t_s).fold(0.0, f64::min);
    let total = s.events.iter().filter(|e| e.outcome == "done").count();
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let title = format!(
        "policy actions over time: {} zones, {} hosts, {} clients",
        s.zones, s.hosts, s.clients
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, (FONT, 16))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(t_min..t_max, 0.0..(total.max(1) as f64 * 1.4))
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the clients started (before: the hosts settle after the boot)")
        .y_desc("actions done (cumulative)")
        .draw()
        .map_err(err)?;
    for (action, color) in MARKS {
        let mut n = 0.0;
        let mut pts = vec![(t_min, 0.0)];
        for e in s
            .events
            .iter()
            .filter(|e| e.action == action && e.outcome == "done")
        {
            pts.push((e.t_s, n));
            n += 1.0;
            pts.push((e.t_s, n));
        }
        pts.push((t_max, n));
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{action} ({n})"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    let failed: Vec<&Event> = s.events.iter().filter(|e| e.outcome != "done").collect();
    if !failed.is_empty() {
        chart
            .draw_series(
                failed
                    .iter()
                    .map(|e| Cross::new((e.t_s, 0.0), 5, BLACK.stroke_width(2))),
            )
            .map_err(err)?
            .label(format!("not carried out ({})", failed.len()))
            .legend(|(x, y)| Cross::new((x + 10, y), 4, BLACK.stroke_width(2)));
    }
    finish(&mut chart, &root)
}

#[cfg(test)]
mod tests {
    use super::super::record::{HostSample, Sample};
    use super::*;

    #[test]
    fn figures_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |policy: &str| Series {
            policy: policy.into(),
            zones: 20,
            hosts: 2,
            clients: 10,
            duration_s: 10.0,
            started_unix_s: 0,
            samples: (0..10)
                .map(|t| Sample {
                    t_s: t as f64,
                    hosts: (1..=2)
                        .map(|h| HostSample {
                            host: format!("h{h}"),
                            load: 0.1 * (t * h) as f64,
                            cpu_cores: 0.0,
                            vms: 10,
                            clones: 0,
                        })
                        .collect(),
                })
                .collect(),
            events: vec![Event {
                t_s: 4.0,
                action: "migrate".into(),
                zone: "vm-3".into(),
                from: "h2".into(),
                to: "h1".into(),
                outcome: "done".into(),
                reason: String::new(),
            }],
        };
        let files = draw(&[mk("off"), mk("on")], dir.path()).unwrap();
        assert_eq!(files.len(), 5);
        let s = std::fs::read_to_string(dir.path().join("dve-load-on-20z.svg")).unwrap();
        assert!(s.starts_with("<svg") && s.contains("migrate (1)") && s.contains("h2"));
    }
}
