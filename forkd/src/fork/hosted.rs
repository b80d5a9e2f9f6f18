//! Clones on other hosts, the clone host's side: a [`HostedFamily`] is the
//! share of a family a parent's host sent here in an envelope. Its clones
//! are built with the same `prepare_clone` as local ones, their pages
//! fetched from the parent host's memory server with the family's key:
//! by unicast per clone, or (the envelope names a multicast group) through
//! one [`HostReceiver`] for all of this host's clones of the family, as on
//! the parent's host (`fork::mcdist`); the receiver is closed when the last
//! clone here ends. Each clone is watched by a reaper thread. Killing the
//! family (or dropping it) stops and joins them all.
//!
//! A clone migrates: its reaper lends the running VM to the migration
//! worker ([`crate::fork::handover`]) and watches it again if the
//! migration does not commit; if it does, the clone is recorded here as
//! moved (the parent's host, polling, learns where to). On the destination
//! the arrived VM joins the family's share there ([`HostedFamily::adopt`];
//! a share is made for it if that host had none), its missing pages still
//! coming from the family's memory server.

use crate::errors::chain;
use crate::fork::clone::{prepare_clone, CloneOptions, CloneSources, StartedClone};
use crate::fork::descriptor::ForkDescriptor;
use crate::fork::envelope::{cpu_fingerprint, EnvelopeBody, EnvelopeError};
use crate::fork::fault::{FaultCounts, FaultStatsView};
use crate::fork::handover::{Answer, HandoverError, Lender, Returned};
use crate::fork::identity::{CloneIdentity, IdentityLease};
use crate::fork::launch::{run_to_end, run_until};
use crate::fork::mcdist::ReceiverFigures;
use crate::fork::remote::{RemoteClone, RemoteCloneState};
use crate::fork::ForkError;
use crate::sync::{join_all, lock};
use crate::vmm::devices::Console;
use crate::vmm::{Vm, VmExit};
use memserver::client::{ClientOptions, PageClient};
use memserver::mcdist::host::{local_ip_for, HostConfig, HostReceiver};
use memserver::mcdist::McEndpoint;
use memserver::{FamilyKey, PageSource, PAGE_SIZE};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HostedError {
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("the family's descriptor")]
    Descriptor(#[from] crate::fork::descriptor::DescriptorError),
    #[error(transparent)]
    Multicast(#[from] ForkError),
}

/// This host's choices for the clones it hosts (the family's own, such
/// as its heuristics, come in the envelope).
#[derive(Debug, Clone)]
pub struct HostedOptions {
    pub name_prefix: String,
    pub readahead: u64,
}

/// How a hosted clone went, once it has ended.
#[derive(Debug, Clone, Copy, Default)]
struct HostedTimes {
    /// The envelope's arrival → first KVM_RUN / `zone: done` line.
    start_after: Option<Duration>,
    done_after: Option<Duration>,
    faults: Option<FaultCounts>,
}

#[derive(Debug, Clone)]
enum HostedState {
    Running,
    Exited(VmExit),
    Failed(String),
    /// Migrated to this host.
    Moved(String),
}

/// One clone of a hosted family: a VM of this host (`vm_id`).
pub struct HostedClone {
    pub clone_id: u64,
    pub vm_id: u64,
    pub identity: CloneIdentity,
    pub mem_bytes: u64,
    /// Set once the clone's VM exists (never, if it could not be built).
    pub console: OnceLock<Console>,
    state: Mutex<HostedState>,
    times: Mutex<HostedTimes>,
    kill: AtomicBool,
    removed: AtomicBool,
    /// Where a migration borrows the running VM from its reaper.
    lender: Lender<Vm>,
    /// Its guest memory while it runs (the client ingress writes it).
    pub guest: crate::fork::guests::CloneGuests,
}

impl HostedClone {
    fn new(clone_id: u64, vm_id: u64, identity: CloneIdentity, mem_bytes: u64) -> HostedClone {
        HostedClone {
            clone_id,
            vm_id,
            identity,
            mem_bytes,
            console: OnceLock::new(),
            state: Mutex::new(HostedState::Running),
            times: Mutex::new(HostedTimes::default()),
            kill: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            lender: Lender::default(),
            guest: Default::default(),
        }
    }

    /// Takes the running VM from its reaper for a migration; the answer
    /// gives it back or records where it went.
    pub fn borrow(&self, timeout: Duration) -> Result<(Vm, Answer<Vm>), HandoverError> {
        if !self.is_running() {
            return Err(HandoverError::Ended);
        }
        self.lender.borrow(timeout, || self.is_running())
    }

    /// The host it migrated to, once it has.
    pub fn moved_to(&self) -> Option<String> {
        match &*lock(&self.state) {
            HostedState::Moved(h) => Some(h.clone()),
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(*lock(&self.state), HostedState::Running)
    }

    /// The exit, once ended (a clone that failed to start: `Failed`).
    pub fn exit(&self) -> Option<VmExit> {
        match &*lock(&self.state) {
            HostedState::Running => None,
            HostedState::Exited(e) => Some(e.clone()),
            HostedState::Failed(why) => Some(VmExit::Failed(why.clone())),
            HostedState::Moved(h) => Some(VmExit::Failed(format!("migrated to {h}"))),
        }
    }

    /// The `zone: done` line if the clone printed one, else its last line.
    pub fn last_line(&self) -> Option<String> {
        let log = self.console.get()?.log();
        log.lines
            .iter()
            .rev()
            .find(|l| l.starts_with("zone: done"))
            .or(log.lines.last())
            .cloned()
    }

    /// Stops this clone (its reaper notices within a slice).
    pub fn kill(&self) {
        self.kill.store(true, Ordering::Release);
    }

    /// Killed and deleted by the host's user (`DELETE /v1/vms/{id}`).
    pub fn remove(&self) {
        self.removed.store(true, Ordering::Release);
        self.kill();
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    pub fn status(&self) -> RemoteClone {
        let state = match &*lock(&self.state) {
            HostedState::Running => RemoteCloneState::Running,
            HostedState::Exited(e) => RemoteCloneState::Exited {
                code: e.exit_code(),
                reason: e.to_string(),
            },
            HostedState::Failed(why) => RemoteCloneState::Failed(why.clone()),
            HostedState::Moved(h) => RemoteCloneState::Moved { host: h.clone() },
        };
        let t = *lock(&self.times);
        RemoteClone {
            clone_id: self.clone_id,
            state,
            last_line: self.last_line(),
            start_after: t.start_after,
            done_after: t.done_after,
            faults: t.faults,
        }
    }
}

/// The family's multicast receiver on this host, closed when the last
/// local clone ends (or the family is killed); its counters outlive that.
struct SharedReceiver {
    receiver: Arc<HostReceiver>,
    running: AtomicUsize,
}

impl SharedReceiver {
    fn clone_ended(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.receiver.close();
        }
    }
}

/// This host's share of a family whose parent runs elsewhere.
pub struct HostedFamily {
    pub family: u64,
    pub parent_host: String,
    /// The family's key and its memory server's unicast endpoint, for a
    /// clone that migrates on.
    pub key: FamilyKey,
    pub memserver: SocketAddr,
    clones: Mutex<Vec<Arc<HostedClone>>>,
    /// When the envelope arrived (the clones' times count from here).
    pub received: Instant,
    multicast: Option<Arc<SharedReceiver>>,
    kill: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for HostedFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostedFamily")
            .field("family", &self.family)
            .field("parent_host", &self.parent_host)
            .finish()
    }
}

impl HostedFamily {
    /// Builds and starts the clones an opened envelope asks for; `vm_id`
    /// gives each its VM id on this host. A clone that cannot be built is
    /// recorded as failed (the parent learns it by polling); an envelope
    /// from an incompatible CPU is refused whole.
    pub fn start(
        body: EnvelopeBody,
        opts: &HostedOptions,
        mut vm_id: impl FnMut() -> u64,
    ) -> Result<Arc<HostedFamily>, HostedError> {
        let received = Instant::now();
        body.check_cpu(&cpu_fingerprint()?)?;
        let desc = ForkDescriptor::decode(&body.descriptor)?;
        let key = FamilyKey::from_parts(body.family, body.secret);
        let pages = desc.state.mem_bytes / PAGE_SIZE as u64;
        // Multicast: join the family's group on the interface that leads
        // to the parent's memory server, once for all clones here.
        let receiver = match body.multicast {
            Some(m) => {
                let endpoint = McEndpoint {
                    group: m.group,
                    port: m.port,
                    server: m.server,
                };
                let cfg = HostConfig::on(local_ip_for(body.memserver));
                let r = HostReceiver::start(endpoint, &key, pages, cfg)
                    .map_err(|e| HostedError::Multicast(ForkError::Multicast(e)))?;
                Some(Arc::new(r))
            }
            None => None,
        };
        let kill = Arc::new(AtomicBool::new(false));
        let mut clones = Vec::new();
        let mut prepared = Vec::new();
        for c in &body.clones {
            let identity = CloneIdentity {
                clone_id: c.clone_id,
                mac: c.mac,
                ip: c.ip,
                generation: (c.generation[1] as u128) << 64 | c.generation[0] as u128,
            };
            let id = vm_id();
            let name = format!("{}vm-{id}", opts.name_prefix);
            let client = || {
                PageClient::with_pages(body.memserver, key.clone(), pages, ClientOptions::default())
                    .map(|c| Arc::new(c) as Arc<dyn PageSource>)
                    .map_err(ForkError::PageClient)
            };
            let built = (|| {
                let sources = CloneSources::network(receiver.as_ref(), body.prefetch, client)?;
                let copts = CloneOptions {
                    echo: false,
                    name: name.clone(),
                    avoidance: body.avoidance,
                    readahead: opts.readahead,
                };
                prepare_clone(
                    &desc,
                    IdentityLease::foreign(identity),
                    sources,
                    &copts,
                    None,
                )
            })();
            let clone = HostedClone::new(c.clone_id, id, identity, desc.state.mem_bytes);
            if let Err(e) = &built {
                *lock(&clone.state) = HostedState::Failed(chain(e));
            }
            let clone = Arc::new(clone);
            if let Ok(p) = built {
                prepared.push((clones.len(), p));
            }
            clones.push(clone);
        }
        // Every clone here has subscribed: the receiver keeps only what
        // reads wait for.
        if let Some(r) = &receiver {
            r.seal();
        }
        let multicast = receiver.map(|receiver| {
            Arc::new(SharedReceiver {
                receiver,
                running: AtomicUsize::new(prepared.len()),
            })
        });
        if let Some(m) = multicast.as_ref().filter(|_| prepared.is_empty()) {
            m.receiver.close();
        }
        // All built, then all started (as on the parent's host).
        let mut threads = Vec::new();
        for (i, p) in prepared {
            let ended = || {
                if let Some(m) = &multicast {
                    m.clone_ended();
                }
            };
            let started = match p.start() {
                Ok(s) => s,
                Err(e) => {
                    *lock(&clones[i].state) = HostedState::Failed(chain(&e));
                    ended();
                    continue;
                }
            };
            let _ = clones[i].console.set(started.vm.console().clone());
            let g = crate::fork::guests::CloneGuest::of(&started.vm);
            clones[i].guest.insert(clones[i].clone_id, g);
            let (clone, kill, rx) = (clones[i].clone(), kill.clone(), multicast.clone());
            let reaper = std::thread::Builder::new()
                .name(format!("hosted-{}", clone.clone_id))
                .spawn(move || {
                    let StartedClone {
                        vm,
                        service,
                        lease,
                        faults,
                    } = started;
                    reap(clone, vm, Some(faults), kill, received, (service, lease));
                    if let Some(m) = rx {
                        m.clone_ended();
                    }
                });
            match reaper {
                Ok(t) => threads.push(t),
                Err(e) => {
                    *lock(&clones[i].state) = HostedState::Failed(format!("reaper thread: {e}"));
                    ended();
                }
            }
        }
        Ok(Arc::new(HostedFamily {
            family: body.family,
            parent_host: body.parent_host,
            key,
            memserver: body.memserver,
            clones: Mutex::new(clones),
            received,
            multicast,
            kill,
            threads: Mutex::new(threads),
        }))
    }

    /// An empty share of a family, for clones that arrive by migration
    /// (`received`: when the first host of the family got its envelope,
    /// as near as known, so the clones' times keep counting from there).
    pub fn for_arrivals(
        family: u64,
        parent_host: String,
        key: FamilyKey,
        memserver: SocketAddr,
        received: Instant,
    ) -> Arc<HostedFamily> {
        Arc::new(HostedFamily {
            family,
            parent_host,
            key,
            memserver,
            clones: Mutex::new(Vec::new()),
            received,
            multicast: None,
            kill: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Adds a running clone that arrived by migration (its VM already
    /// started, its memory server the family's) and watches it. A record
    /// of the same clone having left this host before gives way to it.
    pub fn adopt(
        &self,
        clone_id: u64,
        vm_id: u64,
        identity: CloneIdentity,
        vm: Vm,
        faults: Option<FaultStatsView>,
    ) -> std::io::Result<Arc<HostedClone>> {
        if lock(&self.clones)
            .iter()
            .any(|c| c.clone_id == clone_id && c.moved_to().is_none())
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("clone {clone_id} of family {} is here already", self.family),
            ));
        }
        let mem_bytes = vm.mem_bytes();
        let clone = Arc::new(HostedClone::new(clone_id, vm_id, identity, mem_bytes));
        let _ = clone.console.set(vm.console().clone());
        let g = crate::fork::guests::CloneGuest::of(&vm);
        clone.guest.insert(clone_id, g);
        let (c, kill, received) = (clone.clone(), self.kill.clone(), self.received);
        let reaper = std::thread::Builder::new()
            .name(format!("hosted-{clone_id}"))
            .spawn(move || reap(c, vm, faults, kill, received, ()))?;
        let mut clones = lock(&self.clones);
        clones.retain(|c| c.clone_id != clone_id);
        clones.push(clone.clone());
        drop(clones);
        lock(&self.threads).push(reaper);
        Ok(clone)
    }

    pub fn clones(&self) -> Vec<Arc<HostedClone>> {
        lock(&self.clones).clone()
    }

    /// The family's receiver on this host (multicast), live or as it
    /// ended.
    pub fn receiver(&self) -> Option<ReceiverFigures> {
        let m = self.multicast.as_ref()?;
        Some(ReceiverFigures::from(&m.receiver.stats()))
    }

    pub fn running(&self) -> usize {
        lock(&self.clones).iter().filter(|c| c.is_running()).count()
    }

    pub fn status(&self) -> Vec<RemoteClone> {
        lock(&self.clones).iter().map(|c| c.status()).collect()
    }

    /// Kills every clone and waits for their reapers.
    pub fn kill(&self) {
        self.kill.store(true, Ordering::Release);
        join_all(&self.threads);
        if let Some(m) = &self.multicast {
            m.receiver.close();
        }
    }
}

impl Drop for HostedFamily {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Watches one hosted clone until it ends, is killed or migrates away;
/// lends it to a migration that asks. `keep` lives as long as the VM here.
fn reap(
    clone: Arc<HostedClone>,
    mut vm: Vm,
    faults: Option<FaultStatsView>,
    family_kill: Arc<AtomicBool>,
    received: Instant,
    keep: impl Send,
) {
    let killed = || clone.kill.load(Ordering::Acquire) || family_kill.load(Ordering::Acquire);
    let exit = loop {
        let Some(exit) = run_until(&mut vm, || killed() || clone.lender.requested()) else {
            if killed() {
                break run_to_end(&mut vm, || true);
            }
            // While it is lent, nothing above the VMM writes its memory
            // (a write after the last dirty pass would stay behind): the
            // client ingress holds its updates until it is back or gone.
            clone.guest.remove(clone.clone_id);
            vm = match clone.lender.lend(vm) {
                // Nobody waited after all, or the migration gave it back.
                Err(v) | Ok(Returned::Back(v)) => {
                    let g = crate::fork::guests::CloneGuest::of(&v);
                    clone.guest.insert(clone.clone_id, g);
                    v
                }
                Ok(Returned::Moved(host)) => {
                    drop(keep);
                    *lock(&clone.state) = HostedState::Moved(host);
                    return;
                }
                Ok(Returned::Lost) => {
                    drop(keep);
                    *lock(&clone.state) =
                        HostedState::Failed("lost during a migration that failed".into());
                    return;
                }
            };
            continue;
        };
        break exit;
    };
    let after = |t: Instant| t.saturating_duration_since(received);
    let times = HostedTimes {
        start_after: vm.times.first_run.get().map(|t| after(*t)),
        done_after: vm.console().line_time("zone: done").map(after),
        faults: faults.map(|f| f.get().counts()),
    };
    clone.guest.remove(clone.clone_id);
    drop(vm);
    drop(keep);
    // Times first: a reader that sees the exit sees them too.
    *lock(&clone.times) = times;
    *lock(&clone.state) = HostedState::Exited(exit);
}
