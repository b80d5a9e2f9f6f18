//! Process-level boot figures: QEMU (and, if present, the forkd CLI) booting
//! the same ELF with the same cmdline, timed from spawn to the first `zone:`
//! line on stdout and to process exit.

use crate::stats::{ms, Report};
use crate::vms::{TINY_CMDLINE, TINY_MEM_MIB, WAIT};
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::{self, sleep};
use std::time::{Duration, Instant};

pub use bench_shared::qemu::{find_in_path, QEMU};

pub fn qemu_command(qemu: &Path, guest: &Path) -> Command {
    bench_shared::qemu::command(qemu, guest, TINY_MEM_MIB, TINY_CMDLINE)
}

pub fn forkd_command(forkd: &Path, guest: &Path) -> Command {
    let mut c = Command::new(forkd);
    c.arg("run")
        .arg("--guest")
        .arg(guest)
        .args(["--mem", &TINY_MEM_MIB.to_string()])
        .args(["--cmdline", TINY_CMDLINE, "--timeout-s", "60"]);
    c
}

/// One timed process run.
struct Run {
    first_byte_ms: f64,
    first_line_ms: f64,
    whole_ms: f64,
}

/// What the stdout reader saw.
enum Out {
    FirstByte(Instant),
    Line(Instant, String),
}

/// Reads stdout in raw chunks (so the first byte is timed, not only the
/// first line) and sends the events; ends at EOF or when nobody listens.
fn read_stdout(mut stdout: impl Read, tx: mpsc::Sender<Out>) {
    let mut buf = [0u8; 4096];
    let mut line = Vec::new();
    let mut any = false;
    loop {
        let n = match stdout.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let t = Instant::now();
        if !any {
            any = true;
            if tx.send(Out::FirstByte(t)).is_err() {
                return;
            }
        }
        for &b in &buf[..n] {
            if b != b'\n' {
                line.push(b);
                continue;
            }
            let text = String::from_utf8_lossy(&line).into_owned();
            line.clear();
            if tx.send(Out::Line(t, text)).is_err() {
                return;
            }
        }
    }
}

/// Kills and reaps a child, ignoring errors (it may have exited already).
fn reap(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd`, times the first stdout line starting with `zone:` and the
/// process exit; `ok_codes` are the exit statuses that count as success.
fn timed_run(mut cmd: Command, ok_codes: &[i32]) -> Result<Run> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().context("cannot spawn")?;
    let stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let out_thread = thread::spawn(move || read_stdout(stdout, tx));
    let err_thread = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = t0 + WAIT;
    let (mut first, mut first_byte) = (None, None);
    let mut done = false;
    let mut timed_out = false;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(Out::FirstByte(t)) => first_byte = Some(t),
            Ok(Out::Line(t, line)) => {
                let line = line.trim_end_matches('\r');
                if line.starts_with("zone:") && first.is_none() {
                    first = Some(t);
                }
                done |= line.starts_with("zone: done");
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }
    // stdout is closed (or we gave up): the process is exiting; bound the
    // wait anyway.
    let status = loop {
        if let Some(s) = child.try_wait().context("waiting for the child")? {
            break Some(s);
        }
        if timed_out || Instant::now() >= deadline {
            break None;
        }
        sleep(Duration::from_micros(200));
    };
    let end = Instant::now();
    if status.is_none() {
        reap(&mut child);
    }
    let _ = out_thread.join();
    let err = err_thread.join().unwrap_or_default();
    let tail: String = err.lines().last().unwrap_or("").chars().take(200).collect();
    let Some(status) = status else {
        bail!("no exit within {WAIT:?} (killed); stderr: {tail:?}");
    };
    let code = status.code().unwrap_or(-1);
    if !ok_codes.contains(&code) || !done {
        bail!("exit status {code}, guest finished: {done}; stderr: {tail:?}");
    }
    let first = first.context("no `zone:` line on stdout")?;
    let first_byte = first_byte.context("no stdout")?;
    Ok(Run {
        first_byte_ms: ms(first_byte - t0),
        first_line_ms: ms(first - t0),
        whole_ms: ms(end - t0),
    })
}

/// Runs `make()` `runs` times and records its two figures under `label`.
fn process_runs(
    report: &mut Report,
    label: &str,
    runs: usize,
    ok_codes: &[i32],
    make: impl Fn() -> Command,
) -> Result<()> {
    let (mut byte, mut first, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let r = timed_run(make(), ok_codes).with_context(|| format!("{label} run {i}"))?;
        byte.push(r.first_byte_ms);
        first.push(r.first_line_ms);
        whole.push(r.whole_ms);
    }
    report.add(&format!("{label} spawn to first output"), "ms", &byte);
    report.add(&format!("{label} spawn to first line"), "ms", &first);
    report.add(&format!("{label} whole run (spawn to exit)"), "ms", &whole);
    Ok(())
}

/// QEMU figures and the qemu/forkd ratio (the forkd boot figures must be
/// in `report` already for the ratio).
pub fn qemu(
    report: &mut Report,
    guest: &Path,
    runs: usize,
    forkd_bin: Option<&Path>,
) -> Result<()> {
    let Some(qemu) = find_in_path(QEMU) else {
        report.skip(format!("{QEMU} not found"));
        return Ok(());
    };
    eprintln!("qemu: {runs} runs of {} `{TINY_CMDLINE}`", qemu.display());
    // isa-debug-exit: status (v << 1) | 1, so a guest exit 0 is status 1.
    process_runs(report, "qemu", runs, &[1], || qemu_command(&qemu, guest))?;
    if let Some(forkd) = forkd_bin {
        eprintln!("qemu: {runs} runs of the forkd CLI {}", forkd.display());
        process_runs(report, "forkd CLI process", runs, &[0], || {
            forkd_command(forkd, guest)
        })?;
    }
    // (figure, QEMU figure, forkd figure), each "<vmm> <what>".
    let first_out = "spawn to first output";
    let first_line = "spawn to first line";
    let whole = "whole run (spawn to exit)";
    let pairs = [
        ("first output", first_out, "boot to first output"),
        ("first line", first_line, "boot to first console line"),
        ("whole run", whole, "boot whole run (to guest exit)"),
        (
            "CLI, first line",
            first_line,
            "CLI process spawn to first line",
        ),
        (
            "CLI, whole run",
            whole,
            "CLI process whole run (spawn to exit)",
        ),
    ];
    for (name, q, f) in pairs {
        let q = report.median(&format!("qemu {q}"));
        let f = report.median(&format!("forkd {f}"));
        if let (Some(q), Some(f)) = (q, f) {
            report.add(&format!("ratio qemu/forkd {name}"), "x", &[q / f]);
        }
    }
    Ok(())
}
