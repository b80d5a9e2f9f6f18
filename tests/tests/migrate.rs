//! Live migration: the VMM's dirty log on a running zone guest, then
//! pre-copy migration between two hosts of a local cluster (real daemons in
//! network namespaces, real TCP): the migrated guest ends with QEMU's line
//! for the same cmdline, a destination that dies before commit leaves the
//! guest running on the source, and garbage on the migration port is
//! refused. Needs /dev/kvm (and root for the cluster); fails clearly
//! without.

use forkd::vmm::dirty::ranges;
use std::time::Duration;
use tests::{boot, finish, qemu_done_line};

/// A running zone guest's dirty set over ~200 ms: its per-tick client
/// updates and moved pages land in the zone state, and a paused guest
/// dirties nothing.
#[test]
fn dirty_log_of_a_running_zone() {
    let cmdline = "ticks=200 seed=5 state_mib=32 dirty_pages=16 tick_us=5000";
    let mut vm = boot(cmdline, 512);
    // The guest has said HELLO (where its state is) once it printed a line.
    let t = std::time::Instant::now();
    let info = loop {
        if let (Some(i), true) = (vm.guest_info(), vm.console().lines().len() >= 2) {
            break i;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "guest HELLO");
        std::thread::sleep(Duration::from_millis(10));
    };
    vm.start_dirty_log().expect("start the dirty log");
    std::thread::sleep(Duration::from_millis(200));
    let dirty = vm.dirty_pages().expect("dirty pages");
    let n = dirty.count_ones() as u64;
    let state = (info.state_gpa / 4096)..(info.state_gpa + info.state_bytes).div_ceil(4096);
    let in_state: u64 = ranges(&dirty)
        .iter()
        .map(|r| {
            let (a, b) = (r.first.max(state.start), (r.first + r.count).min(state.end));
            b.saturating_sub(a)
        })
        .sum();
    // One tick alone touches ~256 random entities' pages + 16 moved ones;
    // ~40 ticks touch most of the 8192 state pages, and little else.
    assert!(n >= 250, "only {n} pages dirty in 200 ms");
    assert!(
        n <= 8192 + 512,
        "{n} pages dirty: more than the zone writes"
    );
    assert!(
        in_state * 10 >= n * 9,
        "{in_state} of {n} dirty pages in the zone state"
    );
    vm.pause().expect("pause");
    let _ = vm.dirty_pages().expect("flush");
    std::thread::sleep(Duration::from_millis(50));
    let idle = vm.dirty_pages().expect("dirty pages while paused");
    assert_eq!(idle.count_ones(), 0, "a paused guest dirtied pages");
    vm.resume().expect("resume");
    vm.stop_dirty_log().expect("stop the dirty log");
    assert!(vm.dirty_pages().is_err(), "the log is off");
    assert_eq!(finish(&mut vm), qemu_done_line(cmdline, 512));
}
