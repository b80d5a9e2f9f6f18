//! A bench's own local cluster: `forkd cluster up` at the start and
//! `forkd cluster down` whatever happens — the [`Cluster`] guard runs it on
//! drop (normal end, error, panic), and SIGINT/SIGTERM/SIGHUP only set a
//! flag that every wait of the bench checks ([`check_stop`]), so an
//! interrupted run unwinds through the guard too. Also: running a command
//! with a time limit, and the daemons' resident memory.

use anyhow::{bail, Context, Result};
use forkd::api::client::Endpoint;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long `cluster up` and `cluster down` may take.
const CLUSTER_CMD: Duration = Duration::from_secs(120);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Makes SIGINT, SIGTERM and SIGHUP set the stop flag instead of killing
/// the bench, so the cluster guard always runs.
pub fn install_signal_handlers() -> Result<()> {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is
        // async-signal-safe; signal(2) has no other preconditions.
        let old = unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        if old == libc::SIG_ERR {
            bail!(
                "cannot install a handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

/// An error once a stop signal came.
pub fn check_stop() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted by a signal: stopping (the cluster is taken down)");
    }
    Ok(())
}

/// Sleeps `d` in slices, returning early with an error on a stop signal.
pub fn nap(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    loop {
        check_stop()?;
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Runs `cmd` to its end within `limit` (killed and an error after it);
/// stdin closed, stdout and stderr captured.
pub fn run_cmd(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let readers = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .map(|s| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut s) = s {
                let _ = s.read_to_end(&mut v);
            }
            v
        })
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().context("wait for a child")? {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let [out, err] = readers.map(|r| r.join().unwrap_or_default());
    Ok(Output {
        status,
        stdout: out,
        stderr: err,
    })
}

/// What a failed command printed, for an error message.
pub fn describe(o: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout).trim(),
        String::from_utf8_lossy(&o.stderr).trim()
    )
}

/// One host of the cluster, from `cluster status --json`.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub netns: String,
    pub socket: PathBuf,
    pub pid: Option<u32>,
    /// The host's address on the cluster's bridge.
    pub address: Option<std::net::Ipv4Addr>,
}

impl Host {
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }
}

/// A running local cluster; `cluster down` on drop.
pub struct Cluster {
    /// The bench's name, for its messages.
    tag: &'static str,
    forkd: PathBuf,
    pub name: String,
    dir: PathBuf,
    pub hosts: Vec<Host>,
    down: bool,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// `forkd cluster up --hosts N --name <short><pid> --dir <tempdir>`
    /// for the bench `tag` (its messages and temporary directory); `short`
    /// is 1-7 of a-z. The guard exists before `up` runs, so a half-made
    /// cluster is taken down as well.
    pub fn up(forkd: &Path, hosts: u32, tag: &'static str, short: &str) -> Result<Cluster> {
        Self::up_with(forkd, hosts, tag, short, &[])
    }

    /// [`Cluster::up`] with more `cluster up` options (`--policy`,
    /// `--cpu-capacity C`, …).
    pub fn up_with(
        forkd: &Path,
        hosts: u32,
        tag: &'static str,
        short: &str,
        extra: &[String],
    ) -> Result<Cluster> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the {tag} bench needs root: it makes a local cluster (network namespaces)");
        }
        if short.is_empty() || short.len() > 7 || !short.bytes().all(|b| b.is_ascii_lowercase()) {
            bail!("cluster name prefix {short:?}: 1-7 of a-z");
        }
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{tag}-"))
            .tempdir()
            .context("cannot make a temporary directory for the cluster")?;
        // Cluster names are 1-12 of a-z, 0-9.
        let name = format!("{short}{}", std::process::id() % 100_000);
        let mut c = Cluster {
            tag,
            forkd: forkd.to_owned(),
            name,
            dir: tmp.path().join("cluster"),
            hosts: Vec::new(),
            down: false,
            _tmp: tmp,
        };
        eprintln!("{tag}: cluster up: {} hosts ({})", hosts, c.name);
        let n = hosts.to_string();
        let mut args = vec!["up", "--hosts", &n, "--json"];
        args.extend(extra.iter().map(String::as_str));
        let o = c.cluster(&args)?;
        if !o.status.success() {
            bail!("forkd cluster up failed: {}", describe(&o));
        }
        let v: Value = serde_json::from_slice(&o.stdout)
            .with_context(|| format!("cluster up --json printed no JSON: {}", describe(&o)))?;
        c.hosts = parse_hosts(&v)?;
        if c.hosts.len() != hosts as usize {
            bail!("cluster up made {} hosts, not {hosts}: {v}", c.hosts.len());
        }
        Ok(c)
    }

    fn cluster(&self, args: &[&str]) -> Result<Output> {
        let dir = self.dir.to_str().context("the cluster dir is not UTF-8")?;
        let mut all = vec!["cluster", args[0], "--name", &self.name, "--dir", dir];
        all.extend_from_slice(&args[1..]);
        run_cmd(Command::new(&self.forkd).args(&all), CLUSTER_CMD)
    }

    /// `cluster down`; the guard calls it if nobody did.
    pub fn down(&mut self) -> Result<()> {
        if self.down {
            return Ok(());
        }
        self.down = true;
        eprintln!("{}: cluster down ({})", self.tag, self.name);
        let o = self.cluster(&["down"])?;
        if !o.status.success() {
            bail!("forkd cluster down failed: {}", describe(&o));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.down() {
            eprintln!(
                "{}: {e:#}; run `forkd cluster down --name {} --dir {}` by hand",
                self.tag,
                self.name,
                self.dir.display()
            );
        }
    }
}

fn parse_hosts(v: &Value) -> Result<Vec<Host>> {
    let hosts = v["hosts"]
        .as_array()
        .with_context(|| format!("cluster status has no hosts: {v}"))?;
    hosts
        .iter()
        .map(|h| {
            let s = |k: &str| {
                h[k].as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("cluster host without {k}: {h}"))
            };
            Ok(Host {
                name: s("name")?,
                netns: s("netns")?,
                socket: PathBuf::from(s("socket")?),
                pid: h["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
                address: h["address"].as_str().and_then(|a| a.parse().ok()),
            })
        })
        .collect()
}

/// VmRSS of a process in bytes (None if it is gone or unreadable).
pub fn vm_rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_and_bad_status_is_an_error() {
        let v = serde_json::json!({"hosts": [
            {"name": "h1", "netns": "forkd-x-h1", "socket": "/d/h1/api.sock", "pid": 42},
            {"name": "h2", "netns": "forkd-x-h2", "socket": "/d/h2/api.sock"}
        ]});
        let h = parse_hosts(&v).unwrap();
        assert_eq!(h[0].pid, Some(42));
        assert_eq!(h[1].pid, None);
        assert_eq!(h[1].socket, PathBuf::from("/d/h2/api.sock"));
        assert!(parse_hosts(&serde_json::json!({"hosts": [{"name": "h1"}]})).is_err());
        assert!(parse_hosts(&serde_json::json!({})).is_err());
    }

    #[test]
    fn own_rss_is_readable() {
        assert!(vm_rss(std::process::id()).is_some_and(|b| b > 0));
    }
}
