//! Dirty-rate windows (`Vm::open_dirty_window`, `Vm::close_dirty_window`)
//! on a running zone guest: a window counts the pages the guest dirtied
//! and leaves the log off; dirty tracking (a migration) owns the log — it
//! takes over an open window, and no window opens while it runs; the guest
//! still ends with QEMU's checksum. And what sampling costs the guest.

use forkd::vmm::dirty::LogUse;
use forkd::vmm::Vm;
use std::time::{Duration, Instant};
use tests::{boot, finish, qemu_done_line};

/// Waits until the guest said HELLO and printed its start line.
fn started(vm: &Vm) {
    let t = Instant::now();
    while vm.guest_info().is_none() || vm.console().lines().len() < 2 {
        assert!(t.elapsed() < Duration::from_secs(20), "guest start");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_window_counts_the_pages_dirtied_and_tracking_owns_the_log() {
    let cmdline = "ticks=300 seed=9 state_mib=32 dirty_pages=32 tick_us=5000";
    let mut vm = boot(cmdline, 512);
    started(&vm);
    assert_eq!(vm.dirty_log_use(), LogUse::Off);
    assert_eq!(vm.close_dirty_window().expect("close"), None, "none open");
    assert!(vm.open_dirty_window(1).expect("open"));
    assert!(matches!(vm.dirty_log_use(), LogUse::Window(_)));
    assert!(
        !vm.open_dirty_window(1).expect("open twice"),
        "one at a time"
    );
    std::thread::sleep(Duration::from_millis(300));
    let w = vm.close_dirty_window().expect("close").expect("a window");
    assert_eq!(vm.dirty_log_use(), LogUse::Off);
    // ~60 ticks of 256 updates + 32 moved pages over 8192 state pages.
    assert!(w.elapsed >= Duration::from_millis(300), "{w:?}");
    assert!(w.pages > 1000 && w.pages <= 8192 + 512, "{w:?}");
    assert!(w.pages_per_s() > 3000.0, "{w:?}");
    // The log is off again: a tracker starts from an empty log.
    assert!(vm.dirty_pages().is_err(), "the log is off after a window");

    // A migration starts tracking while a window is open: the window is
    // taken over (counts nothing), the tracker's log goes on.
    assert!(vm.open_dirty_window(1).expect("open"));
    vm.start_dirty_log().expect("tracking");
    assert_eq!(vm.dirty_log_use(), LogUse::Tracking);
    assert_eq!(vm.close_dirty_window().expect("close"), None);
    assert!(
        !vm.open_dirty_window(1).expect("open"),
        "tracking owns the log"
    );
    std::thread::sleep(Duration::from_millis(100));
    let dirty = vm.dirty_pages().expect("the tracker's log is still on");
    assert!(dirty.count_ones() > 100, "{}", dirty.count_ones());
    vm.stop_dirty_log().expect("stop tracking");
    assert!(vm.open_dirty_window(1).expect("open after tracking"));
    assert!(vm.close_dirty_window().expect("close").is_some());
    assert_eq!(finish(&mut vm), qemu_done_line(cmdline, 512));
}

/// A window watching one page in 8 (manual dirty-log protection) estimates
/// what a window watching every page counts, on a steady writer.
#[test]
fn a_sampled_window_estimates_the_full_count() {
    let cmdline = "ticks=1000 seed=12 state_mib=32 dirty_pages=32 tick_us=5000";
    let mut vm = boot(cmdline, 512);
    started(&vm);
    let window = |one_in| {
        assert!(vm.open_dirty_window(one_in).expect("open"));
        std::thread::sleep(Duration::from_millis(200));
        vm.close_dirty_window().expect("close").expect("a window")
    };
    let (full, sampled) = (window(1), window(8));
    let manual = vm.dirty_log_manual();
    eprintln!("manual protection {manual:?}: every page {full:?}; one in 8 {sampled:?}");
    assert_eq!(full.watched, vm.mem_pages() as u64);
    if manual == Some(true) {
        let want = vm.mem_pages() as f64 / 8.0;
        assert!(
            (sampled.watched as f64 - want).abs() < want * 0.1,
            "{sampled:?}"
        );
    }
    let ratio = sampled.pages_per_s() / full.pages_per_s();
    assert!((0.6..1.6).contains(&ratio), "{sampled:?} vs {full:?}");
    assert_eq!(finish(&mut vm), qemu_done_line(cmdline, 512));
}

/// Runs a writer to the end while this thread opens a window of `window`
/// every `every` (None: never): the guest's own run time (its start line
/// to its done line), its vCPU time, its last line and the windows.
fn run_sampled(
    cmdline: &str,
    schedule: Option<(Duration, Duration, u32)>,
) -> (Duration, Duration, String, u64) {
    let mut vm = boot(cmdline, 512);
    started(&vm);
    let mut windows = 0;
    if let Some((every, window, one_in)) = schedule {
        let mut next = Instant::now();
        while vm.poll_exit().is_none() {
            if Instant::now() >= next {
                next += every;
                if vm.open_dirty_window(one_in).expect("open") {
                    std::thread::sleep(window);
                    if vm.close_dirty_window().expect("close").is_some() {
                        windows += 1;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let line = finish(&mut vm);
    let c = vm.console();
    let ran = match (c.line_time("zone: start"), c.line_time("zone: done")) {
        (Some(a), Some(b)) => b.saturating_duration_since(a),
        _ => panic!("no start or done line: {:?}", c.lines()),
    };
    (ran, vm.cpu_time(), line, windows)
}

/// What dirty-rate sampling costs a guest that writes its whole 32 MiB
/// state flat out (no pacing, the worst case): its run time without
/// sampling and with a window every 2 s (1 s and 0.1 s long, every page
/// watched; 1 s watching one page in 8). On this
/// shadow-paging KVM a window costs the guest a trap on the first write to
/// each page while the log is on and, once it is off, on the first write
/// to each page the log had write-protected: about its written working set
/// × ~33 µs × 2, whatever the window's length. Prints the figures and the
/// default schedule's share (one window per 10 s); asserts only that
/// sampling never changes the result and a generous bound.
#[test]
fn what_sampling_costs_a_writing_guest() {
    let cmdline = "ticks=1200 seed=11 state_mib=32 dirty_pages=256";
    let (off, off_cpu, line, _) = run_sampled(cmdline, None);
    let mut per_window = Vec::new();
    for (window, one_in) in [
        (Duration::from_millis(1000), 1),
        (Duration::from_millis(100), 1),
        (Duration::from_millis(1000), 8),
    ] {
        let every = Duration::from_millis(2000);
        let (t, cpu, l, n) = run_sampled(cmdline, Some((every, window, one_in)));
        assert_eq!(l, line, "sampling changed the guest's result");
        // vCPU time, not wall time: other work on the machine moves the
        // wall clock far more than the windows do.
        let cost = cpu.saturating_sub(off_cpu).as_secs_f64() / n.max(1) as f64;
        eprintln!(
            "unpaced writer, window {window:?} watching 1 page in {one_in}, every {every:?}: ran {t:?} (vCPU {cpu:?}) against {off:?} (vCPU {off_cpu:?}) unsampled, {n} windows: {:.0} ms vCPU per window; one window per 10 s: {:.1}% of a core",
            cost * 1e3,
            cost / 10.0 * 100.0
        );
        per_window.push(cost);
    }
    assert!(
        per_window.iter().all(|c| *c < 3.0),
        "per-window cost {per_window:?} s"
    );
    // A paced zone (the e2e test's writer) has slack: windows cost it vCPU
    // time, not ticks.
    let paced = "ticks=250 seed=11 state_mib=32 dirty_pages=64 tick_us=20000";
    let (t0, cpu0, line, _) = run_sampled(paced, None);
    for one_in in [1, 8] {
        let (t1, cpu1, l, n) = run_sampled(
            paced,
            Some((
                Duration::from_millis(2000),
                Duration::from_millis(1000),
                one_in,
            )),
        );
        assert_eq!(l, line, "sampling changed the guest's result");
        eprintln!(
            "paced writer: {t0:?} / vCPU {cpu0:?} unsampled, {t1:?} / vCPU {cpu1:?} with {n} windows of 1 s watching 1 page in {one_in}: {:.0} ms vCPU per window",
            cpu1.saturating_sub(cpu0).as_secs_f64() * 1e3 / n.max(1) as f64
        );
    }
}
