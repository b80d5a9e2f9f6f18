//! Figures: a named set of samples summarised as median/p99/min/max, printed
//! as a table line and collected for the optional JSON output.

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
    /// Summarises `samples` (must not be empty).
    pub fn from_samples(name: &str, unit: &str, samples: &[f64]) -> Figure {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        // Nearest-rank percentile.
        let p99 = s[((n as f64 * 0.99).ceil() as usize).clamp(1, n) - 1];
        Figure {
            name: name.to_string(),
            median,
            p99,
            min: s[0],
            max: s[n - 1],
            n,
            unit: unit.to_string(),
        }
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
        let f = Figure::from_samples("x", "ms", &[3.0, 1.0, 2.0, 10.0]);
        assert_eq!(f.median, 2.5);
        assert_eq!(f.min, 1.0);
        assert_eq!(f.max, 10.0);
        assert_eq!(f.p99, 10.0);
        let g = Figure::from_samples("y", "ms", &[5.0]);
        assert_eq!((g.median, g.p99, g.n), (5.0, 5.0, 1));
    }
}
