//! mcdist across hosts on a local cluster: forks with `"distribution":
//! "multicast"` whose clones run on the parent's host and on others. The
//! family's pages go to its multicast group on the cluster's bridge; each
//! other host with clones runs one receiver that installs every arriving
//! page into all its clones (the parent's host's clones read the frozen
//! image directly). Every clone still ends with QEMU's line; the
//! family report lists every host's receiver; with 10 % loss on the clone
//! hosts the receivers repair it; two multicast families at once stay
//! apart. Needs root and /dev/kvm (fails clearly without).

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

fn memserver(sock: &Path) -> Value {
    let r = client::call_unix(sock, "GET", "/v1/memserver", None);
    assert_eq!(r.status, 200, "GET /v1/memserver: {}", r.error());
    r.json()
}

/// The family's receivers by host name.
fn receivers(family: &Value) -> Vec<(String, Value)> {
    family["receivers"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| (r["host"].as_str().unwrap_or("?").to_owned(), r.clone()))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn sixteen_clones_over_four_hosts_by_multicast_match_qemu() {
    let (_c, up) = Cluster::up(4);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    let cmdline = "ticks=60 seed=38 state_mib=8 dirty_pages=10 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    let before = memserver(&h1);
    fork(
        &h1,
        &id,
        r#"{"clones": 16, "spread": ["h1", "h2", "h3", "h4"], "distribution": "multicast"}"#,
    );
    let v = expect_qemu_lines(&h1, &id, cmdline, 16);
    let family = &v["families"][0];
    assert_eq!(family["distribution"], "multicast", "{family}");
    // One receiver per other host, each of which got pages from the group
    // (h1's clones read the image directly).
    let rs = receivers(family);
    let names: Vec<&str> = rs.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(names, ["h2", "h3", "h4"], "{family}");
    for (h, r) in &rs {
        assert!(r["pages_arrived"].as_u64() > Some(0), "{h}: {r}");
        for bad in ["forged", "replayed", "foreign"] {
            assert_eq!(r[bad], 0, "{h}: {r}");
        }
    }
    // Remote clones carry their start and done times and fault counts.
    for c in family["clones"].as_array().expect("clones") {
        assert!(c["start_us"].as_u64().is_some(), "{c}");
        assert!(c["done_us"].as_u64() >= c["start_us"].as_u64(), "{c}");
        assert!(c["faults"]["faults"].as_u64().is_some(), "{c}");
    }
    let after = memserver(&h1);
    let sent = |v: &Value| v["multicast"]["frames_sent"].as_u64().unwrap_or(0);
    assert!(sent(&after) > sent(&before), "{before} → {after}");
}

#[test]
fn multicast_clones_repair_ten_percent_loss_on_their_hosts() {
    let v = fork_under_ten_percent_loss("multicast");
    let rs = receivers(&v["families"][0]);
    let repaired: u64 = rs
        .iter()
        .map(|(_, r)| r["re_requests"].as_u64().unwrap_or(0))
        .sum();
    assert!(repaired > 0, "no re-request on the lossy hosts: {rs:?}");
}

#[test]
fn two_multicast_families_at_once_never_mix() {
    for v in two_families_at_once("multicast", r#"{"h1": 1, "h2": 2, "h3": 1}"#) {
        for (h, r) in receivers(&v["families"][0]) {
            // Another family's frames may reach a group only if the pools
            // collide; they would be rejected as foreign, never installed.
            assert_eq!(r["forged"], 0, "{h}: {r}");
        }
    }
}

#[test]
fn multicast_clones_fail_clearly_when_the_memory_servers_host_dies() {
    memory_servers_host_dies("multicast");
}
