//! Figure 6: QEMU restoring the zone guest from a saved state
//! (`migrate "exec:cat > FILE"` of a stopped VM, then `-incoming "exec:cat
//! FILE"`), against forkd's clone start and forkd's lazy snapshot restore of
//! the same guest. QEMU is driven over QMP on a Unix socket in a temporary
//! directory; every QEMU started here is quit or killed, and reaped.

use crate::fork::clone_start_name;
use crate::stats::{ms, Report};
use crate::vms;
use anyhow::{bail, ensure, Context, Result};
use bench_shared::qemu::{command, find_in_path, qmp_arg, Qmp, QEMU};
use forkd::vmm::RestoreMemory;
use serde_json::{json, Value};
use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const CMDLINE: &str = "ticks=100000 tick_us=1000 state_mib=16";
const MEM_MIB: u64 = 512;
/// The guest runs this long before it is saved (QEMU and forkd alike).
const SAVE_AFTER: Duration = Duration::from_millis(300);
const LIMIT: Duration = Duration::from_secs(30);

/// A QEMU process that is killed and reaped when dropped.
struct Qemu {
    child: Child,
    stderr: PathBuf,
}

impl Qemu {
    fn spawn(qemu: &Path, guest: &Path, dir: &Path, name: &str, extra: &[&str]) -> Result<Qemu> {
        let stderr = dir.join(format!("{name}.stderr"));
        let child = command(qemu, guest, MEM_MIB, CMDLINE)
            .arg("-qmp")
            .arg(qmp_arg(&sock(dir, name)))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).context("QEMU stderr file")?)
            .spawn()
            .with_context(|| format!("cannot spawn {}", qemu.display()))?;
        Ok(Qemu { child, stderr })
    }

    fn stderr_tail(&self) -> String {
        let s = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail: Vec<&str> = s.lines().rev().take(3).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Asks QEMU to quit, then waits (bounded) and kills it if needed.
    fn quit(mut self, qmp: Option<&mut Qmp>) {
        if let Some(q) = qmp {
            let _ = q.execute("quit", None);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.qmp"))
}

/// Connects to a starting QEMU's QMP socket (retrying every 200 µs) and
/// reads the greeting; also the instant the greeting arrived.
fn connect(q: &mut Qemu, path: &Path) -> Result<(Qmp, Instant)> {
    let deadline = Instant::now() + LIMIT;
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) => {
                if let Some(st) = q.child.try_wait()? {
                    bail!("QEMU exited ({st}) before QMP was up: {}", q.stderr_tail());
                }
                if Instant::now() >= deadline {
                    bail!("no QMP socket within {LIMIT:?}: {e}");
                }
                sleep(Duration::from_micros(200));
            }
        }
    };
    Qmp::handshake(stream, Duration::from_secs(10))
}

/// Boots the guest under QEMU, stops it after [`SAVE_AFTER`] and saves it
/// with `migrate "exec:cat > FILE"`; returns the file and the migration's
/// own figures (total-time in ms).
fn qemu_save(qemu: &Path, guest: &Path, dir: &Path) -> Result<(PathBuf, Value)> {
    let t0 = Instant::now();
    let mut q = Qemu::spawn(qemu, guest, dir, "save", &[])?;
    let (mut qmp, _) = connect(&mut q, &sock(dir, "save"))?;
    sleep(SAVE_AFTER.saturating_sub(t0.elapsed()));
    let status = qmp.status()?;
    ensure!(
        status == "running",
        "QEMU guest is {status:?} before the save"
    );
    qmp.execute("stop", None)?;
    let file = dir.join("state");
    let uri = format!("exec:cat > {}", file.display());
    qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let deadline = Instant::now() + LIMIT;
    let info = loop {
        let r = qmp.execute("query-migrate", None)?;
        match r["status"].as_str() {
            Some("completed") => break r,
            Some("failed") | Some("cancelled") => {
                bail!(
                    "QEMU migrate to file failed: {r}; stderr: {}",
                    q.stderr_tail()
                )
            }
            _ if Instant::now() >= deadline => bail!("QEMU migrate not done in {LIMIT:?}: {r}"),
            _ => sleep(Duration::from_millis(2)),
        }
    };
    q.quit(Some(&mut qmp));
    Ok((file, info))
}

/// One QEMU restore: spawn → QMP greeting, → state loaded (status leaves
/// `inmigrate`), → running (after `cont` if the saved run state was
/// paused); checks the guest is still running 50 ms later.
fn qemu_restore(qemu: &Path, guest: &Path, dir: &Path, state: &Path, i: usize) -> Result<[f64; 4]> {
    let name = format!("restore{i}");
    let incoming = format!("exec:cat {}", state.display());
    let t0 = Instant::now();
    let mut q = Qemu::spawn(qemu, guest, dir, &name, &["-incoming", &incoming])?;
    let (mut qmp, greeted) = connect(&mut q, &sock(dir, &name))?;
    let deadline = Instant::now() + LIMIT;
    let (status, loaded) = loop {
        let s = qmp.status()?;
        if s != "inmigrate" {
            break (s, Instant::now());
        }
        ensure!(
            Instant::now() < deadline,
            "QEMU still inmigrate after {LIMIT:?}"
        );
        sleep(Duration::from_micros(500));
    };
    let running = match status.as_str() {
        "running" => loaded,
        "paused" => {
            qmp.execute("cont", None)?;
            let s = qmp.status()?;
            ensure!(s == "running", "QEMU is {s:?} after cont");
            Instant::now()
        }
        s => bail!(
            "QEMU is {s:?} after loading the state; stderr: {}",
            q.stderr_tail()
        ),
    };
    sleep(Duration::from_millis(50));
    let s = qmp.status()?;
    ensure!(
        s == "running",
        "the restored QEMU guest is {s:?} 50 ms after resuming"
    );
    q.quit(Some(&mut qmp));
    Ok([
        ms(greeted - t0),
        ms(loaded - t0),
        ms(running - t0),
        ms(running - greeted),
    ])
}

/// forkd: the same guest and run time, paused, snapshotted, and restored
/// lazily `restores` times (restore call → first KVM_RUN).
fn forkd_restore(guest: &Path, dir: &Path, restores: usize) -> Result<Vec<f64>> {
    let mut vm = vms::boot_running(guest, MEM_MIB, CMDLINE)?;
    sleep(SAVE_AFTER.saturating_sub(vm.times.started.elapsed()));
    let snap = dir.join("forkd-snap");
    let saved = vm
        .pause()
        .context("pause before snapshot")
        .and_then(|_| vm.snapshot(&snap).context("snapshot"));
    vm.kill();
    drop(vm);
    saved?;
    vms::restore_runs(&snap, restores, RestoreMemory::Lazy)
}

pub fn compare(report: &mut Report, guest: &Path, restores: usize) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("forkd-bench-qemu")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = tmp.path();
    eprintln!("fork: forkd lazy restore of `{CMDLINE}` ({MEM_MIB} MiB), {restores} restores");
    let lazy = forkd_restore(guest, dir, restores)?;
    let lazy = report.add("forkd lazy restore→1st run, same guest", "ms", &lazy);
    let Some(qemu) = find_in_path(QEMU) else {
        report.skip(format!("{QEMU} not found: no QEMU restore figures"));
        return Ok(());
    };
    eprintln!("fork: QEMU save and {restores} -incoming restores of `{CMDLINE}`");
    let (state, info) = match qemu_save(&qemu, guest, dir) {
        Ok(x) => x,
        Err(e) => {
            report.skip(format!("QEMU save failed: {e:#}"));
            return Ok(());
        }
    };
    let bytes = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
    report.add(
        "qemu saved state file",
        "MiB",
        &[bytes as f64 / (1u64 << 20) as f64],
    );
    if let Some(t) = info["total-time"].as_f64() {
        report.add("qemu migrate to file (stopped VM)", "ms", &[t]);
    }
    let mut rows: [Vec<f64>; 4] = Default::default();
    for i in 0..restores {
        let r = qemu_restore(&qemu, guest, dir, &state, i)
            .with_context(|| format!("QEMU restore {i}"))?;
        for (row, v) in rows.iter_mut().zip(r) {
            row.push(v);
        }
    }
    report.add("qemu -incoming: spawn→QMP greeting", "ms", &rows[0]);
    report.add("qemu -incoming: spawn→state loaded", "ms", &rows[1]);
    let running = report.add("qemu -incoming: spawn→running", "ms", &rows[2]);
    let greeted = report.add("qemu -incoming: QMP greeting→running", "ms", &rows[3]);
    // QEMU's spawn→running includes its process start and QMP; from the
    // greeting on it leaves out the process start. forkd's figures are in
    // process: no process start, no control channel.
    let clone = report.median(&clone_start_name(1));
    for (what, q) in [("spawn→running", running), ("greeting→running", greeted)] {
        if let (Some(q), Some(c)) = (q, clone) {
            let name = format!("ratio qemu {what}/forkd clone start");
            report.add(&name, "x", &[q / c]);
        }
        if let (Some(q), Some(l)) = (q, lazy) {
            let name = format!("ratio qemu {what}/forkd lazy restore");
            report.add(&name, "x", &[q / l]);
        }
    }
    Ok(())
}
