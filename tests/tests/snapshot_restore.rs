//! Snapshot a running guest at different moments, restore it, and get the
//! checksum of the uninterrupted run.

use forkd::vmm::{RestoreMemory, RestoreOptions, Vm, VmExit};
use std::path::Path;
use std::time::Duration;
use tests::{boot, finish, forkd, stdout_lines, straight_run};

const MEM: u64 = 512;
/// About 600 ms of guest time (paced by the TSC), so the snapshot points
/// below fall early, mid and late in the run.
const PACED: &str = "ticks=300 seed=5 state_mib=16 dirty_pages=20 alloc_mib=1 tick_us=2000";

fn snapshot_after(cmdline: &str, mem: u64, after: Duration, dir: &Path) {
    let mut vm = boot(cmdline, mem);
    std::thread::sleep(after);
    vm.pause().expect("pause a running guest");
    let stats = vm.snapshot(dir).expect("snapshot");
    assert!(stats.state_bytes > 0);
    vm.kill();
}

fn restore_to_end(dir: &Path) -> String {
    let mut vm = Vm::restore(dir, false, None).expect("restore");
    finish(&mut vm)
}

#[test]
fn early_mid_late_snapshots_finish_like_the_straight_run() {
    let expected = straight_run(PACED, MEM);
    for ms in [15, 250, 450] {
        let dir = tempfile::tempdir().unwrap();
        snapshot_after(PACED, MEM, Duration::from_millis(ms), dir.path());
        assert_eq!(restore_to_end(dir.path()), expected, "snapshot at {ms} ms");
    }
}

/// Snapshots of a zone paced by 150 ms ticks, taken while it is asleep in
/// the VMM (`OP_SLEEP`), restore to the uninterrupted run's result; the
/// restored guest sleeps on where it left off.
#[test]
fn snapshot_of_a_sleeping_guest_finishes_like_the_straight_run() {
    let cmdline = "ticks=6 seed=12 state_mib=16 dirty_pages=40 alloc_mib=1 tick_us=150000";
    let expected = straight_run(cmdline, MEM);
    for ms in [100, 380] {
        let dir = tempfile::tempdir().unwrap();
        snapshot_after(cmdline, MEM, Duration::from_millis(ms), dir.path());
        assert_eq!(restore_to_end(dir.path()), expected, "snapshot at {ms} ms");
    }
}

#[test]
fn same_snapshot_restored_twice_gives_the_same_result() {
    let expected = straight_run(PACED, MEM);
    let dir = tempfile::tempdir().unwrap();
    snapshot_after(PACED, MEM, Duration::from_millis(200), dir.path());
    assert_eq!(restore_to_end(dir.path()), expected);
    assert_eq!(restore_to_end(dir.path()), expected);
}

#[test]
fn eager_restore_gives_the_same_result() {
    let expected = straight_run(PACED, MEM);
    let dir = tempfile::tempdir().unwrap();
    snapshot_after(PACED, MEM, Duration::from_millis(250), dir.path());
    let opts = RestoreOptions {
        memory: RestoreMemory::Eager,
        ..Default::default()
    };
    let mut vm = Vm::restore_with(dir.path(), &opts, None).expect("eager restore");
    assert_eq!(finish(&mut vm), expected);
}

#[test]
fn restored_guest_can_be_snapshotted_into_its_own_directory() {
    let expected = straight_run(PACED, MEM);
    let dir = tempfile::tempdir().unwrap();
    snapshot_after(PACED, MEM, Duration::from_millis(100), dir.path());
    let mut vm = Vm::restore(dir.path(), false, None).expect("restore");
    std::thread::sleep(Duration::from_millis(150));
    vm.pause().expect("pause restored guest");
    vm.snapshot(dir.path())
        .expect("snapshot over the snapshot it runs from");
    vm.kill();
    assert_eq!(restore_to_end(dir.path()), expected);
}

#[test]
fn large_state_in_a_one_gib_guest() {
    let cmdline = "ticks=12 seed=21 state_mib=256 dirty_pages=100 tick_us=40000";
    let expected = straight_run(cmdline, 1024);
    let dir = tempfile::tempdir().unwrap();
    snapshot_after(cmdline, 1024, Duration::from_millis(250), dir.path());
    let mem_file = std::fs::metadata(dir.path().join("memory.bin")).unwrap();
    assert_eq!(mem_file.len(), 1 << 30, "memory file has the guest's size");
    assert_eq!(restore_to_end(dir.path()), expected);
}

#[test]
fn two_vcpus_snapshot_and_restore() {
    tests::require_kvm();
    let mut cfg = tests::config(PACED, MEM);
    cfg.vcpus = 2;
    let expected = straight_run(PACED, MEM);
    let dir = tempfile::tempdir().unwrap();
    let mut vm = Vm::boot(&cfg).expect("boot");
    std::thread::sleep(Duration::from_millis(200));
    vm.pause().expect("pause");
    vm.snapshot(dir.path()).expect("snapshot with irqchip");
    vm.kill();
    assert_eq!(restore_to_end(dir.path()), expected);
}

#[test]
fn cli_snapshot_then_restore() {
    let expected = straight_run(PACED, MEM);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("snap");
    let d = d.to_str().unwrap();
    let out = forkd(&[
        "run",
        "--cmdline",
        PACED,
        "--snapshot-after-ms",
        "250",
        "--snapshot-dir",
        d,
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    assert!(
        !lines.iter().any(|l| l.starts_with("zone: done")),
        "{lines:?}"
    );
    let snap: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(snap["event"], "snapshot");
    for key in ["pause_ms", "snapshot_write_ms", "boot_to_first_output_ms"] {
        assert!(snap[key].as_f64().is_some(), "{key} missing in {snap}");
    }
    // Guest image and whatever state it had built by then (a loaded
    // machine may snapshot it before the state is complete).
    assert!(snap["memory_bytes_written"].as_u64().unwrap() > 1 << 20);
    assert!(snap["state_bytes"].as_u64().unwrap() > 0);

    let out = forkd(&["restore", d, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    assert!(lines.contains(&expected), "{lines:?} lacks {expected}");
    let r: serde_json::Value = serde_json::from_str(lines.last().unwrap()).unwrap();
    assert_eq!(r["event"], "restore");
    assert!(r["restore_to_first_instruction_ms"].as_f64().is_some());
}

/// A lazily restored guest runs while its memory file is checked in the
/// background: damage stops it with an error naming the chunk, and such a
/// VM cannot be snapshotted (which would give the damage fresh checksums).
#[test]
fn lazy_restore_of_a_damaged_memory_file_fails_the_vm() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    snapshot_after(PACED, MEM, Duration::from_millis(100), dir.path());
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("memory.bin"))
        .unwrap();
    f.write_all_at(&[0xa5; 4096], 8 << 20).unwrap();
    drop(f);
    let mut vm = Vm::restore(dir.path(), false, None).expect("lazy restore starts");
    let exit = vm.wait(Some(tests::WAIT)).expect("wait");
    match &exit {
        VmExit::Failed(why) => assert!(why.contains("is damaged: chunk 4"), "{why}"),
        other => panic!("damaged memory ended as {other:?}"),
    }
    let mut vm = Vm::restore(dir.path(), false, None).expect("lazy restore starts");
    vm.pause().expect("pause");
    let other = tempfile::tempdir().unwrap();
    let err = vm.snapshot(other.path()).expect_err("snapshot refused");
    assert!(format!("{err}").contains("damaged memory file"), "{err}");
    vm.kill();
}
