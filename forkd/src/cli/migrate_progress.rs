//! How `forkd vm migrate --wait` shows a migration while it runs, from the
//! statuses it polls (`GET /v1/vms/{id}/migration`): on a terminal, an
//! indicatif bar on stderr — bytes sent of the populated bytes, rate,
//! round, dirty rate, estimated downtime, ETA — the way `virsh migrate
//! --verbose` does; otherwise (logs, CI) a line on stderr whenever the
//! figures change; with `--json` nothing (stdout gets the final JSON only).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::target::text;

const PAGE: u64 = 4096;
/// Two lines: the bytes, then what the migration is doing.
const BAR_TEMPLATE: &str = "{prefix} {elapsed:>4} [{bar:25}] {bytes}/{total_bytes} \
                            {binary_bytes_per_sec} ETA {eta}\n  {msg}";

/// The figures of one status the display shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Figures {
    pub phase: String,
    pub round: u64,
    pub bytes_sent: u64,
    pub populated_bytes: u64,
    pub dirty_pages: u64,
    pub dirty_pages_per_s: u64,
    pub estimated_downtime_us: u64,
}

impl Figures {
    pub(super) fn of(v: &Value) -> Figures {
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        Figures {
            phase: text(&v["phase"]),
            round: n("round"),
            bytes_sent: n("bytes_sent"),
            populated_bytes: n("populated_bytes"),
            dirty_pages: n("dirty_pages"),
            dirty_pages_per_s: n("dirty_pages_per_s"),
            estimated_downtime_us: n("estimated_downtime_us"),
        }
    }

    /// What the whole migration will have sent, as far as is known now:
    /// the populated memory, or what was sent plus what is dirty, whichever
    /// is more (later rounds send pages again).
    pub(super) fn total(&self) -> u64 {
        let pending = self.bytes_sent.saturating_add(self.dirty_pages * PAGE);
        self.populated_bytes.max(pending).max(1)
    }

    fn dirty(&self) -> String {
        format!(
            "dirty {} pages/s ({:.1} MiB/s)",
            self.dirty_pages_per_s,
            (self.dirty_pages_per_s * PAGE) as f64 / (1 << 20) as f64
        )
    }

    /// The bar's message: phase, round, dirty rate, estimated downtime.
    pub(super) fn message(&self) -> String {
        format!(
            "{} round {} · {} · estimated downtime {:.1} ms",
            self.phase,
            self.round,
            self.dirty(),
            self.estimated_downtime_us as f64 / 1e3
        )
    }

    /// The line printed without a terminal.
    pub(super) fn line(&self) -> String {
        format!(
            "{} round {}: {} of {} MiB sent, {}, estimated downtime {:.1} ms",
            self.phase,
            self.round,
            self.bytes_sent >> 20,
            self.total() >> 20,
            self.dirty(),
            self.estimated_downtime_us as f64 / 1e3,
        )
    }
}

/// Where the progress goes.
pub(super) enum Display {
    /// The bar draws from its first update on (no empty bar before).
    Bar {
        bar: ProgressBar,
        drawn: bool,
    },
    Lines {
        id: String,
        last: Option<Figures>,
    },
    Quiet,
}

impl Display {
    /// A bar if stderr is a terminal (and not `--json`), else lines.
    pub(super) fn new(id: &str, json: bool) -> Display {
        if json {
            return Display::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Display::Lines {
                id: id.to_owned(),
                last: None,
            };
        }
        let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template(BAR_TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("migrating {id}"));
        Display::Bar { bar, drawn: false }
    }

    pub(super) fn update(&mut self, v: &Value) {
        let f = Figures::of(v);
        match self {
            Display::Bar { bar, drawn } => {
                bar.set_length(f.total());
                bar.set_position(f.bytes_sent);
                bar.set_message(f.message());
                if !*drawn {
                    bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(10));
                    bar.enable_steady_tick(Duration::from_millis(250));
                    *drawn = true;
                }
            }
            Display::Lines { id, last } => {
                // A line when something but the byte count changed, or
                // every 16 MiB: a log, not a flood.
                let changed = last.as_ref().is_none_or(|l| {
                    l.phase != f.phase
                        || l.round != f.round
                        || l.dirty_pages_per_s != f.dirty_pages_per_s
                        || f.bytes_sent >> 24 != l.bytes_sent >> 24
                });
                if changed {
                    eprintln!("forkd: {id} {}", f.line());
                    *last = Some(f);
                }
            }
            Display::Quiet => {}
        }
    }

    /// The migration ended (`v`, its final status): the bar full on a
    /// commit, left where it stopped otherwise.
    pub(super) fn finish(self, v: &Value) {
        let f = Figures::of(v);
        match self {
            Display::Bar { bar, drawn } => {
                // Over before the first update: the final bar still shows.
                if !drawn {
                    bar.set_draw_target(ProgressDrawTarget::stderr());
                }
                if f.phase == "committed" {
                    bar.set_length(f.bytes_sent.max(1));
                    bar.set_position(f.bytes_sent.max(1));
                    bar.finish_with_message(f.phase);
                } else {
                    bar.abandon_with_message(f.phase);
                }
            }
            mut lines @ Display::Lines { .. } => lines.update(v),
            Display::Quiet => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn total_grows_with_what_is_dirty_again() {
        let v = json!({"phase": "precopy", "round": 0, "bytes_sent": 10 << 20,
            "populated_bytes": 40 << 20, "dirty_pages": 0});
        assert_eq!(Figures::of(&v).total(), 40 << 20);
        let v = json!({"phase": "precopy", "round": 3, "bytes_sent": 39 << 20,
            "populated_bytes": 40 << 20, "dirty_pages": 1024, "dirty_pages_per_s": 2560,
            "estimated_downtime_us": 12_300});
        let f = Figures::of(&v);
        assert_eq!(f.total(), 43 << 20);
        assert_eq!(
            f.line(),
            "precopy round 3: 39 of 43 MiB sent, dirty 2560 pages/s (10.0 MiB/s), estimated downtime 12.3 ms"
        );
        assert!(f.message().starts_with("precopy round 3 · dirty 2560"));
        // Missing figures (an older daemon) are zeros, never a panic.
        assert_eq!(Figures::of(&json!({})).total(), 1);
    }
}
