//! The policy controller on a local cluster: every daemon is a candidate,
//! etcd elects one; an overloaded host gets exactly one migration, which
//! completes, and the loads even out; killing the leader hands leadership
//! to another within the lease's TTL, never two at once. Real etcd, real
//! daemons, real VMs. Needs root and /dev/kvm; fails clearly without.

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
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Thresholds for these tests: no forks (a flat-out zone VM would look
/// like one VM's worth of demand), migrations as the defaults.
const NO_FORK: &str = r#"{"fork_above": 50, "fork_target": 25, "join_below": 10}"#;
const TTL: Duration = Duration::from_secs(3);

fn get(sock: &Path, path: &str) -> Value {
    let r = client::call_unix(sock, "GET", path, None);
    assert_eq!(r.status, 200, "GET {path}: {}", r.error());
    r.json()
}

/// A zone VM with a steady load: an 8 MiB state scanned every 8 ms tick
/// (~2 ms of work), about a quarter of a core whatever else the machine
/// does (a flat-out guest would take whatever CPU is free instead).
fn zone_vm(sock: &Path, seed: u32) -> String {
    let body = format!(
        r#"{{"cmdline": "ticks=1000000 seed={seed} state_mib=8 tick_us=8000", "mem_mib": 128}}"#
    );
    let r = client::call_unix(sock, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    r.json()["id"].as_str().expect("id").to_owned()
}

fn migrations(decisions: &Value) -> Vec<Value> {
    decisions
        .as_array()
        .expect("decisions")
        .iter()
        .filter(|d| d["decision"]["action"] == "migrate")
        .cloned()
        .collect()
}

fn leaders(socks: &[PathBuf]) -> Vec<String> {
    socks
        .iter()
        .filter_map(|s| {
            let r = client::call_unix(s, "GET", "/v1/policy", None);
            (r.status == 200 && r.json()["leader"] == true)
                .then(|| r.json()["host"].as_str().unwrap_or_default().to_owned())
        })
        .collect()
}

/// h1 runs two zones of ~0.25 cores each on a 0.5-core capacity (load
/// ~1.0 > 0.85), h2 none: the leader migrates one zone h1→h2 (auto mode),
/// once; the migration completes and both hosts end at about the same
/// load, below the high-water mark.
#[test]
fn an_overloaded_host_gets_exactly_one_migration_and_the_loads_even_out() {
    let (_c, up) = Cluster::up_with(
        2,
        &[
            "--policy",
            "--policy-period-ms",
            "500",
            "--cpu-capacity",
            "0.5",
            "--policy-config",
            NO_FORK,
        ],
    );
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let a = zone_vm(&h1, 1);
    let b = zone_vm(&h1, 2);
    let t = Instant::now();
    let moved = loop {
        let d = get(&h1, "/v1/policy/decisions");
        let m = migrations(&d);
        if let Some(first) = m.first() {
            break first.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no migration decided; cluster: {}",
            get(&h1, "/v1/cluster")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("decision after {:?}: {moved}", t.elapsed());
    let zone = moved["decision"]["zone"].as_str().expect("zone").to_owned();
    assert!(zone == a || zone == b, "{moved}");
    assert_eq!(moved["decision"]["from"], "h1");
    assert_eq!(moved["decision"]["to"], "h2");
    assert_eq!(moved["outcome"], "done", "{moved}");
    assert!(moved["decision"]["reason"]
        .as_str()
        .is_some_and(|r| r.contains("overloaded")));
    // The migration completes: the zone runs on h2.
    let done = migration_end(&h1, &zone, Duration::from_secs(60));
    assert_eq!(done["phase"], "committed", "{done}");
    let dest = done["report"]["destination_vm"]
        .as_str()
        .expect("dest")
        .to_owned();
    let on_h2 = get(&h2, &format!("/v1/vms/{dest}"));
    assert_eq!(on_h2["state"], "running", "{on_h2}");
    // Loads even out (each host one busy zone), and nothing more moves.
    let t = Instant::now();
    let even = loop {
        let v = get(&h1, "/v1/cluster");
        let loads: Vec<f64> = v["hosts"]
            .as_array()
            .expect("hosts")
            .iter()
            .filter_map(|h| {
                Some(h["load"]["cpu_cores"].as_f64()? / h["load"]["capacity_cores"].as_f64()?)
            })
            .collect();
        let max = loads.iter().copied().fold(0.0, f64::max);
        if loads.len() == 2 && (loads[0] - loads[1]).abs() <= 0.3 * max && max < 0.85 {
            break loads;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "loads did not even out: {v}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("loads after: {even:?}");
    std::thread::sleep(Duration::from_secs(4));
    let all = migrations(&get(&h2, "/v1/policy/decisions"));
    assert_eq!(all.len(), 1, "more than one migration: {all:?}");
    for (s, id) in [(&h1, &a), (&h1, &b), (&h2, &dest)] {
        let _ = client::call_unix(s, "DELETE", &format!("/v1/vms/{id}"), None);
    }
}

/// One leader among three candidates; its daemon killed (SIGKILL), another
/// leads within the TTL plus a renewal, and at no sample do two lead.
#[test]
fn killing_the_leader_hands_over_within_the_ttl() {
    let (_c, up) = Cluster::up_with(3, &["--policy", "--policy-period-ms", "300"]);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let socks: Vec<PathBuf> = hs.iter().map(socket).collect();
    let t = Instant::now();
    let first = loop {
        let l = leaders(&socks);
        assert!(l.len() <= 1, "two leaders: {l:?}");
        if l.len() == 1 {
            break l[0].clone();
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no leader elected");
        std::thread::sleep(Duration::from_millis(100));
    };
    let i = hs
        .iter()
        .position(|h| h["name"] == first.as_str())
        .expect("leader host");
    let pid = hs[i]["pid"].as_u64().expect("pid");
    // SAFETY: kill(2) on a daemon of this test's cluster; no memory.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let rest: Vec<PathBuf> = socks
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i)
        .map(|(_, s)| s.clone())
        .collect();
    let next = loop {
        let l = leaders(&rest);
        assert!(l.len() <= 1, "two leaders: {l:?}");
        if l.len() == 1 {
            break l[0].clone();
        }
        assert!(
            killed.elapsed() < TTL + Duration::from_secs(3),
            "no new leader within {:?}",
            TTL + Duration::from_secs(3)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("{first} killed; {next} leads after {:?}", killed.elapsed());
    assert_ne!(next, first);
    // It stays the only one.
    for _ in 0..10 {
        assert_eq!(leaders(&rest), std::slice::from_ref(&next));
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A zone whose demand is more than one VM serves (thresholds scaled down
/// so the zone counts as that: its vCPU uses 0.08–0.25 cores here, by the
/// machine's load) is forked by the leader, and its
/// clones go to the least loaded host with room — idle h2, not the zone's
/// own h1 (which keeps the parent): the decision carries the placement and
/// h2 runs its clones.
#[test]
fn a_forked_zones_clones_go_to_the_least_loaded_host() {
    let (_c, up) = Cluster::up_with(
        2,
        &[
            "--policy",
            "--policy-period-ms",
            "500",
            "--cpu-capacity",
            "2",
            "--policy-config",
            // Any demand above 0.03 cores, for two periods in a row (not
            // only the boot's burst), forks into max_clones.
            r#"{"fork_above": 0.03, "fork_target": 0.01, "join_below": 0.005, "max_clones": 2}"#,
            "--dirty-sample-every-ms",
            "1000",
            "--dirty-window-ms",
            "300",
        ],
    );
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let zone = zone_vm(&h1, 7);
    let t = Instant::now();
    let fork = loop {
        let d = get(&h1, "/v1/policy/decisions");
        let f =
            d.as_array().expect("decisions").iter().find(|d| {
                d["decision"]["action"] == "fork" && d["decision"]["zone"] == zone.as_str()
            });
        if let Some(f) = f {
            break f.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no fork decided; cluster: {}",
            get(&h1, "/v1/cluster")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("decision after {:?}: {fork}", t.elapsed());
    assert_eq!(fork["outcome"], "done", "{fork}");
    assert_eq!(fork["decision"]["clones"], 2, "{fork}");
    let placement = fork["decision"]["placement"]
        .as_object()
        .expect("placement");
    let on = |h: &str| placement.get(h).and_then(Value::as_u64).unwrap_or(0);
    assert_eq!(on("h1") + on("h2"), 2, "{fork}");
    assert!(on("h2") >= 1, "no clone on idle h2: {fork}");
    // h2 runs them, as clones of h1's zone.
    let clones = poll(&h2, "/v1/vms", Duration::from_secs(10), |v| {
        v["vms"].as_array().is_some_and(|vs| {
            vs.iter()
                .filter(|c| c["parent_host"] == "h1" && c["state"] == "running")
                .count() as u64
                == on("h2")
        })
    });
    eprintln!("h2's VMs: {clones}");
    // The zone's dirty rate reaches etcd (the policy's view), windows
    // going on while its clones read its frozen image.
    let t = Instant::now();
    let dirty = loop {
        let v = get(&h1, "/v1/cluster");
        let d = v["hosts"].as_array().and_then(|hs| {
            hs.iter()
                .filter_map(|h| h["load"]["vms"].as_array())
                .flatten()
                .find(|vm| vm["id"] == zone.as_str())
                .and_then(|vm| vm["load"]["dirty_pages_per_s"].as_f64())
        });
        if let Some(d) = d.filter(|d| *d > 0.0) {
            break d;
        }
        assert!(t.elapsed() < Duration::from_secs(15), "no dirty rate: {v}");
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{zone} dirties {dirty:.0} pages/s");
    // The clones' own vCPU loads reach etcd too: h2 publishes its hosted
    // clones under the zone's family, h1 the zone's clones it runs.
    let t = Instant::now();
    let (families, here, there) = loop {
        let v = get(&h1, "/v1/cluster");
        let hosts = v["hosts"].as_array().cloned().unwrap_or_default();
        let report = |name: &str| {
            hosts
                .iter()
                .find(|h| h["name"] == name)
                .map(|h| h["load"].clone())
                .unwrap_or(Value::Null)
        };
        let parent = report("h1")["vms"]
            .as_array()
            .and_then(|vs| vs.iter().find(|vm| vm["id"] == zone.as_str()).cloned())
            .unwrap_or(Value::Null);
        let families: Vec<u64> = parent["families"]
            .as_array()
            .map(|f| f.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default();
        let cores = |v: &Value| v.as_f64().filter(|c| *c > 0.0);
        let here: Vec<f64> = parent["clone_cpu_cores"]
            .as_array()
            .map(|c| c.iter().filter_map(cores).collect())
            .unwrap_or_default();
        let there: Vec<f64> = report("h2")["hosted"]
            .as_array()
            .map(|hs| {
                hs.iter()
                    .filter(|c| {
                        c["parent_host"] == "h1"
                            && c["family"].as_u64().is_some_and(|f| families.contains(&f))
                    })
                    .filter_map(|c| cores(&c["cpu_cores"]))
                    .collect()
            })
            .unwrap_or_default();
        if here.len() as u64 == on("h1") && there.len() as u64 == on("h2") {
            break (families, here, there);
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "the clones' loads did not reach etcd: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{zone}'s families {families:?}: clones on h1 {here:?}, on h2 {there:?} cores");
    // And a hosted clone's own API entry shows its load.
    let id = clones["vms"]
        .as_array()
        .and_then(|vs| vs.iter().find(|c| c["parent_host"] == "h1"))
        .and_then(|c| c["id"].as_str())
        .expect("a hosted clone")
        .to_owned();
    let c = poll(
        &h2,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(10),
        |v| v["load"]["cpu_cores"].as_f64().is_some_and(|c| c > 0.0),
    );
    eprintln!("{id} on h2: {}", c["load"]);
    let _ = client::call_unix(&h1, "DELETE", &format!("/v1/vms/{zone}"), None);
}
