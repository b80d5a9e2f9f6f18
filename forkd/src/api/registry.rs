//! The VMs `forkd serve` runs: one [`ForkHub`] per VM, all sharing the
//! daemon's memory server; a reaper thread notices VMs that ended. Every
//! method may block (VM boot, fork, kill): call them off the async executor.
//!
//! Locking: an entry's `vm` mutex is held by boot-time insertion, fork and
//! removal only; status reads (`detail`, `list`, `console`) never take it,
//! they read the console handle, the recorded exit and the fork hub, so a
//! slow fork never stalls a GET. The reaper only `try_lock`s.

use crate::sync::lock;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::thread::JoinHandle;
use std::time::Duration;

use memserver::server::MemServer;

use super::error::ApiError;
use super::family_view::family_info;
use super::ids::{IdTaken, VmIds};
use super::load::{clone_cpu, clone_faults, Counters, DirtySampling, HostSampler, VmSampler};
use super::peers::{placement_counts, Peers};
use super::types::{
    vm_id, ConsoleLines, CreateVm, ExitInfo, ForkVm, Forked, Joined, MemServerInfo, MulticastInfo,
    VmDetail, VmState, VmSummary, MAX_NAME,
};
use crate::fork::family::ForkCounters;
use crate::fork::host::{fork_vm_placed, HostForkError};
use crate::fork::hosted::HostedFamily;
use crate::fork::identity::IdentityPool;
use crate::fork::parent::{ForkHub, ForkOptions, ForkTuning};
use crate::fork::remote::CloneHosts;
use crate::guest::default_guest;
use crate::vmm::devices::Console;
use crate::vmm::memory::check_size;
use crate::vmm::vm::MAX_VCPUS;
use crate::vmm::{Vm, VmConfig, VmExit};

/// How often the reaper looks for VMs that ended.
const REAP_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// VMs registered at once, exited ones included (until DELETE).
    pub max_vms: usize,
    /// Clones one fork may ask for.
    pub max_clones: u64,
}

pub(super) struct Entry {
    pub(super) id: u64,
    pub(super) name: Option<String>,
    pub(super) cmdline: String,
    pub(super) mem_mib: u64,
    pub(super) vcpus: u64,
    pub(super) guest: PathBuf,
    console: Console,
    pub(super) hub: Arc<ForkHub>,
    /// Its VM is out with a migration worker (`api::migration`): fork and
    /// removal are refused until it is given back or gone.
    pub(super) migrating: AtomicBool,
    /// Set once the VM has ended (by the reaper, a fork that found it
    /// ended, or removal).
    exit: Mutex<Option<VmExit>>,
    /// `None` once removed (or while a migration worker holds it).
    pub(super) vm: Mutex<Option<Vm>>,
    /// Its load, sampled by the reaper.
    pub(super) load: VmSampler,
    /// The guest's own tick load, read by the reaper.
    pub(super) guest_load: Mutex<Option<crate::clients::GuestLoad>>,
}

impl Entry {
    pub(super) fn is_running(&self) -> bool {
        lock(&self.exit).is_none()
    }

    fn record_exit(&self, vm: &mut Vm) -> Option<VmExit> {
        let exit = vm.poll_exit();
        if let Some(e) = &exit {
            lock(&self.exit).get_or_insert_with(|| e.clone());
        }
        exit
    }

    fn summary(&self) -> VmSummary {
        let exit = lock(&self.exit).clone();
        let (last_line, console_lines) = {
            let log = self.console.log();
            (
                log.last_line().map(str::to_owned),
                log.lines.len() as u64 + log.dropped_lines,
            )
        };
        VmSummary {
            id: vm_id(self.id),
            name: self.name.clone(),
            state: if exit.is_some() {
                VmState::Exited
            } else {
                VmState::Running
            },
            exit: exit.as_ref().map(ExitInfo::from),
            last_line,
            console_lines,
            family: None,
            clone_id: None,
            parent_host: None,
        }
    }
}

#[derive(Default)]
struct Inner {
    ids: VmIds,
    vms: BTreeMap<u64, Arc<Entry>>,
    /// Slots reserved by boots in progress.
    booting: usize,
}

pub struct Registry {
    pub(super) memserver: Arc<MemServer>,
    limits: Limits,
    inner: Mutex<Inner>,
    closed: AtomicBool,
    /// The other hosts clones may go to (`--name`, `--peer`, the token).
    peers: Option<Arc<Peers>>,
    /// Families hosted here for parents elsewhere (`api::hosted`).
    pub(super) hosted: Mutex<BTreeMap<u64, Arc<HostedFamily>>>,
    /// Where clone MACs and IPs come from: this host's share of the pool
    /// in a cluster, the process's pool otherwise.
    identities: Arc<IdentityPool>,
    /// This host's clones read the frozen image directly (default), or
    /// through the memory server like remote ones.
    local_direct: AtomicBool,
    /// Migrations out of and into this host (`api::migration`).
    pub(super) migrations: super::migration_table::Migrations,
    /// The daemon's load and counters (`api::load`, `api::metrics`).
    pub(super) host_load: HostSampler,
    pub(super) counters: Counters,
    pub(super) fork_counters: Arc<ForkCounters>,
    /// `--cpu-capacity`: the cores this host offers its zones (default:
    /// the machine's online CPUs).
    pub(super) capacity_cores: std::sync::OnceLock<f64>,
    /// Dirty-rate sampling (`--dirty-sample-every-ms`; default if unset).
    pub(super) dirty_sampling: std::sync::OnceLock<DirtySampling>,
    /// The client ingress and the zones that moved away (`api::updates`).
    pub(super) clients: super::clients_state::ClientsState,
}

/// A VM slot held while its VM boots; given back on drop unless the VM
/// took it.
struct Slot<'a> {
    reg: &'a Registry,
    held: bool,
}

impl Slot<'_> {
    /// The VM is registered: its entry now counts instead of the slot.
    fn fill(mut self, inner: &mut Inner) {
        inner.booting -= 1;
        self.held = false;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if self.held {
            lock(&self.reg.inner).booting -= 1;
        }
    }
}

/// Checks a create request before anything is booted.
fn validate(req: &CreateVm) -> Result<(), ApiError> {
    check_size(req.mem_mib).map_err(|e| ApiError::BadRequest(format!("mem_mib: {e}")))?;
    if req.vcpus == 0 || req.vcpus > MAX_VCPUS as u64 {
        return Err(ApiError::BadRequest(format!(
            "vcpus: {} requested; 1..={MAX_VCPUS} supported",
            req.vcpus
        )));
    }
    if let Some(name) = &req.name {
        if name.is_empty() || name.len() > MAX_NAME || name.chars().any(char::is_control) {
            return Err(ApiError::BadRequest(format!(
                "name: 1..={MAX_NAME} bytes without control characters"
            )));
        }
    }
    if let Some(g) = &req.guest {
        if !g.is_file() {
            return Err(ApiError::BadRequest(format!(
                "guest: {} is not a file",
                g.display()
            )));
        }
    }
    Ok(())
}

impl Registry {
    pub fn new(
        memserver: Arc<MemServer>,
        limits: Limits,
        peers: Option<Arc<Peers>>,
    ) -> Arc<Registry> {
        let (identities, ids) = match &peers {
            Some(p) => {
                let (part, parts) = p.share();
                (IdentityPool::share(part, parts), VmIds::share(part, parts))
            }
            None => (IdentityPool::global(), VmIds::default()),
        };
        Arc::new(Registry {
            memserver,
            limits,
            inner: Mutex::new(Inner {
                ids,
                ..Inner::default()
            }),
            closed: AtomicBool::new(false),
            identities,
            local_direct: AtomicBool::new(true),
            peers,
            hosted: Mutex::new(BTreeMap::new()),
            migrations: Default::default(),
            host_load: HostSampler::default(),
            counters: Counters::default(),
            fork_counters: Arc::default(),
            capacity_cores: std::sync::OnceLock::new(),
            dirty_sampling: std::sync::OnceLock::new(),
            clients: Default::default(),
        })
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub(super) fn limits(&self) -> Limits {
        self.limits
    }

    pub(super) fn envelope_key(&self) -> Option<[u8; 32]> {
        self.peers.as_ref().map(|p| p.envelope_key())
    }

    /// A fresh VM id from this host's share (booted VMs and hosted clones
    /// share it; `api::ids`).
    pub(super) fn next_vm_id(&self) -> u64 {
        let mut inner = lock(&self.inner);
        let Inner { ids, vms, .. } = &mut *inner;
        ids.next(|id| vms.contains_key(&id))
    }

    /// Ids in use elsewhere in the cluster (`api::ids`: after a restart).
    pub(super) fn skip_vm_ids(&self, taken: impl IntoIterator<Item = u64>) {
        lock(&self.inner).ids.skip_through(taken);
    }

    /// Holds VM id `id` for incoming migration `mig` until the hold drops
    /// (409 if a VM of that id is here or another migration holds it).
    pub(super) fn reserve_incoming_id(
        self: &Arc<Self>,
        id: u64,
        mig: u64,
    ) -> Result<IncomingId, ApiError> {
        let hosted = self.hosted_detail(id).is_some();
        let mut inner = lock(&self.inner);
        let exists = hosted || inner.vms.contains_key(&id);
        inner.ids.reserve(id, mig, exists).map_err(|e| {
            let host = self.peers.as_ref().map_or("this host", |p| p.name());
            ApiError::Conflict(match e {
                IdTaken::Exists => format!("{} exists on {host} already", vm_id(id)),
                IdTaken::Reserved => format!(
                    "{} is being migrated to {host} already (another incoming migration holds the id)",
                    vm_id(id)
                ),
            })
        })?;
        Ok(IncomingId {
            reg: self.clone(),
            id,
            mig,
        })
    }

    /// Migration `mig` ended (its VM registered, or nothing of it here).
    pub(super) fn release_incoming_id(&self, id: u64, mig: u64) {
        lock(&self.inner).ids.release(id, mig);
    }

    /// This host's name in its cluster (`local` without one).
    pub(super) fn host_name(&self) -> String {
        self.peers
            .as_ref()
            .map(|p| p.name().to_owned())
            .unwrap_or_else(|| "local".into())
    }

    pub(super) fn peers(&self) -> Option<&Arc<Peers>> {
        self.peers.as_ref()
    }

    pub(super) fn memserver_ip(&self) -> std::net::IpAddr {
        self.memserver.local_addr().ip()
    }

    pub(super) fn entry(&self, id: u64) -> Result<Arc<Entry>, ApiError> {
        lock(&self.inner)
            .vms
            .get(&id)
            .cloned()
            .ok_or_else(|| ApiError::NoSuchVm(vm_id(id)))
    }

    fn reserve(&self) -> Result<Slot<'_>, ApiError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        let mut inner = lock(&self.inner);
        if inner.vms.len() + inner.booting >= self.limits.max_vms {
            return Err(ApiError::TooManyVms(self.limits.max_vms));
        }
        inner.booting += 1;
        Ok(Slot {
            reg: self,
            held: true,
        })
    }

    /// Boots a VM with its own fork hub; returns its id.
    pub fn create(&self, req: CreateVm) -> Result<u64, ApiError> {
        validate(&req)?;
        let placement = match (&req.placement, &self.peers) {
            (None, _) => None,
            (Some(p), Some(peers)) => peers.default_placement(p)?,
            (Some(p), None) => {
                let names = p
                    .hosts
                    .iter()
                    .flat_map(|h| h.keys())
                    .chain(p.spread.iter().flatten());
                return Err(match names.into_iter().next() {
                    Some(h) => ApiError::Placement(format!("unknown host '{h}'")),
                    None => ApiError::BadRequest("placement: names no host".into()),
                });
            }
        };
        let slot = self.reserve()?;
        let guest = req.guest.clone().unwrap_or_else(default_guest);
        let id = self.next_vm_id();
        let hub = self.new_hub(
            id,
            ForkTuning {
                distribution: req.distribution.unwrap_or_default(),
                heuristics: req.heuristics.unwrap_or(true),
            },
        );
        hub.set_placement(placement);
        let cfg = VmConfig {
            guest: guest.clone(),
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            cmdline: req.cmdline.clone(),
            echo: false,
            name: req.name.clone(),
        };
        let vm = Vm::boot_with(&cfg, Some(hub.clone())).map_err(ApiError::Boot)?;
        let entry = Arc::new(Entry {
            id,
            name: req.name,
            cmdline: req.cmdline,
            mem_mib: req.mem_mib,
            vcpus: req.vcpus,
            guest,
            console: vm.console().clone(),
            hub,
            migrating: AtomicBool::new(false),
            exit: Mutex::new(None),
            vm: Mutex::new(Some(vm)),
            load: VmSampler::default(),
            guest_load: Mutex::new(None),
        });
        {
            let mut inner = lock(&self.inner);
            // Checked under the lock `shutdown` drains under: a VM is
            // either drained by it or never inserted.
            if !self.closed.load(Ordering::Acquire) {
                inner.vms.insert(id, entry.clone());
                slot.fill(&mut inner);
                return Ok(id);
            }
        }
        drop(slot);
        kill(&entry);
        Err(ApiError::ShuttingDown)
    }

    /// The fork hub of VM `id` (booted here or migrated in).
    pub(super) fn new_hub(&self, id: u64, tuning: ForkTuning) -> Arc<ForkHub> {
        ForkHub::new(
            ForkOptions {
                max_clones: self.limits.max_clones,
                echo: false,
                name_prefix: format!("{}.", vm_id(id)),
                identities: self.identities.clone(),
                local_direct: self.local_direct.load(Ordering::Relaxed),
                counters: self.fork_counters.clone(),
                ..ForkOptions::default()
            }
            .tuned(Some(tuning)),
            self.memserver.clone(),
        )
    }

    /// Registers a running VM that arrived by migration as VM `id`.
    pub(super) fn adopt(&self, vm: Vm, hub: Arc<ForkHub>, meta: Adopted) -> Result<(), ApiError> {
        let entry = Arc::new(Entry {
            id: meta.id,
            name: meta.name,
            cmdline: meta.cmdline,
            mem_mib: meta.mem_mib,
            vcpus: meta.vcpus,
            guest: meta.guest,
            console: vm.console().clone(),
            hub,
            migrating: AtomicBool::new(false),
            exit: Mutex::new(None),
            vm: Mutex::new(Some(vm)),
            load: VmSampler::default(),
            guest_load: Mutex::new(None),
        });
        let mut inner = lock(&self.inner);
        if self.closed.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        if inner.vms.len() + inner.booting >= self.limits.max_vms {
            return Err(ApiError::TooManyVms(self.limits.max_vms));
        }
        if inner.vms.contains_key(&meta.id) {
            return Err(ApiError::Conflict(format!(
                "{} exists here already",
                vm_id(meta.id)
            )));
        }
        inner.vms.insert(meta.id, entry);
        drop(inner);
        self.zone_arrived(meta.id, crate::clients::Target::Vm(meta.id));
        Ok(())
    }

    /// Whether one more VM fits (`--max-vms`); 429 otherwise.
    pub(super) fn check_room(&self) -> Result<(), ApiError> {
        let inner = lock(&self.inner);
        if inner.vms.len() + inner.booting >= self.limits.max_vms {
            return Err(ApiError::TooManyVms(self.limits.max_vms));
        }
        Ok(())
    }

    /// Takes booted VM `id` out of its entry for a migration worker
    /// (clones: [`super::migration_clone`]): refused for an exited VM, one
    /// with a live fork family or one already migrating.
    pub(super) fn take_for_migration(&self, id: u64) -> Result<(Arc<Entry>, Vm), ApiError> {
        let entry = self.entry(id)?;
        let mut guard = lock(&entry.vm);
        if entry.migrating.load(Ordering::Acquire) {
            return Err(ApiError::Conflict(format!(
                "{} is being migrated already",
                vm_id(id)
            )));
        }
        if entry.hub.families().iter().any(|f| !f.is_released()) {
            return Err(ApiError::Conflict(format!(
                "{} has a live fork family (its clones read its memory); migrating a parent is not implemented yet",
                vm_id(id)
            )));
        }
        let exited = match guard.as_mut() {
            Some(vm) => entry.record_exit(vm).is_some(),
            None => true,
        };
        if exited {
            let exit = lock(&entry.exit).clone().unwrap_or(VmExit::Stopped);
            return Err(ApiError::Conflict(format!(
                "{} has exited ({exit})",
                vm_id(id)
            )));
        }
        let vm = guard.take().ok_or(ApiError::Conflict("no VM".into()))?;
        // The migration's dirty tracking owns the log from now on.
        entry.load.drop_window(&vm);
        entry.migrating.store(true, Ordering::Release);
        drop(guard);
        Ok((entry, vm))
    }

    /// A migration that did not commit hands the VM back.
    pub(super) fn give_back(&self, entry: &Entry, mut vm: Vm) {
        let mut guard = lock(&entry.vm);
        // Shut down meanwhile: the entry was drained; the VM goes too.
        if self.closed.load(Ordering::Acquire) {
            drop(guard);
            vm.kill();
            entry.migrating.store(false, Ordering::Release);
            return;
        }
        *guard = Some(vm);
        entry.migrating.store(false, Ordering::Release);
    }

    /// A committed migration: the VM runs elsewhere; forget it here.
    pub(super) fn forget_migrated(&self, id: u64) {
        let entry = lock(&self.inner).vms.remove(&id);
        if let Some(e) = entry {
            kill(&e);
        }
    }

    pub(super) fn list_entries(&self) -> Vec<Arc<Entry>> {
        lock(&self.inner).vms.values().cloned().collect()
    }

    pub fn list(&self) -> Vec<VmSummary> {
        let entries: Vec<_> = lock(&self.inner).vms.values().cloned().collect();
        let mut all: Vec<_> = entries.iter().map(|e| e.summary()).collect();
        all.extend(self.hosted_summaries());
        all
    }

    pub fn detail(&self, id: u64) -> Result<VmDetail, ApiError> {
        if let Some(d) = self.hosted_detail(id) {
            return Ok(d);
        }
        let e = self.entry(id)?;
        Ok(VmDetail {
            summary: e.summary(),
            cmdline: e.cmdline.clone(),
            mem_mib: e.mem_mib,
            vcpus: e.vcpus,
            guest: e.guest.display().to_string(),
            families: {
                let rates = e.load.clone_rates();
                e.hub
                    .families()
                    .iter()
                    .map(|f| family_info(f, &rates))
                    .collect()
            },
            load: self.vm_load(&e),
        })
    }

    pub fn console(&self, id: u64) -> Result<ConsoleLines, ApiError> {
        if let Some(c) = self.hosted_console(id) {
            return Ok(c);
        }
        let e = self.entry(id)?;
        let log = e.console.log();
        Ok(ConsoleLines {
            lines: log.lines.clone(),
            dropped_lines: log.dropped_lines,
        })
    }

    /// Host-initiated fork of a running VM into `req.clones` clones, on
    /// this host or as `req` places them.
    pub fn fork(&self, id: u64, req: ForkVm) -> Result<Forked, ApiError> {
        let clones = req.clones;
        let plan = match &self.peers {
            Some(p) => p.plan(&req)?,
            // No peers: no host is known, any placement names one.
            None => placement_counts(&req, |_| false).map(|_| None)?,
        };
        let entry = self.entry(id)?;
        if entry.migrating.load(Ordering::Acquire) {
            return Err(ApiError::Conflict(format!(
                "{} is being migrated",
                vm_id(id)
            )));
        }
        let mut guard = lock(&entry.vm);
        let Some(vm) = guard.as_mut() else {
            // Its memory was released at its exit. The count is checked
            // first, as for a live VM (422 whatever the VM's state).
            let max = entry.hub.max_clones();
            if clones == 0 || clones > max {
                return Err(ApiError::Fork {
                    vm: vm_id(id),
                    source: HostForkError::BadClones {
                        requested: clones,
                        max,
                    },
                });
            }
            let exit = lock(&entry.exit).clone().unwrap_or(VmExit::Stopped);
            return Err(ApiError::Conflict(format!(
                "{} has exited ({exit})",
                vm_id(id)
            )));
        };
        // `fork_vm` checks the count first (422 whatever the VM's state),
        // then whether the VM still runs (409).
        let tuning = match (req.distribution, req.heuristics) {
            (None, None) => None,
            (d, h) => Some(ForkTuning {
                distribution: d.unwrap_or(entry.hub.options().distribution),
                heuristics: h.unwrap_or(entry.hub.options().heuristics()),
            }),
        };
        entry.load.drop_window(vm);
        match fork_vm_placed(vm, &entry.hub, clones, plan, tuning) {
            Ok(family) => Ok(Forked {
                family: family.id(),
                clones: (1..=clones).collect(),
            }),
            Err(source) => {
                if matches!(source, HostForkError::Exited) {
                    entry.record_exit(vm);
                }
                Err(ApiError::Fork {
                    vm: vm_id(id),
                    source,
                })
            }
        }
    }

    /// Whether VMs created from now on have their local clones read the
    /// frozen image directly (true, the default) or through the memory
    /// server (the network path, e.g. to test it on one host).
    pub fn set_local_direct(&self, direct: bool) {
        self.local_direct.store(direct, Ordering::Relaxed);
    }

    /// `GET /v1/memserver`: this host's memory server counters.
    pub fn memserver_info(&self) -> MemServerInfo {
        let s = self.memserver.stats();
        let m = s.multicast.total;
        MemServerInfo {
            address: self.memserver.local_addr().to_string(),
            requests: s.requests,
            pages_sent: s.pages_sent,
            bytes_sent: s.bytes_sent,
            families: s.families.len() as u64,
            multicast: MulticastInfo {
                bytes_sent: m.bytes_sent,
                frames_sent: m.frames_sent,
                blocks_requested: m.blocks_requested,
                blocks_multicast: m.blocks_multicast,
                blocks_unicast: m.blocks_unicast,
                blocks_pushed: m.blocks_pushed,
                push_skipped: m.push_skipped,
                lockstep_suppressed: m.lockstep_suppressed,
                retries_received: m.retries_received,
                end_game_entered: m.end_game_entered,
                forged: m.forged,
                replayed: m.replayed,
                foreign: m.foreign,
            },
        }
    }

    /// `POST /v1/vms/{id}/join`: ends the VM's live fork family (the
    /// policy's join); the VM runs on alone. Blocks until its clones ended.
    pub fn join(&self, id: u64) -> Result<Joined, ApiError> {
        let entry = self.entry(id)?;
        match entry.hub.join_live_family() {
            Some(family) => Ok(Joined { family }),
            None => Err(ApiError::Conflict(format!(
                "{} has no live fork family to join",
                vm_id(id)
            ))),
        }
    }

    /// Kills a VM and its clones and forgets it.
    pub fn remove(&self, id: u64) -> Result<(), ApiError> {
        if self.remove_hosted(id) {
            return Ok(());
        }
        if self
            .entry(id)
            .is_ok_and(|e| e.migrating.load(Ordering::Acquire))
        {
            return Err(ApiError::Conflict(format!(
                "{} is being migrated; cancel the migration first (DELETE /v1/vms/{{id}}/migration)",
                vm_id(id)
            )));
        }
        let entry = lock(&self.inner)
            .vms
            .remove(&id)
            .ok_or_else(|| ApiError::NoSuchVm(vm_id(id)))?;
        kill(&entry);
        Ok(())
    }

    /// Refuses new VMs, kills every VM and its clones, stops the memory
    /// server.
    pub fn shutdown(&self) {
        let entries: Vec<_> = {
            let mut inner = lock(&self.inner);
            self.closed.store(true, Ordering::Release);
            std::mem::take(&mut inner.vms).into_values().collect()
        };
        for e in &entries {
            kill(e);
        }
        self.kill_hosted();
        self.memserver.stop();
    }

    /// Starts the reaper thread; it ends after [`Registry::shutdown`].
    pub fn start_reaper(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let reg = self.clone();
        std::thread::Builder::new()
            .name("api-reaper".into())
            .spawn(move || {
                let dirty = reg.dirty_sampling.get().copied().unwrap_or_default();
                while !reg.closed.load(Ordering::Acquire) {
                    let entries: Vec<_> = lock(&reg.inner).vms.values().cloned().collect();
                    for e in entries {
                        // A VM busy forking is looked at next round.
                        let mut guard = match e.vm.try_lock() {
                            Ok(g) => g,
                            Err(TryLockError::Poisoned(p)) => p.into_inner(),
                            Err(TryLockError::WouldBlock) => continue,
                        };
                        if let Some(vm) = guard.as_mut() {
                            if e.record_exit(vm).is_some() {
                                e.load.ended();
                            } else {
                                let hub = &e.hub;
                                e.load
                                    .sample(vm, &dirty, || clone_faults(hub), || clone_cpu(hub));
                                *lock(&e.guest_load) = super::clients_state::vm_guest_load(vm);
                            }
                        }
                        // An exited VM gives its guest memory back at once
                        // (its console and report stay), unless clones
                        // still read its frozen image.
                        if lock(&e.exit).is_some()
                            && guard.is_some()
                            && e.hub.families().iter().all(|f| f.is_released())
                        {
                            drop(guard.take());
                        }
                    }
                    reg.host_load.sample(|| reg.hosted_cpu_times());
                    std::thread::sleep(REAP_EVERY);
                }
            })
    }
}

/// An incoming migration's hold on its VM's id; let go on drop (by then
/// the VM is registered, or nothing of it is here).
pub(super) struct IncomingId {
    reg: Arc<Registry>,
    id: u64,
    mig: u64,
}

impl Drop for IncomingId {
    fn drop(&mut self) {
        self.reg.release_incoming_id(self.id, self.mig);
    }
}

/// What a VM that arrived by migration is registered with.
pub(super) struct Adopted {
    pub id: u64,
    pub name: Option<String>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub vcpus: u64,
    pub guest: PathBuf,
}

/// Stops the VM; dropping it shuts its fork hub down, which kills and
/// joins the clones.
fn kill(entry: &Entry) {
    let vm = lock(&entry.vm).take();
    if let Some(mut vm) = vm {
        if entry.record_exit(&mut vm).is_none() {
            vm.kill();
        }
        drop(vm);
    }
    entry.hub.end_families();
}
