//! `forkd vm ...`, the client CLI, against a real `forkd serve` on a Unix
//! socket: create a zone, list it, fork it with `--wait` (progress, then the
//! family report), read its console, delete it. Clone results equal QEMU's.

// Only the server harness of the API tests' client is used here.
#[allow(dead_code)]
#[path = "api/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "api/schema.rs"]
mod schema;

use client::Server;
use serde_json::Value;
use std::process::Output;
use std::time::{Duration, Instant};
use tests::{qemu_done_line, require_kvm, run_with_timeout};

const MEM: u64 = 512;

fn vm(socket: &std::path::Path, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(tests::forkd_bin());
    cmd.arg("vm").args(args).arg("--socket").arg(socket);
    run_with_timeout(&mut cmd, Duration::from_secs(120))
}

fn ok_json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "status {:?}: {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn vm_commands_drive_a_host() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("forkd.sock");
    let s = Server::start(&socket, &["--max-clones", "4"]);
    let cmdline = "ticks=60 seed=38 state_mib=8 dirty_pages=10 tick_us=5000";
    let created = ok_json(&vm(
        &socket,
        &[
            "create",
            "--cmdline",
            cmdline,
            "--mem",
            &MEM.to_string(),
            "--name",
            "zone-a",
            "--json",
        ],
    ));
    let id = created["id"].as_str().expect("id").to_owned();
    // The table form names the VM.
    let list = vm(&socket, &["list"]);
    let table = String::from_utf8_lossy(&list.stdout);
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id) && table.contains("zone-a"), "{table}");
    // Fork once the guest agent is up (409 "try again shortly" before).
    let t = Instant::now();
    let forked = loop {
        let o = vm(&socket, &["fork", &id, "--clones", "2", "--wait", "--json"]);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        if !o.status.success() && err.contains("try again") && t.elapsed() < Duration::from_secs(10)
        {
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        assert!(err.contains("clones started"), "no progress shown: {err}");
        break ok_json(&o);
    };
    let console = ok_json(&vm(&socket, &["console", &id, "--json"]));
    let lines: Vec<String> = serde_json::from_value(console["lines"].clone()).expect("lines");
    let tick: u64 = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("zone: forked by the host before tick ")?
                .strip_suffix(": clone=0")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the parent did not see the fork: {lines:?}"));
    let oracle = |i: u64| {
        qemu_done_line(
            &format!("{cmdline} fork_at={tick} clones=2 as_clone={i}"),
            MEM,
        )
    };
    let clones = forked["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 2, "{forked}");
    for c in clones {
        let i = c["clone_id"].as_u64().expect("clone id");
        assert_eq!(c["state"], "exited", "{c}");
        assert_eq!(c["last_line"], oracle(i).as_str(), "clone {i}");
    }
    // The parent ends with its straight-line result.
    let t = Instant::now();
    let parent = loop {
        let v = ok_json(&vm(&socket, &["get", &id, "--json"]));
        if v["state"] == "exited" || t.elapsed() > Duration::from_secs(60) {
            break v;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(parent["last_line"], oracle(0).as_str(), "{parent}");
    let get = vm(&socket, &["get", &id]);
    assert!(
        String::from_utf8_lossy(&get.stdout).contains("family"),
        "{get:?}"
    );
    // Delete, then the VM is gone: a clear error, non-zero exit.
    let del = vm(&socket, &["delete", &id]);
    assert!(del.status.success(), "{del:?}");
    let gone = vm(&socket, &["get", &id]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("404"),
        "{gone:?}"
    );
    let bad = vm(&socket, &["get", "garbage"]);
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("not a VM id"),
        "{bad:?}"
    );
    s.stop();
    // No daemon: a clear connection error.
    let none = vm(&socket, &["list"]);
    assert!(!none.status.success());
    assert!(
        String::from_utf8_lossy(&none.stderr).contains("cannot reach the API"),
        "{none:?}"
    );
}
