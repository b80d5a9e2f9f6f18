//! QEMU 7.2 as the reference: the same zone guest ELF and cmdline under
//! `qemu-system-x86_64 -M microvm`, migrated between two QEMU processes of
//! this machine over loopback (`-incoming tcp:127.0.0.1:PORT`, QMP sockets
//! for both), with the same downtime budget and bandwidth cap as forkd's
//! run. Downtime and total time are QMP `query-migrate`'s; the checksum is
//! the destination's last console line. Every process is killed and reaped
//! when its guard drops (also on errors and signals), and dies with this
//! process (`PR_SET_PDEATHSIG`).

use crate::record::checksum;
use anyhow::{bail, Context, Result};
use bench_shared::cluster::{check_stop, nap};
pub use bench_shared::qemu::QEMU;
use bench_shared::qemu::{command, find_in_path, qmp_arg, Qmp};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// QEMU's `max-bandwidth` when the bench asks for no cap (QEMU's default,
/// 32 MiB/s in 7.2, would be the bottleneck).
const NO_CAP_BYTES_S: u64 = 100 << 30;
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// QEMU, if it is installed.
pub fn find() -> Option<PathBuf> {
    find_in_path(QEMU)
}

/// One QEMU process; killed and reaped on drop.
struct Proc {
    child: Child,
    /// Console lines, as they came, with the instant they were read.
    lines: Receiver<(Instant, String)>,
    seen: Vec<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn spawn(
        qemu: &Path,
        guest: &Path,
        mem_mib: u64,
        cmdline: &str,
        extra: &[&str],
    ) -> Result<Proc> {
        let mut c = command(qemu, guest, mem_mib, cmdline);
        c.args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only prctl(2), which is async-signal-safe; it touches no
        // memory of the parent.
        unsafe {
            c.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = c
            .spawn()
            .with_context(|| format!("cannot start {}", qemu.display()))?;
        let out = child.stdout.take().context("QEMU's stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                let line = line.trim_end_matches('\r').to_owned();
                if tx.send((Instant::now(), line)).is_err() {
                    return;
                }
            }
        });
        Ok(Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// Waits up to `limit` for a console line starting with `prefix`; its
    /// instant and text. An error if QEMU ends first.
    fn wait_line(&mut self, prefix: &str, limit: Duration) -> Result<(Instant, String)> {
        let end = Instant::now() + limit;
        loop {
            check_stop()?;
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "QEMU printed no `{prefix}` line within {limit:?}: {:?}",
                    self.tail()
                );
            }
            match self.lines.recv_timeout(left.min(Duration::from_millis(50))) {
                Ok((t, l)) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Ok((t, l));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("QEMU ended before a `{prefix}` line: {:?}", self.tail())
                }
            }
        }
    }

    fn tail(&self) -> Vec<String> {
        self.seen.iter().rev().take(3).rev().cloned().collect()
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// Connects to a starting QEMU's QMP socket (the socket appears once QEMU
/// is up).
fn connect(path: &Path) -> Result<Qmp> {
    let t = Instant::now();
    let s = loop {
        match UnixStream::connect(path) {
            Ok(s) => break s,
            Err(e) if t.elapsed() > QMP_TIMEOUT => bail!("QMP {}: {e}", path.display()),
            Err(_) => nap(Duration::from_millis(10))?,
        }
    };
    Ok(Qmp::handshake(s, QMP_TIMEOUT)?.0)
}

/// A QEMU run of a guest to its end: start line → done line, and the line.
pub fn straight(
    qemu: &Path,
    guest: &Path,
    mem_mib: u64,
    cmdline: &str,
    limit: Duration,
) -> Result<(Duration, String)> {
    let mut p = Proc::spawn(qemu, guest, mem_mib, cmdline, &[])?;
    let (t0, _) = p.wait_line("zone: start", Duration::from_secs(30))?;
    let (t1, line) = p.wait_line("zone: done", limit)?;
    Ok((t1 - t0, line))
}

/// What QEMU's migration took.
#[derive(Debug, Default)]
pub struct Migrated {
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub setup_ms: Option<f64>,
    pub bytes: Option<u64>,
    pub rounds: Option<u64>,
    pub done_line: String,
    pub migrated_after: Duration,
}

impl Migrated {
    pub fn checksum(&self) -> Option<String> {
        checksum(&self.done_line)
    }
}

/// What to migrate and how.
pub struct Job<'a> {
    pub qemu: &'a Path,
    pub guest: &'a Path,
    pub mem_mib: u64,
    pub cmdline: &'a str,
    pub migrate_after: Duration,
    pub downtime_ms: u64,
    pub bandwidth_mib_s: u64,
    /// Bound on the migration (request → completed).
    pub budget: Duration,
    /// Bound on the whole guest run.
    pub run_limit: Duration,
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("a free loopback port")?;
    Ok(l.local_addr()?.port())
}

fn ms(v: &Value, key: &str) -> Option<f64> {
    v[key].as_f64()
}

/// Boots the guest in a source QEMU and an incoming QEMU, migrates it
/// `migrate_after` its start line, and waits for its done line on the
/// destination.
pub fn migrate(j: &Job) -> Result<Migrated> {
    let dir = tempfile::Builder::new().prefix("migrate-qemu-").tempdir()?;
    let port = free_port()?;
    let (src_sock, dst_sock) = (dir.path().join("src.qmp"), dir.path().join("dst.qmp"));
    let incoming = format!("tcp:127.0.0.1:{port}");
    let (dq, sq) = (qmp_arg(&dst_sock), qmp_arg(&src_sock));
    let mut dst = Proc::spawn(
        j.qemu,
        j.guest,
        j.mem_mib,
        j.cmdline,
        &["-qmp", &dq, "-incoming", &incoming],
    )?;
    // Up (and so listening) once its QMP answers.
    drop(connect(&dst_sock).context("the destination QEMU")?);
    let mut src = Proc::spawn(j.qemu, j.guest, j.mem_mib, j.cmdline, &["-qmp", &sq])?;
    let mut qmp = connect(&src_sock).context("the source QEMU")?;
    let bw = match j.bandwidth_mib_s {
        0 => NO_CAP_BYTES_S,
        m => m << 20,
    };
    qmp.execute(
        "migrate-set-parameters",
        Some(json!({"downtime-limit": j.downtime_ms, "max-bandwidth": bw})),
    )?;
    let (started, _) = src.wait_line("zone: start", Duration::from_secs(30))?;
    nap((started + j.migrate_after).saturating_duration_since(Instant::now()))?;
    if src.exited() {
        bail!("the guest ended on the source before the migration started");
    }
    let migrated_after = started.elapsed();
    let asked = Instant::now();
    qmp.execute("migrate", Some(json!({ "uri": incoming })))?;
    let info = loop {
        let v = qmp.execute("query-migrate", None)?;
        match v["status"].as_str() {
            Some("completed") => break v,
            Some(s @ ("failed" | "cancelled")) => {
                bail!(
                    "QEMU's migration {s}: {}",
                    v["error-desc"].as_str().unwrap_or_default()
                )
            }
            _ => {}
        }
        if asked.elapsed() > j.budget {
            let _ = qmp.execute("migrate_cancel", None);
            bail!(
                "QEMU's migration did not complete within {:?} (downtime-limit {} ms): {}; \
                 cancelled",
                j.budget,
                j.downtime_ms,
                v["ram"]
            );
        }
        if src.exited() {
            bail!("the guest ended on the source before QEMU's migration completed");
        }
        nap(POLL)?;
    };
    drop(qmp);
    drop(src);
    let left = j.run_limit.saturating_sub(started.elapsed());
    let (_, done_line) = dst.wait_line("zone: done", left.max(Duration::from_secs(5)))?;
    Ok(Migrated {
        downtime_ms: ms(&info, "downtime"),
        total_ms: ms(&info, "total-time"),
        setup_ms: ms(&info, "setup-time"),
        bytes: info["ram"]["transferred"].as_u64(),
        rounds: info["ram"]["dirty-sync-count"].as_u64(),
        done_line,
        migrated_after,
    })
}
