//! VM fork: every clone I ends with the checksum QEMU prints for the
//! straight-line run `as_clone=I`, the parent with `as_clone=0`.

use forkd::fork::host::{fork_vm, HostForkError};
use forkd::fork::parent::{ForkHub, ForkOptions};
use forkd::fork::ForkError;
use forkd::vmm::{Vm, VmExit};
use memserver::server::MemServer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::{config, finish, forkd, qemu_done_line, require_kvm, stdout_lines};

const MEM: u64 = 512;

fn memserver() -> Arc<MemServer> {
    Arc::new(MemServer::loopback().expect("memory server"))
}

/// Boots `cmdline` with a fork hub and waits until the zone runs.
fn boot_forkable(cmdline: &str) -> (Vm, Arc<ForkHub>) {
    require_kvm();
    let hub = ForkHub::new(ForkOptions::default(), memserver());
    let vm = Vm::boot_with(&config(cmdline, MEM), Some(hub.clone())).expect("boot");
    let t = Instant::now();
    while !vm
        .console()
        .lines()
        .iter()
        .any(|l| l.starts_with("zone: start"))
    {
        assert!(t.elapsed() < Duration::from_secs(30), "guest never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    (vm, hub)
}

/// Waits (bounded) until the guest has forked through `hub`.
fn wait_forked(hub: &ForkHub) {
    let t = Instant::now();
    while hub.families().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest never forked"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// QEMU's line for VM `i` of a host fork of `parent` into `clones`: the
/// straight-line run forking at the tick the parent saw the fork.
fn host_fork_oracle(parent: &Vm, cmdline: &str, clones: u64) -> impl Fn(u64) -> String {
    let tick = host_fork_tick(parent);
    let cmdline = cmdline.to_string();
    move |i| {
        qemu_done_line(
            &format!("{cmdline} fork_at={tick} clones={clones} as_clone={i}"),
            MEM,
        )
    }
}

/// The tick at which the parent saw a host-initiated fork.
fn host_fork_tick(parent: &Vm) -> u64 {
    let lines = parent.console().lines();
    lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("zone: forked by the host before tick ")?
                .strip_suffix(": clone=0")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("the parent did not see the fork: {lines:?}"))
}

struct ForkRun {
    parent: String,
    /// (clone id, its `zone: done` line without the prefix).
    clones: Vec<(u64, String)>,
    fork: serde_json::Value,
}

fn fork_run(cmdline: &str, extra: &[&str]) -> ForkRun {
    let mut args = vec!["run", "--cmdline", cmdline, "--json", "--timeout-s", "120"];
    args.extend_from_slice(extra);
    let out = forkd(&args);
    assert!(out.status.success(), "{out:?}");
    let lines = stdout_lines(&out);
    let parent = lines
        .iter()
        .find(|l| l.starts_with("zone: done clone=0"))
        .unwrap_or_else(|| panic!("no parent done line in {lines:?}"))
        .clone();
    let mut clones: Vec<(u64, String)> = lines
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("[clone-")?;
            let (id, line) = rest.split_once("] ")?;
            line.starts_with("zone: done")
                .then(|| (id.parse().ok(), line.to_string()))
                .and_then(|(id, line)| Some((id?, line)))
        })
        .collect();
    clones.sort();
    let summary: serde_json::Value =
        serde_json::from_str(lines.last().expect("summary")).expect("JSON summary");
    ForkRun {
        parent,
        clones,
        fork: summary["fork"].clone(),
    }
}

fn matches_qemu(cmdline: &str, clones: u64) -> ForkRun {
    let run = fork_run(cmdline, &[]);
    assert_eq!(
        run.parent,
        qemu_done_line(&format!("{cmdline} as_clone=0"), MEM),
        "parent of '{cmdline}'"
    );
    assert_eq!(
        run.clones.len() as u64,
        clones,
        "clone lines: {:?}",
        run.clones
    );
    for (id, line) in &run.clones {
        assert_eq!(
            line,
            &qemu_done_line(&format!("{cmdline} as_clone={id}"), MEM),
            "clone {id} of '{cmdline}'"
        );
    }
    assert_eq!(run.fork["clones"], clones);
    let desc = run.fork["descriptor_bytes"].as_u64().unwrap();
    assert!(desc > 0 && desc < 1 << 20, "descriptor of {desc} bytes");
    run
}

#[test]
fn one_clone() {
    matches_qemu(
        "ticks=12 seed=31 state_mib=16 dirty_pages=20 fork_at=4 clones=1",
        1,
    );
}

#[test]
fn four_clones() {
    matches_qemu(
        "ticks=12 seed=32 state_mib=16 alloc_mib=2 dirty_pages=20 fork_at=6 clones=4",
        4,
    );
}

#[test]
fn sixteen_clones() {
    matches_qemu(
        "ticks=8 seed=33 state_mib=8 dirty_pages=10 fork_at=3 clones=16",
        16,
    );
}

/// A paced zone (asleep in the VMM between ticks) forks, and parent and
/// clones, pacing on asleep, end with QEMU's checksums.
#[test]
fn paced_fork_matches_qemu() {
    matches_qemu(
        "ticks=10 seed=40 state_mib=8 dirty_pages=20 fork_at=4 clones=2 tick_us=20000",
        2,
    );
}

/// A host fork of a guest asleep in `OP_SLEEP` (0.1 s ticks): the parent
/// and every clone wake, see the fork and end with QEMU's checksums.
#[test]
fn host_fork_of_a_sleeping_guest_matches_qemu() {
    let cmdline = "ticks=6 seed=41 state_mib=8 dirty_pages=10 tick_us=100000";
    let (mut parent, hub) = boot_forkable(cmdline);
    std::thread::sleep(Duration::from_millis(150));
    let family = fork_vm(&mut parent, &hub, 2).expect("host fork of a sleeping guest");
    let parent_done = finish(&mut parent);
    assert!(
        hub.wait_clones(Duration::from_secs(60)),
        "clones still running"
    );
    let oracle = host_fork_oracle(&parent, cmdline, 2);
    assert_eq!(parent_done, oracle(0));
    let report = family.report();
    assert_eq!(report.clones.len(), 2, "{:?}", report.start_failures);
    for c in &report.clones {
        assert_eq!(c.exit, VmExit::Guest(0), "clone {}", c.clone_id);
        assert_eq!(c.last_line.as_deref(), Some(oracle(c.clone_id).as_str()));
    }
}

#[test]
fn fork_at_the_first_and_after_the_last_tick() {
    matches_qemu("ticks=6 seed=34 state_mib=4 fork_at=0 clones=2", 2);
    matches_qemu("ticks=6 seed=35 state_mib=4 fork_at=6 clones=2", 2);
}

#[test]
fn avoidance_heuristics_on_and_off() {
    let cmdline = "ticks=10 seed=36 state_mib=8 alloc_mib=4 fork_at=3 clones=2";
    let on = matches_qemu(cmdline, 2);
    let avoided = on.fork["pages_avoided"].as_u64().unwrap();
    assert!(avoided > 0, "no pages avoided: {}", on.fork);
    // Heuristic b: each clone's client inbox (16 pages) is declared.
    assert_eq!(on.fork["pages_declared"], 32, "{}", on.fork);
    let off = fork_run(cmdline, &["--no-avoidance"]);
    assert_eq!(off.parent, on.parent);
    assert_eq!(off.clones, on.clones, "checksums with heuristics off");
    assert_eq!(off.fork["pages_avoided"], 0);
    assert_eq!(off.fork["pages_declared"], 0);
    // What the prefetcher installs first depends on timing; together with
    // the demand fetches it must cover the avoided pages when avoidance is
    // off.
    let moved = |f: &serde_json::Value| {
        f["pages_fetched"].as_u64().unwrap() + f["pages_prefetched"].as_u64().unwrap()
    };
    assert!(
        moved(&off.fork) > moved(&on.fork),
        "heuristics off should fetch more: on {} / off {}",
        on.fork,
        off.fork
    );
}

#[test]
fn memserver_gone_mid_run_stops_clones_not_the_parent() {
    require_kvm();
    let cmdline = "ticks=40 seed=37 state_mib=64 tick_us=20000 fork_at=2 clones=2";
    let server = memserver();
    // One page per fetch: the clones need seconds to fault 64 MiB in, so
    // stopping the server 300 ms after the fork catches them mid-run.
    let hub = ForkHub::new(
        ForkOptions {
            readahead: 1,
            // The clones fetch through the server this test stops.
            local_direct: false,
            ..Default::default()
        },
        server.clone(),
    );
    let mut parent = Vm::boot_with(&config(cmdline, MEM), Some(hub.clone())).expect("boot");
    wait_forked(&hub);
    std::thread::sleep(Duration::from_millis(300));
    server.stop();
    let stopped = Instant::now();
    assert!(
        hub.wait_clones(Duration::from_secs(30)),
        "clones still running"
    );
    let took = stopped.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "clones took {took:?} to stop"
    );
    let report = hub.families()[0].report();
    let mut ended = 0;
    for c in &report.clones {
        match &c.exit {
            VmExit::Failed(why) => assert!(why.contains("did not answer"), "{why}"),
            other => panic!("clone {} ended {other:?}, expected a failure", c.clone_id),
        }
        ended += 1;
    }
    for (id, why) in &report.start_failures {
        assert!(why.contains("memory server"), "clone {id}: {why}");
        ended += 1;
    }
    assert_eq!(ended, 2);
    // The parent is unharmed and finishes with its straight-line checksum.
    assert_eq!(
        finish(&mut parent),
        qemu_done_line(&format!("{cmdline} as_clone=0"), MEM)
    );
}

#[test]
fn host_initiated_fork_matches_qemu() {
    // About 300 ms of guest time, so the host forks it mid-run.
    let cmdline = "ticks=60 seed=38 state_mib=8 dirty_pages=10 tick_us=5000";
    let (mut parent, hub) = boot_forkable(cmdline);
    std::thread::sleep(Duration::from_millis(60));
    let family = fork_vm(&mut parent, &hub, 3).expect("host fork");
    let parent_done = finish(&mut parent);
    assert!(
        hub.wait_clones(Duration::from_secs(60)),
        "clones still running"
    );
    let oracle = host_fork_oracle(&parent, cmdline, 3);
    assert_eq!(parent_done, oracle(0));
    let report = family.report();
    assert_eq!(report.clones.len(), 3, "{:?}", report.start_failures);
    for c in &report.clones {
        assert_eq!(c.exit, VmExit::Guest(0), "clone {}", c.clone_id);
        assert_eq!(c.last_line.as_deref(), Some(oracle(c.clone_id).as_str()));
    }
}

#[test]
fn host_fork_is_refused_clearly() {
    require_kvm();
    let hub = ForkHub::new(ForkOptions::default(), memserver());
    let mut vm = Vm::boot_with(
        &config("ticks=400 state_mib=4 tick_us=1000", MEM),
        Some(hub.clone()),
    )
    .expect("boot");
    let err = fork_vm(&mut vm, &hub, 0).expect_err("zero clones");
    assert!(err.to_string().contains("clones"), "{err}");
    let err = fork_vm(&mut vm, &hub, 1000).expect_err("too many clones");
    assert!(err.to_string().contains("clones"), "{err}");
    vm.kill();
    assert!(matches!(
        fork_vm(&mut vm, &hub, 1),
        Err(HostForkError::Exited)
    ));
    // Two vCPUs: refused before anything is paused.
    let mut cfg = config("ticks=400 state_mib=4 tick_us=1000", MEM);
    cfg.vcpus = 2;
    let mut two = Vm::boot_with(&cfg, Some(hub.clone())).expect("boot 2 vCPUs");
    assert!(matches!(
        fork_vm(&mut two, &hub, 1),
        Err(HostForkError::MultipleVcpus(2))
    ));
    two.kill();
}

/// A second host fork while the first family still runs is a clear
/// refusal (the parent's memory is frozen by one family at a time); once
/// the family has ended, the VM forks again.
#[test]
fn second_fork_waits_for_the_first_family() {
    let cmdline = "ticks=150 seed=44 state_mib=4 tick_us=5000";
    let (mut parent, hub) = boot_forkable(cmdline);
    std::thread::sleep(Duration::from_millis(60));
    let first = fork_vm(&mut parent, &hub, 1).expect("first fork");
    match fork_vm(&mut parent, &hub, 1) {
        Err(e @ HostForkError::Fork(ForkError::FamilyLive(_))) => assert!(e.is_refusal()),
        Ok(_) if first.is_released() => {} // the clone was already done
        other => panic!("second fork: {other:?}"),
    }
    assert!(
        hub.wait_clones(Duration::from_secs(60)),
        "clones still running"
    );
    assert!(first.is_released());
    if parent.poll_exit().is_none() {
        match fork_vm(&mut parent, &hub, 1) {
            Ok(_) | Err(HostForkError::GuestFinished) | Err(HostForkError::Exited) => {}
            Err(e) => panic!("fork after the family ended: {e:?}"),
        }
    }
    finish(&mut parent);
    assert!(hub.wait_clones(Duration::from_secs(60)));
}

/// Direct isolation: after a host fork, the test itself scribbles over the
/// parent's zone state. The parent's result changes (the write landed);
/// every clone's does not (they see memory as of the fork instant).
#[test]
fn parent_writes_after_the_fork_are_invisible_to_clones() {
    require_kvm();
    let cmdline = "ticks=60 seed=39 state_mib=8 tick_us=5000";
    let (mut parent, hub) = boot_forkable(cmdline);
    std::thread::sleep(Duration::from_millis(40));
    let family = fork_vm(&mut parent, &hub, 2).expect("host fork");
    let state = parent.guest_info().expect("guest info").state_gpa;
    parent.pause().expect("pause");
    let junk = vec![0xa5u8; 64 << 10];
    vm_memory::Bytes::write_slice(parent.memory(), &junk, vm_memory::GuestAddress(state))
        .expect("scribble");
    parent.resume().expect("resume");
    let parent_done = finish(&mut parent);
    assert!(
        hub.wait_clones(Duration::from_secs(60)),
        "clones still running"
    );
    let oracle = host_fork_oracle(&parent, cmdline, 2);
    assert_ne!(
        parent_done,
        oracle(0),
        "the scribble did not reach the parent"
    );
    let report = family.report();
    assert_eq!(report.clones.len(), 2, "{:?}", report.start_failures);
    for c in &report.clones {
        assert_eq!(c.last_line.as_deref(), Some(oracle(c.clone_id).as_str()));
    }
}

/// `sf_kill` (here through the hub, the path the hypercall takes): the
/// clones end, the parent's join returns and it finishes unharmed.
#[test]
fn killing_the_clones_lets_the_parent_finish() {
    require_kvm();
    let cmdline = "ticks=200 seed=41 state_mib=4 tick_us=5000 fork_at=2 clones=3";
    let server = memserver();
    let hub = ForkHub::new(ForkOptions::default(), server.clone());
    let mut parent = Vm::boot_with(&config(cmdline, MEM), Some(hub.clone())).expect("boot");
    wait_forked(&hub);
    std::thread::sleep(Duration::from_millis(100));
    hub.kill(1).expect("kill ticket 1");
    assert!(
        hub.wait_clones(Duration::from_secs(30)),
        "clones still running"
    );
    let report = hub.families()[0].report();
    let killed = report
        .clones
        .iter()
        .filter(|c| c.exit == VmExit::Stopped)
        .count()
        + report.start_failures.len();
    assert_eq!(killed, 3, "{report:?}");
    assert_eq!(
        finish(&mut parent),
        qemu_done_line(&format!("{cmdline} as_clone=0"), MEM)
    );
    assert_eq!(hub.kill(99), Err(guest_agent::abi::STATUS_REFUSED));
    // The family is over: the memory server no longer serves its image.
    let family = hub.families()[0].id();
    let served = server.stats().families;
    assert!(
        served.is_empty(),
        "family {family} still served: {served:?}"
    );
}

/// A restored VM forks like a booted one: snapshot a running zone, restore
/// it (eager memory) with a fork hub, fork it from the host, and every VM
/// ends with QEMU's checksum for its straight-line run. A lazily restored
/// VM (memory mapped from the snapshot file) is refused clearly.
#[test]
fn restored_vm_forks_and_matches_qemu() {
    let cmdline = "ticks=60 seed=45 state_mib=8 dirty_pages=10 tick_us=5000";
    let (mut first, _hub) = boot_forkable(cmdline);
    std::thread::sleep(Duration::from_millis(40));
    first.pause().expect("pause");
    let dir = tempfile::tempdir().expect("tempdir");
    first.snapshot(dir.path()).expect("snapshot");
    first.kill();
    let hub = ForkHub::new(ForkOptions::default(), memserver());
    let mut lazy = Vm::restore_with(
        dir.path(),
        &forkd::vmm::RestoreOptions::default(),
        Some(hub.clone()),
    )
    .expect("lazy restore with a fork hub");
    std::thread::sleep(Duration::from_millis(30));
    match fork_vm(&mut lazy, &hub, 1) {
        Err(e @ HostForkError::Fork(ForkError::FileBackedMemory)) => {
            assert!(e.is_refusal());
            assert!(e.to_string().contains("eager"), "{e}");
        }
        other => panic!("fork of a lazily restored VM: {other:?}"),
    }
    lazy.kill();
    let eager = forkd::vmm::RestoreOptions {
        memory: forkd::vmm::RestoreMemory::Eager,
        ..Default::default()
    };
    let mut restored =
        Vm::restore_with(dir.path(), &eager, Some(hub.clone())).expect("eager restore");
    std::thread::sleep(Duration::from_millis(30));
    let family = fork_vm(&mut restored, &hub, 2).expect("host fork of a restored VM");
    let parent_done = finish(&mut restored);
    assert!(
        hub.wait_clones(Duration::from_secs(60)),
        "clones still running"
    );
    let oracle = host_fork_oracle(&restored, cmdline, 2);
    assert_eq!(parent_done, oracle(0));
    let report = family.report();
    assert_eq!(report.clones.len(), 2, "{:?}", report.start_failures);
    for c in &report.clones {
        assert_eq!(c.last_line.as_deref(), Some(oracle(c.clone_id).as_str()));
    }
}

/// Clone identity: two parents forked at once (two hubs, one daemon-wide
/// pool) give their clones distinct MACs, IPs and generation ids, and each
/// guest finds its own identity in its agent page (it prints what it
/// read). Checksums still match QEMU: the identity never changes them.
#[test]
fn clones_of_two_families_get_distinct_identities() {
    require_kvm();
    let cmdline =
        |seed: u64| format!("ticks=30 seed={seed} state_mib=4 tick_us=2000 fork_at=3 clones=2");
    let server = memserver();
    let parents: Vec<_> = [51u64, 52]
        .iter()
        .map(|&seed| {
            let hub = ForkHub::new(ForkOptions::default(), server.clone());
            let vm = Vm::boot_with(&config(&cmdline(seed), MEM), Some(hub.clone())).expect("boot");
            (seed, vm, hub)
        })
        .collect();
    let (mut macs, mut ips, mut generations) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    for (seed, mut vm, hub) in parents {
        assert_eq!(
            finish(&mut vm),
            qemu_done_line(&format!("{} as_clone=0", cmdline(seed)), MEM)
        );
        assert!(
            hub.wait_clones(Duration::from_secs(60)),
            "clones still running"
        );
        let report = hub.families()[0].report();
        assert_eq!(report.identities.len(), 2);
        for c in &report.clones {
            assert_eq!(
                c.last_line.as_deref(),
                Some(
                    qemu_done_line(&format!("{} as_clone={}", cmdline(seed), c.clone_id), MEM)
                        .as_str()
                )
            );
            let id = &c.identity;
            assert!(macs.insert(id.mac), "MAC {} given twice", id.mac_string());
            assert!(ips.insert(id.ip), "IP {} given twice", id.ip);
            assert!(generations.insert(id.generation), "generation given twice");
            let line = c
                .identity_line
                .as_deref()
                .unwrap_or_else(|| panic!("clone {} printed no identity", c.clone_id));
            assert!(
                line.contains(&format!("generation={}", id.generation_hex())),
                "{line}"
            );
            assert!(line.contains(&format!("ip={}", id.ip)), "{line}");
        }
    }
}

/// The API's DELETE of a VM whose clones' fault handlers died (the memory
/// server stopped under them, in the daemon's own registry): the clones
/// end with a clear error, and DELETE returns within seconds.
#[test]
fn delete_after_the_clones_lost_their_memory_returns_promptly() {
    use forkd::api::registry::{Limits, Registry};
    use forkd::api::types::{CloneState, CreateVm};
    require_kvm();
    let server = memserver();
    let reg = Registry::new(
        server.clone(),
        Limits {
            max_vms: 4,
            max_clones: 4,
        },
        None,
    );
    // The clones fetch through the memory server this test stops.
    reg.set_local_direct(false);
    let id = reg
        .create(CreateVm {
            cmdline: "ticks=100000 seed=46 state_mib=64 tick_us=1000".into(),
            mem_mib: MEM,
            vcpus: 1,
            guest: None,
            name: None,
            placement: None,
            distribution: None,
            heuristics: None,
        })
        .expect("create");
    let t = Instant::now();
    loop {
        let req = forkd::api::types::ForkVm {
            clones: 2,
            hosts: None,
            spread: None,
            distribution: None,
            heuristics: None,
        };
        match reg.fork(id, req) {
            Ok(_) => break,
            Err(e)
                if e.to_string().contains("try again")
                    || format!("{e:?}").contains("AgentNotReady") =>
            {
                assert!(t.elapsed() < Duration::from_secs(30), "never forkable: {e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("fork: {e:?}"),
        }
    }
    // The clones fault their 64 MiB in from a server that is now gone.
    server.stop();
    let t = Instant::now();
    let clones = loop {
        let d = reg.detail(id).expect("detail");
        let clones = d.families[0].clones.clone();
        if clones.iter().all(|c| c.state != CloneState::Running) {
            break clones;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "clones still running: {clones:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    for c in &clones {
        let why = c
            .exit
            .as_ref()
            .map(|e| e.reason.clone())
            .or(c.error.clone())
            .unwrap_or_default();
        assert!(
            why.contains("memory") || why.contains("did not answer"),
            "clone {}: {why}",
            c.clone_id
        );
    }
    let t = Instant::now();
    reg.remove(id).expect("DELETE");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "DELETE took {:?}",
        t.elapsed()
    );
    reg.shutdown();
}
