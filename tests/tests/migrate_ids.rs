//! A migrated VM keeps its id: VM ids are unique across a cluster (each
//! daemon counts in its own interleaved share), the destination registers
//! the VM under its source's id and reserves it when the migration opens;
//! a second migration onto an id the destination has is refused (409) and
//! harms neither VM. Real daemons of a local cluster; needs root and
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
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::{forkd_bin, qemu_done_line};

fn get_status(sock: &Path, id: &str) -> u16 {
    client::call_unix(sock, "GET", &format!("/v1/vms/{id}"), None).status
}

/// Moves `id` from `from` to `to` and checks it is there under its own id
/// and gone from `from`.
fn move_vm(from: &Path, to: &Path, to_name: &str, id: &str) {
    let v = migrate_and_wait(from, id, to_name, Duration::from_secs(30));
    assert_eq!(v["phase"], "committed", "{v}");
    assert_eq!(v["report"]["destination_vm"], id, "{v}");
    assert_eq!(get_status(to, id), 200, "{id} on {to_name}");
    assert_eq!(get_status(from, id), 404, "{id} still on its source");
}

fn last_line(sock: &Path, id: &str) -> String {
    let v = poll(sock, &format!("/v1/vms/{id}"), tests::WAIT, |v| {
        v["state"] == "exited"
    });
    assert_eq!(v["exit"]["code"], 0, "{v}");
    v["last_line"].as_str().expect("last line").to_owned()
}

/// Stops host `i`'s daemon and starts it again as `cluster up` did (its id
/// counter starts over); waits until it answers.
fn restart_daemon(dir: &Path, i: usize) {
    let st: Value = serde_json::from_slice(&std::fs::read(dir.join("state.json")).expect("state"))
        .expect("state.json");
    let hosts = st["hosts"].as_array().expect("hosts");
    let h = &hosts[i];
    let s = |v: &Value| v.as_str().expect("string").to_owned();
    let pid = h["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) on the pid of a daemon this test's cluster started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "daemon {pid} ends");
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock = s(&h["socket"]);
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(s(&h["log"]))
        .expect("log");
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &s(&h["netns"])])
        .arg(forkd_bin())
        .args(["serve", "--socket", &sock, "--tcp", &s(&h["tcp"])])
        .args(["--tcp-allow-remote", "--token-file", &s(&st["token_file"])])
        .args(["--name", &s(&h["name"])]);
    for p in hosts.iter().filter(|p| p["name"] != h["name"]) {
        cmd.arg("--peer")
            .arg(format!("{}={}", s(&p["name"]), s(&p["tcp"])));
    }
    let err = log.try_clone().expect("log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .expect("forkd serve");
    // `cluster down` (the Cluster guard) ends it with the namespace's
    // processes; reaped here then.
    std::thread::spawn(move || child.wait());
    let t = Instant::now();
    loop {
        let up = std::os::unix::net::UnixStream::connect(&sock).is_ok();
        if up && client::call_unix(Path::new(&sock), "GET", "/v1/vms", None).status == 200 {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "daemon restarts");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ids interleave across hosts; a VM keeps its id h1→h2→h1→h2; an id held
/// by an open incoming migration or taken by a VM is refused (409); after
/// h1's daemon restarts, its new first VM has the id of the one living on
/// h2, and migrating it there is refused with 409: both run on and end with
/// QEMU's line.
#[test]
fn a_migrated_vm_keeps_its_id_and_a_taken_id_is_refused() {
    let (c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (socket(&hs[0]), socket(&hs[1]));
    // Runs ~8 s: three migrations and a daemon restart fit.
    let cmd_a = "ticks=1600 seed=7 state_mib=8 dirty_pages=16 tick_us=5000";
    let cmd_b = "ticks=300 seed=8 state_mib=8 dirty_pages=16 tick_us=5000";
    let a = start_vm(&h1, cmd_a);
    assert_eq!(a, "vm-1", "h1 counts 1, 3, 5, …");
    let other = start_vm(&h2, "ticks=1 seed=1");
    assert_eq!(other, "vm-2", "h2 counts 2, 4, 6, …");
    move_vm(&h1, &h2, "h2", &a);
    move_vm(&h2, &h1, "h1", &a);
    move_vm(&h1, &h2, "h2", &a);

    // Daemon to daemon: an id held by an open incoming migration, or of a
    // VM here, is refused; an aborted one frees its id at once.
    let open = |vm: &str| {
        let body = format!(
            r#"{{"source": "test/{vm}", "vm": "{vm}", "mem_mib": 64, "vcpus": 1, "cmdline": "ticks=1"}}"#
        );
        client::call_unix(&h2, "POST", "/v1/migrations", Some(&body))
    };
    let r = open(&a);
    assert_eq!(r.status, 409, "{}", r.error());
    assert!(r.error().contains("exists"), "{}", r.error());
    let r = open("vm-99");
    assert_eq!(r.status, 201, "{}", r.error());
    let mig = r.json()["id"].as_u64().expect("id");
    assert_eq!(r.json()["vm"], "vm-99");
    let r = open("vm-99");
    assert_eq!(r.status, 409, "{}", r.error());
    assert!(r.error().contains("incoming migration"), "{}", r.error());
    let r = client::call_unix(&h2, "DELETE", &format!("/v1/migrations/{mig}"), None);
    assert_eq!(r.status, 200, "{}", r.error());
    assert_eq!(r.json()["state"], "aborted");
    let r = open("vm-99");
    assert_eq!(r.status, 201, "{}", r.error());
    let mig = r.json()["id"].as_u64().expect("id");
    client::call_unix(&h2, "DELETE", &format!("/v1/migrations/{mig}"), None);
    let r = open("vm-x");
    assert_eq!(r.status, 400, "{}", r.error());

    // h1's counter starts over: its next VM is vm-1 again, like A on h2.
    restart_daemon(&c.dir, 0);
    let b = start_vm(&h1, cmd_b);
    assert_eq!(b, a, "the restarted h1 counts from 1 again");
    let r = client::call_unix(
        &h1,
        "POST",
        &format!("/v1/vms/{b}/migrate"),
        Some(r#"{"destination": "h2"}"#),
    );
    assert_eq!(r.status, 409, "{}", r.error());
    assert!(r.error().contains("exists on h2"), "{}", r.error());
    // Nothing harmed: B runs on on h1, A on h2.
    assert_eq!(get_status(&h1, &b), 200);
    assert_eq!(last_line(&h1, &b), qemu_done_line(cmd_b, MEM));
    assert_eq!(last_line(&h2, &a), qemu_done_line(cmd_a, MEM));
}
