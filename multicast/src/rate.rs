//! Rate limiting and flow control.
//!
//! - [`TokenBucket`] paces the sender: a frame may go when the bucket holds
//!   its size in bytes; the bucket refills at the current rate up to a
//!   burst.
//! - [`FlowControl`] sets that rate (SnowFlock's mcdist): receivers
//!   piggyback their measured receive rate on every request; the sender
//!   keeps a smoothed rate per receiver (bounded table) and throttles to a
//!   weighted average of them (weight = freshness: a report's weight falls
//!   linearly to 0 over `report_ttl`), times `growth` so the rate can climb
//!   when every receiver keeps up, clamped to `[min_rate, max_rate]`. With
//!   no fresh reports the rate is `max_rate`.
//! - [`RateMeter`] is the receiver's side: bytes of valid data frames per
//!   second, smoothed, measured only over intervals in which the receiver
//!   was waiting for blocks (an idle receiver's low rate says nothing about
//!   the path).

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The sender's rate limits and flow-control parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct RateConfig {
    /// Never throttle below this, bytes/s.
    pub min_rate: u64,
    /// Never send faster than this, bytes/s.
    pub max_rate: u64,
    /// Bucket size, bytes (how much may go back to back).
    pub burst: u64,
    /// Factor over the receivers' weighted average the sender may reach.
    pub growth: f64,
    /// Age at which a receiver's report stops counting.
    pub report_ttl: Duration,
    /// Receivers whose reports are kept (the stalest is evicted).
    pub max_receivers: usize,
    /// Whether receivers' reports steer the rate (else always `max_rate`).
    pub flow_control: bool,
}

impl Default for RateConfig {
    fn default() -> RateConfig {
        RateConfig {
            min_rate: 4 << 20,
            max_rate: 200 << 20,
            burst: 64 << 10,
            growth: 1.5,
            report_ttl: Duration::from_secs(2),
            max_receivers: 1024,
            flow_control: true,
        }
    }
}

/// A token bucket in bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u64, burst: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate.max(1) as f64,
            burst: burst.max(1) as f64,
            tokens: burst.max(1) as f64,
            last: now,
        }
    }

    /// Changes the refill rate (bytes/s).
    pub fn set_rate(&mut self, rate: u64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(1) as f64;
    }

    /// The refill rate, bytes/s.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes `n` bytes if the bucket holds them (a frame larger than the
    /// burst goes once the bucket is full).
    pub fn try_take(&mut self, n: usize, now: Instant) -> bool {
        self.refill(now);
        let need = (n as f64).min(self.burst);
        if self.tokens >= need {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// How long until `n` bytes are available.
    pub fn wait_for(&mut self, n: usize, now: Instant) -> Duration {
        self.refill(now);
        let need = (n as f64).min(self.burst) - self.tokens;
        if need <= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(need / self.rate)
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Report {
    rate: f64,
    at: Instant,
}

/// Receivers' rate reports and the sending rate they allow.
#[derive(Debug)]
pub struct FlowControl {
    cfg: RateConfig,
    reports: HashMap<u32, Report>,
}

impl FlowControl {
    /// No reports yet.
    pub fn new(cfg: RateConfig) -> FlowControl {
        FlowControl {
            cfg,
            reports: HashMap::new(),
        }
    }

    /// Records receiver `origin`'s report (0 = unknown, ignored).
    pub fn report(&mut self, origin: u32, rate: u64, now: Instant) {
        if rate == 0 || !self.cfg.flow_control {
            return;
        }
        if let Some(r) = self.reports.get_mut(&origin) {
            r.rate = 0.5 * r.rate + 0.5 * rate as f64;
            r.at = now;
            return;
        }
        if self.reports.len() >= self.cfg.max_receivers.max(1) {
            let ttl = self.cfg.report_ttl;
            self.reports
                .retain(|_, r| now.saturating_duration_since(r.at) < ttl);
            if self.reports.len() >= self.cfg.max_receivers.max(1) {
                if let Some(oldest) = self
                    .reports
                    .iter()
                    .min_by_key(|(_, r)| r.at)
                    .map(|(k, _)| *k)
                {
                    self.reports.remove(&oldest);
                }
            }
        }
        self.reports.insert(
            origin,
            Report {
                rate: rate as f64,
                at: now,
            },
        );
    }

    /// The weighted average of the fresh reports, if any.
    pub fn weighted_average(&self, now: Instant) -> Option<f64> {
        let ttl = self.cfg.report_ttl.as_secs_f64().max(1e-3);
        let (mut sum, mut weights) = (0.0, 0.0);
        for r in self.reports.values() {
            let age = now.saturating_duration_since(r.at).as_secs_f64();
            let w = 1.0 - age / ttl;
            if w > 0.0 {
                sum += w * r.rate;
                weights += w;
            }
        }
        (weights > 0.0).then(|| sum / weights)
    }

    /// The rate the sender may use now, bytes/s.
    pub fn target(&self, now: Instant) -> u64 {
        let max = self.cfg.max_rate.max(1);
        let min = self.cfg.min_rate.min(max);
        match self.weighted_average(now) {
            Some(avg) if self.cfg.flow_control => ((avg * self.cfg.growth) as u64).clamp(min, max),
            _ => max,
        }
    }
}

/// A receiver's smoothed receive rate.
#[derive(Debug, Clone)]
pub struct RateMeter {
    interval: Duration,
    start: Instant,
    bytes: u64,
    busy_all_interval: bool,
    smoothed: f64,
}

impl RateMeter {
    /// Measures over intervals of `interval`.
    pub fn new(interval: Duration, now: Instant) -> RateMeter {
        RateMeter {
            interval,
            start: now,
            bytes: 0,
            busy_all_interval: true,
            smoothed: 0.0,
        }
    }

    /// Counts `n` received bytes.
    pub fn add(&mut self, n: usize) {
        self.bytes += n as u64;
    }

    /// Closes the interval if it is over; `busy` says whether the receiver
    /// is waiting for blocks now (an interval counts only if it was busy at
    /// every tick).
    pub fn tick(&mut self, busy: bool, now: Instant) {
        self.busy_all_interval &= busy;
        let dt = now.saturating_duration_since(self.start);
        if dt < self.interval {
            return;
        }
        if self.busy_all_interval && self.bytes > 0 {
            let r = self.bytes as f64 / dt.as_secs_f64();
            self.smoothed = if self.smoothed == 0.0 {
                r
            } else {
                0.7 * self.smoothed + 0.3 * r
            };
        }
        self.start = now;
        self.bytes = 0;
        self.busy_all_interval = busy;
    }

    /// The smoothed rate, bytes/s (0 = not measured yet).
    pub fn rate(&self) -> u64 {
        self.smoothed as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert!(b.try_take(100, t0));
        assert!(!b.try_take(50, t0));
        let w = b.wait_for(50, t0);
        assert!((w.as_secs_f64() - 0.05).abs() < 1e-6, "{w:?}");
        assert!(b.try_take(50, t0 + Duration::from_millis(50)));
        // Frames above the burst go when the bucket is full.
        assert!(b.try_take(500, t0 + Duration::from_secs(1)));
        assert!(!b.try_take(1, t0 + Duration::from_secs(1)));
    }

    #[test]
    fn weighted_average_and_clamps() {
        let t0 = Instant::now();
        let cfg = RateConfig {
            min_rate: 100,
            max_rate: 10_000,
            growth: 1.0,
            report_ttl: Duration::from_secs(1),
            ..RateConfig::default()
        };
        let mut fc = FlowControl::new(cfg);
        assert_eq!(fc.target(t0), 10_000, "no reports: max");
        fc.report(1, 1000, t0);
        fc.report(2, 3000, t0);
        assert_eq!(fc.target(t0), 2000);
        // Report 1 is half as fresh as report 2 half a second later.
        let t1 = t0 + Duration::from_millis(500);
        fc.report(2, 3000, t1);
        let avg = fc.weighted_average(t1).expect("fresh");
        assert!((avg - (0.5 * 1000.0 + 3000.0) / 1.5).abs() < 1.0, "{avg}");
        assert_eq!(fc.target(t1 + Duration::from_secs(5)), 10_000, "stale");
        let mut slow = FlowControl::new(fc.cfg.clone());
        slow.report(3, 1, t1);
        slow.report(3, 0, t1);
        assert_eq!(slow.target(t1), 100, "clamped to min, 0 ignored");
    }

    #[test]
    fn reports_bounded() {
        let t0 = Instant::now();
        let mut fc = FlowControl::new(RateConfig {
            max_receivers: 4,
            ..RateConfig::default()
        });
        for i in 0..100 {
            fc.report(
                i,
                1000 + u64::from(i),
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert_eq!(fc.reports.len(), 4);
    }

    #[test]
    fn meter_counts_busy_intervals_only() {
        let t0 = Instant::now();
        let mut m = RateMeter::new(Duration::from_millis(100), t0);
        m.add(10_000);
        m.tick(true, t0 + Duration::from_millis(100));
        assert_eq!(m.rate(), 100_000);
        m.add(1);
        m.tick(false, t0 + Duration::from_millis(150));
        m.tick(true, t0 + Duration::from_millis(200));
        assert_eq!(m.rate(), 100_000, "idle interval ignored");
    }
}
