//! Shared by the cluster tests: a local cluster per test (`cluster down`
//! on drop), polling a daemon's API, starting a zone VM, the fork tick,
//! and nftables inside a host's namespace.

use super::client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tests::{forkd_bin, require_kvm, run_with_timeout};

pub const MEM: u64 = 512;

pub fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the remote fork tests need root (a local cluster: network namespaces); run them as root"
    );
    require_kvm();
}

pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("r{:x}{n}", std::process::id() % 0xff_ffff)
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A cluster for one test; `down` runs on drop, whatever happened.
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Cluster {
    pub fn up(hosts: u32) -> (Cluster, Value) {
        Self::up_with(hosts, &[])
    }

    /// `up` with more `forkd cluster up` arguments (`--policy`, …).
    pub fn up_with(hosts: u32, extra: &[&str]) -> (Cluster, Value) {
        require_root();
        let parent = tempfile::tempdir().expect("tempdir");
        let c = Cluster {
            name: unique_name(),
            dir: parent.path().join("cluster"),
            _parent: parent,
        };
        let n = hosts.to_string();
        let mut args = vec!["up", "--hosts", &n, "--json"];
        args.extend_from_slice(extra);
        let o = c.run(&args);
        assert!(o.status.success(), "cluster up: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("cluster up --json: {e}: {}", text(&o)));
        (c, v)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let dir = self.dir.to_str().expect("utf-8 dir");
        let mut all = vec!["cluster", args[0], "--name", &self.name, "--dir", dir];
        all.extend_from_slice(&args[1..]);
        run_with_timeout(Command::new(forkd_bin()).args(&all), tests::WAIT)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let o = self.run(&["down"]);
        if !o.status.success() {
            eprintln!("cleanup of cluster {}: {}", self.name, text(&o));
        }
    }
}

pub fn socket(h: &Value) -> PathBuf {
    PathBuf::from(h["socket"].as_str().expect("socket"))
}

/// Polls `GET path` on a Unix socket until `done` holds.
pub fn poll(socket: &Path, path: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let r = client::call_unix(socket, "GET", path, None);
        assert_eq!(r.status, 200, "GET {path}: {}", r.error());
        let v = r.json();
        if done(&v) {
            return v;
        }
        assert!(t.elapsed() < limit, "{path} within {limit:?}; last: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn all_ended(v: &Value) -> bool {
    v["state"] == "exited"
        && v["families"].as_array().is_some_and(|fs| {
            fs.iter().all(|f| {
                f["running"] == 0
                    && f["clones"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().all(|c| c["state"] != "running"))
            })
        })
}

/// Creates a VM on `sock` and waits until its guest runs.
/// Polls `GET /v1/vms/{id}/migration` on `sock` until the migration has
/// ended (committed, aborted or in doubt; post-copy included).
pub fn migration_end(sock: &Path, id: &str, limit: Duration) -> Value {
    poll(sock, &format!("/v1/vms/{id}/migration"), limit, |v| {
        matches!(
            v["phase"].as_str(),
            Some("committed" | "aborted" | "in_doubt")
        )
    })
}

pub fn start_vm(sock: &Path, cmdline: &str) -> String {
    let body = format!(r#"{{"cmdline": "{cmdline}", "mem_mib": {MEM}}}"#);
    let r = client::call_unix(sock, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    poll(
        sock,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(30),
        |v| v["console_lines"].as_u64() >= Some(2),
    );
    id
}

/// The tick the parent saw the host's fork at (it notices at its next
/// tick, which on a busy machine may come after its clones have ended:
/// looked for up to 10 s).
pub fn fork_tick(sock: &Path, id: &str) -> u64 {
    let t = Instant::now();
    loop {
        let r = client::call_unix(sock, "GET", &format!("/v1/vms/{id}/console"), None);
        let lines: Vec<String> = serde_json::from_value(r.json()["lines"].clone()).expect("lines");
        let tick = lines.iter().find_map(|l| {
            l.strip_prefix("zone: forked by the host before tick ")?
                .strip_suffix(": clone=0")?
                .parse()
                .ok()
        });
        match tick {
            Some(tick) => return tick,
            None if t.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            None => panic!("the parent did not see the fork: {lines:?}"),
        }
    }
}

/// Runs `nft` inside a host's network namespace (nftables from Debian's
/// packages; scripts/setup.sh installs it).
pub fn nft_in(netns: &str, args: &[&str]) -> String {
    let mut all = vec!["netns", "exec", netns, "nft"];
    all.extend_from_slice(args);
    let o = run_with_timeout(Command::new("ip").args(&all), Duration::from_secs(10));
    assert!(o.status.success(), "nft {args:?} in {netns}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Drops `pct` % of the UDP datagrams arriving in `netns` (nftables; this
/// kernel has no netem).
pub fn add_udp_loss(netns: &str, pct: u32) {
    nft_in(netns, &["add", "table", "inet", "loss"]);
    nft_in(
        netns,
        &[
            "add",
            "chain",
            "inet",
            "loss",
            "input",
            "{ type filter hook input priority 0; }",
        ],
    );
    let pct = pct.to_string();
    nft_in(
        netns,
        &[
            "add", "rule", "inet", "loss", "input", "meta", "l4proto", "udp", "numgen", "random",
            "mod", "100", "<", &pct, "counter", "drop",
        ],
    );
}

/// The datagrams the loss rule of `netns` has dropped.
pub fn udp_dropped(netns: &str) -> u64 {
    let rules = nft_in(netns, &["list", "table", "inet", "loss"]);
    rules
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Waits for the VM `id` on `sock` and all its clones to end, checks the
/// parent's and every clone's final line against QEMU's straight-line run
/// of the same cmdline (`as_clone=I`), and returns the VM's detail.
pub fn expect_qemu_lines(sock: &Path, id: &str, cmdline: &str, clones: u64) -> Value {
    let v = poll(sock, &format!("/v1/vms/{id}"), tests::WAIT, all_ended);
    let tick = fork_tick(sock, id);
    let oracle = |i: u64| {
        tests::qemu_done_line(
            &format!("{cmdline} fork_at={tick} clones={clones} as_clone={i}"),
            MEM,
        )
    };
    assert_eq!(v["last_line"], oracle(0).as_str(), "parent {id}");
    let list = v["families"][0]["clones"].as_array().expect("clones");
    assert_eq!(list.len() as u64, clones, "{v}");
    for (c, i) in list.iter().zip(1u64..) {
        assert_eq!(c["state"], "exited", "{id} clone {i}: {c}");
        assert_eq!(c["last_line"], oracle(i).as_str(), "{id} clone {i}: {c}");
    }
    v
}

/// h1's daemon (the parent's, with its memory server) is killed while
/// h2's clones still fault their 128 MiB in: they fail with an error
/// naming the memory server within seconds; nothing hangs.
pub fn memory_servers_host_dies(distribution: &str) {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    // A large zone state: h2's clones still fetch it when h1 dies.
    let cmdline = "ticks=400 seed=3 state_mib=128 dirty_pages=16 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    let body =
        format!(r#"{{"clones": 2, "hosts": {{"h2": 2}}, "distribution": "{distribution}"}}"#);
    let r = client::call_unix(&h1, "POST", &format!("/v1/vms/{id}/fork"), Some(&body));
    assert_eq!(r.status, 200, "fork: {}", r.error());
    poll(&h2, "/v1/vms", Duration::from_secs(30), |v| {
        v["vms"].as_array().is_some_and(|vs| vs.len() == 2)
    });
    let pid = hs[0]["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) on the pid of h1's daemon, which this test's cluster
    // started; the cluster guard cleans up after a dead daemon.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = Instant::now();
    let v = poll(&h2, "/v1/vms", Duration::from_secs(20), |v| {
        v["vms"]
            .as_array()
            .is_some_and(|vs| vs.iter().all(|v| v["state"] == "exited"))
    });
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "{:?}: {v}",
        t.elapsed()
    );
    for c in v["vms"].as_array().expect("vms") {
        assert_eq!(c["exit"]["code"], 103, "{c}");
        let why = c["exit"]["reason"].as_str().unwrap_or_default();
        assert!(
            why.contains("memory server") || why.contains("multicast"),
            "{why}"
        );
    }
}

/// Forks the VM `id` on `sock` with the fork request `body`.
pub fn fork(sock: &Path, id: &str, body: &str) {
    let r = client::call_unix(sock, "POST", &format!("/v1/vms/{id}/fork"), Some(body));
    assert_eq!(r.status, 200, "fork {id}: {}", r.error());
}

/// 10 % of every UDP datagram arriving at h2 and h3 is dropped; a zone on
/// h1 forked into 2 clones on each by `distribution`: every VM ends with
/// QEMU's line and the drops happened. Returns the parent's detail.
pub fn fork_under_ten_percent_loss(distribution: &str) -> Value {
    let (_c, up) = Cluster::up(3);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    for h in &hs[1..] {
        add_udp_loss(h["netns"].as_str().expect("netns"), 10);
    }
    let cmdline = "ticks=60 seed=13 state_mib=8 dirty_pages=8 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    fork(
        &h1,
        &id,
        &format!(
            r#"{{"clones": 4, "hosts": {{"h2": 2, "h3": 2}}, "distribution": "{distribution}"}}"#
        ),
    );
    let v = expect_qemu_lines(&h1, &id, cmdline, 4);
    for h in &hs[1..] {
        let ns = h["netns"].as_str().expect("netns");
        assert!(udp_dropped(ns) > 0, "no datagram dropped in {ns}");
    }
    v
}

/// Two families forked at once from two parents on h1 by `distribution`,
/// their clones placed by `hosts` (JSON counts) over h1..h3: each clone
/// ends with its own family's QEMU line (no clone ever sees the other
/// family's pages). Returns both parents' details.
pub fn two_families_at_once(distribution: &str, hosts: &str) -> Vec<Value> {
    let (_c, up) = Cluster::up(3);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    let cmdlines = [
        "ticks=60 seed=21 state_mib=8 dirty_pages=8 tick_us=5000",
        "ticks=60 seed=22 state_mib=8 dirty_pages=8 tick_us=5000",
    ];
    let ids: Vec<String> = cmdlines.iter().map(|c| start_vm(&h1, c)).collect();
    let body = format!(r#"{{"clones": 4, "hosts": {hosts}, "distribution": "{distribution}"}}"#);
    for id in &ids {
        fork(&h1, id, &body);
    }
    ids.iter()
        .zip(cmdlines)
        .map(|(id, cmdline)| expect_qemu_lines(&h1, id, cmdline, 4))
        .collect()
}

/// Runs `f` on a thread inside network namespace `ns` (threads it starts
/// are inside too).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: setns on a namespace file we opened; it changes the
        // network namespace of this thread only.
        let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread")
}

/// Migrates VM `id` from the daemon at `from` to host `to` through the
/// API and waits (polling every 20 ms, at most `limit`) for the end; the
/// final status.
pub fn migrate_and_wait(from: &Path, id: &str, to: &str, limit: Duration) -> Value {
    let body = format!(r#"{{"destination": "{to}"}}"#);
    let r = client::call_unix(from, "POST", &format!("/v1/vms/{id}/migrate"), Some(&body));
    assert_eq!(r.status, 202, "migrate {id} to {to}: {}", r.error());
    migration_end(from, id, limit)
}
