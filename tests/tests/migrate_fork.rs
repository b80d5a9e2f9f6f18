//! A VM migrated between its fork ticket and its fork forks on its
//! destination: the zone reserves its clones at boot
//! (`sf_request_ticket`) on h1, moves to h2, and at `fork_at` calls
//! `sf_clone` there — h2's fresh fork hub holds the ticket it brought
//! along, and the parent and both clones end with QEMU's lines for
//! `as_clone=0..2`. Real daemons of a local cluster; needs root and
//! /dev/kvm.

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
use std::time::Duration;
use tests::qemu_done_line;

const MEM_MIB: u64 = 64;
/// The ticket at boot, the fork ~1.5 s later (tick 300 of 5 ms).
const CMDLINE: &str = "ticks=600 seed=29 state_mib=2 dirty_pages=4 tick_us=5000";
const FORK: &str = "fork_at=300 clones=2";

#[test]
fn a_migrated_vm_with_a_pending_ticket_forks_on_its_destination() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let body = format!(r#"{{"cmdline": "{CMDLINE} {FORK}", "mem_mib": {MEM_MIB}}}"#);
    let r = client::call_unix(&h1, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    poll(
        &h1,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(20),
        |v| v["console_lines"].as_u64() >= Some(2),
    );
    let v = migrate_and_wait(&h1, &id, "h2", Duration::from_secs(20));
    assert_eq!(v["phase"], "committed", "{v}");
    let v = poll(&h2, &format!("/v1/vms/{id}"), tests::WAIT, all_ended);
    // The fork happened on h2, after the move: h1 never had a family.
    let families = v["families"].as_array().expect("families");
    assert_eq!(families.len(), 1, "{v}");
    let clones = families[0]["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 2, "{v}");
    let oracles: Vec<_> = (0..=2)
        .map(|i| {
            std::thread::spawn(move || {
                qemu_done_line(&format!("{CMDLINE} {FORK} as_clone={i}"), MEM_MIB)
            })
        })
        .collect();
    let want: Vec<String> = oracles
        .into_iter()
        .map(|o| o.join().expect("QEMU"))
        .collect();
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(v["last_line"], want[0].as_str(), "parent {id}: {v}");
    for (c, i) in clones.iter().zip(1..) {
        assert_eq!(c["state"], "exited", "clone {i}: {c}");
        assert_eq!(c["last_line"], want[i].as_str(), "clone {i}: {c}");
    }
}
