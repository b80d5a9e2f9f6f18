//! Pausing and resuming a running guest never changes its result.

use std::time::{Duration, Instant};
use tests::{boot, finish, straight_run};

#[test]
fn hundred_pauses_same_checksum() {
    let cmdline = "ticks=200 seed=3 state_mib=16 dirty_pages=10 alloc_mib=1 tick_us=1500";
    let expected = straight_run(cmdline, 512);
    let mut vm = boot(cmdline, 512);
    for _ in 0..100 {
        vm.pause().expect("pause");
        assert!(vm.is_paused());
        std::thread::sleep(Duration::from_micros(200));
        vm.resume().expect("resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(finish(&mut vm), expected);
}

/// A zone paced by 0.5 s ticks is asleep in the VMM (`OP_SLEEP`) almost
/// all the time: every pause wakes it at once, and pausing it at random
/// points of its sleep never changes its result.
#[test]
fn sleeping_guest_pauses_at_once_and_ends_the_same() {
    let cmdline = "ticks=4 seed=8 state_mib=16 dirty_pages=30 alloc_mib=1 tick_us=500000";
    let expected = tests::qemu_done_line(cmdline, 512);
    let mut vm = boot(cmdline, 512);
    let mut slowest = Duration::ZERO;
    for i in 0..12u64 {
        std::thread::sleep(Duration::from_millis(40 + 23 * (i % 5)));
        let t = Instant::now();
        vm.pause().expect("pause a sleeping guest");
        slowest = slowest.max(t.elapsed());
        assert!(vm.is_paused());
        std::thread::sleep(Duration::from_millis(5));
        vm.resume().expect("resume");
    }
    assert!(
        slowest < Duration::from_millis(200),
        "a pause waited {slowest:?} for a sleeping guest (its sleeps are 500 ms)"
    );
    assert_eq!(finish(&mut vm), expected);
}

/// A hostile or just slow guest asking to sleep for long is still stopped
/// at once: a sleep ends on any command.
#[test]
fn guest_asleep_for_long_is_killed_at_once() {
    let mut vm = boot("ticks=3 state_mib=1 tick_us=10000000", 64);
    for _ in 0..2000 {
        if vm
            .console()
            .lines()
            .iter()
            .any(|l| l.starts_with("zone: start"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    vm.kill();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "killing a sleeping guest took {:?}",
        t.elapsed()
    );
}

#[test]
fn paused_guest_makes_no_progress() {
    let mut vm = boot("ticks=100 state_mib=16 tick_us=1000", 512);
    // Wait for the first line, then freeze the guest well past its run time.
    for _ in 0..2000 {
        if !vm.console().lines().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    vm.pause().expect("pause");
    let before = vm.console().lines();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.console().lines(), before, "paused guest printed");
    assert!(vm.poll_exit().is_none(), "paused guest exited");
    vm.resume().expect("resume");
    finish(&mut vm);
}

#[test]
fn two_vcpus_with_irqchip() {
    let cmdline = "ticks=20 seed=13 state_mib=16";
    let expected = straight_run(cmdline, 512);
    tests::require_kvm();
    let mut cfg = tests::config(cmdline, 512);
    cfg.vcpus = 2;
    let mut vm = forkd::vmm::Vm::boot(&cfg).expect("boot with 2 vCPUs");
    assert_eq!(finish(&mut vm), expected);
}
