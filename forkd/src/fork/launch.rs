//! Starting a family's clones on this host and watching each until it
//! ends: the launcher builds every clone first and only then starts them;
//! a reaper thread per clone records its report and tells the family.

use crate::errors::chain;
use crate::fork::clone::{prepare_clone, CloneOptions, CloneShell, CloneSources, StartedClone};
use crate::fork::descriptor::ForkDescriptor;
use crate::fork::family::{CloneReport, Family, ForkOptions};
use crate::fork::identity::IdentityLease;
use crate::fork::ForkError;
use crate::sync::lock;
use crate::vmm::{Vm, VmError, VmExit};
use memserver::client::{ClientOptions, PageClient};
use memserver::{PageSource, PAGE_SIZE};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A reaper checks its family's kill flag this often.
const REAP_SLICE: Duration = Duration::from_millis(50);

/// Starts the clones of a family, one reaper thread each. All clones are
/// built first and only then started: a running clone faulting its memory
/// in would otherwise slow the building of the next ones (they share the
/// process's address space and the 2 cores).
pub(super) fn launch(
    family: Arc<Family>,
    descriptor: Vec<u8>,
    leases: Vec<IdentityLease>,
    opts: ForkOptions,
    server: std::net::SocketAddr,
    requested_at: Instant,
    mut shells: Vec<CloneShell>,
) {
    let fail = |clone_id: u64, why: String| {
        tracing::warn!("clone {clone_id} of family {}: {why}", family.id);
        lock(&family.report).start_failures.push((clone_id, why));
        family.clone_ended();
    };
    // Multicast: one receiver for this host's clones of the family (none
    // if they all run elsewhere, or read the image directly).
    let receiver = match &family.multicast {
        Some(m) if !leases.is_empty() && !opts.local_direct => {
            let pages = family.image.pages();
            match m.start_receiver(&family.key, pages, server) {
                Ok(r) => Some(r),
                Err(e) => {
                    let why = chain(&e);
                    for lease in leases {
                        fail(lease.identity.clone_id, why.clone());
                    }
                    family.ready_for_push();
                    return;
                }
            }
        }
        _ => None,
    };
    let mut prepared = Vec::new();
    for lease in leases {
        let clone_id = lease.identity.clone_id;
        if family.kill.load(Ordering::Acquire) {
            fail(clone_id, "killed before start".into());
            continue;
        }
        let built = ForkDescriptor::decode(&descriptor)
            .map_err(ForkError::from)
            .and_then(|desc| {
                // The image size is the descriptor's memory: no round trip.
                let client = || {
                    let pages = desc.state.mem_bytes / PAGE_SIZE as u64;
                    let key = family.key.clone();
                    PageClient::with_pages(server, key, pages, ClientOptions::default())
                        .map(|c| Arc::new(c) as Arc<dyn PageSource>)
                        .map_err(ForkError::PageClient)
                };
                let image = || family.image.clone() as Arc<dyn PageSource>;
                let sources = if opts.local_direct {
                    // The frozen image itself: a fault is a copy from it.
                    CloneSources {
                        demand: image(),
                        prefetch: opts.prefetch.then(image),
                        feed: None,
                    }
                } else {
                    CloneSources::network(receiver.as_ref(), opts.prefetch, client)?
                };
                let copts = CloneOptions {
                    echo: opts.echo,
                    name: format!("{}clone-{clone_id}", opts.name_prefix),
                    avoidance: opts.avoidance,
                    readahead: opts.readahead,
                };
                prepare_clone(&desc, lease, sources, &copts, shells.pop())
            });
        match built {
            Ok(p) => prepared.push((clone_id, p)),
            Err(e) => fail(clone_id, chain(&e)),
        }
    }
    if let Some(r) = &receiver {
        r.seal();
    }
    // Every local clone is subscribed now: the push of the allocated
    // ranges may start (across hosts: once every clone host has joined).
    family.ready_for_push();
    for (clone_id, p) in prepared {
        if family.kill.load(Ordering::Acquire) {
            fail(clone_id, "killed before start".into());
            continue;
        }
        let started = match p.start() {
            Ok(c) => c,
            Err(e) => {
                fail(clone_id, chain(&e));
                continue;
            }
        };
        lock(&family.live_faults).insert(clone_id, started.faults.clone());
        family
            .guests
            .insert(clone_id, crate::fork::guests::CloneGuest::of(&started.vm));
        let f = family.clone();
        let reaper = std::thread::Builder::new()
            .name(format!("clone-{clone_id}"))
            .spawn(move || reap(f, started, requested_at));
        match reaper {
            Ok(t) => lock(&family.threads).push(t),
            // The clone (moved into the failed closure) is dropped: stopped.
            Err(e) => {
                lock(&family.live_faults).remove(&clone_id);
                fail(clone_id, format!("reaper thread: {e}"))
            }
        }
    }
}

/// Waits for a clone VM to end, or kills it once `killed` says so.
pub(crate) fn run_to_end(vm: &mut Vm, killed: impl Fn() -> bool) -> VmExit {
    run_until(vm, &killed).unwrap_or_else(|| {
        vm.kill();
        VmExit::Stopped
    })
}

/// Watches `vm` until it ends (its exit) or `stop` holds (`None`: the
/// guest still runs).
pub(crate) fn run_until(vm: &mut Vm, stop: impl Fn() -> bool) -> Option<VmExit> {
    loop {
        if stop() {
            return None;
        }
        match vm.wait(Some(REAP_SLICE)) {
            Ok(e) => return Some(e),
            Err(VmError::WaitTimeout(_)) => continue,
            Err(e) => return Some(VmExit::Failed(chain(&e))),
        }
    }
}

/// Watches one clone until it ends (or the family is killed).
fn reap(family: Arc<Family>, clone: StartedClone, requested_at: Instant) {
    let mut vm = clone.vm;
    let exit = run_to_end(&mut vm, || family.kill.load(Ordering::Acquire));
    let lines = vm.console().lines();
    let report = CloneReport {
        clone_id: clone.lease.identity.clone_id,
        identity: clone.lease.identity,
        start_latency: vm
            .times
            .first_run
            .get()
            .map(|t| t.saturating_duration_since(requested_at)),
        done_latency: vm
            .console()
            .line_time("zone: done")
            .map(|t| t.saturating_duration_since(requested_at)),
        exit,
        last_line: lines
            .iter()
            .rev()
            .find(|l| l.starts_with("zone: done"))
            .or(lines.last())
            .cloned(),
        identity_line: lines
            .iter()
            .find(|l| l.starts_with("zone: clone identity"))
            .cloned(),
        faults: Arc::new(clone.faults.get()),
        pages_declared: clone.service.pages_declared(),
    };
    family.guests.remove(report.clone_id);
    drop(vm);
    let id = report.clone_id;
    lock(&family.report).clones.push(report);
    lock(&family.live_faults).remove(&id);
    family.clone_ended();
}
