//! Fork across hosts on a local cluster (`forkd cluster up`): a VM on h1
//! forked through h1's API into clones on h1 and h2. h2's clones are built
//! from the envelope h1 sends, fault their pages in from h1's memory
//! server over the bridge, show in h2's `GET /v1/vms`, and their ends
//! reach h1's family report; every clone prints QEMU's line for its clone
//! id. A clone host whose daemon dies mid-family has its clones marked
//! failed on the parent's host within a bound; clones whose memory
//! server's host dies fail with a clear error within seconds. Needs root
//! and /dev/kvm (fails clearly without); each cluster has its own name and
//! a guard that runs `cluster down`.

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

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tests::{forkd_bin, qemu_done_line, run_with_timeout};

#[test]
fn clones_on_two_hosts_match_qemu() {
    let (c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let cmdline = "ticks=60 seed=38 state_mib=8 dirty_pages=10 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    let vm = format!("/v1/vms/{id}");
    let body = r#"{"clones": 4, "hosts": {"h1": 2, "h2": 2}}"#;
    let r = client::call_unix(&h1, "POST", &format!("{vm}/fork"), Some(body));
    assert_eq!(r.status, 200, "fork: {}", r.error());
    let forked = r.json();
    assert_eq!(forked["clones"], json!([1, 2, 3, 4]));
    let family = forked["family"].as_u64().expect("family");
    let v = poll(&h1, &vm, tests::WAIT, all_ended);
    let tick = fork_tick(&h1, &id);
    let oracle = |i: u64| {
        qemu_done_line(
            &format!("{cmdline} fork_at={tick} clones=4 as_clone={i}"),
            MEM,
        )
    };
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(v["last_line"], oracle(0).as_str(), "parent");
    let fam = &v["families"][0];
    assert_eq!(fam["family"], family);
    assert_eq!(fam["start_failures"], json!([]), "{v}");
    let clones = fam["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 4, "{v}");
    for (c, i) in clones.iter().zip(1u64..) {
        assert_eq!(c["clone_id"], i);
        assert_eq!(c["state"], "exited", "{c}");
        assert_eq!(c["exit"]["code"], 0, "{c}");
        assert_eq!(c["last_line"], oracle(i).as_str(), "clone {i}");
        let host = if i <= 2 { Value::Null } else { json!("h2") };
        assert_eq!(c["host"], host, "clone {i}");
    }
    // h2 lists its clones as its own VMs, with family and parent host.
    let list = client::call_unix(&h2, "GET", "/v1/vms", None).json();
    let vms = list["vms"].as_array().expect("vms").clone();
    assert_eq!(vms.len(), 2, "{list}");
    for (v, i) in vms.iter().zip(3u64..) {
        assert_eq!(v["family"], family, "{v}");
        assert_eq!(v["clone_id"], i, "{v}");
        assert_eq!(v["parent_host"], "h1", "{v}");
        assert_eq!(v["state"], "exited", "{v}");
        assert_eq!(v["exit"]["code"], 0, "{v}");
        assert_eq!(v["last_line"], oracle(i).as_str(), "clone {i} on h2");
    }
    let cid = vms[0]["id"].as_str().expect("id");
    let con = client::call_unix(&h2, "GET", &format!("/v1/vms/{cid}/console"), None);
    assert_eq!(con.status, 200);
    let lines = con.json()["lines"].clone();
    assert!(
        lines
            .as_array()
            .is_some_and(|ls| ls.iter().any(|l| l == oracle(3).as_str())),
        "{lines}"
    );
    let st = client::call_unix(&h2, "GET", &format!("/v1/families/{family}"), None);
    assert_eq!(st.status, 200);
    assert_eq!(st.json()["running"], 0);
    // A hosted clone is deletable like any VM.
    let del = client::call_unix(&h2, "DELETE", &format!("/v1/vms/{cid}"), None);
    assert_eq!(del.status, 204);
    let list = client::call_unix(&h2, "GET", "/v1/vms", None).json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(1), "{list}");

    bad_envelopes_are_refused(&c, &h2);

    // Placements that cannot be honoured.
    for (body, status, what) in [
        (
            r#"{"clones": 2, "hosts": {"h1": 1, "h9": 1}}"#,
            422,
            "unknown host 'h9'",
        ),
        (
            r#"{"clones": 3, "hosts": {"h1": 1, "h2": 1}}"#,
            422,
            "add up to 2",
        ),
        (r#"{"clones": 2, "spread": ["h3"]}"#, 422, "unknown host"),
        (
            r#"{"clones": 2, "spread": ["h1"], "hosts": {"h1": 2}}"#,
            400,
            "not both",
        ),
    ] {
        let r = client::call_unix(&h1, "POST", &format!("{vm}/fork"), Some(body));
        assert_eq!(r.status, status, "{body}: {}", r.error());
        assert!(r.error().contains(what), "{body}: {}", r.error());
    }
}

/// Envelopes that h2 must refuse: forged (another key), corrupted, from
/// a host with other CPU features, malformed.
fn bad_envelopes_are_refused(c: &Cluster, h2: &Path) {
    use forkd::fork::envelope::{envelope_key, to_hex, EnvelopeBody, EnvelopeClone};
    let token = std::fs::read_to_string(c.dir.join("token")).expect("token");
    let key = envelope_key(token.trim().as_bytes());
    let body = EnvelopeBody {
        family: 99,
        secret: [7; 32],
        parent_host: "h1".into(),
        memserver: "10.77.0.1:9".parse().expect("addr"),
        multicast: None,
        avoidance: true,
        prefetch: true,
        cpu: [0; 32],
        clones: vec![EnvelopeClone {
            clone_id: 1,
            mac: [2, 0xfd, 0, 0, 0, 1],
            ip: std::net::Ipv4Addr::new(10, 200, 0, 1),
            generation: [1, 2],
        }],
        descriptor: vec![0; 64],
    };
    let post = |bytes: &[u8]| {
        let b = format!(r#"{{"envelope": "{}"}}"#, to_hex(bytes));
        client::call_unix(h2, "POST", "/v1/families", Some(&b))
    };
    let forged = body
        .seal(&envelope_key(b"not the cluster token"))
        .expect("seal");
    let r = post(&forged);
    assert_eq!(r.status, 403, "{}", r.error());
    assert!(r.error().contains("MAC"), "{}", r.error());
    let mut corrupt = body.seal(&key).expect("seal");
    corrupt[20] ^= 1;
    let r = post(&corrupt);
    assert_eq!(r.status, 400, "{}", r.error());
    assert!(r.error().contains("checksum"), "{}", r.error());
    let r = post(&body.seal(&key).expect("seal"));
    assert_eq!(r.status, 409, "{}", r.error());
    assert!(r.error().contains("CPU mismatch"), "{}", r.error());
    let r = post(b"short");
    assert_eq!(r.status, 400, "{}", r.error());
    assert_eq!(
        client::call_unix(h2, "GET", "/v1/families/99", None).status,
        404
    );
}

#[test]
fn a_vanished_clone_host_fails_its_clones_within_a_bound() {
    let (c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    // Clones that run ~3 s after the fork.
    let cmdline = "ticks=600 seed=7 state_mib=4 dirty_pages=4 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    let vm = format!("/v1/vms/{id}");
    let body = r#"{"clones": 2, "spread": ["h1", "h2"]}"#;
    let r = client::call_unix(&h1, "POST", &format!("{vm}/fork"), Some(body));
    assert_eq!(r.status, 200, "fork: {}", r.error());
    // h2's clone runs, then its daemon dies with it.
    let h2 = socket(&hs[1]);
    poll(&h2, "/v1/vms", Duration::from_secs(30), |v| {
        v["vms"][0]["state"] == "running"
    });
    let pid = hs[1]["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) on the pid of h2's daemon, which this test's cluster
    // started; the cluster guard cleans up after a dead daemon.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    let v = poll(&h1, &vm, Duration::from_secs(20), |v| {
        v["families"][0]["running"] == 0
    });
    assert!(killed.elapsed() < Duration::from_secs(10), "{v}");
    let clones = v["families"][0]["clones"]
        .as_array()
        .expect("clones")
        .clone();
    assert_eq!(clones[1]["state"], "failed", "{v}");
    assert_eq!(clones[1]["host"], "h2", "{v}");
    let why = clones[1]["error"].as_str().unwrap_or_default();
    assert!(why.contains("h2 stopped answering"), "{why}");
    // The parent and the clone on its own host end as QEMU says.
    let v = poll(&h1, &vm, tests::WAIT, all_ended);
    let tick = fork_tick(&h1, &id);
    let oracle = |i: u64| {
        qemu_done_line(
            &format!("{cmdline} fork_at={tick} clones=2 as_clone={i}"),
            MEM,
        )
    };
    assert_eq!(v["last_line"], oracle(0).as_str(), "parent");
    assert_eq!(
        v["families"][0]["clones"][0]["last_line"],
        oracle(1).as_str()
    );
    drop(c);
}

#[test]
fn deleting_the_parent_kills_its_clones_on_other_hosts() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let cmdline = "ticks=2000 seed=9 state_mib=4 dirty_pages=4 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    let vm = format!("/v1/vms/{id}");
    let body = r#"{"clones": 2, "hosts": {"h2": 2}}"#;
    let r = client::call_unix(&h1, "POST", &format!("{vm}/fork"), Some(body));
    assert_eq!(r.status, 200, "fork: {}", r.error());
    let family = r.json()["family"].as_u64().expect("family");
    poll(&h2, "/v1/vms", Duration::from_secs(30), |v| {
        v["vms"]
            .as_array()
            .is_some_and(|vs| vs.len() == 2 && vs.iter().all(|v| v["state"] == "running"))
    });
    let t = Instant::now();
    let del = client::call_unix(&h1, "DELETE", &vm, None);
    assert_eq!(del.status, 204, "{}", del.error());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The family is gone from h2: its clones were killed.
    let st = client::call_unix(&h2, "GET", &format!("/v1/families/{family}"), None);
    assert_eq!(st.status, 404, "{:?}", String::from_utf8_lossy(&st.body));
    let list = client::call_unix(&h2, "GET", "/v1/vms", None).json();
    assert_eq!(list["vms"], json!([]), "{list}");
}

#[test]
fn a_guest_fork_follows_the_vms_default_placement() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    let cmdline = "ticks=40 seed=21 state_mib=8 dirty_pages=10 tick_us=2000 fork_at=10 clones=4";
    let body = format!(
        r#"{{"cmdline": "{cmdline}", "mem_mib": {MEM}, "placement": {{"spread": ["h1", "h2"]}}}}"#
    );
    let r = client::call_unix(&h1, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let v = poll(&h1, &format!("/v1/vms/{id}"), tests::WAIT, |v| {
        all_ended(v) && v["families"].as_array().is_some_and(|f| !f.is_empty())
    });
    let oracle = |i: u64| qemu_done_line(&format!("{cmdline} as_clone={i}"), MEM);
    // The parent's sf_join waited for the clones on h2 too.
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(v["last_line"], oracle(0).as_str(), "parent");
    let clones = v["families"][0]["clones"]
        .as_array()
        .expect("clones")
        .clone();
    assert_eq!(clones.len(), 4, "{v}");
    for (c, i) in clones.iter().zip(1u64..) {
        assert_eq!(c["last_line"], oracle(i).as_str(), "clone {i}: {c}");
    }
    assert_eq!(clones[2]["host"], "h2");
    let list = client::call_unix(&h2, "GET", "/v1/vms", None).json();
    assert_eq!(list["vms"].as_array().map(Vec::len), Some(2), "{list}");
    // A placement naming an unknown host is refused at create.
    let body = r#"{"cmdline": "ticks=1", "placement": {"spread": ["h7"]}}"#;
    let r = client::call_unix(&h1, "POST", "/v1/vms", Some(body));
    assert_eq!(r.status, 422, "{}", r.error());
    assert!(r.error().contains("unknown host 'h7'"), "{}", r.error());
}

#[test]
fn clones_spread_over_three_hosts_match_qemu() {
    let (_c, up) = Cluster::up(3);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    let cmdline = "ticks=50 seed=11 state_mib=8 dirty_pages=8 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    let vm = format!("/v1/vms/{id}");
    let body = r#"{"clones": 7, "spread": ["h2", "h3", "h1"]}"#;
    let r = client::call_unix(&h1, "POST", &format!("{vm}/fork"), Some(body));
    assert_eq!(r.status, 200, "fork: {}", r.error());
    let v = poll(&h1, &vm, tests::WAIT, all_ended);
    let tick = fork_tick(&h1, &id);
    let oracle = |i: u64| {
        qemu_done_line(
            &format!("{cmdline} fork_at={tick} clones=7 as_clone={i}"),
            MEM,
        )
    };
    assert_eq!(v["last_line"], oracle(0).as_str(), "parent");
    // h1 gets 2 (named last), h2 3, h3 2; ids in host-name order.
    let hosts = [
        Value::Null,
        Value::Null,
        json!("h2"),
        json!("h2"),
        json!("h2"),
    ]
    .into_iter()
    .chain([json!("h3"), json!("h3")]);
    let clones = v["families"][0]["clones"]
        .as_array()
        .expect("clones")
        .clone();
    assert_eq!(clones.len(), 7, "{v}");
    for ((c, i), host) in clones.iter().zip(1u64..).zip(hosts) {
        assert_eq!(c["last_line"], oracle(i).as_str(), "clone {i}: {c}");
        assert_eq!(c["host"], host, "clone {i}");
    }
    // Every clone's MAC and IP differ.
    let mut ips: Vec<_> = clones.iter().map(|c| c["ip"].to_string()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 7, "{v}");
}

#[test]
fn clones_fail_clearly_when_the_memory_servers_host_dies() {
    memory_servers_host_dies("unicast");
}

#[test]
fn sixteen_clones_over_four_hosts_match_qemu() {
    let (_c, up) = Cluster::up(4);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    let cmdline = "ticks=60 seed=38 state_mib=8 dirty_pages=10 tick_us=5000";
    let id = start_vm(&h1, cmdline);
    fork(
        &h1,
        &id,
        r#"{"clones": 16, "hosts": {"h2": 4, "h3": 4, "h4": 4, "h1": 4}}"#,
    );
    let v = expect_qemu_lines(&h1, &id, cmdline, 16);
    let clones = v["families"][0]["clones"].as_array().expect("clones");
    for (c, i) in clones.iter().zip(1u64..) {
        let host = match (i - 1) / 4 {
            0 => Value::Null,
            h => json!(format!("h{}", h + 1)),
        };
        assert_eq!(c["host"], host, "clone {i}");
    }
    for h in &hs[1..] {
        let list = client::call_unix(&socket(h), "GET", "/v1/vms", None).json();
        assert_eq!(list["vms"].as_array().map(Vec::len), Some(4), "{list}");
    }
}

/// `forkd vm` drives the cluster by host name: create on h1, fork with
/// `--place h1=1,h2=1 --wait`; the family report shows clone 2 on h2 and
/// both clones end with QEMU's lines.
#[test]
fn the_vm_cli_places_clones_on_hosts() {
    let (c, _up) = Cluster::up(2);
    let dir = c.dir.to_str().expect("utf-8 dir").to_owned();
    let vm = |args: &[&str]| {
        let mut all: Vec<&str> = vec!["vm"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--host", "h1", "--cluster", &c.name, "--cluster-dir", &dir]);
        run_with_timeout(Command::new(forkd_bin()).args(&all), tests::WAIT)
    };
    let cmdline = "ticks=60 seed=12 state_mib=8 dirty_pages=8 tick_us=5000";
    let o = vm(&[
        "create",
        "--mem",
        &MEM.to_string(),
        "--cmdline",
        cmdline,
        "--json",
    ]);
    assert!(o.status.success(), "create: {}", text(&o));
    let id = serde_json::from_slice::<Value>(&o.stdout).expect("json")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let t = std::time::Instant::now();
    let family = loop {
        let o = vm(&[
            "fork",
            &id,
            "--clones",
            "2",
            "--place",
            "h1=1,h2=1",
            "--wait",
            "--json",
        ]);
        if !o.status.success()
            && text(&o).contains("try again")
            && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        assert!(o.status.success(), "fork: {}", text(&o));
        break serde_json::from_slice::<Value>(&o.stdout).expect("family json");
    };
    let sock = c.dir.join("h1").join("api.sock");
    let tick = fork_tick(&sock, &id);
    let clones = family["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 2, "{family}");
    for (cl, (i, host)) in clones.iter().zip([(1u64, Value::Null), (2, json!("h2"))]) {
        assert_eq!(cl["host"], host, "{cl}");
        assert_eq!(
            cl["last_line"],
            qemu_done_line(
                &format!("{cmdline} fork_at={tick} clones=2 as_clone={i}"),
                MEM
            )
            .as_str(),
            "clone {i}"
        );
    }
}

/// 10 % of every UDP datagram arriving at the clone hosts is dropped
/// (nftables in their namespaces; this kernel has no netem): every clone
/// still ends with QEMU's line, nothing hangs, and the drops happened.
#[test]
fn clones_repair_ten_percent_loss_on_their_hosts() {
    fork_under_ten_percent_loss("unicast");
}

/// Two families forked at once from two parents on h1, their clones on h2
/// and h3: each clone ends with its own family's QEMU line (no clone ever
/// sees the other family's pages).
#[test]
fn two_families_at_once_never_mix() {
    two_families_at_once("unicast", r#"{"h2": 2, "h3": 2}"#);
}
