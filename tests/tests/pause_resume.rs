//! Pausing and resuming a running guest never changes its result.

use std::time::Duration;
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
