//! Dirty-rate sampling never interferes with a migration: with a window
//! of KVM's dirty log open nearly all the time (80 ms in every 100 ms), a
//! writing zone migrates h1→h2 and back (pre-copy, the migration's own
//! tracking owning the log) and ends with QEMU's checksum; each host
//! measures its dirty rate while it runs there. Needs root and /dev/kvm;
//! fails clearly without.

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
use tests::qemu_done_line;

/// Waits for the VM's load on `sock` to show a dirty rate above zero.
fn dirty_rate(sock: &Path, id: &str) -> f64 {
    let v = poll(
        sock,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(10),
        |v| v["load"]["dirty_pages_per_s"].as_f64() > Some(0.0),
    );
    v["load"]["dirty_pages_per_s"].as_f64().unwrap_or(0.0)
}

#[test]
fn a_zone_migrates_exactly_while_its_dirty_rate_is_sampled() {
    let (_c, up) = Cluster::up_with(
        2,
        &["--dirty-sample-every-ms", "100", "--dirty-window-ms", "80"],
    );
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let cmdline = "ticks=1000 seed=21 state_mib=32 dirty_pages=32 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    eprintln!("on h1: {:.0} pages/s", dirty_rate(&h1, &id));
    let there = migrate_and_wait(&h1, &id, "h2", Duration::from_secs(60));
    assert_eq!(there["phase"], "committed", "{there}");
    eprintln!("on h2: {:.0} pages/s", dirty_rate(&h2, &id));
    let back = migrate_and_wait(&h2, &id, "h1", Duration::from_secs(60));
    assert_eq!(back["phase"], "committed", "{back}");
    let v: Value = poll(
        &h1,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(60),
        |v| v["state"] == "exited",
    );
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(
        v["last_line"].as_str().expect("last line"),
        qemu_done_line(cmdline, MEM),
        "the migrated guest's result"
    );
}

/// A zone that arrives by post-copy faults the rest of its memory in from
/// its source: its load on the destination shows those faults as a rate.
#[test]
fn a_post_copy_arrival_shows_its_fault_rate() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let cmdline = "ticks=1000 seed=22 state_mib=64 dirty_pages=32 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    std::thread::sleep(Duration::from_millis(300));
    let r = client::call_unix(
        &h1,
        "POST",
        &format!("/v1/vms/{id}/migrate"),
        Some(r#"{"destination": "h2", "mode": "postcopy"}"#),
    );
    assert_eq!(r.status, 202, "{}", r.error());
    let done = migration_end(&h1, &id, Duration::from_secs(60));
    assert_eq!(done["phase"], "committed", "{done}");
    let v = poll(
        &h2,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(10),
        |v| v["load"]["faults_per_s"].as_f64() > Some(0.0),
    );
    eprintln!("arrival: {}", v["load"]);
    let end: Value = poll(
        &h2,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(60),
        |v| v["state"] == "exited",
    );
    assert_eq!(
        end["last_line"].as_str().expect("last line"),
        qemu_done_line(cmdline, MEM)
    );
}
