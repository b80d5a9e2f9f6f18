//! Client updates driving zones (`clients=host`): a real `forkd serve`
//! (and a local cluster for the migration), real KVM VMs, clients from
//! `forkd::clients::ClientSender`. Every zone's final checksum is compared
//! with `guest_agent::reference`, the host-side oracle for the updates it
//! was sent. Needs /dev/kvm (and root for the cluster test); fails
//! clearly without.

#[allow(dead_code)]
#[path = "api/client.rs"]
mod client;
#[allow(dead_code)]
#[path = "remote/common.rs"]
mod common;
#[allow(dead_code)]
#[path = "api/schema.rs"]
mod schema;

use client::Server;
use forkd::clients::{ClientSender, SenderConfig};
use guest_agent::reference::{reference, reference_events, reference_sequence, Event, OwnedUpdate};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tests::require_kvm;

const MEM: u64 = 256;

fn vm_num(id: &str) -> u64 {
    id.strip_prefix("vm-")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("VM id {id}"))
}

fn get(sock: &Path, path: &str) -> Value {
    let r = client::call_unix(sock, "GET", path, None);
    assert_eq!(r.status, 200, "GET {path}: {}", r.error());
    r.json()
}

fn ingress(sock: &Path) -> SocketAddr {
    let v = get(sock, "/v1/clients");
    v["address"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("/v1/clients: {v}"))
}

fn create(sock: &Path, cmdline: &str) -> String {
    let body = format!(r#"{{"cmdline": "{cmdline}", "mem_mib": {MEM}}}"#);
    let r = client::call_unix(sock, "POST", "/v1/vms", Some(&body));
    assert_eq!(r.status, 201, "create: {}", r.error());
    let id = r.json()["id"].as_str().expect("id").to_owned();
    common::poll(
        sock,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(30),
        |v| v["console_lines"].as_u64() >= Some(2),
    );
    id
}

/// The checksum of a `zone: done` line.
fn checksum(line: &str) -> u64 {
    line.rsplit("checksum=")
        .next()
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no checksum in {line:?}"))
}

fn wait_exit(sock: &Path, id: &str, limit: Duration) -> Value {
    common::poll(sock, &format!("/v1/vms/{id}"), limit, common::all_ended)
}

fn done_checksum(v: &Value) -> u64 {
    assert_eq!(v["exit"]["code"], 0, "the zone ended badly: {v}");
    checksum(v["last_line"].as_str().expect("last line"))
}

/// `per` updates for each of `clients` clients from `first_seq` on, in
/// the order a round-robin client population sends them.
fn updates(clients: u32, first_seq: u64, per: u64) -> Vec<OwnedUpdate> {
    let mut v = Vec::new();
    for s in first_seq..first_seq + per {
        for c in 0..clients {
            let len = 256 + ((c as usize * 31 + s as usize * 7) % 257);
            v.push(OwnedUpdate::generated(c, s, len));
        }
    }
    v
}

fn send_all(tx: &mut ClientSender, vm: u64, ups: &[OwnedUpdate]) {
    for u in ups {
        let seq = tx.send(vm, u.client, &u.payload).expect("send");
        assert_eq!(
            seq, u.seq,
            "the sender numbers each client's updates from 1"
        );
    }
    tx.flush().expect("flush");
}

fn sender() -> ClientSender {
    ClientSender::new(SenderConfig::default()).expect("client socket")
}

/// N updates from 24 clients, all acknowledged; re-sent duplicates are
/// acknowledged as such and not applied again; the final checksum is the
/// reference's for exactly that sequence.
#[test]
fn updates_are_applied_once_and_the_checksum_matches_the_reference() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("forkd.sock"), &[]);
    let sock = dir.path().join("forkd.sock");
    let cmdline = "ticks=300 tick_us=10000 state_mib=2 seed=9 clients=host update_cost=2";
    let id = create(&sock, cmdline);
    let vm = vm_num(&id);
    let mut tx = sender();
    tx.set_zone(vm, ingress(&sock));
    let ups = updates(24, 1, 25);
    send_all(&mut tx, vm, &ups);
    assert!(
        tx.wait_acked(Duration::from_secs(20)).expect("poll"),
        "every update acknowledged: {} left, {:?}; daemon: {}",
        tx.unacked(),
        tx.stats(),
        get(&sock, "/v1/clients")
    );
    let st = tx.stats();
    assert_eq!(st.acked, ups.len() as u64);
    assert_eq!(st.acked_duplicate, 0, "nothing was re-sent yet: {st:?}");
    assert!(tx.latency_us(0.99) > 0);
    eprintln!(
        "update → acknowledged: p50 {} µs, p99 {} µs ({} datagrams for {} updates)",
        tx.latency_us(0.5),
        tx.latency_us(0.99),
        st.datagrams,
        st.updates
    );
    // Duplicates of applied updates: the guest skips them.
    for u in ups.iter().step_by(60).take(10) {
        tx.resend_now(vm, u.client, u.seq, &u.payload)
            .expect("resend");
    }
    let v = common::poll(
        &sock,
        &format!("/v1/vms/{id}"),
        Duration::from_secs(10),
        |v| v["load"]["guest"]["duplicates"].as_u64() >= Some(10),
    );
    assert_eq!(
        v["load"]["guest"]["updates_applied"],
        ups.len() as u64,
        "{v}"
    );
    let c = &v["load"]["clients"];
    assert_eq!(c["applied"], ups.len() as u64, "{v}");
    assert_eq!(c["acked"].as_u64(), Some(ups.len() as u64 + 10), "{v}");
    let metrics = client::call_unix(&sock, "GET", "/metrics", None);
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    let want = format!(
        "forkd_vm_client_updates_applied_total{{vm=\"{id}\"}} {}",
        ups.len()
    );
    assert!(text.contains(&want), "metrics lack {want:?}");
    let end = wait_exit(&sock, &id, Duration::from_secs(30));
    let want = reference_sequence(cmdline, &ups).expect("reference");
    assert_eq!(
        done_checksum(&end),
        want.checksum,
        "the zone's checksum is the reference's for the updates sent"
    );
    // Not the empty run's: the updates counted.
    assert_ne!(
        want.checksum,
        reference_sequence(cmdline, &[])
            .expect("reference")
            .checksum
    );
    s.stop();
}

/// Under QEMU there is no ring: the same ELF ends with the reference's
/// checksum for no updates, and so does forkd's run of it with no client.
#[test]
fn without_a_ring_the_zone_ends_as_the_empty_reference() {
    require_kvm();
    let cmdline = "ticks=40 state_mib=2 seed=11 clients=host update_cost=7";
    let want = reference_sequence(cmdline, &[])
        .expect("reference")
        .checksum;
    let line = tests::qemu_done_line(cmdline, MEM);
    assert_eq!(checksum(&line), want, "QEMU: {line}");
    let forkd = tests::straight_run(cmdline, MEM);
    assert_eq!(checksum(&forkd), want, "forkd, no client: {forkd}");
}

/// With `update_cost`, more updates mean more guest work per tick: the
/// guest's own busy time orders the runs by the updates they were fed.
#[test]
fn update_cost_makes_work_grow_with_the_updates() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("forkd.sock"), &[]);
    let sock = dir.path().join("forkd.sock");
    let cmdline = "ticks=150 tick_us=10000 state_mib=1 seed=2 clients=host update_cost=1000";
    let mut busy = Vec::new();
    for (clients, per) in [(0u32, 0u64), (10, 30), (20, 60)] {
        let id = create(&sock, cmdline);
        let vm = vm_num(&id);
        let mut tx = sender();
        tx.set_zone(vm, ingress(&sock));
        let ups = updates(clients, 1, per);
        send_all(&mut tx, vm, &ups);
        assert!(
            tx.wait_acked(Duration::from_secs(20)).expect("poll"),
            "{} updates unacknowledged",
            tx.unacked()
        );
        // The reaper reads the guest's load while it runs: the last
        // reading before the end.
        let mut last = 0.0;
        let t = Instant::now();
        loop {
            let v = get(&sock, &format!("/v1/vms/{id}"));
            if let Some(b) = v["load"]["guest"]["busy_us_total"].as_f64() {
                last = b;
            }
            if v["state"] == "exited" {
                assert_eq!(done_checksum(&v), {
                    reference_sequence(cmdline, &ups).expect("ref").checksum
                });
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "the zone ends");
            std::thread::sleep(Duration::from_millis(20));
        }
        busy.push((ups.len(), last));
    }
    eprintln!("updates → guest busy µs: {busy:?}");
    assert!(
        busy[0].1 < busy[1].1 && busy[1].1 < busy[2].1,
        "guest busy time grows with the updates applied: {busy:?}"
    );
    s.stop();
}

/// Forks a zone through the API; returns the tick the parent saw it at.
fn host_fork(sock: &Path, id: &str, clones: u64) -> u64 {
    let t = Instant::now();
    loop {
        let body = format!(r#"{{"clones": {clones}}}"#);
        let r = client::call_unix(sock, "POST", &format!("/v1/vms/{id}/fork"), Some(&body));
        if r.status == 409
            && r.error().contains("try again")
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        assert_eq!(r.status, 200, "fork: {}", r.error());
        break;
    }
    let t = Instant::now();
    loop {
        let r = client::call_unix(sock, "GET", &format!("/v1/vms/{id}/console"), None);
        let lines = r.json()["lines"].to_string();
        if lines.contains("forked by the host") {
            return common::fork_tick(sock, id);
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the parent sees the fork"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A zone forked by the host into 2 clones: after the fork, client `c`'s
/// updates go to member `c % 3`; every member ends with the reference's
/// checksum for the updates before the fork plus its share after it.
#[test]
fn a_forked_zone_splits_its_clients_by_clone_id() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("forkd.sock"), &["--max-clones", "4"]);
    let sock = dir.path().join("forkd.sock");
    let cmdline = "ticks=400 tick_us=10000 state_mib=2 seed=3 clients=host update_cost=1";
    let id = create(&sock, cmdline);
    let vm = vm_num(&id);
    let mut tx = sender();
    tx.set_zone(vm, ingress(&sock));
    let before = updates(12, 1, 5);
    send_all(&mut tx, vm, &before);
    assert!(tx.wait_acked(Duration::from_secs(20)).expect("poll"));
    let fork_at = host_fork(&sock, &id, 2);
    let after = updates(12, 6, 5);
    send_all(&mut tx, vm, &after);
    assert!(
        tx.wait_acked(Duration::from_secs(30)).expect("poll"),
        "every update after the fork acknowledged by its member: {} left; {}",
        tx.unacked(),
        get(&sock, "/v1/clients")
    );
    let end = wait_exit(&sock, &id, Duration::from_secs(60));
    let schedule: Vec<_> = before
        .iter()
        .map(|u| (0, u.clone()))
        .chain(after.iter().map(|u| (fork_at, u.clone())))
        .collect();
    let member = |i: u64| {
        let c = format!("{cmdline} fork_at={fork_at} clones=2 as_clone={i}");
        reference(&c, &schedule).expect("reference").checksum
    };
    assert_eq!(done_checksum(&end), member(0), "the parent's share");
    let clones = end["families"][0]["clones"]
        .as_array()
        .expect("clones")
        .clone();
    assert_eq!(clones.len(), 2, "{end}");
    for c in &clones {
        let i = c["clone_id"].as_u64().expect("clone id");
        assert_eq!(c["exit"]["code"], 0, "clone {i}: {c}");
        let line = c["last_line"].as_str().expect("clone's line");
        assert_eq!(checksum(line), member(i), "clone {i}'s share: {line}");
    }
    // The members differ: each applied other clients.
    assert_ne!(member(1), member(2));
    s.stop();
}

/// After a join the zone's clients go back to the parent: it applies
/// every client's updates again, and ends with the reference's checksum
/// for that history.
#[test]
fn after_a_join_the_parent_takes_every_client_again() {
    require_kvm();
    let dir = tempfile::tempdir().expect("tempdir");
    let s = Server::start(&dir.path().join("forkd.sock"), &["--max-clones", "4"]);
    let sock = dir.path().join("forkd.sock");
    let cmdline = "ticks=500 tick_us=10000 state_mib=2 seed=6 clients=host update_cost=1";
    let id = create(&sock, cmdline);
    let vm = vm_num(&id);
    let mut tx = sender();
    tx.set_zone(vm, ingress(&sock));
    let before = updates(9, 1, 4);
    send_all(&mut tx, vm, &before);
    assert!(tx.wait_acked(Duration::from_secs(20)).expect("poll"));
    let fork_at = host_fork(&sock, &id, 2);
    let during = updates(9, 5, 4);
    send_all(&mut tx, vm, &during);
    assert!(tx.wait_acked(Duration::from_secs(30)).expect("poll"));
    let r = client::call_unix(&sock, "POST", &format!("/v1/vms/{id}/join"), Some("{}"));
    assert_eq!(r.status, 200, "join: {}", r.error());
    let after = updates(9, 9, 4);
    send_all(&mut tx, vm, &after);
    assert!(
        tx.wait_acked(Duration::from_secs(30)).expect("poll"),
        "after the join every client is acknowledged by the parent: {} left; {}",
        tx.unacked(),
        get(&sock, "/v1/clients")
    );
    let end = wait_exit(&sock, &id, Duration::from_secs(60));
    let ev: Vec<_> = before
        .iter()
        .map(|u| (0, Event::Update(u.clone())))
        .chain(during.iter().map(|u| (fork_at, Event::Update(u.clone()))))
        .chain([(fork_at, Event::Members(1))])
        .chain(after.iter().map(|u| (fork_at, Event::Update(u.clone()))))
        .collect();
    let c = format!("{cmdline} fork_at={fork_at} clones=2 as_clone=0");
    let want = reference_events(&c, &ev).expect("reference");
    assert_eq!(done_checksum(&end), want.checksum, "the parent's history");
    s.stop();
}

/// A zone on h1 forked with both clones on h2: the clones' clients are
/// forwarded to h2's ingress, which acknowledges them; every member ends
/// with the reference's checksum for its share.
#[test]
fn clones_on_another_host_get_their_clients_forwarded() {
    let (cluster, up) = common::Cluster::up(2);
    let hosts = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (common::socket(&hosts[0]), common::socket(&hosts[1]));
    let ns = hosts[0]["netns"].as_str().expect("netns").to_owned();
    let cmdline = "ticks=500 tick_us=10000 state_mib=2 seed=8 clients=host update_cost=1";
    let id = common::start_vm(&h1, cmdline);
    let vm = vm_num(&id);
    let addr = ingress(&h1);
    let before = updates(12, 1, 4);
    let after = updates(12, 5, 4);
    let (b, a) = (before.clone(), after.clone());
    let (h1c, idc) = (h1.clone(), id.clone());
    let (fork_at, stats) = common::in_netns(&ns, move || {
        let mut tx = sender();
        tx.set_zone(vm, addr);
        send_all(&mut tx, vm, &b);
        assert!(tx.wait_acked(Duration::from_secs(20)).expect("poll"));
        let t = Instant::now();
        loop {
            let body = r#"{"clones": 2, "hosts": {"h2": 2}}"#;
            let r = client::call_unix(&h1c, "POST", &format!("/v1/vms/{idc}/fork"), Some(body));
            if r.status == 409 && t.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            assert_eq!(r.status, 200, "fork: {}", r.error());
            break;
        }
        // The clones run once h2 built them; updates meanwhile are re-sent.
        send_all(&mut tx, vm, &a);
        let all = tx.wait_acked(Duration::from_secs(40)).expect("poll");
        assert!(all, "{} unacknowledged: {:?}", tx.unacked(), tx.stats());
        (common::fork_tick(&h1c, &idc), tx.stats())
    });
    assert_eq!(stats.acked, (before.len() + after.len()) as u64);
    // h2 shows each clone's client counters in its load.
    let vms = get(&h2, "/v1/vms");
    let clone_ids: Vec<String> = vms["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .filter(|v| v["clone_id"].is_u64())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(clone_ids.len(), 2, "{vms}");
    for cid in &clone_ids {
        let v = get(&h2, &format!("/v1/vms/{cid}"));
        if v["state"] == "running" {
            assert!(v["load"]["clients"]["acked"].as_u64() > Some(0), "{v}");
        }
    }
    let ingress_h1 = get(&h1, "/v1/clients");
    assert!(
        ingress_h1["forwarded"].as_u64() >= Some(1),
        "h1 forwarded the clones' clients: {ingress_h1}"
    );
    let end = wait_exit(&h1, &id, Duration::from_secs(60));
    let schedule: Vec<_> = before
        .iter()
        .map(|u| (0, u.clone()))
        .chain(after.iter().map(|u| (fork_at, u.clone())))
        .collect();
    let member = |i: u64| {
        let c = format!("{cmdline} fork_at={fork_at} clones=2 as_clone={i}");
        reference(&c, &schedule).expect("reference").checksum
    };
    assert_eq!(done_checksum(&end), member(0), "the parent's share");
    let clones = end["families"][0]["clones"]
        .as_array()
        .expect("clones")
        .clone();
    assert_eq!(clones.len(), 2, "{end}");
    for c in &clones {
        let i = c["clone_id"].as_u64().expect("clone id");
        assert_eq!(c["host"], "h2", "{c}");
        let line = c["last_line"].as_str().expect("clone's line");
        assert_eq!(checksum(line), member(i), "clone {i}'s share on h2: {line}");
    }
    drop(cluster);
}

/// A zone migrated h1 → h2 while a client streams updates to it: the
/// client is redirected, re-sends what was unacknowledged, nothing is
/// lost, and the zone ends on h2 with the reference's checksum.
#[test]
fn a_migrating_zone_loses_no_update() {
    stream_through_a_migration(0);
}

/// The same with 10 % of the UDP datagrams arriving on either host
/// dropped (updates, acks, redirects): the client's re-sends and the
/// daemons' order rule still apply every update exactly once.
#[test]
fn a_migrating_zone_loses_no_update_under_loss() {
    stream_through_a_migration(10);
}

/// The client runs in h2's namespace (its datagrams cross the bridge to
/// h1, then stay local after the redirect).
fn stream_through_a_migration(loss_pct: u32) {
    let (cluster, up) = common::Cluster::up(2);
    let hosts = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (common::socket(&hosts[0]), common::socket(&hosts[1]));
    let ns1 = hosts[0]["netns"].as_str().expect("netns").to_owned();
    let ns2 = hosts[1]["netns"].as_str().expect("netns").to_owned();
    let cmdline =
        "ticks=800 tick_us=10000 state_mib=8 dirty_pages=8 seed=4 clients=host update_cost=2";
    let id = common::start_vm(&h1, cmdline);
    let vm = vm_num(&id);
    let addr = ingress(&h1);
    if loss_pct > 0 {
        common::add_udp_loss(&ns1, loss_pct);
        common::add_udp_loss(&ns2, loss_pct);
    }
    let ups = updates(16, 1, 120);
    let sent = ups.clone();
    let ns = ns2.clone();
    let streamer = std::thread::spawn(move || {
        common::in_netns(&ns, move || {
            let mut tx = ClientSender::new(SenderConfig {
                retry_after: Duration::from_millis(100),
                ..SenderConfig::default()
            })
            .expect("client socket");
            tx.set_zone(vm, addr);
            // 16 updates every 10 ms: ~1.2 s of traffic for 1920 updates.
            for chunk in sent.chunks(16) {
                send_all(&mut tx, vm, chunk);
                tx.poll(Duration::from_millis(10)).expect("poll");
            }
            let all = tx.wait_acked(Duration::from_secs(40)).expect("poll");
            (all, tx.unacked(), tx.stats(), tx.zone_addr(vm))
        })
    });
    std::thread::sleep(Duration::from_millis(500));
    let st = common::migrate_and_wait(&h1, &id, "h2", Duration::from_secs(60));
    assert_eq!(st["phase"], "committed", "{st}");
    let (all, left, stats, zone) = streamer.join().expect("streamer");
    assert!(all, "{left} updates unacknowledged: {stats:?}");
    assert!(stats.redirects >= 1, "the client was redirected: {stats:?}");
    assert_eq!(zone, Some(ingress(&h2)), "it sends to h2 now");
    assert_eq!(stats.acked, ups.len() as u64);
    if loss_pct > 0 {
        let dropped = common::udp_dropped(&ns1) + common::udp_dropped(&ns2);
        assert!(dropped > 0, "the loss rules dropped datagrams");
        assert!(stats.resent > 0, "the client re-sent: {stats:?}");
        eprintln!("loss {loss_pct}%: {dropped} datagrams dropped, {stats:?}");
    }
    let end = wait_exit(&h2, &id, Duration::from_secs(60));
    let want = reference_sequence(cmdline, &ups).expect("reference");
    assert_eq!(
        done_checksum(&end),
        want.checksum,
        "the migrated zone applied every update exactly once"
    );
    drop(cluster);
}

/// A zone that migrates h1 → h2 and back to h1 between bursts of
/// updates: each host takes its ring over afresh on arrival (h1's own
/// record of the ring, from before the zone left, no longer holds), so
/// every burst is acknowledged and the zone ends with the reference's
/// checksum. (The ingress once kept a departed zone's idle ring state and
/// wrote behind the guest's consumer on its return: those updates were
/// never acknowledged.)
#[test]
fn a_zone_that_comes_back_loses_no_update() {
    let (cluster, up) = common::Cluster::up(2);
    let hosts = up["hosts"].as_array().expect("hosts").clone();
    let (h1, h2) = (common::socket(&hosts[0]), common::socket(&hosts[1]));
    let ns2 = hosts[1]["netns"].as_str().expect("netns").to_owned();
    let cmdline = "ticks=2000 tick_us=10000 state_mib=8 seed=6 clients=host update_cost=2";
    let id = common::start_vm(&h1, cmdline);
    let vm = vm_num(&id);
    let addr = ingress(&h1);
    let bursts = [updates(16, 1, 20), updates(16, 21, 20), updates(16, 41, 20)];
    let all: Vec<OwnedUpdate> = bursts.iter().flatten().cloned().collect();
    let (sock1, sock2, vm_id) = (h1.clone(), h2.clone(), id.clone());
    let ns = ns2.clone();
    let per_burst = common::in_netns(&ns, move || {
        let mut tx = sender();
        tx.set_zone(vm, addr);
        let mut acked = Vec::new();
        for (i, burst) in bursts.iter().enumerate() {
            send_all(&mut tx, vm, burst);
            let done = tx.wait_acked(Duration::from_secs(20)).expect("poll");
            acked.push((done, tx.unacked(), tx.stats()));
            // Then move the zone while no update is on its way.
            let (from, to) = match i {
                0 => (&sock1, "h2"),
                1 => (&sock2, "h1"),
                _ => break,
            };
            let st = common::migrate_and_wait(from, &vm_id, to, Duration::from_secs(60));
            assert_eq!(st["phase"], "committed", "burst {i}, then to {to}: {st}");
        }
        (acked, tx.zone_addr(vm))
    });
    let (acked, zone) = per_burst;
    for (i, (done, left, stats)) in acked.iter().enumerate() {
        assert!(done, "burst {i}: {left} updates unacknowledged: {stats:?}");
    }
    assert_eq!(zone, Some(addr), "it sends to h1 again");
    let end = wait_exit(&h1, &id, Duration::from_secs(60));
    let want = reference_sequence(cmdline, &all).expect("reference");
    assert_eq!(
        done_checksum(&end),
        want.checksum,
        "the zone applied every update exactly once, on both hosts"
    );
    drop(cluster);
}
