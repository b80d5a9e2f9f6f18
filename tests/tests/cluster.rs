//! `forkd cluster up|status|down`: a local cluster of hosts on this
//! machine, each a network namespace with its own `forkd serve`. Needs
//! root (namespaces) and /dev/kvm. The hosts reach each other's TCP API
//! with the cluster's token (401 without), a VM created on h1 ends with
//! QEMU's checksum, multicast crosses the bridge, and `down` leaves
//! nothing behind, also after a daemon was killed and a namespace deleted
//! by hand. Every cluster here has its own name and is removed even when
//! a test fails (a guard runs `down`).

#[allow(dead_code)]
#[path = "api/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "api/schema.rs"]
mod schema;

use serde_json::Value;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};
use tests::{forkd_bin, qemu_done_line, require_kvm, run_with_timeout};

/// Fails the test (never skips it) without root.
fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the cluster tests need root (network namespaces, veth, bridge); run them as root"
    );
    require_kvm();
}

/// A cluster name nobody else uses: `t` + pid + a counter (≤ 12 chars).
fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("t{:x}{n}", std::process::id() % 0xff_ffff)
}

fn forkd(args: &[&str]) -> Output {
    run_with_timeout(Command::new(forkd_bin()).args(args), tests::WAIT)
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ip(args: &[&str]) -> String {
    let o = Command::new("ip").args(args).output().expect("run ip");
    assert!(o.status.success(), "ip {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// What of the root namespace the cluster must never change.
fn root_network() -> String {
    [
        ip(&["-br", "link"]),
        ip(&["-br", "addr"]),
        ip(&["-4", "route", "show", "table", "all"]),
    ]
    .join("\n")
}

/// The namespaces of cluster `name` that exist.
fn namespaces_of(name: &str) -> Vec<String> {
    let prefix = format!("forkd-{name}-");
    ip(&["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// A live (not zombie) process.
fn process_alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        let state = s
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().next());
        !matches!(state, Some("Z" | "X"))
    })
}

/// A cluster made for one test; `down` runs on drop, whatever happened.
struct Cluster {
    name: String,
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Cluster {
    fn up(hosts: u32) -> (Cluster, Value) {
        require_root();
        let parent = tempfile::tempdir().expect("tempdir");
        let c = Cluster {
            name: unique_name(),
            dir: parent.path().join("cluster"),
            _parent: parent,
        };
        let o = c.run(&["up", "--hosts", &hosts.to_string(), "--json"]);
        assert!(o.status.success(), "cluster up: {}", text(&o));
        let v: Value = serde_json::from_slice(&o.stdout)
            .unwrap_or_else(|e| panic!("cluster up --json: {e}: {}", text(&o)));
        (c, v)
    }

    /// `forkd cluster SUB --name N --dir D ARGS...`.
    fn run(&self, args: &[&str]) -> Output {
        let dir = self.dir.to_str().expect("utf-8 dir");
        let mut all = vec!["cluster", args[0], "--name", &self.name, "--dir", dir];
        all.extend_from_slice(&args[1..]);
        forkd(&all)
    }

    fn status(&self) -> Value {
        let o = self.run(&["status", "--json"]);
        assert!(o.status.success(), "cluster status: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)))
    }

    fn down(&self) -> Output {
        self.run(&["down"])
    }

    fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("token"))
            .expect("token file")
            .trim()
            .to_owned()
    }

    /// Checks that nothing of the cluster is left.
    fn assert_gone(&self, pids: &[u64], sockets: &[PathBuf]) {
        assert_eq!(namespaces_of(&self.name), Vec::<String>::new());
        for p in pids {
            assert!(!process_alive(*p), "daemon {p} still runs");
        }
        for s in sockets {
            assert!(!s.exists(), "{} left behind", s.display());
        }
        assert!(!self.dir.exists(), "{} left behind", self.dir.display());
        let st = self.status();
        assert_eq!(st["state"], "absent", "{st}");
        assert_eq!(st["hosts"], serde_json::json!([]));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let o = self.down();
        if !o.status.success() {
            eprintln!("cleanup of cluster {}: {}", self.name, text(&o));
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns` (setns
/// changes only the calling thread's namespace).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace file we hold open; it changes this
        // thread's network namespace only, and the thread ends after `f`.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in the namespace")
}

fn hosts(st: &Value) -> Vec<Value> {
    st["hosts"].as_array().expect("hosts").clone()
}

fn pids(st: &Value) -> Vec<u64> {
    hosts(st)
        .iter()
        .map(|h| h["pid"].as_u64().expect("pid"))
        .collect()
}

fn sockets(st: &Value) -> Vec<PathBuf> {
    hosts(st)
        .iter()
        .map(|h| PathBuf::from(h["socket"].as_str().expect("socket")))
        .collect()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

/// Polls `GET path` on a Unix socket until `done` holds.
fn poll(socket: &Path, path: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
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

/// One datagram from `from`'s namespace to a group, received in every
/// namespace of `to` (joined on its host's address).
fn multicast(from: &Value, to: &[Value], group: Ipv4Addr, port: u16) {
    let ready = Arc::new(Barrier::new(to.len() + 1));
    let (tx, rx) = mpsc::channel();
    let mut receivers = Vec::new();
    for h in to {
        let ns = h["netns"].as_str().expect("netns").to_owned();
        let addr: Ipv4Addr = h["address"].as_str().expect("address").parse().expect("ip");
        let (ready, tx, name) = (ready.clone(), tx.clone(), h["name"].clone());
        receivers.push(std::thread::spawn(move || {
            in_netns(&ns, move || {
                let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                    .expect("bind the receiver");
                s.join_multicast_v4(&group, &addr).expect("join the group");
                s.set_read_timeout(Some(Duration::from_millis(200)))
                    .expect("timeout");
                ready.wait();
                let mut buf = [0u8; 64];
                let t = Instant::now();
                while t.elapsed() < Duration::from_secs(10) {
                    if let Ok((n, src)) = s.recv_from(&mut buf) {
                        let _ = tx.send((name.clone(), buf[..n].to_vec(), src));
                        return;
                    }
                }
            })
        }));
    }
    drop(tx);
    let ns = from["netns"].as_str().expect("netns").to_owned();
    let src: Ipv4Addr = from["address"]
        .as_str()
        .expect("address")
        .parse()
        .expect("ip");
    let sent = in_netns(&ns, move || {
        let s = UdpSocket::bind(SocketAddrV4::new(src, 0)).expect("bind the sender");
        s.set_multicast_ttl_v4(1).expect("ttl");
        ready.wait();
        // Datagrams may be lost: a few, until the receivers are done.
        for _ in 0..50 {
            s.send_to(b"forkd-cluster", SocketAddrV4::new(group, port))
                .expect("send to the group");
            std::thread::sleep(Duration::from_millis(20));
        }
        s.local_addr().expect("sender address")
    });
    let got: Vec<_> = rx.iter().collect();
    for r in receivers {
        r.join().expect("receiver");
    }
    assert_eq!(
        got.len(),
        to.len(),
        "receivers that got the datagram: {got:?}"
    );
    for (name, data, from_addr) in got {
        assert_eq!(data, b"forkd-cluster", "{name}");
        assert_eq!(from_addr.ip(), sent.ip(), "{name}: source address");
    }
}

#[test]
fn local_cluster_serves_and_goes_away() {
    let before = root_network();
    let (c, up) = Cluster::up(3);
    let st = c.status();
    assert_eq!(st["state"], "running", "{st}");
    assert_eq!(up["hosts"], st["hosts"]);
    let hs = hosts(&st);
    assert_eq!(hs.len(), 3, "{st}");
    let net: Vec<u8> = hs[0]["address"]
        .as_str()
        .and_then(|a| a.parse::<Ipv4Addr>().ok())
        .expect("address")
        .octets()
        .to_vec();
    assert_eq!(&net[..2], &[10, 77], "private test subnet: {st}");
    for (h, i) in hs.iter().zip(1..) {
        assert_eq!(h["name"], format!("h{i}"));
        assert_eq!(h["state"], "running", "{h}");
        assert_eq!(h["netns"], format!("forkd-{}-h{i}", c.name));
        assert_eq!(
            h["address"],
            Ipv4Addr::new(10, 77, net[2], i as u8).to_string()
        );
        let sock = PathBuf::from(h["socket"].as_str().expect("socket"));
        assert_eq!(mode(&sock), 0o600, "{}", sock.display());
        assert_eq!(mode(sock.parent().expect("host dir")), 0o700);
        assert!(process_alive(h["pid"].as_u64().expect("pid")));
    }
    // The token: 32 random bytes in hex, only root can read it.
    let token = c.token();
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    assert_eq!(mode(&c.dir.join("token")), 0o600);
    assert_eq!(mode(&c.dir.join("state.json")), 0o600);
    assert_eq!(mode(&c.dir), 0o700);
    // Nothing changed in the root namespace.
    assert_eq!(root_network(), before, "the root namespace changed");
    let table = c.run(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert!(
        table.contains("HOST") && table.contains("running"),
        "{table}"
    );

    // h2 reaches h1's TCP API with the token, and only with it.
    let h1_tcp = hs[0]["tcp"].as_str().expect("tcp").to_owned();
    let h2_ns = hs[1]["netns"].as_str().expect("netns").to_owned();
    let (ok, none, wrong) = {
        let (tcp, tok) = (h1_tcp.clone(), token.clone());
        in_netns(&h2_ns, move || {
            let bearer = format!("Bearer {tok}");
            let wrong = format!("Bearer {}", "0".repeat(64));
            (
                client::call_tcp_with(&tcp, "GET", "/v1/vms", &[("Authorization", &bearer)]),
                client::call_tcp_with(&tcp, "GET", "/v1/vms", &[]),
                client::call_tcp_with(&tcp, "GET", "/v1/vms", &[("Authorization", &wrong)]),
            )
        })
    };
    assert_eq!(ok.status, 200, "{:?}", String::from_utf8_lossy(&ok.body));
    assert_eq!(ok.json()["vms"], serde_json::json!([]));
    assert_eq!(none.status, 401);
    assert!(none.error().contains("Bearer"), "{}", none.error());
    assert_eq!(wrong.status, 401);
    // From the root namespace, h1's address is not h1 (no route leads to
    // the bridge; whatever answers there, if anything, is not forkd).
    let addr: SocketAddr = h1_tcp.parse().expect("tcp address");
    if let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        use std::io::{Read, Write};
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let _ = s.write_all(b"GET /v1/vms HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.take(8192).read_to_end(&mut buf);
        let answer = String::from_utf8_lossy(&buf);
        assert!(
            !answer.contains("unauthorized") && !answer.contains("\"vms\""),
            "h1's API answers from the root namespace: {answer}"
        );
    }

    // A VM created through h1's Unix socket ends with QEMU's checksum.
    let cmdline = "ticks=40 seed=5 state_mib=4 tick_us=2000";
    let h1_sock = PathBuf::from(hs[0]["socket"].as_str().expect("socket"));
    let body = format!(r#"{{"cmdline": "{cmdline}", "mem_mib": 64}}"#);
    let r = client::call_unix(&h1_sock, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let v = poll(&h1_sock, &format!("/v1/vms/{id}"), tests::WAIT, |v| {
        v["state"] == "exited"
    });
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(v["last_line"], qemu_done_line(cmdline, 64).as_str());
    // h2's daemon is another one: it does not have h1's VM.
    let h2_sock = PathBuf::from(hs[1]["socket"].as_str().expect("socket"));
    let r = client::call_unix(&h2_sock, "GET", "/v1/vms", None);
    assert_eq!(r.json()["vms"], serde_json::json!([]));

    // Multicast from h1 reaches h2 and h3 over the bridge.
    let group = Ipv4Addr::new(239, 77, net[2], 1);
    multicast(&hs[0], &hs[1..], group, 47_700);

    // A second `up` refuses clearly.
    let again = c.run(&["up", "--hosts", "3"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exists") && err.contains("cluster down"),
        "{err}"
    );
    assert_eq!(c.status()["state"], "running");

    // Down removes everything; a second down has nothing to do.
    let o = c.down();
    assert!(o.status.success(), "down: {}", text(&o));
    c.assert_gone(&pids(&st), &sockets(&st));
    assert_eq!(root_network(), before, "the root namespace changed");
    let o = c.down();
    assert!(o.status.success(), "second down: {}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nothing to remove"),
        "{}",
        text(&o)
    );
}

#[test]
fn down_cleans_up_after_a_crash() {
    let (c, st) = Cluster::up(3);
    let hs = hosts(&st);
    // h1's daemon killed, h2's namespace deleted by hand (its daemon runs
    // on in a namespace nobody can name).
    let h1_pid = hs[0]["pid"].as_u64().expect("pid");
    // SAFETY: kill(2) on the daemon's pid; no memory is involved.
    assert_eq!(
        unsafe { libc::kill(h1_pid as libc::pid_t, libc::SIGKILL) },
        0
    );
    ip(&["netns", "delete", hs[1]["netns"].as_str().expect("netns")]);
    let t = Instant::now();
    while process_alive(h1_pid) {
        assert!(t.elapsed() < Duration::from_secs(10), "SIGKILL took long");
        std::thread::sleep(Duration::from_millis(10));
    }
    let now = c.status();
    assert_eq!(now["state"], "degraded", "{now}");
    let states: Vec<String> = hosts(&now)
        .iter()
        .map(|h| h["state"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(states, ["dead", "missing", "running"], "{now}");
    // `up` on the half-made cluster refuses and says what to do.
    let again = c.run(&["up", "--hosts", "3"]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("h1 dead") && err.contains("h2 missing") && err.contains("cluster down"),
        "{err}"
    );
    let o = c.down();
    assert!(o.status.success(), "down: {}", text(&o));
    c.assert_gone(&pids(&st), &sockets(&st));
}

#[test]
fn down_works_without_a_valid_state_file() {
    let (c, st) = Cluster::up(2);
    // `down` with another cluster's name on this directory refuses and
    // touches nothing.
    let dir = c.dir.to_str().expect("utf-8 dir");
    let o = forkd(&["cluster", "down", "--name", "someother", "--dir", dir]);
    assert!(!o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("holds the state of cluster"), "{err}");
    assert_eq!(c.status()["state"], "running");
    // A damaged state file: down finds the cluster by its namespaces.
    std::fs::write(c.dir.join("state.json"), b"{ not json").expect("overwrite");
    let o = c.run(&["status", "--json"]);
    assert!(
        !o.status.success(),
        "status on a damaged state: {}",
        text(&o)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("not valid"),
        "{}",
        text(&o)
    );
    let o = c.down();
    assert!(o.status.success(), "down: {}", text(&o));
    c.assert_gone(&pids(&st), &sockets(&st));
}

#[test]
fn cluster_refusals_are_clear() {
    require_root();
    for (args, why) in [
        (
            &["cluster", "up", "--hosts", "0", "--name", "x"][..],
            "1 to 64 hosts",
        ),
        (
            &["cluster", "up", "--hosts", "2", "--name", "Bad-Name"],
            "a-z and 0-9",
        ),
        (&["cluster", "status", "--name", "a/b"], "a-z and 0-9"),
        (&["cluster", "down", "--name", ""], "a-z and 0-9"),
    ] {
        let o = forkd(args);
        assert!(!o.status.success(), "{args:?}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
}
