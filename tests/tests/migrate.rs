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

mod local {
    //! The library's sender and receiver on loopback in one process (real
    //! VMs, real TCP): what the daemons do, without them.
    use forkd::migrate::receiver::{receive, CommitGate, Incoming, ReceiveProgress};
    use forkd::migrate::sender::{migrate, MigrateError, Outgoing};
    use forkd::migrate::{MigrateOptions, Phase, Progress};
    use forkd::vmm::devices::Console;
    use forkd::vmm::vm::BuildOptions;
    use forkd::vmm::Vm;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};
    use tests::{boot, finish, qemu_done_line};

    pub const CMDLINE: &str = "ticks=400 seed=5 state_mib=32 dirty_pages=16 tick_us=5000";

    fn incoming(mem_bytes: u64) -> (TcpListener, Incoming) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let inc = Incoming {
            secret: [42; 32],
            mem_bytes,
            accept_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(5),
        };
        (l, inc)
    }

    fn build_options() -> BuildOptions {
        BuildOptions {
            console: Console::new(false, None),
            hypercalls: None,
            memory_server: None,
            started: Instant::now(),
        }
    }

    fn wait_running(vm: &Vm) {
        let t = Instant::now();
        while vm.console().lines().len() < 2 {
            assert!(t.elapsed() < Duration::from_secs(20), "guest started");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn loopback_migration_ends_with_qemus_line() {
        let mut vm = boot(CMDLINE, 512);
        wait_running(&vm);
        std::thread::sleep(Duration::from_millis(300));
        let (listener, inc) = incoming(vm.mem_bytes());
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = mpsc::channel();
        let recv = std::thread::spawn(move || {
            let gate = CommitGate::default();
            let progress = ReceiveProgress::default();
            receive(listener, &inc, build_options(), &gate, &progress, |vm| {
                tx.send(vm).map_err(|e| e.to_string())?;
                Ok("vm-dest".into())
            })
        });
        let out = Outgoing {
            addr,
            secret: [42; 32],
            source: "test/vm".into(),
        };
        let progress = Progress::default();
        let report = migrate(&mut vm, &out, &MigrateOptions::default(), &progress)
            .expect("migration commits");
        assert_eq!(progress.phase(), Phase::Committed);
        assert_eq!(report.destination_vm, "vm-dest");
        assert!(report.rounds >= 1 && report.bytes_sent > 0, "{report:?}");
        // Round 0 sent the touched memory only: ~32 MiB state, not 512 MiB.
        assert!(report.bytes_sent < 200 << 20, "{report:?}");
        eprintln!("report: {report:?}");
        let id = recv.join().expect("receiver thread").expect("received");
        assert_eq!(id, "vm-dest");
        let console_before = vm.console().lines();
        vm.kill();
        let mut dest = rx.recv_timeout(Duration::from_secs(5)).expect("the VM");
        let line = finish(&mut dest);
        assert_eq!(line, qemu_done_line(CMDLINE, 512));
        // The source never printed the end.
        assert!(!console_before.iter().any(|l| l.starts_with("zone: done")));
    }

    #[test]
    fn wrong_secret_is_refused_and_the_guest_runs_on() {
        let mut vm = boot(CMDLINE, 512);
        wait_running(&vm);
        let (listener, mut inc) = incoming(vm.mem_bytes());
        inc.accept_timeout = Duration::from_secs(3);
        let addr = listener.local_addr().expect("addr");
        let recv = std::thread::spawn(move || {
            let gate = CommitGate::default();
            let progress = ReceiveProgress::default();
            let r = receive(listener, &inc, build_options(), &gate, &progress, |_| {
                Ok("never".into())
            });
            (r, progress.view())
        });
        let out = Outgoing {
            addr,
            secret: [1; 32],
            source: "test/vm".into(),
        };
        let progress = Progress::default();
        let err = migrate(&mut vm, &out, &MigrateOptions::default(), &progress).unwrap_err();
        assert!(
            matches!(&err, MigrateError::Refused(r) if r.contains("secret")),
            "{err}"
        );
        assert_eq!(progress.phase(), Phase::Aborted);
        let (r, view) = recv.join().expect("receiver");
        assert!(r.is_err());
        assert_eq!(view.rejected, 1);
        assert_eq!(finish(&mut vm), qemu_done_line(CMDLINE, 512));
    }
}
