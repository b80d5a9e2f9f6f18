//! Live migration: the VMM's dirty log on a running zone guest, then
//! pre-copy migration between two hosts of a local cluster (real daemons in
//! network namespaces, real TCP): the migrated guest ends with QEMU's line
//! for the same cmdline, a destination that dies before commit leaves the
//! guest running on the source, and garbage on the migration port is
//! refused. Needs /dev/kvm (and root for the cluster); fails clearly
//! without.

#[allow(dead_code)]
#[path = "api/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "remote/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "api/schema.rs"]
mod schema;

use forkd::vmm::dirty::ranges;
use std::time::Duration;
use tests::{boot, finish, qemu_done_line};

/// A running zone guest's dirty set over a few ticks: its per-tick client
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
    // Collect the dirty set until it covers a few ticks' writes (a loaded
    // machine may run the guest slowly; bounded at 10 s).
    let t = std::time::Instant::now();
    let mut dirty = vm.dirty_pages().expect("dirty pages");
    while dirty.count_ones() < 300 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
        forkd::vmm::dirty::or_into(&mut dirty, &vm.dirty_pages().expect("dirty pages"));
    }
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
    assert!(n >= 300, "only {n} pages dirty in {:?}", t.elapsed());
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
    use forkd::migrate::sender::{conclude, migrate, MigrateError, Outgoing};
    use forkd::migrate::{MigrateOptions, Phase, Progress, StopReason};
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
            family: None,
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
        loopback_at(Some(Duration::from_millis(300)));
    }

    /// Early: at once after the boot, before the guest has said a word.
    #[test]
    fn loopback_migration_early() {
        loopback_at(None);
    }

    /// Late: 1.5 s into the guest's ~2 s run.
    #[test]
    fn loopback_migration_late() {
        loopback_at(Some(Duration::from_millis(1500)));
    }

    /// Migrates a running zone guest over loopback `after` it printed its
    /// start (at once after the boot with `None`); the destination's guest
    /// ends with QEMU's line and the source's console history.
    fn loopback_at(after: Option<Duration>) {
        let mut vm = boot(CMDLINE, 512);
        if let Some(d) = after {
            wait_running(&vm);
            std::thread::sleep(d);
        }
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
            memserver: None,
        };
        let progress = Progress::default();
        let result = migrate(&mut vm, &out, &MigrateOptions::default(), &progress);
        conclude(&progress, result.as_ref().map(|m| &m.report));
        let report = result.expect("migration commits").report;
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
        // The console's history moved with the guest.
        let lines = dest.console().lines();
        assert!(
            lines.starts_with(&console_before),
            "{console_before:?} then {lines:?}"
        );
        // The source never printed the end.
        assert!(!console_before.iter().any(|l| l.starts_with("zone: done")));
    }

    /// A guest that rewrites pages of its 32 MiB state flat out (unpaced),
    /// with a budget pre-copy cannot meet (1 ms, below the fixed cost):
    /// the rounds go on until the dirty set stops shrinking or the round
    /// limit, then the rest is copied with the guest stopped — and the
    /// guest still ends with QEMU's line (every dirty page arrived).
    #[test]
    fn a_migration_that_cannot_converge_still_moves_the_guest_exactly() {
        let cmdline = "ticks=300 seed=5 state_mib=32 dirty_pages=8192";
        let mut vm = boot(cmdline, 512);
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
            memserver: None,
        };
        let progress = Progress::default();
        let opts = MigrateOptions {
            downtime: Duration::from_millis(1),
            max_rounds: 8,
            ..MigrateOptions::default()
        };
        let report = migrate(&mut vm, &out, &opts, &progress)
            .expect("migration commits")
            .report;
        eprintln!("report: {report:?}");
        assert_ne!(report.stop_reason, StopReason::Converged, "{report:?}");
        assert!(report.rounds >= 2, "{report:?}");
        recv.join().expect("receiver").expect("received");
        vm.kill();
        let mut dest = rx.recv_timeout(Duration::from_secs(5)).expect("the VM");
        assert_eq!(finish(&mut dest), qemu_done_line(cmdline, 512));
    }

    /// Migrates `vm` to a fake destination on loopback that answers the
    /// handshake (Hello → Welcome) and then does `rest` on the connection;
    /// returns the migration's progress and outcome once both are done.
    fn migrate_to_fake(
        vm: &mut Vm,
        rest: impl FnOnce(&mut std::net::TcpStream) + Send + 'static,
    ) -> (Progress, Result<forkd::migrate::Report, MigrateError>) {
        use forkd::migrate::protocol::{read_message, write_message, Message};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            assert!(matches!(read_message(&mut s), Ok(Message::Hello(_))));
            write_message(&mut s, &Message::Welcome).expect("welcome");
            rest(&mut s);
        });
        let out = Outgoing {
            addr,
            secret: [42; 32],
            source: "test/vm".into(),
            memserver: None,
        };
        let progress = Progress::default();
        let result = migrate(vm, &out, &MigrateOptions::default(), &progress).map(|m| m.report);
        conclude(&progress, result.as_ref());
        peer.join().expect("peer");
        (progress, result)
    }

    /// A destination that takes the commit and vanishes without a word
    /// (it died, or the acknowledgement was lost): the source is in doubt
    /// and keeps the guest paused — it never resumes it on its own. Told
    /// the destination aborted (what the API asks it), it resumes the guest
    /// intact.
    #[test]
    fn commit_without_answer_keeps_the_guest_paused() {
        use forkd::migrate::protocol::{read_message, write_message, Message};
        let mut vm = boot(CMDLINE, 512);
        wait_running(&vm);
        // Speaks the protocol up to Commit, then hangs up.
        let (progress, result) = migrate_to_fake(&mut vm, |s| {
            loop {
                match read_message(s).expect("message") {
                    Message::State(_) => break,
                    Message::RoundEnd { round, .. } => {
                        write_message(s, &Message::RoundAck { round }).expect("ack");
                    }
                    Message::Pages { .. } | Message::Console(_) => {}
                    other => panic!("unexpected {other:?}"),
                }
            }
            write_message(s, &Message::Ready).expect("ready");
            assert_eq!(read_message(s).expect("commit"), Message::Commit);
        });
        let err = result.unwrap_err();
        assert!(matches!(err, MigrateError::InDoubt(_)), "{err}");
        assert_eq!(progress.phase(), Phase::InDoubt);
        assert!(
            vm.is_paused(),
            "the source resumed a guest it sent a commit for"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(vm.is_paused());
        vm.stop_dirty_log().expect("stop the dirty log");
        vm.resume().expect("resume");
        assert_eq!(finish(&mut vm), qemu_done_line(CMDLINE, 512));
    }

    /// A destination that dies in the stop-and-copy, once it has the state
    /// and before it answers `Ready`: the source, which had paused the
    /// guest, resumes it (dirty log off) and it ends with QEMU's line.
    #[test]
    fn destination_gone_in_stop_and_copy_the_guest_resumes() {
        use forkd::migrate::protocol::{read_message, write_message, Message};
        let mut vm = boot(CMDLINE, 512);
        wait_running(&vm);
        let (progress, result) = migrate_to_fake(&mut vm, |s| {
            loop {
                match read_message(s) {
                    Ok(Message::State(_)) | Err(_) => break,
                    Ok(Message::RoundEnd { round, .. }) => {
                        let _ = write_message(s, &Message::RoundAck { round });
                    }
                    Ok(_) => {}
                }
            }
            // Gone: the connection closes without a Ready.
        });
        let err = result.unwrap_err();
        assert!(!matches!(err, MigrateError::InDoubt(_)), "{err}");
        assert_eq!(progress.phase(), Phase::Aborted);
        // Resume is asynchronous (a command to the vCPU thread).
        let t = Instant::now();
        while vm.is_paused() {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the guest was not resumed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(vm.dirty_pages().is_err(), "the dirty log is still on");
        assert_eq!(finish(&mut vm), qemu_done_line(CMDLINE, 512));
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
            memserver: None,
        };
        let progress = Progress::default();
        let result =
            migrate(&mut vm, &out, &MigrateOptions::default(), &progress).map(|m| m.report);
        conclude(&progress, result.as_ref());
        let err = result.unwrap_err();
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

mod cluster {
    //! Two hosts of a local cluster: real daemons in network namespaces,
    //! the migration over real TCP on the cluster's bridge.
    use super::client;
    use super::common::*;
    use forkd::migrate::protocol::{read_message, Hello, Message, HEADER_LEN};
    use serde_json::Value;
    use std::io::Write;
    use std::net::{Shutdown, TcpStream};
    use std::path::Path;
    use std::process::Command;
    use std::time::{Duration, Instant};
    use tests::{forkd_bin, qemu_done_line, run_with_timeout};

    const CMDLINE: &str = super::local::CMDLINE;

    fn vms(sock: &Path) -> Vec<Value> {
        let r = client::call_unix(sock, "GET", "/v1/vms", None);
        assert_eq!(r.status, 200, "{}", r.error());
        r.json()["vms"].as_array().expect("vms").clone()
    }

    fn last_line(sock: &Path, id: &str, limit: Duration) -> String {
        let v = poll(sock, &format!("/v1/vms/{id}"), limit, |v| {
            v["state"] == "exited"
        });
        assert_eq!(v["exit"]["code"], 0, "{v}");
        v["last_line"].as_str().expect("last line").to_owned()
    }

    /// A zone guest migrated h1→h2 mid-run with `forkd vm migrate --wait`
    /// ends on h2 with QEMU's line; h1 no longer has it.
    #[test]
    fn zone_migrated_mid_run_ends_with_qemus_line() {
        let (c, up) = Cluster::up(2);
        let hs = up["hosts"].as_array().expect("hosts").clone();
        let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
        // Long enough (~4 s) for a migration there and one back.
        let cmdline = "ticks=800 seed=5 state_mib=32 dirty_pages=16 tick_us=5000";
        let id = start_vm(&h1, cmdline);
        std::thread::sleep(Duration::from_millis(500));
        let dir = c.dir.to_str().expect("dir");
        let o = run_with_timeout(
            Command::new(forkd_bin()).args([
                "vm",
                "migrate",
                &id,
                "--host",
                "h1",
                "--cluster",
                &c.name,
                "--cluster-dir",
                dir,
                "--to",
                "h2",
                "--wait",
                "--json",
            ]),
            Duration::from_secs(60),
        );
        assert!(o.status.success(), "vm migrate: {}", text(&o));
        let status: Value = serde_json::from_slice(&o.stdout).expect("json");
        assert_eq!(status["phase"], "committed", "{status}");
        let report = &status["report"];
        let dest = report["destination_vm"]
            .as_str()
            .expect("dest vm")
            .to_owned();
        eprintln!("report: {report}");
        assert_eq!(dest, id, "the VM keeps its id");
        assert!(report["rounds"].as_u64() >= Some(1));
        // Round 0 carried the touched memory, not the 512 MiB guest.
        assert!(report["bytes_sent"].as_u64() < Some(200 << 20), "{report}");
        // The status again, through the API (checked against the spec).
        let r = client::call_unix(&h1, "GET", &format!("/v1/vms/{id}/migration"), None);
        assert_eq!(r.status, 200, "{}", r.error());
        assert!(
            vms(&h1).iter().all(|v| v["id"] != id.as_str()),
            "the source still lists {id}"
        );
        assert!(vms(&h2).iter().any(|v| v["id"] == dest.as_str()));
        // And back to h1, through h2's API: a migrated VM migrates again.
        let r = client::call_unix(
            &h2,
            "POST",
            &format!("/v1/vms/{dest}/migrate"),
            Some(r#"{"destination": "h1"}"#),
        );
        assert_eq!(r.status, 202, "{}", r.error());
        let back = poll(
            &h2,
            &format!("/v1/vms/{dest}/migration"),
            Duration::from_secs(30),
            |v| {
                matches!(
                    v["phase"].as_str(),
                    Some("committed" | "aborted" | "in_doubt")
                )
            },
        );
        assert_eq!(back["phase"], "committed", "{back}");
        let home = back["report"]["destination_vm"]
            .as_str()
            .expect("vm on h1")
            .to_owned();
        assert!(vms(&h2).iter().all(|v| v["id"] != dest.as_str()));
        let line = last_line(&h1, &home, Duration::from_secs(30));
        assert_eq!(line, qemu_done_line(cmdline, MEM));
        // Its console still begins with what it printed on h1 at boot.
        let r = client::call_unix(&h1, "GET", &format!("/v1/vms/{home}/console"), None);
        let lines = r.json()["lines"].as_array().expect("lines").clone();
        assert!(lines.len() >= 3, "{lines:?}");
        assert!(
            lines
                .iter()
                .any(|l| l.as_str().is_some_and(|l| l.starts_with("zone:"))),
            "{lines:?}"
        );
        // Refusals: an unknown destination, an unknown mode.
        let id2 = start_vm(&h1, CMDLINE);
        let path = format!("/v1/vms/{id2}/migrate");
        let r = client::call_unix(&h1, "POST", &path, Some(r#"{"destination": "h9"}"#));
        assert_eq!(r.status, 422, "{}", r.error());
        let r = client::call_unix(
            &h1,
            "POST",
            &path,
            Some(r#"{"destination": "h2", "mode": "sideways"}"#),
        );
        assert_eq!(r.status, 400, "{}", r.error());
        assert!(r.error().contains("postcopy"), "{}", r.error());
        // Cancelled mid-way (a capped link keeps it going): it aborts and
        // the guest runs on here; a second cancel is too late.
        let body = r#"{"destination": "h2", "bandwidth_mib_s": 4}"#;
        let r = client::call_unix(&h1, "POST", &path, Some(body));
        assert_eq!(r.status, 202, "{}", r.error());
        let status = format!("/v1/vms/{id2}/migration");
        let r = client::call_unix(&h1, "DELETE", &status, None);
        assert_eq!(r.status, 202, "{}", r.error());
        let v = poll(&h1, &status, Duration::from_secs(10), |v| {
            v["phase"] == "aborted"
        });
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("cancelled")),
            "{v}"
        );
        let r = client::call_unix(&h1, "DELETE", &status, None);
        assert_eq!(r.status, 409, "{}", r.error());
        let line = last_line(&h1, &id2, Duration::from_secs(30));
        assert_eq!(line, qemu_done_line(CMDLINE, MEM));
    }

    /// h2's daemon killed during pre-copy: the migration aborts, the guest
    /// runs on on h1 and ends with QEMU's line.
    #[test]
    fn destination_killed_mid_migration_source_continues() {
        let (_c, up) = Cluster::up(2);
        let hs = up["hosts"].as_array().expect("hosts").clone();
        let h1 = socket(&hs[0]);
        let cmdline = "ticks=1000 seed=5 state_mib=32 dirty_pages=16 tick_us=5000";
        let id = start_vm(&h1, cmdline);
        // A capped link: round 0 (~40 MiB) takes ~10 s at 4 MiB/s.
        let body = r#"{"destination": "h2", "downtime_ms": 30, "bandwidth_mib_s": 4}"#;
        let r = client::call_unix(&h1, "POST", &format!("/v1/vms/{id}/migrate"), Some(body));
        assert_eq!(r.status, 202, "{}", r.error());
        let path = format!("/v1/vms/{id}/migration");
        poll(&h1, &path, Duration::from_secs(20), |v| {
            v["phase"] == "precopy" && v["bytes_sent"].as_u64() > Some(2 << 20)
        });
        // While migrating, the VM is not migrated again, forked or deleted.
        let r = client::call_unix(&h1, "POST", &format!("/v1/vms/{id}/migrate"), Some(body));
        assert_eq!(r.status, 409, "{}", r.error());
        let r = client::call_unix(&h1, "DELETE", &format!("/v1/vms/{id}"), None);
        assert_eq!(r.status, 409, "{}", r.error());
        let r = client::call_unix(
            &h1,
            "POST",
            &format!("/v1/vms/{id}/fork"),
            Some(r#"{"clones": 1}"#),
        );
        assert_eq!(r.status, 409, "{}", r.error());
        let pid = hs[1]["pid"].as_u64().expect("pid") as i32;
        // SAFETY: kill(2) on the pid of h2's daemon, which this test's
        // cluster started; the cluster guard cleans up after it.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let t = Instant::now();
        let v = poll(&h1, &path, Duration::from_secs(15), |v| {
            v["phase"] == "aborted"
        });
        eprintln!("aborted after {:?}: {}", t.elapsed(), v["error"]);
        assert!(v["error"].as_str().is_some(), "{v}");
        let line = last_line(&h1, &id, Duration::from_secs(60));
        assert_eq!(line, qemu_done_line(cmdline, MEM));
    }

    /// The connection cut mid-migration (nftables drops every TCP segment
    /// into h2 but its API's): the source's next write times out, the
    /// migration aborts within the I/O timeout, and the guest runs on on h1
    /// to QEMU's line; h2 built nothing.
    #[test]
    fn connection_cut_mid_migration_aborts_within_the_timeout() {
        let (_c, up) = Cluster::up(2);
        let hs = up["hosts"].as_array().expect("hosts").clone();
        let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
        let cmdline = "ticks=1200 seed=5 state_mib=32 dirty_pages=16 tick_us=5000";
        let id = start_vm(&h1, cmdline);
        let body = r#"{"destination": "h2", "downtime_ms": 30, "bandwidth_mib_s": 4}"#;
        let r = client::call_unix(&h1, "POST", &format!("/v1/vms/{id}/migrate"), Some(body));
        assert_eq!(r.status, 202, "{}", r.error());
        let path = format!("/v1/vms/{id}/migration");
        poll(&h1, &path, Duration::from_secs(20), |v| {
            v["phase"] == "precopy" && v["bytes_sent"].as_u64() > Some(2 << 20)
        });
        let ns = hs[1]["netns"].as_str().expect("netns");
        let api_port = hs[1]["tcp"]
            .as_str()
            .and_then(|t| t.rsplit(':').next())
            .expect("tcp")
            .to_owned();
        nft_in(ns, &["add", "table", "inet", "cut"]);
        nft_in(
            ns,
            &[
                "add",
                "chain",
                "inet",
                "cut",
                "input",
                "{ type filter hook input priority 0; }",
            ],
        );
        nft_in(
            ns,
            &[
                "add", "rule", "inet", "cut", "input", "tcp", "dport", "!=", &api_port, "drop",
            ],
        );
        let t = Instant::now();
        let v = poll(&h1, &path, Duration::from_secs(20), |v| {
            v["phase"] == "aborted"
        });
        eprintln!("aborted after {:?}: {}", t.elapsed(), v["error"]);
        // The 5 s I/O timeout (plus the time the socket buffers take to
        // fill at the capped rate), not an unbounded hang; the guest ran
        // on meanwhile (pre-copy).
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert!(
            v["error"].as_str().is_some_and(|e| e.contains("timed out")),
            "{v}"
        );
        let line = last_line(&h1, &id, Duration::from_secs(60));
        assert_eq!(line, qemu_done_line(cmdline, MEM));
        assert!(vms(&h2).is_empty(), "h2 built nothing");
    }

    /// Sends `bytes` (then closes the writing half) and returns the
    /// receiver's `Abort` reason.
    fn refused(addr: String, bytes: Vec<u8>) -> String {
        let mut s =
            TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(5))
                .expect("connect to the migration port");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(&bytes).expect("send");
        s.shutdown(Shutdown::Write).expect("shutdown");
        match read_message(&mut s) {
            Ok(Message::Abort { reason }) => reason,
            other => panic!("expected Abort, got {other:?}"),
        }
    }

    /// A valid handshake, then a page range past the guest's end: the
    /// receiver's `Abort` reason.
    fn outside_memory(addr: String, secret_hex: &str) -> String {
        let secret: Vec<u8> = (0..32)
            .map(|i| u8::from_str_radix(&secret_hex[2 * i..2 * i + 2], 16).expect("hex"))
            .collect();
        let mut s =
            TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(5))
                .expect("connect to the migration port");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let hello = Message::Hello(Hello {
            secret: secret.try_into().expect("32 bytes"),
            mem_bytes: 512 << 20,
            vcpus: 1,
            irqchip: false,
            source: "test".into(),
        });
        s.write_all(&hello.encode().expect("encode"))
            .expect("hello");
        assert_eq!(read_message(&mut s).expect("welcome"), Message::Welcome);
        let pages = Message::Pages {
            first: (512 << 20) / 4096 - 1,
            count: 2,
            data: vec![1; 8192],
        };
        s.write_all(&pages.encode().expect("encode"))
            .expect("pages");
        match read_message(&mut s) {
            Ok(Message::Abort { reason }) => reason,
            other => panic!("expected Abort, got {other:?}"),
        }
    }

    /// Garbage, another protocol version, a truncated message and a wrong
    /// secret on h2's migration port: each refused with a clear reason;
    /// the incoming migration stays open, and a VM on h1 runs to QEMU's
    /// line meanwhile.
    #[test]
    fn bad_input_on_the_migration_port_is_refused() {
        let (_c, up) = Cluster::up(2);
        let hs = up["hosts"].as_array().expect("hosts").clone();
        let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
        let id = start_vm(&h1, CMDLINE);
        // Opening a migration is daemon to daemon: over TCP without the
        // cluster's token it is refused.
        let ns = hs[0]["netns"].as_str().expect("netns").to_owned();
        let api = hs[1]["tcp"].as_str().expect("tcp").to_owned();
        let r = in_netns(&ns, move || {
            client::call_tcp_with(&api, "POST", "/v1/migrations", &[])
        });
        assert_eq!(r.status, 401, "{}", r.error());
        let body = r#"{"source": "test", "vm": "vm-99", "mem_mib": 512, "vcpus": 1, "cmdline": "ticks=1"}"#;
        let r = client::call_unix(&h2, "POST", "/v1/migrations", Some(body));
        assert_eq!(r.status, 201, "{}", r.error());
        let opened = r.json();
        let mig = opened["id"].as_u64().expect("id");
        let addr = format!(
            "{}:{}",
            hs[1]["address"].as_str().expect("address"),
            opened["port"]
        );
        let hello = Message::Hello(Hello {
            secret: [0; 32],
            mem_bytes: 512 << 20,
            vcpus: 1,
            irqchip: false,
            source: "test".into(),
        })
        .encode()
        .expect("encode");
        let mut wrong_version = hello.clone();
        wrong_version[4] = 7;
        let truncated = hello[..HEADER_LEN + 5].to_vec();
        let cases = [
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), "bad magic"),
            (wrong_version, "version 7"),
            (truncated, "truncated"),
            (hello, "wrong secret"),
        ];
        for (i, (bytes, want)) in cases.into_iter().enumerate() {
            let a = addr.clone();
            let why = in_netns(&ns, move || refused(a, bytes));
            assert!(why.contains(want), "case {i}: {why}");
            let r = client::call_unix(&h2, "GET", &format!("/v1/migrations/{mig}"), None);
            assert_eq!(r.status, 200, "{}", r.error());
            let st = r.json();
            assert_eq!(st["rejected"], i as u64 + 1, "{st}");
            assert_eq!(st["state"], "open", "{st}");
        }
        // The right secret, then pages outside guest memory: refused, and
        // this incoming migration is over (nothing was built).
        let secret = opened["secret"].as_str().expect("secret").to_owned();
        let a = addr.clone();
        let why = in_netns(&ns, move || outside_memory(a, &secret));
        assert!(why.contains("outside guest memory"), "{why}");
        let st = poll(
            &h2,
            &format!("/v1/migrations/{mig}"),
            Duration::from_secs(10),
            |v| v["state"] == "aborted" && v["error"].is_string(),
        );
        assert!(
            st["error"].as_str().is_some_and(|e| e.contains("outside")),
            "{st}"
        );
        let r = client::call_unix(&h2, "DELETE", &format!("/v1/migrations/{mig}"), None);
        assert_eq!(r.status, 200, "{}", r.error());
        assert_eq!(r.json()["state"], "aborted");
        assert!(vms(&h2).is_empty(), "nothing was built on h2");
        let line = last_line(&h1, &id, Duration::from_secs(30));
        assert_eq!(line, qemu_done_line(CMDLINE, MEM));
    }
}
