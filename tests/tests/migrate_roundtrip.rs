//! One running zone guest live-migrated h1→h2→h1 a hundred times (two
//! hundred pre-copy migrations, each with its commit): it keeps its id
//! throughout and still ends with QEMU's line for its cmdline — no page,
//! register or device byte lost or doubled along the way. Real daemons of
//! a local cluster; needs root and /dev/kvm.

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
use std::time::{Duration, Instant};
use tests::qemu_done_line;

const TRIPS: usize = 100;
/// A small guest: 64 MiB, 2 MiB of zone state, a modest dirty rate; runs
/// ~25 s (paced): the trips take ~9 s here (debug build), so a machine
/// almost three times slower still fits them.
const MEM_MIB: u64 = 64;
const CMDLINE: &str = "ticks=5000 seed=17 state_mib=2 dirty_pages=4 tick_us=5000";
/// One migration, start to commit, at most (they take ~0.1 s).
const ONE: Duration = Duration::from_secs(20);

#[test]
fn a_hundred_round_trips_end_with_qemus_line() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let hosts = [(socket(&hs[0]), "h1"), (socket(&hs[1]), "h2")];
    let body = format!(r#"{{"cmdline": "{CMDLINE}", "mem_mib": {MEM_MIB}}}"#);
    let r = client::call_unix(&hosts[0].0, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    poll(
        &hosts[0].0,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(30),
        |v| v["console_lines"].as_u64() >= Some(2),
    );
    let t = Instant::now();
    let (mut downtime, mut worst, mut bytes) = (0u64, 0u64, 0u64);
    for trip in 0..TRIPS * 2 {
        let (from, to) = (&hosts[trip % 2], &hosts[(trip + 1) % 2]);
        let v = migrate_and_wait(&from.0, &id, to.1, ONE);
        assert_eq!(v["phase"], "committed", "migration {trip}: {v}");
        let r = &v["report"];
        assert_eq!(r["destination_vm"], id.as_str(), "migration {trip}: {v}");
        let d = r["downtime_us"].as_u64().unwrap_or(0);
        (downtime, worst) = (downtime + d, worst.max(d));
        bytes += r["bytes_sent"].as_u64().unwrap_or(0);
        if trip % 20 == 0 {
            let gone = client::call_unix(&from.0, "GET", &format!("/v1/vms/{id}"), None);
            assert_eq!(gone.status, 404, "{id} still on {} after {trip}", from.1);
        }
    }
    let took = t.elapsed();
    eprintln!(
        "{TRIPS} round trips ({} migrations) in {took:.1?}: {:.1} ms each, downtime mean {:.1} ms, worst {:.1} ms, {:.1} MiB sent",
        TRIPS * 2,
        took.as_secs_f64() * 1e3 / (TRIPS * 2) as f64,
        downtime as f64 / 1e3 / (TRIPS * 2) as f64,
        worst as f64 / 1e3,
        bytes as f64 / (1 << 20) as f64
    );
    // QEMU's run of the same cmdline (paced: as long as the guest's)
    // alongside the guest's rest, not alongside the trips: its spinning
    // pacer takes a core.
    let oracle = std::thread::spawn(|| qemu_done_line(CMDLINE, MEM_MIB));
    // Back where it started: it ends there with QEMU's line.
    let v = poll(&hosts[0].0, &format!("/v1/vms/{id}"), tests::WAIT, |v| {
        v["state"] == "exited"
    });
    assert_eq!(v["exit"]["code"], 0, "{v}");
    let want = oracle.join().expect("QEMU's run");
    assert_eq!(v["last_line"], want.as_str(), "{v}");
    let lines = client::call_unix(&hosts[0].0, "GET", &format!("/v1/vms/{id}/console"), None);
    let lines = lines.json()["lines"].as_array().expect("lines").len();
    assert!(lines >= 3, "its console came along: {lines} lines");
}
