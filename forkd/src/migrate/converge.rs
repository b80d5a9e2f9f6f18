//! The convergence rule of pre-copy: after each round, go on copying the
//! dirty set or stop the guest and copy the rest.
//!
//! Stop when the estimated downtime — the dirty bytes and the state over
//! the measured bandwidth, plus a fixed cost for pause and resume — is
//! down to [`GOAL`] (or the budget, if smaller); or when it fits the budget
//! and another round no longer shrinks the dirty set by a tenth (a round
//! that would shrink it is worth its time: the downtime is what users
//! feel); or when progress stalls (the dirty set has not shrunk by a tenth
//! for [`STALL_ROUNDS`] rounds in a row); or at the round limit.

use std::time::Duration;

/// Rounds without progress before pre-copy gives up and stops the guest.
pub const STALL_ROUNDS: u32 = 3;
/// Pause, state capture, destination build and resume, measured here at a
/// few ms; counted in every estimate.
pub const FIXED_DOWNTIME: Duration = Duration::from_millis(3);
/// Below this estimate no further round is worth it.
pub const GOAL: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Copy the dirty set in another round.
    Continue,
    /// Stop the guest and copy the rest, because of this.
    Stop(StopReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The estimate fits the downtime budget.
    Converged,
    /// The dirty set stopped shrinking.
    Stalled,
    /// The round limit was reached.
    RoundLimit,
    /// Mode `postcopy`: no pre-copy rounds at all.
    Postcopy,
}

/// Tracks the rounds and decides.
#[derive(Debug, Clone)]
pub struct Convergence {
    pub budget: Duration,
    pub max_rounds: u32,
    best: Option<u64>,
    stalled: u32,
}

impl Convergence {
    pub fn new(budget: Duration, max_rounds: u32) -> Convergence {
        Convergence {
            budget,
            max_rounds: max_rounds.max(1),
            best: None,
            stalled: 0,
        }
    }

    /// Estimated downtime of stopping now: `dirty_bytes` and `state_bytes`
    /// at `bytes_per_s`, plus the fixed cost.
    pub fn estimate(dirty_bytes: u64, state_bytes: u64, bytes_per_s: f64) -> Duration {
        let bw = bytes_per_s.max(1.0);
        FIXED_DOWNTIME + Duration::from_secs_f64((dirty_bytes + state_bytes) as f64 / bw)
    }

    /// After round `round` (0 = the first full copy), with `dirty_bytes`
    /// dirty now.
    pub fn decide(
        &mut self,
        round: u32,
        dirty_bytes: u64,
        state_bytes: u64,
        bytes_per_s: f64,
    ) -> Decision {
        let estimate = Self::estimate(dirty_bytes, state_bytes, bytes_per_s);
        if estimate <= self.budget.min(GOAL) {
            return Decision::Stop(StopReason::Converged);
        }
        let shrinking = self.best.is_none_or(|b| dirty_bytes * 10 <= b * 9);
        if estimate <= self.budget && !shrinking {
            return Decision::Stop(StopReason::Converged);
        }
        if shrinking {
            self.stalled = 0;
        } else {
            self.stalled += 1;
        }
        self.best = Some(self.best.map_or(dirty_bytes, |b| b.min(dirty_bytes)));
        if self.stalled >= STALL_ROUNDS {
            return Decision::Stop(StopReason::Stalled);
        }
        if round + 1 >= self.max_rounds {
            return Decision::Stop(StopReason::RoundLimit);
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: f64 = 1e9;

    #[test]
    fn small_dirty_set_converges() {
        let mut c = Convergence::new(Duration::from_millis(30), 30);
        // 1 MB at 1 GB/s = 1 ms + 3 ms fixed: under the goal.
        assert_eq!(
            c.decide(0, 1_000_000, 50_000, GB),
            Decision::Stop(StopReason::Converged)
        );
    }

    #[test]
    fn within_budget_but_shrinking_goes_on() {
        let mut c = Convergence::new(Duration::from_millis(30), 30);
        // 10 MB: 13 ms fits 30 ms, but the set may shrink: another round.
        assert_eq!(c.decide(0, 10_000_000, 0, GB), Decision::Continue);
        // It shrank to 4 MB (7 ms): still shrinking, go on.
        assert_eq!(c.decide(1, 4_000_000, 0, GB), Decision::Continue);
        // No longer shrinking (3.8 MB): stop, within the budget.
        assert_eq!(
            c.decide(2, 3_800_000, 0, GB),
            Decision::Stop(StopReason::Converged)
        );
    }

    #[test]
    fn shrinking_set_continues_then_converges() {
        let mut c = Convergence::new(Duration::from_millis(10), 30);
        assert_eq!(c.decide(0, 100_000_000, 0, GB), Decision::Continue);
        assert_eq!(c.decide(1, 50_000_000, 0, GB), Decision::Continue);
        // 8 ms fits the budget, but the set still shrinks: one more.
        assert_eq!(c.decide(2, 5_000_000, 0, GB), Decision::Continue);
        assert_eq!(
            c.decide(3, 1_500_000, 0, GB),
            Decision::Stop(StopReason::Converged)
        );
    }

    #[test]
    fn no_progress_stalls() {
        let mut c = Convergence::new(Duration::from_millis(1), 30);
        assert_eq!(c.decide(0, 80_000_000, 0, GB), Decision::Continue);
        assert_eq!(c.decide(1, 80_000_000, 0, GB), Decision::Continue);
        assert_eq!(c.decide(2, 79_000_000, 0, GB), Decision::Continue);
        assert_eq!(
            c.decide(3, 81_000_000, 0, GB),
            Decision::Stop(StopReason::Stalled)
        );
    }

    #[test]
    fn round_limit() {
        let mut c = Convergence::new(Duration::from_millis(1), 3);
        assert_eq!(c.decide(0, 80_000_000, 0, GB), Decision::Continue);
        assert_eq!(c.decide(1, 40_000_000, 0, GB), Decision::Continue);
        assert_eq!(
            c.decide(2, 20_000_000, 0, GB),
            Decision::Stop(StopReason::RoundLimit)
        );
    }
}
