//! Waiting for a tick's TSC deadline: asleep in the VMM (`OP_SLEEP`) while
//! the wait is long, spinning on the TSC for the rest or when no VMM can
//! sleep the vCPU (QEMU). Pure, so the host tests drive it with a fake
//! clock; timing only, never the result.

/// Waits shorter than this are spun: a hypercall exit and the host's
/// wake-up cost about 0.1 ms each, so a shorter sleep would overshoot.
pub const SLEEP_MIN_US: u64 = 200;

/// The guest's clock and the VMM's sleep, as `wait_until` uses them.
pub trait Clock {
    /// The TSC now.
    fn now(&mut self) -> u64;
    /// Asks the VMM to sleep up to `ns`; false if no VMM took the call.
    fn sleep_ns(&mut self, ns: u64) -> bool;
    /// One iteration of a busy wait.
    fn spin(&mut self) {
        core::hint::spin_loop();
    }
}

/// Returns once the TSC has reached `due`. Sleeps in the VMM while at
/// least [`SLEEP_MIN_US`] remain and `can_sleep` holds (cleared the first
/// time the VMM does not answer, so later waits spin at once), and checks
/// the TSC after every wake-up: an early wake (the VMM paused or saved the
/// VM, or capped the sleep) just sleeps again.
pub fn wait_until(due: u64, tsc_per_us: u64, can_sleep: &mut bool, clock: &mut impl Clock) {
    let per_us = tsc_per_us.max(1);
    loop {
        let now = clock.now();
        if now >= due {
            return;
        }
        let left_us = (due - now) / per_us;
        if *can_sleep && left_us >= SLEEP_MIN_US {
            if !clock.sleep_ns(left_us.saturating_mul(1000)) {
                *can_sleep = false;
            }
        } else {
            clock.spin();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 1000 TSC ticks per µs; a sleep advances time by what the VMM grants
    /// (capped, or cut short every `early`-th call), plus a wake-up cost.
    struct Fake {
        tsc: u64,
        vmm: bool,
        cap_ns: u64,
        early_every: u64,
        sleeps: u64,
        spins: u64,
    }

    impl Clock for Fake {
        fn now(&mut self) -> u64 {
            self.tsc
        }
        fn sleep_ns(&mut self, ns: u64) -> bool {
            if !self.vmm {
                return false;
            }
            self.sleeps += 1;
            let mut slept = ns.min(self.cap_ns);
            if self.early_every != 0 && self.sleeps.is_multiple_of(self.early_every) {
                slept /= 3;
            }
            self.tsc += slept + 50_000;
            true
        }
        fn spin(&mut self) {
            self.spins += 1;
            self.tsc += 100;
        }
    }

    fn fake(vmm: bool) -> Fake {
        Fake {
            tsc: 5_000,
            vmm,
            cap_ns: u64::MAX,
            early_every: 0,
            sleeps: 0,
            spins: 0,
        }
    }

    #[test]
    fn long_waits_sleep_once_then_return_past_due() {
        let mut c = fake(true);
        let mut can = true;
        wait_until(5_000 + 20_000_000, 1000, &mut can, &mut c);
        assert!(c.tsc >= 20_005_000);
        assert_eq!((c.sleeps, c.spins), (1, 0));
        assert!(can);
    }

    #[test]
    fn early_and_capped_wakes_sleep_again_and_spin_the_tail() {
        let mut c = fake(true);
        c.cap_ns = 3_000_000;
        c.early_every = 2;
        let mut can = true;
        let due = 5_000 + 20_000_123;
        wait_until(due, 1000, &mut can, &mut c);
        assert!(c.tsc >= due);
        assert!(c.sleeps > 6, "{} sleeps", c.sleeps);
        assert!(can);
    }

    #[test]
    fn without_a_vmm_it_spins_and_stops_asking() {
        let mut c = fake(false);
        let mut can = true;
        wait_until(5_000 + 1_000_000, 1000, &mut can, &mut c);
        assert!(!can);
        assert!(c.spins >= 9_000);
        let spins = c.spins;
        wait_until(c.tsc + 1_000_000, 1000, &mut can, &mut c);
        assert!(c.spins > spins);
    }

    #[test]
    fn short_waits_and_past_deadlines_spin_or_return() {
        let mut c = fake(true);
        let mut can = true;
        wait_until(5_000 + 150_000, 1000, &mut can, &mut c);
        assert_eq!(c.sleeps, 0);
        assert!(c.tsc >= 155_000);
        let before = c.tsc;
        wait_until(10, 1000, &mut can, &mut c);
        assert_eq!(c.tsc, before);
    }
}
