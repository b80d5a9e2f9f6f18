//! QEMU 7.2 running the zone guest ELF (`-M microvm`, isa-debug-exit), and
//! a QMP client; what forkd-bench's QEMU figures and the migrate bench
//! share.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const QEMU: &str = "qemu-system-x86_64";

/// Finds an executable in `$PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `qemu -M microvm … -kernel GUEST -append CMDLINE` with KVM, no display,
/// and the guest's exit through port 0xf4 (status `(code << 1) | 1`).
pub fn command(qemu: &Path, guest: &Path, mem_mib: u64, cmdline: &str) -> Command {
    let mut c = Command::new(qemu);
    c.args([
        "-M",
        "microvm",
        "-enable-kvm",
        "-cpu",
        "host,-arch-capabilities",
    ])
    .args(["-m", &mem_mib.to_string(), "-nographic", "-no-reboot"])
    .args(["-device", "isa-debug-exit,iobase=0xf4", "-kernel"])
    .arg(guest)
    .args(["-append", cmdline]);
    c
}

/// `-qmp` argument: a QMP server on the Unix socket `path`.
pub fn qmp_arg(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", path.display())
}

/// A QMP connection (capabilities negotiated).
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Reads the greeting on a fresh connection and leaves capabilities
    /// negotiation; also the instant the greeting arrived.
    pub fn handshake(stream: UnixStream, timeout: Duration) -> Result<(Qmp, Instant)> {
        stream.set_read_timeout(Some(timeout))?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        let greeting = qmp.read()?;
        let at = Instant::now();
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok((qmp, at))
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).context("reading QMP")?;
        if n == 0 {
            bail!("QMP connection closed");
        }
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    /// Runs a command; events in between are skipped (at most 10,000).
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": cmd });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        writeln!(self.writer, "{msg}").context("writing QMP")?;
        for _ in 0..10_000 {
            let v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {cmd}: {e}");
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
        bail!("QMP {cmd}: no answer among 10,000 events")
    }

    /// `query-status`'s `status` (`running`, `paused`, `inmigrate`, …).
    pub fn status(&mut self) -> Result<String> {
        let r = self.execute("query-status", None)?;
        Ok(r["status"].as_str().unwrap_or("?").to_string())
    }
}
