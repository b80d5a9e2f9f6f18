//! Cluster state in etcd: `forkd cluster up` starts the cluster's etcd on
//! the bridge and every daemon registers there under a lease and publishes
//! its load; a host whose daemon dies drops out within the lease's TTL;
//! with etcd gone the daemons run their VMs on, and register again when it
//! is back. Real etcd, real daemons in network namespaces. Needs root and
//! /dev/kvm; fails clearly without.

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
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::qemu_done_line;

/// The daemons' lease (`forkd serve --etcd-ttl-s`, the default).
const TTL: Duration = Duration::from_secs(3);

fn cluster(sock: &Path) -> client::Response {
    client::call_unix(sock, "GET", "/v1/cluster", None)
}

fn names(v: &Value) -> Vec<String> {
    v["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .map(|h| h["name"].as_str().expect("name").to_owned())
        .collect()
}

/// Waits (bounded) until `h1`'s view of the cluster satisfies `done`.
fn until(sock: &Path, limit: Duration, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let t = Instant::now();
    loop {
        let r = cluster(sock);
        if r.status == 200 && done(&r.json()) {
            return r.json();
        }
        assert!(
            t.elapsed() < limit,
            "{what} within {limit:?}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kill9(pid: u64) {
    // SAFETY: kill(2) on a pid this test's cluster started; no memory.
    let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    assert_eq!(rc, 0, "kill {pid}: {}", std::io::Error::last_os_error());
}

/// Every host registers with its addresses and load; killing h3's daemon
/// (SIGKILL: no goodbye) drops it from the cluster within the TTL (plus
/// one renewal period of slack), and the others stay.
#[test]
fn hosts_register_and_a_dead_host_drops_out_within_the_ttl() {
    let (_c, up) = Cluster::up(3);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    assert_eq!(up["etcd"]["running"], true, "{up}");
    let v = until(
        &h1,
        Duration::from_secs(10),
        "three hosts with loads",
        |v| {
            names(v) == ["h1", "h2", "h3"]
                && v["hosts"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|h| h["load"].is_object()))
        },
    );
    assert_eq!(v["etcd"]["registered"], true, "{v}");
    for (h, rec) in v["hosts"].as_array().expect("hosts").iter().zip(&hs) {
        assert_eq!(h["api"], rec["tcp"], "{h}");
        assert!(h["load"]["capacity_cores"].as_f64() >= Some(1.0), "{h}");
    }
    let pid = hs[2]["pid"].as_u64().expect("h3's pid");
    kill9(pid);
    let t = Instant::now();
    until(&h1, TTL + Duration::from_secs(3), "h3 dropped out", |v| {
        names(v) == ["h1", "h2"]
    });
    eprintln!(
        "h3 dropped out {:?} after SIGKILL (TTL {TTL:?})",
        t.elapsed()
    );
}

fn leaders(socks: &[&Path]) -> usize {
    socks
        .iter()
        .filter(|s| {
            let r = client::call_unix(s, "GET", "/v1/policy", None);
            r.status == 200 && r.json()["leader"] == true
        })
        .count()
}

/// etcd gone: the cluster view fails clearly (502), the policy controller
/// stops acting (no leader within the TTL), the daemons run their VMs on
/// (one ends with QEMU's line) and a fork still works; etcd back (same
/// data): the daemons register again by themselves and a leader is
/// elected again.
#[test]
fn etcd_unreachable_the_daemons_keep_running_their_vms() {
    let (c, up) = Cluster::up_with(2, &["--policy", "--policy-period-ms", "300"]);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    until(&h1, Duration::from_secs(10), "two hosts", |v| {
        names(v) == ["h1", "h2"]
    });
    let t = Instant::now();
    while leaders(&[&h1, &h2]) != 1 {
        assert!(t.elapsed() < Duration::from_secs(10), "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
    let cmdline = "ticks=300 seed=21 state_mib=8 dirty_pages=8 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    kill9(up["etcd"]["pid"].as_u64().expect("etcd pid"));
    let t = Instant::now();
    loop {
        let r = cluster(&h1);
        if r.status == 502 {
            assert!(r.error().contains("etcd"), "{}", r.error());
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no 502 while etcd is down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The leader cannot renew its lease: it stops acting.
    while leaders(&[&h1, &h2]) != 0 {
        assert!(
            t.elapsed() < TTL + Duration::from_secs(3),
            "a controller still leads without etcd"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The VM runs on and forks; its clones run too.
    let r = client::call_unix(
        &h1,
        "POST",
        &format!("/v1/vms/{id}/fork"),
        Some(r#"{"clones": 1}"#),
    );
    assert_eq!(r.status, 200, "fork without etcd: {}", r.error());
    let v = poll(
        &h1,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(60),
        |v| v["state"] == "exited",
    );
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(v["last_line"], qemu_done_line(cmdline, MEM).as_str(), "{v}");
    // etcd back, as `cluster up` ran it: the daemons register again.
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(c.dir.join("state.json")).expect("state file"),
    )
    .expect("state json");
    let e = &state["etcd"];
    let arg = |k: &str| e[k].as_str().expect(k).to_owned();
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(arg("log"))
        .expect("etcd log");
    let mut etcd = Command::new("ip")
        .args([
            "netns",
            "exec",
            state["bridge_netns"].as_str().expect("netns"),
            "etcd",
        ])
        .args(["--name", state["name"].as_str().expect("name")])
        .args(["--data-dir", &arg("data_dir")])
        .args(["--listen-client-urls", &arg("client_url")])
        .args(["--advertise-client-urls", &arg("client_url")])
        .args(["--listen-peer-urls", &arg("peer_url")])
        .args(["--initial-advertise-peer-urls", &arg("peer_url")])
        .args([
            "--initial-cluster",
            &format!(
                "{}={}",
                state["name"].as_str().expect("name"),
                arg("peer_url")
            ),
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("restart etcd");
    let back = until(&h1, Duration::from_secs(20), "both hosts again", |v| {
        names(v) == ["h1", "h2"] && v["etcd"]["sessions"].as_u64() >= Some(2)
    });
    eprintln!("after etcd came back: {}", back["etcd"]);
    let t = Instant::now();
    while leaders(&[&h1, &h2]) != 1 {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no leader after etcd came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // `down` stops it with the rest; reap our child.
    drop(c);
    let _ = etcd.wait();
}

/// Kills a daemon started by `forkd serve` when dropped.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A restarted daemon hands out no VM id that runs elsewhere: h1's first
/// VM migrates to h2; h1's daemon is killed and started again with the
/// same command line in its namespace; once it has registered, the VM it
/// makes gets a fresh id of its share (vm-3), not vm-1, which runs on h2.
#[test]
fn a_restarted_daemon_does_not_reuse_an_id_that_runs_elsewhere() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let id = start_vm(&h1, "ticks=100000 seed=3 state_mib=1 tick_us=10000");
    assert_eq!(id, "vm-1");
    let done = migrate_and_wait(&h1, &id, "h2", Duration::from_secs(60));
    assert_eq!(done["phase"], "committed", "{done}");
    until(&h1, Duration::from_secs(10), "h2 reports vm-1", |v| {
        v["hosts"].as_array().is_some_and(|hs| {
            hs.iter().any(|h| {
                h["name"] == "h2"
                    && h["load"]["vms"]
                        .as_array()
                        .is_some_and(|vs| vs.iter().any(|vm| vm["id"] == "vm-1"))
            })
        })
    });
    // h1's daemon dies and comes back with the same command line.
    let pid = hs[0]["pid"].as_u64().expect("h1's pid");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("h1's cmdline");
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    kill9(pid);
    let ns = hs[0]["netns"].as_str().expect("netns");
    let t = Instant::now();
    let _daemon = loop {
        // Its ports free up once the killed process is gone.
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("restart h1's daemon");
        let mut d = Daemon(child);
        let up = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            client::call_unix(&h1, "GET", "/v1/host", None).status == 200
        });
        if up {
            break d;
        }
        assert!(
            d.0.try_wait().ok().flatten().is_some() && t.elapsed() < Duration::from_secs(20),
            "h1's daemon did not come back"
        );
    };
    // Registered again (its VM ids checked against the cluster's).
    until(&h2, Duration::from_secs(10), "h1 registered again", |v| {
        v["hosts"].as_array().is_some_and(|hs| {
            hs.iter().any(|h| {
                h["name"] == "h1" && h["load"]["vms"].as_array().is_some_and(|v| v.is_empty())
            })
        })
    });
    let again = start_vm(&h1, "ticks=100 seed=4 state_mib=1 tick_us=1000");
    assert_eq!(again, "vm-3", "h1 handed out {again} after its restart");
    for (s, v) in [(&h1, &again), (&h2, &id)] {
        let _ = client::call_unix(s, "DELETE", &format!("/v1/vms/{v}"), None);
    }
}
