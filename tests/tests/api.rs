//! `forkd serve`: the host fork API over its Unix socket (and TCP), with a
//! real server process and real KVM VMs. Clones forked through the API end
//! with QEMU's straight-line checksum; every response is validated against
//! `forkd/api/openapi.json`.

#[path = "api/client.rs"]
mod client;
#[path = "api/schema.rs"]
mod schema;

use client::{Response, Server};
use serde_json::Value;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tests::{qemu_done_line, require_kvm};

const MEM: u64 = 512;

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("forkd.sock")
}

/// GETs `path` until `done` holds for the body (bounded by `limit`).
fn poll(
    s: &Server,
    path: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let r = s.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.error());
        let v = r.json();
        if done(&v) {
            return v;
        }
        assert!(t.elapsed() < limit, "{what} within {limit:?}; last: {v}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn expect_error(r: &Response, status: u16, contains: &str) {
    assert_eq!(r.status, status, "{:?}", String::from_utf8_lossy(&r.body));
    let e = r.error();
    assert!(
        e.contains(contains),
        "error {e:?} should mention {contains:?}"
    );
}

fn create(s: &Server, body: &str) -> String {
    let r = s.post("/v1/vms", body);
    assert_eq!(r.status, 201, "create: {}", r.error());
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("vm-"), "{id}");
    assert_eq!(v["state"], "running");
    assert_eq!(r.header("location"), Some(format!("/v1/vms/{id}").as_str()));
    id
}

/// Forks a VM whose guest has started; the agent announces itself just
/// before "zone: start", so a 409 "try again shortly" is retried briefly.
fn fork(s: &Server, vm: &str, clones: u64) -> Value {
    let t = Instant::now();
    loop {
        let r = s.post(&format!("{vm}/fork"), &format!(r#"{{"clones": {clones}}}"#));
        if r.status == 409
            && r.error().contains("try again")
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        assert_eq!(r.status, 200, "fork: {}", r.error());
        let v = r.json();
        assert_eq!(
            v["clones"],
            serde_json::json!((1..=clones).collect::<Vec<_>>())
        );
        return v;
    }
}

fn started(v: &Value) -> bool {
    v["console_lines"].as_u64() >= Some(2)
}

fn all_ended(v: &Value) -> bool {
    v["state"] == "exited"
        && v["families"].as_array().is_some_and(|fs| {
            fs.iter().all(|f| {
                f["running"] == 0
                    && f["clones"]
                        .as_array()
                        .is_some_and(|cs| cs.iter().all(|c| c["state"] != "running"))
            })
        })
}

#[test]
fn host_fork_through_the_api_matches_qemu() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&socket_in(&dir), &["--max-clones", "4"]);
    // About 300 ms of guest time, so the fork lands mid-run.
    let cmdline = "ticks=60 seed=38 state_mib=8 dirty_pages=10 tick_us=5000";
    let id = create(
        &s,
        &format!(r#"{{"cmdline": "{cmdline}", "mem_mib": {MEM}, "name": "zone-a"}}"#),
    );
    let vm = format!("/v1/vms/{id}");
    poll(&s, &vm, Duration::from_secs(30), "the guest starts", |v| {
        v["last_line"]
            .as_str()
            .is_some_and(|l| l.starts_with("zone: start"))
            || v["console_lines"].as_u64() >= Some(2)
    });
    let forked = fork(&s, &vm, 2);
    assert_eq!(forked["clones"], serde_json::json!([1, 2]));
    let family = forked["family"].as_u64().expect("family id");
    let v = poll(&s, &vm, tests::WAIT, "the VM and its clones end", all_ended);
    assert_eq!(v["name"], "zone-a");
    assert_eq!(v["exit"]["code"], 0, "{v}");
    let console = s.get(&format!("{vm}/console"));
    assert_eq!(console.status, 200);
    let lines: Vec<String> =
        serde_json::from_value(console.json()["lines"].clone()).expect("lines");
    assert_eq!(v["console_lines"], lines.len() as u64);
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
    assert_eq!(v["last_line"], oracle(0).as_str(), "parent");
    let fams = v["families"].as_array().expect("families");
    assert_eq!(fams.len(), 1, "{v}");
    assert_eq!(fams[0]["family"], family);
    assert_eq!(fams[0]["start_failures"], serde_json::json!([]));
    let clones = fams[0]["clones"].as_array().expect("clones");
    assert_eq!(clones.len(), 2, "{v}");
    for (c, i) in clones.iter().zip(1u64..) {
        assert_eq!(c["clone_id"], i);
        assert_eq!(c["state"], "exited", "{c}");
        assert_eq!(c["exit"]["code"], 0, "{c}");
        assert_eq!(c["last_line"], oracle(i).as_str(), "clone {i}");
    }
    assert_ne!(clones[0]["ip"], clones[1]["ip"]);
    assert_ne!(clones[0]["mac"], clones[1]["mac"]);
    let list = s.get("/v1/vms").json();
    assert_eq!(list["vms"][0]["id"], id.as_str());
    assert_eq!(list["vms"][0]["state"], "exited");
    assert_eq!(s.call("DELETE", &vm, None).status, 204);
    expect_error(&s.get(&vm), 404, "no VM");
    expect_error(&s.call("DELETE", &vm, None), 404, "no VM");
    assert_eq!(s.get("/v1/vms").json()["vms"], serde_json::json!([]));
    s.stop();
}

#[test]
fn api_errors_are_clear() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&socket_in(&dir), &["--max-vms", "2", "--max-clones", "4"]);
    let bad_creates = [
        (r#"{"cmdline": "ticks=1""#, "EOF"),
        ("", "empty"),
        ("[1, 2]", "invalid type"),
        (
            r#"{"cmdline": "ticks=1", "mem": 512}"#,
            "unknown field `mem`",
        ),
        (r#"{"mem_mib": 512}"#, "missing field `cmdline`"),
        (r#"{"cmdline": 7}"#, "invalid type"),
        (r#"{"cmdline": "", "mem_mib": 4}"#, "mem_mib"),
        (r#"{"cmdline": "", "mem_mib": -1}"#, "invalid value"),
        (r#"{"cmdline": "", "vcpus": 0}"#, "vcpus"),
        (r#"{"cmdline": "", "vcpus": 33}"#, "vcpus"),
        (
            r#"{"cmdline": "", "guest": "/nonexistent/guest.elf"}"#,
            "not a file",
        ),
        (r#"{"cmdline": "", "name": ""}"#, "name"),
    ];
    for (body, why) in bad_creates {
        let r = s.post("/v1/vms", body);
        expect_error(&r, 400, why);
    }
    expect_error(&s.get("/v1/vms/vm-999"), 404, "no VM with id 'vm-999'");
    expect_error(&s.get("/v1/vms/garbage"), 404, "no VM");
    expect_error(
        &s.post("/v1/vms/vm-999/fork", r#"{"clones": 1}"#),
        404,
        "no VM",
    );
    expect_error(&s.call("DELETE", "/v1/vms/vm-999", None), 404, "no VM");
    expect_error(&s.get("/v2/vms"), 404, "no route");
    expect_error(&s.call("PUT", "/v1/vms", Some("{}")), 405, "not allowed");

    // A guest that ends at once.
    let short = create(
        &s,
        r#"{"cmdline": "ticks=1 seed=1 state_mib=4", "mem_mib": 64}"#,
    );
    let path = format!("/v1/vms/{short}");
    let v = poll(
        &s,
        &path,
        Duration::from_secs(30),
        "the short guest ends",
        |v| v["state"] == "exited",
    );
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert!(
        v["last_line"]
            .as_str()
            .is_some_and(|l| l.starts_with("zone: done")),
        "{v}"
    );
    let fork_path = format!("{path}/fork");
    expect_error(&s.post(&fork_path, r#"{"clones": 1}"#), 409, "exited");
    expect_error(&s.post(&fork_path, r#"{"clones": 0}"#), 422, "1..=4");
    expect_error(&s.post(&fork_path, r#"{"clones": 5}"#), 422, "1..=4");
    expect_error(
        &s.post(&fork_path, r#"{"clones": -1}"#),
        400,
        "invalid value",
    );
    expect_error(
        &s.post(&fork_path, r#"{"clones": "2"}"#),
        400,
        "invalid type",
    );
    expect_error(
        &s.post(&fork_path, r#"{"clones": 1, "x": 1}"#),
        400,
        "unknown field `x`",
    );
    expect_error(&s.post(&fork_path, "{}"), 400, "missing field `clones`");

    // A guest that runs long; the limit counts exited VMs too.
    let long = create(
        &s,
        r#"{"cmdline": "ticks=100000 state_mib=4 tick_us=1000", "mem_mib": 64}"#,
    );
    expect_error(&s.post("/v1/vms", r#"{"cmdline": ""}"#), 429, "limit (2)");
    assert_eq!(
        s.get("/v1/vms").json()["vms"].as_array().map(Vec::len),
        Some(2)
    );
    let long_path = format!("/v1/vms/{long}");
    poll(
        &s,
        &long_path,
        Duration::from_secs(30),
        "the guest starts",
        started,
    );
    fork(&s, &long_path, 2);
    let v = s.get(&long_path).json();
    assert_eq!(v["state"], "running");
    assert_eq!(v["families"][0]["clones"][1]["state"], "running", "{v}");
    // A second fork while the family runs is a clear refusal, at once.
    let t = Instant::now();
    expect_error(
        &s.post(&format!("{long_path}/fork"), r#"{"clones": 1}"#),
        409,
        "still running",
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // DELETE kills the VM and its running clones, promptly.
    let t = Instant::now();
    assert_eq!(s.call("DELETE", &long_path, None).status, 204);
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "DELETE took {:?}",
        t.elapsed()
    );
    expect_error(&s.get(&long_path), 404, "no VM");
    // The slot is free again; SIGTERM kills this one and its clone.
    let last = create(
        &s,
        r#"{"cmdline": "ticks=100000 state_mib=4 tick_us=1000", "mem_mib": 64}"#,
    );
    let last = format!("/v1/vms/{last}");
    poll(
        &s,
        &last,
        Duration::from_secs(30),
        "the guest starts",
        started,
    );
    fork(&s, &last, 1);
    s.stop();
}

#[test]
fn socket_and_tcp_are_guarded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = socket_in(&dir);
    let s = Server::start(&sock, &["--tcp", "0"]);
    assert!(
        s.banner.contains(&format!("unix:{}", sock.display())),
        "{}",
        s.banner
    );
    // A second server on a live socket refuses and leaves it alone.
    match Server::try_start(&sock, &[]) {
        Ok(_) => panic!("a second server started on a live socket"),
        Err((status, stderr)) => {
            assert!(!status.success());
            assert!(stderr.contains("another server answers"), "{stderr}");
        }
    }
    assert_eq!(s.get("/v1/vms").status, 200);
    // TCP listens on loopback only, with the same API.
    let tcp = s
        .banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp:"))
        .unwrap_or_else(|| panic!("no tcp address in {:?}", s.banner))
        .to_owned();
    assert!(tcp.starts_with("127.0.0.1:"), "{tcp}");
    assert_eq!(Server::call_tcp(&tcp, "GET", "/v1/vms").status, 200);
    // The served document is the one in the repository.
    let served = s.get("/v1/openapi.json").json();
    assert_eq!(&served, schema::spec().doc());
    let status = s.stop_with(libc::SIGINT);
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "socket left behind after SIGINT");

    // A stale socket (nobody listening) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("stale socket"));
    assert!(sock.exists());
    Server::start(&sock, &[]).stop();

    // Something that is not a socket is never removed.
    std::fs::write(&sock, b"keep me").expect("file");
    let (status, stderr) = Server::try_start(&sock, &[]).err().expect("refused");
    assert!(
        !status.success() && stderr.contains("not a socket"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&sock).expect("file kept"), b"keep me");
    std::fs::remove_file(&sock).expect("rm");

    // A non-loopback TCP address needs --tcp-allow-remote.
    let (status, stderr) = Server::try_start(&sock, &["--tcp", "0.0.0.0:0"])
        .err()
        .expect("refused");
    assert!(
        !status.success() && stderr.contains("not a loopback address"),
        "{stderr}"
    );
    assert!(!sock.exists());
    // --tcp-allow-remote needs --token-file.
    let (status, stderr) = Server::try_start(&sock, &["--tcp", "0.0.0.0:0", "--tcp-allow-remote"])
        .err()
        .expect("refused");
    assert!(
        !status.success() && stderr.contains("--token-file"),
        "{stderr}"
    );
    // A token file readable by others is refused.
    let token_file = dir.path().join("token");
    let token = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    std::fs::write(&token_file, format!("{token}\n")).expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let tf = token_file.to_str().expect("utf-8 path");
    let (status, stderr) = Server::try_start(&sock, &["--tcp", "0", "--token-file", tf])
        .err()
        .expect("refused");
    assert!(
        !status.success() && stderr.contains("chmod 600"),
        "{stderr}"
    );
    // With a token file, TCP needs the bearer token; the Unix socket not.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let s = Server::start(&sock, &["--tcp", "0", "--token-file", tf]);
    let tcp = s
        .banner
        .split_whitespace()
        .find_map(|w| w.strip_prefix("tcp:"))
        .unwrap_or_else(|| panic!("no tcp address in {:?}", s.banner))
        .to_owned();
    assert_eq!(s.get("/v1/vms").status, 200);
    let bearer = format!("Bearer {token}");
    let ok = client::call_tcp_with(&tcp, "GET", "/v1/vms", &[("Authorization", &bearer)]);
    assert_eq!(ok.status, 200);
    let r = Server::call_tcp(&tcp, "GET", "/v1/vms");
    expect_error(&r, 401, "Authorization");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let wrong = format!("Bearer {}", token.replace('0', "1"));
    for (path, auth) in [
        ("/v1/vms", wrong.as_str()),
        ("/v1/vms/vm-1", "Basic Zm9vOmJhcg=="),
        ("/v1/openapi.json", "Bearer"),
    ] {
        let r = client::call_tcp_with(&tcp, "GET", path, &[("Authorization", auth)]);
        expect_error(&r, 401, "unauthorized");
    }
    s.stop();
}

/// A guest that lies in its HELLO (a 1 TiB bitmap; addresses past the end
/// of memory) fails alone with a clear error; a VM beside it in the same
/// daemon finishes with its QEMU checksum; a two-vCPU VM asked to fork is
/// refused clearly.
#[test]
fn hostile_guests_fail_alone() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&socket_in(&dir), &["--max-vms", "8"]);
    let good_cmdline = "ticks=40 seed=5 state_mib=4 tick_us=2000";
    let good = create(
        &s,
        &format!(r#"{{"cmdline": "{good_cmdline}", "mem_mib": 64}}"#),
    );
    let mut hostile = Vec::new();
    for mode in [1, 2] {
        hostile.push(create(
            &s,
            &format!(
                r#"{{"cmdline": "ticks=40 state_mib=4 hostile_hello={mode}", "mem_mib": 64}}"#
            ),
        ));
    }
    for (id, why) in hostile.iter().zip(["bitmap", "outside guest memory"]) {
        let v = poll(
            &s,
            &format!("/v1/vms/{id}"),
            Duration::from_secs(30),
            "the hostile guest fails",
            |v| v["state"] == "exited",
        );
        assert_eq!(v["exit"]["code"], 103, "{v}");
        let reason = v["exit"]["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("HELLO refused") && reason.contains(why),
            "{reason}"
        );
    }
    let two = create(
        &s,
        r#"{"cmdline": "ticks=100000 state_mib=4 tick_us=1000", "mem_mib": 64, "vcpus": 2}"#,
    );
    let two = format!("/v1/vms/{two}");
    poll(
        &s,
        &two,
        Duration::from_secs(30),
        "the guest starts",
        started,
    );
    expect_error(
        &s.post(&format!("{two}/fork"), r#"{"clones": 1}"#),
        409,
        "2 vCPUs",
    );
    let v = poll(
        &s,
        &format!("/v1/vms/{good}"),
        Duration::from_secs(60),
        "the good guest ends",
        |v| v["state"] == "exited",
    );
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(v["last_line"], qemu_done_line(good_cmdline, 64).as_str());
    s.stop();
}

/// Load, measured: a guest computing flat out uses a good part of a core
/// of vCPU time per second, one that sleeps between short ticks almost
/// none; the host's figures and the Prometheus text carry them, and the
/// fork counter counts a fork.
#[test]
fn load_is_measured_and_exported() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&socket_in(&dir), &["--max-clones", "2"]);
    // Flat out: 32 MiB of state scanned every tick, no pacing.
    let busy = create(
        &s,
        r#"{"cmdline": "ticks=100000 seed=3 state_mib=32", "mem_mib": 256}"#,
    );
    // Sleeping: a tiny state, 50 ms ticks (OP_SLEEP between them).
    let idle = create(
        &s,
        r#"{"cmdline": "ticks=100000 seed=4 state_mib=1 tick_us=50000", "mem_mib": 64}"#,
    );
    let load = |id: &str| {
        poll(
            &s,
            &format!("/v1/vms/{id}"),
            Duration::from_secs(20),
            "two load samples",
            |v| {
                v["load"]["cpu_seconds"].as_f64() > Some(0.0)
                    && v["load"]["cpu_cores"].as_f64() > Some(0.0)
            },
        )["load"]
            .clone()
    };
    std::thread::sleep(Duration::from_millis(2500));
    let (b, i) = (load(&busy), load(&idle));
    eprintln!("busy {b}, idle {i}");
    let cores = |v: &Value| v["cpu_cores"].as_f64().expect("cpu_cores");
    assert!(cores(&b) > 0.2, "busy guest: {b}");
    assert!(cores(&i) < 0.1, "sleeping guest: {i}");
    assert!(cores(&b) > 4.0 * cores(&i), "busy {b} vs idle {i}");
    // The busy guest touched its 32 MiB state.
    assert!(b["resident_bytes"].as_u64() >= Some(32 << 20), "{b}");
    let h = s.get("/v1/host").json();
    assert_eq!(h["vms"], 2, "{h}");
    assert!(h["cpu_cores"].as_f64() >= Some(cores(&b) * 0.5), "{h}");
    assert!(h["capacity_cores"].as_f64() >= Some(1.0), "{h}");
    fork(&s, &format!("/v1/vms/{idle}"), 2);
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    let text = String::from_utf8(r.body.clone()).expect("utf-8");
    for want in [
        "# TYPE forkd_vm_cpu_seconds_total counter",
        &format!("forkd_vm_cpu_cores{{vm=\"{busy}\"}} "),
        &format!("forkd_vm_resident_bytes{{vm=\"{idle}\"}} "),
        "forkd_forks_total 1\n",
        "forkd_fork_clones_total 2\n",
        "forkd_vms 2\n",
        "forkd_migrations_total{outcome=\"committed\"} 0\n",
        "forkd_memserver_requests_total ",
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    for id in [&busy, &idle] {
        assert_eq!(s.call("DELETE", &format!("/v1/vms/{id}"), None).status, 204);
    }
}

/// The dirty rate, sampled in windows of KVM's dirty log: a guest that
/// writes `dirty_pages=D` pages (and its 256 client updates) every
/// `tick_us=U` shows a rate near what it writes — distinct pages of its
/// state per second over the window — far above a sleeping guest's; both
/// in `load` and in `/metrics`; a fork's clones show as the parent's
/// clone fault rate.
#[test]
fn dirty_and_fault_rates_are_measured_and_exported() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(
        &socket_in(&dir),
        &[
            "--max-clones",
            "2",
            "--dirty-sample-every-ms",
            "1000",
            "--dirty-window-ms",
            "500",
        ],
    );
    let (state_mib, d, u) = (32u64, 64u64, 20_000u64);
    let writer = create(
        &s,
        &format!(
            r#"{{"cmdline": "ticks=100000 seed=5 state_mib={state_mib} dirty_pages={d} tick_us={u}", "mem_mib": 256}}"#
        ),
    );
    let idle = create(
        &s,
        r#"{"cmdline": "ticks=100000 seed=4 state_mib=1 tick_us=50000", "mem_mib": 64}"#,
    );
    // Past the boot (which writes the whole state once) and a few windows.
    std::thread::sleep(Duration::from_millis(3500));
    let rate = |id: &str| {
        let v = poll(
            &s,
            &format!("/v1/vms/{id}"),
            Duration::from_secs(20),
            "a dirty-rate window",
            |v| v["load"]["dirty_pages_per_s"].as_f64().is_some(),
        );
        v["load"]["dirty_pages_per_s"].as_f64().expect("rate")
    };
    let (w, i) = (rate(&writer), rate(&idle));
    // Distinct pages of the state written in a 0.5 s window, random pages
    // at (D + 256 updates) per tick: P·(1 − e^(−writes/P)) per window.
    let pages = (state_mib << 20) as f64 / 4096.0;
    let writes = (d + 256) as f64 * 1e6 / u as f64 * 0.5;
    let expected = pages * (1.0 - (-writes / pages).exp()) / 0.5;
    eprintln!("writer {w:.0} pages/s (expected ~{expected:.0}), idle {i:.0} pages/s");
    // Generous: ticks run late while the log traps the first write to
    // each page (~33 µs each on this shadow-paging KVM).
    assert!(
        w > 0.25 * expected && w < 1.5 * expected + 1000.0,
        "writer: {w:.0} pages/s, expected ~{expected:.0}"
    );
    assert!(w > 5.0 * i, "writer {w:.0} vs idle {i:.0} pages/s");
    let text = String::from_utf8(s.get("/metrics").body).expect("utf-8");
    for want in [
        "# TYPE forkd_vm_dirty_pages_per_second gauge",
        &format!("forkd_vm_dirty_pages_per_second{{vm=\"{writer}\"}} "),
        &format!("forkd_vm_dirty_pages_per_second{{vm=\"{idle}\"}} "),
        &format!("forkd_vm_faults_per_second{{vm=\"{idle}\",of=\"clones\"}} "),
        &format!("forkd_vm_faults_per_second{{vm=\"{writer}\",of=\"own\"}} 0\n"),
    ] {
        assert!(text.contains(want), "no {want:?} in:\n{text}");
    }
    let exported: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!(
                "forkd_vm_dirty_pages_per_second{{vm=\"{writer}\"}} "
            ))
        })
        .and_then(|v| v.parse().ok())
        .expect("the writer's gauge");
    assert!(exported > 5.0 * i, "exported {exported:.0} vs idle {i:.0}");
    // The idle zone forks; its clones fault their memory in.
    fork(&s, &format!("/v1/vms/{idle}"), 2);
    poll(
        &s,
        &format!("/v1/vms/{idle}"),
        Duration::from_secs(10),
        "the clones' faults counted as a rate",
        |v| {
            v["load"]["clone_faults_per_s"].as_f64() > Some(0.0)
                && v["families"][0]["clones"]
                    .as_array()
                    .is_some_and(|cs| cs.iter().any(|c| c["faults_per_s"].as_f64() > Some(0.0)))
        },
    );
    let text = String::from_utf8(s.get("/metrics").body).expect("utf-8");
    let want = format!("forkd_clone_faults_per_second{{vm=\"{idle}\",family=");
    assert!(text.contains(&want), "no {want:?} in:\n{text}");
    for id in [&writer, &idle] {
        assert_eq!(s.call("DELETE", &format!("/v1/vms/{id}"), None).status, 204);
    }
}
