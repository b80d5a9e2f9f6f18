//! The same ELF and cmdline give the same checksum under forkd and QEMU.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::{done_line, forkd, qemu_done_line, stdout_lines, straight_run};

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
fn every_page_dirtied_every_tick() {
    same_as_qemu("ticks=20 seed=23 state_mib=8 dirty_all=1");
}

#[test]
fn large_state() {
    same_as_qemu("ticks=4 seed=7 state_mib=256 dirty_pages=300 alloc_mib=2");
}

#[test]
fn straight_line_clone_stand_in() {
    same_as_qemu("ticks=25 seed=9 state_mib=16 fork_at=10 clones=4 as_clone=3");
}

/// Runs `forkd run` on `cmdline` and returns its done line and the host
/// CPU time (user + sys) it used, from wait4's rusage (wait4 reaps it,
/// which clippy cannot see).
#[allow(clippy::zombie_processes)]
fn forkd_run_cpu(cmdline: &str) -> (String, Duration) {
    tests::require_kvm();
    let mut child = Command::new(tests::forkd_bin())
        .args(["run", "--mem", "64", "--cmdline", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start forkd run");
    let pid = child.id() as libc::pid_t;
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped")
        .read_to_string(&mut out)
        .expect("read forkd's output");
    let mut status = 0;
    // SAFETY: wait4 writes only the status and the rusage we pass; the pid
    // is our own child, not yet reaped (std reaps only in wait/try_wait).
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::wait4(pid, &mut status, 0, &mut ru), pid, "wait4");
        ru
    };
    assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let lines: Vec<String> = out.lines().map(str::to_owned).collect();
    (done_line(&lines), tv(ru.ru_utime) + tv(ru.ru_stime))
}

#[test]
fn paced_by_sleep_matches_qemu_and_spinning_and_leaves_the_cpu_idle() {
    // 100 ticks of 15 ms: 1.5 s, the zone idle most of each tick.
    let cmdline = "ticks=100 seed=17 state_mib=2 dirty_pages=20 tick_us=15000";
    let (asleep, asleep_cpu) = forkd_run_cpu(cmdline);
    let (spinning, _) = forkd_run_cpu(&format!("{cmdline} pace_spin=1"));
    assert_eq!(asleep, qemu_done_line(cmdline, 64), "forkd asleep vs QEMU");
    assert_eq!(asleep, spinning, "asleep vs spinning");
    // Spinning would burn the whole 1.5 s (as much of it as a loaded host
    // lets it have, so it is not compared); asleep costs the zone's work
    // and one hypercall per tick (~0.2 ms each on this nested KVM), plus
    // boot: ~0.1 s.
    assert!(
        asleep_cpu < Duration::from_millis(400),
        "a zone paced asleep used {asleep_cpu:?} of host CPU in a 1.5 s run"
    );
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
