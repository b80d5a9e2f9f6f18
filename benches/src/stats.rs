//! Figures: a named set of samples summarised as median/p99/min/max, printed
//! as a table line and collected for the optional JSON output.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::Duration;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub name: String,
    pub median: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
    pub unit: String,
}

impl Figure {
    /// Summarises `samples` (must not be empty, all finite). Min and max are
    /// the exact extremes; median and p99 are hdrhistogram's values at the
    /// quantiles 0.5 and 0.99 (the sample at that rank, so for an even
    /// count the lower of the two middle samples), found to 3 significant
    /// digits of their distance from the minimum and reported as the
    /// nearest sample.
    pub fn from_samples(name: &str, unit: &str, samples: &[f64]) -> Figure {
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let hist = Scaled::new(min, max, samples);
        // The sample nearest to the histogram's value: exact figures (whole
        // pages stay whole), the rank is hdrhistogram's.
        let nearest = |v: f64| {
            let d = |s: &f64| (s - v).abs();
            samples
                .iter()
                .copied()
                .min_by(|a, b| d(a).total_cmp(&d(b)))
                .unwrap_or(v)
        };
        Figure {
            name: name.to_string(),
            median: nearest(hist.quantile(0.5)),
            p99: nearest(hist.quantile(0.99)),
            min,
            max,
            n: samples.len(),
            unit: unit.to_string(),
        }
    }
}

/// Samples as `(v - min) * scale` in an auto-resizing hdrhistogram: the
/// histogram holds unsigned integers, the samples are any finite floats
/// (negative percentages, fractional milliseconds).
struct Scaled {
    hist: Histogram<u64>,
    min: f64,
    max: f64,
    scale: f64,
}

impl Scaled {
    /// 10^6 to 10^7 integer steps across the samples' range.
    fn new(min: f64, max: f64, samples: &[f64]) -> Scaled {
        let range = max - min;
        let scale = if range > 0.0 {
            10f64.powf((6.0 - range.log10()).ceil())
        } else {
            1.0
        };
        let mut hist = Histogram::<u64>::new(3).expect("3 significant digits is valid");
        for &v in samples {
            let x = ((v - min) * scale).round().max(0.0) as u64;
            hist.record(x)
                .expect("an auto-resizing histogram takes any u64");
        }
        Scaled {
            hist,
            min,
            max,
            scale,
        }
    }

    fn quantile(&self, q: f64) -> f64 {
        let v = self.hist.value_at_quantile(q) as f64 / self.scale + self.min;
        v.clamp(self.min, self.max)
    }
}

/// Milliseconds as a float.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Every figure and skip note of one run, printed as they come.
#[derive(Debug, Default)]
pub struct Report {
    pub figures: Vec<Figure>,
    pub skipped: Vec<String>,
}

impl Report {
    pub fn header() {
        println!(
            "{:<44} {:>10} {:>10} {:>10} {:>10} {:>5}  unit",
            "figure", "median", "p99", "min", "max", "n"
        );
    }

    /// Records and prints a figure from samples; nothing if there are none.
    pub fn add(&mut self, name: &str, unit: &str, samples: &[f64]) -> Option<f64> {
        if samples.is_empty() {
            self.skip(format!("{name}: no samples"));
            return None;
        }
        let f = Figure::from_samples(name, unit, samples);
        println!(
            "{:<44} {:>10.3} {:>10.3} {:>10.3} {:>10.3} {:>5}  {}",
            f.name, f.median, f.p99, f.min, f.max, f.n, f.unit
        );
        let median = f.median;
        self.figures.push(f);
        Some(median)
    }

    pub fn skip(&mut self, why: String) {
        println!("skipped: {why}");
        self.skipped.push(why);
    }

    pub fn median(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.median)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let figures: serde_json::Map<String, serde_json::Value> = self
            .figures
            .iter()
            .map(|f| {
                (
                    f.name.clone(),
                    serde_json::json!({
                        "median": f.median,
                        "p99": f.p99,
                        "min": f.min,
                        "max": f.max,
                        "n": f.n,
                        "unit": f.unit,
                    }),
                )
            })
            .collect();
        serde_json::json!({ "figures": figures, "skipped": self.skipped })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary() {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-3 * b.abs().max(1.0);
        let f = Figure::from_samples("x", "ms", &[3.0, 1.0, 2.0, 10.0]);
        assert!(close(f.median, 2.0), "{f:?}");
        assert_eq!((f.min, f.max, f.n), (1.0, 10.0, 4));
        assert!(close(f.p99, 10.0), "{f:?}");
        let g = Figure::from_samples("y", "ms", &[5.0]);
        assert_eq!((g.median, g.p99, g.n), (5.0, 5.0, 1));
        // Negative and fractional samples.
        let h = Figure::from_samples("z", "%", &[-12.5, 0.25, 3.0]);
        assert_eq!(h.median, 0.25, "{h:?}");
        // Whole numbers stay whole.
        let w: Vec<f64> = (0..50).map(|i| f64::from(1000 + 37 * i)).collect();
        let w = Figure::from_samples("w", "pages", &w);
        assert_eq!(
            (w.median, w.p99),
            (1000.0 + 37.0 * 24.0, 1000.0 + 37.0 * 49.0)
        );
        assert_eq!((h.min, h.max), (-12.5, 3.0));
        // 1..=100: the 50th and the 99th sample.
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        let k = Figure::from_samples("k", "us", &s);
        assert!(close(k.median, 50.0) && close(k.p99, 99.0), "{k:?}");
    }
}
