//! Migrating clones: a zone on h1 forks two clones onto h2; while they
//! run, clone 1 moves h2→h3 and back to h2 by pre-copy and clone 2 moves
//! h2→h3 in mode auto. Their pages that were not on h2 keep coming from
//! the family's memory server on h1, the parent's host follows each move
//! (its family shows the clone's new host and its end there), and the
//! parent and both clones end with QEMU's lines for `as_clone=0..2`.
//! A migration of clone 2 cancelled in round 0 leaves it running on h2.
//! Refused with 422: a clone onto its parent's host, and post-copy.
//! Real daemons of a local cluster; needs root and /dev/kvm.

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
use std::time::Duration;

/// ~8 s of ticks; the fork comes once it runs.
const CMDLINE: &str = "ticks=1600 seed=41 state_mib=16 dirty_pages=8 alloc_mib=1 tick_us=5000";

/// The VM id on `sock` of clone `clone_id` of `family`.
fn clone_vm(sock: &Path, family: u64, clone_id: u64) -> String {
    let v = poll(sock, "/v1/vms", Duration::from_secs(30), |v| {
        v["vms"].as_array().is_some_and(|vs| {
            vs.iter().any(|c| {
                c["family"] == family && c["clone_id"] == clone_id && c["state"] == "running"
            })
        })
    });
    v["vms"]
        .as_array()
        .and_then(|vs| {
            vs.iter()
                .find(|c| c["family"] == family && c["clone_id"] == clone_id)
        })
        .and_then(|c| c["id"].as_str())
        .expect("clone id")
        .to_owned()
}

fn migrate(from: &Path, id: &str, to: &str, mode: &str) -> Value {
    let body = format!(r#"{{"destination": "{to}", "mode": "{mode}"}}"#);
    let r = client::call_unix(from, "POST", &format!("/v1/vms/{id}/migrate"), Some(&body));
    assert_eq!(r.status, 202, "migrate {id} to {to}: {}", r.error());
    let v = migration_end(from, id, Duration::from_secs(30));
    assert_eq!(v["phase"], "committed", "{id} → {to}: {v}");
    let r = &v["report"];
    eprintln!(
        "{id} → {to} ({mode}): downtime {} µs (pause {}, last round {}, state {}, resume {}), {} bytes",
        r["downtime_us"], r["pause_us"], r["last_round_us"], r["state_us"], r["resume_us"], r["bytes_sent"]
    );
    v
}

#[test]
fn clones_migrate_between_clone_hosts_and_end_with_qemus_lines() {
    let (_c, up) = Cluster::up(3);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2, h3) = (socket(&hs[0]), socket(&hs[1]), socket(&hs[2]));
    let id = start_vm(&h1, CMDLINE);
    let r = client::call_unix(
        &h1,
        "POST",
        &format!("/v1/vms/{id}/fork"),
        Some(r#"{"clones": 2, "hosts": {"h2": 2}}"#),
    );
    assert_eq!(r.status, 200, "fork: {}", r.error());
    let family = r.json()["family"].as_u64().expect("family");
    let c1 = clone_vm(&h2, family, 1);
    let c2 = clone_vm(&h2, family, 2);
    // Let the clones fault some of their memory in on h2 first.
    std::thread::sleep(Duration::from_millis(700));

    // Refused, and nothing harmed: onto the parent's host; post-copy.
    let to_parent = client::call_unix(
        &h2,
        "POST",
        &format!("/v1/vms/{c1}/migrate"),
        Some(r#"{"destination": "h1"}"#),
    );
    assert_eq!(to_parent.status, 422, "{}", to_parent.error());
    let postcopy = client::call_unix(
        &h2,
        "POST",
        &format!("/v1/vms/{c1}/migrate"),
        Some(r#"{"destination": "h3", "mode": "postcopy"}"#),
    );
    assert_eq!(postcopy.status, 422, "{}", postcopy.error());

    let m = migrate(&h2, &c1, "h3", "precopy");
    // Only what h2 had went: far less than the clone's memory.
    let sent = m["report"]["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent < (MEM << 20) / 2, "{m}");
    // It is h3's now, under its own id; h2 no longer lists it.
    let on_h3 = client::call_unix(&h3, "GET", &format!("/v1/vms/{c1}"), None);
    assert_eq!(on_h3.status, 200, "{}", on_h3.error());
    assert_eq!(on_h3.json()["clone_id"], 1, "{}", on_h3.json());
    let on_h2 = client::call_unix(&h2, "GET", &format!("/v1/vms/{c1}"), None);
    assert_eq!(on_h2.status, 404, "{}", on_h2.error());
    let st = client::call_unix(&h2, "GET", &format!("/v1/families/{family}"), None).json();
    let moved = st["clones"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["clone_id"] == 1))
        .cloned()
        .expect("clone 1 on h2");
    assert_eq!(moved["state"], "migrated", "{st}");
    assert_eq!(moved["moved_to"], "h3", "{st}");
    // The parent's host follows it.
    poll(&h1, &format!("/v1/vms/{id}"), Duration::from_secs(5), |v| {
        v["families"][0]["clones"][0]["host"] == "h3"
    });

    // A migration cancelled in round 0 (1 MiB/s: it is slow) leaves the
    // clone running on h2, watched by its reaper again.
    let slow = client::call_unix(
        &h2,
        "POST",
        &format!("/v1/vms/{c2}/migrate"),
        Some(r#"{"destination": "h3", "bandwidth_mib_s": 1}"#),
    );
    assert_eq!(slow.status, 202, "{}", slow.error());
    std::thread::sleep(Duration::from_millis(300));
    let del = client::call_unix(&h2, "DELETE", &format!("/v1/vms/{c2}/migration"), None);
    assert_eq!(del.status, 202, "{}", del.error());
    let v = migration_end(&h2, &c2, Duration::from_secs(20));
    assert_eq!(v["phase"], "aborted", "{v}");
    let back = client::call_unix(&h2, "GET", &format!("/v1/vms/{c2}"), None).json();
    assert_eq!(back["state"], "running", "{back}");

    migrate(&h2, &c2, "h3", "auto");
    std::thread::sleep(Duration::from_millis(300));
    // And back: h2 takes clone 1 into its share of the family again.
    migrate(&h3, &c1, "h2", "precopy");

    let v = expect_qemu_lines(&h1, &id, CMDLINE, 2);
    let clones = v["families"][0]["clones"].as_array().expect("clones");
    assert_eq!(clones[0]["host"], "h2", "{v}");
    assert_eq!(clones[1]["host"], "h3", "{v}");
    // Every clone VM is gone from the hosts' lists once ended and the
    // family released: nothing left running anywhere.
    for h in [&h2, &h3] {
        let list = client::call_unix(h, "GET", "/v1/vms", None).json();
        let running = list["vms"]
            .as_array()
            .map(|vs| vs.iter().filter(|v| v["state"] == "running").count())
            .unwrap_or(0);
        assert_eq!(running, 0, "{list}");
    }
}

/// A parent deleted right after its clone moved h2→h3 takes the clone
/// along: the parent's host or h2 (passing the family's kill on) ends it
/// on h3; nothing of the family is left running anywhere.
#[test]
fn deleting_the_parent_ends_its_migrated_clone() {
    let (_c, up) = Cluster::up(3);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2, h3) = (socket(&hs[0]), socket(&hs[1]), socket(&hs[2]));
    let id = start_vm(&h1, "ticks=4000 seed=43 state_mib=4 tick_us=5000");
    let r = client::call_unix(
        &h1,
        "POST",
        &format!("/v1/vms/{id}/fork"),
        Some(r#"{"clones": 1, "hosts": {"h2": 1}}"#),
    );
    assert_eq!(r.status, 200, "fork: {}", r.error());
    let family = r.json()["family"].as_u64().expect("family");
    let c1 = clone_vm(&h2, family, 1);
    migrate(&h2, &c1, "h3", "precopy");
    let del = client::call_unix(&h1, "DELETE", &format!("/v1/vms/{id}"), None);
    assert_eq!(del.status, 204, "{}", del.error());
    poll(&h3, "/v1/vms", Duration::from_secs(10), |v| {
        v["vms"]
            .as_array()
            .is_some_and(|vs| vs.iter().all(|v| v["state"] != "running"))
    });
    for h in [&h2, &h3] {
        let st = client::call_unix(h, "GET", &format!("/v1/families/{family}"), None);
        if st.status == 200 {
            assert_eq!(st.json()["running"], 0, "{}", st.json());
        }
    }
}
