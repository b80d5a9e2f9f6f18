//! The same ELF and cmdline give the same checksum under forkd and QEMU.

use tests::{forkd, qemu_done_line, stdout_lines, straight_run};

const MEM: u64 = 512;

fn same_as_qemu(cmdline: &str) {
    let ours = straight_run(cmdline, MEM);
    let theirs = qemu_done_line(cmdline, MEM);
    assert_eq!(ours, theirs, "forkd and QEMU disagree for '{cmdline}'");
}

#[test]
fn small_state_default_seed() {
    same_as_qemu("ticks=30 state_mib=16");
}

#[test]
fn other_seed_with_alloc_and_dirty_pages() {
    same_as_qemu("ticks=20 seed=42 state_mib=16 alloc_mib=4 dirty_pages=50");
}

#[test]
fn large_state() {
    same_as_qemu("ticks=4 seed=7 state_mib=256 dirty_pages=300 alloc_mib=2");
}

#[test]
fn straight_line_clone_stand_in() {
    same_as_qemu("ticks=25 seed=9 state_mib=16 fork_at=10 clones=4 as_clone=3");
}

#[test]
fn cli_prints_the_same_line_and_exits_zero() {
    let cmdline = "ticks=15 seed=11 state_mib=16 dirty_pages=5";
    let out = forkd(&["run", "--cmdline", cmdline, "--name", "zone1", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    let done = lines
        .iter()
        .find(|l| l.starts_with("[zone1] zone: done"))
        .unwrap_or_else(|| panic!("no prefixed done line in {lines:?}"));
    let summary: serde_json::Value =
        serde_json::from_str(lines.last().expect("json line")).expect("last line is JSON");
    assert_eq!(summary["exit_code"], 0);
    assert!(summary["boot_to_first_output_ms"].as_f64().unwrap() > 0.0);
    let theirs = qemu_done_line(cmdline, MEM);
    assert_eq!(done.trim_start_matches("[zone1] "), theirs);
}
