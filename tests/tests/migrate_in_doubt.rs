//! A commit in doubt through the API: h2's daemon is replaced by a fake on
//! its address that opens the migration, takes it up to `Commit` and hangs
//! up without acknowledging. The source's worker then asks `DELETE
//! /v1/migrations/{id}` and follows the answer: `aborted` → the guest
//! resumes on h1 and ends with QEMU's line; `committed` → h1 destroys its
//! copy; no answer → the guest stays paused on h1 (`in_doubt`), never
//! running in two places. Real daemon on h1 of a local cluster; needs root
//! and /dev/kvm.

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
use forkd::migrate::protocol::{read_message, write_message, Message};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};
use tests::qemu_done_line;

const MEM_MIB: u64 = 64;
const CMDLINE: &str = "ticks=800 seed=23 state_mib=2 dirty_pages=4 tick_us=5000";
const LIMIT: Duration = Duration::from_secs(20);

/// What the fake destination answers when asked to abort.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Committed,
    Aborted,
    /// 503: it cannot say.
    NoAnswer,
}

fn accept_within(l: &TcpListener, limit: Duration) -> TcpStream {
    l.set_nonblocking(true).expect("nonblocking");
    let t = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking");
                s.set_read_timeout(Some(LIMIT)).expect("timeout");
                return s;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(t.elapsed() < limit, "nobody connected within {limit:?}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// One HTTP request: its request line and body.
fn read_request(s: &mut TcpStream) -> (String, Vec<u8>) {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let n = s.read(&mut buf).expect("request");
        assert!(n > 0, "the request ended early");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = raw[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut buf).expect("body");
        assert!(n > 0, "the body ended early");
        body.extend_from_slice(&buf[..n]);
    }
    (head.lines().next().unwrap_or_default().to_owned(), body)
}

fn respond(s: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(r.as_bytes()).expect("respond");
}

/// Serves h2's API address for one migration per decision: opens it,
/// takes it up to the commit, hangs up, and answers the DELETE as told.
/// Returns the request lines it saw.
fn fake_destination(api: SocketAddr, decisions: Vec<Decision>) -> Vec<String> {
    let listener = TcpListener::bind(api).expect("h2's API address");
    let mut seen = Vec::new();
    for (mig, decision) in (1u64..).zip(decisions) {
        let mut s = accept_within(&listener, LIMIT);
        let (line, body) = read_request(&mut s);
        assert!(line.starts_with("POST /v1/migrations "), "{line}");
        let open: Value = serde_json::from_slice(&body).expect("open body");
        let vm = open["vm"].as_str().expect("vm").to_owned();
        let incoming = TcpListener::bind(SocketAddr::new(api.ip(), 0)).expect("bind");
        let port = incoming.local_addr().expect("addr").port();
        let opened = json!({"id": mig, "port": port, "secret": "42".repeat(32), "vm": vm});
        respond(&mut s, "201 Created", &opened);
        drop(s);
        seen.push(line);
        // The migration itself, up to the commit; then hang up unanswered.
        let mut m = accept_within(&incoming, LIMIT);
        assert!(matches!(read_message(&mut m), Ok(Message::Hello(_))));
        write_message(&mut m, &Message::Welcome).expect("welcome");
        loop {
            match read_message(&mut m).expect("message") {
                Message::State(_) => break,
                Message::RoundEnd { round, .. } => {
                    write_message(&mut m, &Message::RoundAck { round }).expect("ack");
                }
                _ => {}
            }
        }
        write_message(&mut m, &Message::Ready).expect("ready");
        assert_eq!(read_message(&mut m).expect("commit"), Message::Commit);
        drop(m);
        // The source asks what happened.
        let mut s = accept_within(&listener, LIMIT);
        let (line, _) = read_request(&mut s);
        assert_eq!(line, format!("DELETE /v1/migrations/{mig} HTTP/1.1"));
        let state = match decision {
            Decision::Committed => "committed",
            Decision::Aborted => "aborted",
            Decision::NoAnswer => {
                respond(
                    &mut s,
                    "503 Service Unavailable",
                    &json!({"error": "no idea"}),
                );
                seen.push(line);
                continue;
            }
        };
        let status = json!({"id": mig, "source": open["source"], "state": state, "vm": vm,
            "pages_received": 0, "bytes_received": 0, "rounds": 1, "rejected": 0});
        respond(&mut s, "200 OK", &status);
        seen.push(line);
    }
    seen
}

fn create(h1: &Path) -> String {
    let body = format!(r#"{{"cmdline": "{CMDLINE}", "mem_mib": {MEM_MIB}}}"#);
    let r = client::call_unix(h1, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    poll(h1, &format!("/v1/vms/{id}"), LIMIT, |v| {
        v["console_lines"].as_u64() >= Some(2)
    });
    id
}

/// Migrates a new VM from h1 to the fake h2; its final status.
fn migrate_in_doubt(h1: &Path) -> (String, Value) {
    let id = create(h1);
    let v = migrate_and_wait(h1, &id, "h2", LIMIT);
    (id, v)
}

fn console_lines(h1: &Path, id: &str) -> u64 {
    let r = client::call_unix(h1, "GET", &format!("/v1/vms/{id}"), None);
    assert_eq!(r.status, 200, "{}", r.error());
    r.json()["console_lines"].as_u64().expect("lines")
}

#[test]
fn a_commit_in_doubt_follows_the_destinations_decision() {
    let (_c, up) = Cluster::up(2);
    let hs = up["hosts"].as_array().expect("hosts").clone();
    let h1 = socket(&hs[0]);
    let ns = hs[1]["netns"].as_str().expect("netns").to_owned();
    let api: SocketAddr = hs[1]["tcp"].as_str().expect("tcp").parse().expect("addr");
    let pid = hs[1]["pid"].as_u64().expect("pid") as i32;
    // SAFETY: kill(2) on the pid of h2's daemon, which this test's cluster
    // started; the cluster guard cleans up after a dead daemon.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < LIMIT, "h2's daemon ends");
        std::thread::sleep(Duration::from_millis(10));
    }
    let decisions = vec![Decision::Aborted, Decision::Committed, Decision::NoAnswer];
    let fake = std::thread::spawn(move || in_netns(&ns, move || fake_destination(api, decisions)));

    // Aborted: the guest runs on here, intact.
    let (a, v) = migrate_in_doubt(&h1);
    assert_eq!(v["phase"], "aborted", "{v}");
    let why = v["error"].as_str().unwrap_or_default();
    assert!(why.contains("the destination aborted"), "{v}");

    // Committed: the guest runs there; this host's copy is gone.
    let (b, v) = migrate_in_doubt(&h1);
    assert_eq!(v["phase"], "committed", "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("confirmed the commit")),
        "{v}"
    );
    let r = client::call_unix(&h1, "GET", &format!("/v1/vms/{b}"), None);
    assert_eq!(r.status, 404, "{b} still on h1: {}", r.error());

    // No answer: the guest stays paused here (its ~4 s run never ends).
    let created = Instant::now();
    let (c, v) = migrate_in_doubt(&h1);
    assert_eq!(v["phase"], "in_doubt", "{v}");
    let before = console_lines(&h1, &c);

    let seen = fake.join().expect("fake destination");
    assert_eq!(seen.len(), 6, "{seen:?}");
    let v = poll(&h1, &format!("/v1/vms/{a}"), tests::WAIT, |v| {
        v["state"] == "exited"
    });
    assert_eq!(v["exit"]["code"], 0, "{v}");
    assert_eq!(
        v["last_line"],
        qemu_done_line(CMDLINE, MEM_MIB).as_str(),
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(6).saturating_sub(created.elapsed()));
    let r = client::call_unix(&h1, "GET", &format!("/v1/vms/{c}"), None);
    assert_eq!(
        r.json()["state"],
        "running",
        "{c} ran on in doubt: {}",
        r.json()
    );
    assert_eq!(console_lines(&h1, &c), before, "{c} printed in doubt");
    let r = client::call_unix(&h1, "DELETE", &format!("/v1/vms/{c}"), None);
    assert_eq!(r.status, 204, "{}", r.error());
}
