//! `forkd vm migrate --wait` as a person and a script see it: with stderr
//! on a terminal (a pseudo-terminal here) an indicatif progress bar, with
//! stderr a pipe (CI, logs) progress lines, with `--json` nothing but the
//! final JSON; then the report with the downtime's parts. Real daemons of
//! a local cluster; needs root and /dev/kvm.

#[allow(dead_code)]
#[path = "api/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "remote/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "api/schema.rs"]
mod schema;

use common::*;
use serde_json::Value;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use tests::{forkd_bin, qemu_done_line, run_with_timeout};

const LIMIT: Duration = Duration::from_secs(60);

fn migrate_cmd(c: &Cluster, id: &str, from: &str, to: &str, extra: &[&str]) -> Command {
    let dir = c.dir.to_str().expect("dir").to_owned();
    let mut cmd = Command::new(forkd_bin());
    cmd.args(["vm", "migrate", id, "--host", from, "--to", to, "--wait"])
        .args(["--cluster", &c.name, "--cluster-dir", &dir])
        .args(extra);
    cmd
}

/// Runs `cmd` with stderr on a fresh pseudo-terminal (120 columns); its
/// stdout and what the terminal showed.
fn run_on_a_terminal(mut cmd: Command) -> (Output, String) {
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the locals; no name buffer, no
    // termios, a valid winsize.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just opened by openpty and are owned here only.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("forkd vm migrate");
    // The command kept its copy of the slave: the child's must be the only
    // one, so that reads end (EIO) when it exits.
    drop(cmd);
    let mut term = File::from(master);
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = term.read(&mut buf) {
            if n == 0 {
                break;
            }
            v.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&v).into_owned()
    });
    let mut out = child.stdout.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if t.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("forkd vm migrate did not end within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let stdout = out_reader.join().unwrap_or_default();
    let shown = reader.join().unwrap_or_default();
    (
        Output {
            status,
            stdout,
            stderr: Vec::new(),
        },
        shown,
    )
}

/// The report's text: the downtime with its parts, total, rounds, bytes.
fn check_report(stdout: &str, id: &str, to: &str) {
    assert!(
        stdout.contains(&format!("{id} → {to}: committed")),
        "{stdout}"
    );
    for part in [
        "downtime ",
        "pause ",
        "last round ",
        "state ",
        "destination resume ",
        "total ",
        "pre-copy rounds",
        "MiB sent",
    ] {
        assert!(stdout.contains(part), "no '{part}' in the report: {stdout}");
    }
    assert!(stdout.contains(&format!("on {to} as {id}")), "{stdout}");
}

/// A bar on a terminal (h1→h2), lines on a pipe (h2→h1), only JSON with
/// `--json` (h1→h2); the guest ends with QEMU's line.
#[test]
fn migrate_wait_shows_a_bar_on_a_terminal_and_lines_otherwise() {
    let (c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h2 = socket(&hs[1]);
    let cmdline = "ticks=1400 seed=9 state_mib=16 dirty_pages=16 tick_us=5000";
    let id = start_vm(&socket(&hs[0]), cmdline);
    // A cap keeps it going long enough for the bar to draw a few times.
    let capped = ["--bandwidth-mib-s", "60"];

    let (o, shown) = run_on_a_terminal(migrate_cmd(&c, &id, "h1", "h2", &capped));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{stdout}\n{shown}");
    assert!(shown.contains(&format!("migrating {id}")), "{shown}");
    assert!(shown.contains("ETA"), "{shown}");
    assert!(shown.contains("MiB/s"), "{shown}");
    assert!(shown.contains("[=="), "no bar drawn: {shown}");
    assert!(shown.contains("round"), "{shown}");
    assert!(!shown.contains("forkd: "), "lines on a terminal: {shown}");
    check_report(&stdout, &id, "h2");

    let o = run_with_timeout(&mut migrate_cmd(&c, &id, "h2", "h1", &capped), LIMIT);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{}", text(&o));
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(
        lines.iter().any(
            |l| l.starts_with(&format!("forkd: {id} precopy round ")) && l.contains("MiB sent")
        ),
        "{stderr}"
    );
    assert!(
        !stderr.contains("ETA") && !stderr.contains('\x1b'),
        "{stderr}"
    );
    check_report(&stdout, &id, "h1");

    let o = run_with_timeout(&mut migrate_cmd(&c, &id, "h1", "h2", &["--json"]), LIMIT);
    assert!(o.status.success(), "{}", text(&o));
    assert!(o.stderr.is_empty(), "{}", text(&o));
    let v: Value = serde_json::from_slice(&o.stdout).expect("only JSON on stdout");
    assert_eq!(v["phase"], "committed", "{v}");
    assert!(v["populated_bytes"].as_u64() > Some(16 << 20), "{v}");
    assert_eq!(v["report"]["destination_vm"], id.as_str());

    let v = poll(&h2, &format!("/v1/vms/{id}"), tests::WAIT, |v| {
        v["state"] == "exited"
    });
    assert_eq!(v["last_line"], qemu_done_line(cmdline, MEM).as_str(), "{v}");
}
