//! Parent side: the [`ForkHub`] is a parent VM's fork service (its
//! hypercalls are decoded in `fork::calls`). At `sf_clone` (or a host fork)
//! it builds the descriptor from the stopped parent, registers the family
//! with the memory server behind a page source that waits for the image,
//! hands the descriptor to a launcher thread that builds the clones, and
//! then freezes the parent's memory (copy-before-write, see
//! `memserver::image`) and returns, so the parent resumes. Each clone is
//! watched by a reaper thread; when the last clone of a family has ended,
//! the frozen image is released.

pub use crate::fork::family::{CloneReport, Family, FamilyReport, ForkOptions, ForkTuning};

use crate::errors::chain;
use crate::fork::descriptor::ForkDescriptor;
use crate::fork::envelope::cpu_fingerprint;
use crate::fork::launch::launch;
use crate::fork::mcdist::{Distribution, FamilyMulticast};
use crate::fork::pending::PendingImage;
use crate::fork::pool::ShellPool;
use crate::fork::remote::{self, DefaultPlacement, RemotePlan};
use crate::fork::{Answer, ForkError, ForkRequest};
use crate::sync::lock;
use crate::vmm::memory::GuestMemory;
use crate::vmm::services::GuestCall;
use guest_agent::abi;
use memserver::image::FrozenImage;
use memserver::server::MemServer;
use memserver::{FamilyKey, PageSource, PAGE_SIZE};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Ended families kept for their reports (`GET /v1/vms/{id}`).
const ENDED_FAMILIES_KEPT: usize = 16;
/// Tickets a VM may hold that have not forked yet.
const MAX_RESERVED_TICKETS: usize = 64;
/// A warm pool whose ticket is not used for this long is dropped.
const POOL_TTL: Duration = Duration::from_secs(30);

enum Ticket {
    /// Clones granted, and the warm pool of their VMs being built.
    Reserved(u64, Option<Arc<ShellPool>>),
    Forked(Arc<Family>),
}

#[derive(Default)]
struct HubInner {
    next_ticket: u64,
    tickets: HashMap<u64, Ticket>,
}

/// The fork service of a parent VM.
pub struct ForkHub {
    opts: ForkOptions,
    memserver: Arc<MemServer>,
    inner: Mutex<HubInner>,
    families: Mutex<Vec<Arc<Family>>>,
    /// Where the guest's own forks (`sf_clone`) place clones (`None`: here).
    placement: Mutex<Option<DefaultPlacement>>,
}

impl ForkHub {
    pub fn new(opts: ForkOptions, memserver: Arc<MemServer>) -> Arc<ForkHub> {
        Arc::new(ForkHub {
            opts,
            memserver,
            inner: Mutex::new(HubInner::default()),
            families: Mutex::new(Vec::new()),
            placement: Mutex::new(None),
        })
    }

    /// Places the clones of the guest's own forks (see `fork::remote`).
    pub fn set_placement(&self, placement: Option<DefaultPlacement>) {
        *lock(&self.placement) = placement;
    }

    pub fn max_clones(&self) -> u64 {
        self.opts.max_clones
    }

    pub fn options(&self) -> &ForkOptions {
        &self.opts
    }

    pub fn families(&self) -> Vec<Arc<Family>> {
        lock(&self.families).clone()
    }

    /// Waits (bounded) until every clone of every family has ended.
    pub fn wait_clones(&self, limit: Duration) -> bool {
        let t = Instant::now();
        loop {
            if self.families().iter().all(|f| f.running() == 0) {
                for f in self.families() {
                    f.join_threads();
                }
                return true;
            }
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Forks a paused VM into `clones` clones (host-initiated). The caller
    /// resumes the parent afterwards.
    pub fn fork_paused(&self, req: ForkRequest, clones: u64) -> Result<Arc<Family>, ForkError> {
        if clones == 0 || clones > self.opts.max_clones {
            return Err(ForkError::BadClones {
                requested: clones,
                max: self.opts.max_clones,
            });
        }
        self.check_forkable(&req.memory)?;
        let family = self.do_fork(req, clones, None, None)?;
        self.add_family(family.clone());
        Ok(family)
    }

    /// [`ForkHub::fork_paused`] with clones on other hosts too
    /// (`fork::remote`): `plan.total()` clones in all.
    pub fn fork_paused_placed(
        &self,
        req: ForkRequest,
        plan: RemotePlan,
    ) -> Result<Arc<Family>, ForkError> {
        let clones = plan.total();
        if clones == 0 || clones > self.opts.max_clones {
            return Err(ForkError::BadClones {
                requested: clones,
                max: self.opts.max_clones,
            });
        }
        self.check_forkable(&req.memory)?;
        let family = self.do_fork(req, clones, None, Some(plan))?;
        self.add_family(family.clone());
        Ok(family)
    }

    /// Whether a VM with this memory can fork now: its memory must be
    /// anonymous (userfaultfd write-protect freezes nothing else here), and
    /// frozen by one family at a time.
    pub fn check_forkable(&self, memory: &GuestMemory) -> Result<(), ForkError> {
        let region = memory.iter().next().ok_or(ForkError::NoMemory)?;
        if region.file_offset().is_some() {
            return Err(ForkError::FileBackedMemory);
        }
        self.check_no_live_family()
    }

    /// The parent's memory can be frozen by one family at a time.
    fn check_no_live_family(&self) -> Result<(), ForkError> {
        match lock(&self.families).iter().find(|f| !f.is_released()) {
            Some(f) => Err(ForkError::FamilyLive(f.running())),
            None => Ok(()),
        }
    }

    /// Records a family; ended ones beyond the last few are forgotten.
    fn add_family(&self, family: Arc<Family>) {
        let c = &self.opts.counters;
        c.families.fetch_add(1, Ordering::Relaxed);
        c.clones
            .fetch_add(family.report().clones_granted, Ordering::Relaxed);
        let mut families = lock(&self.families);
        families.push(family);
        let ended = families.iter().filter(|f| f.is_released()).count();
        let mut drop_n = ended.saturating_sub(ENDED_FAMILIES_KEPT);
        families.retain(|f| {
            let forget = drop_n > 0 && f.is_released();
            if forget {
                drop_n -= 1;
            }
            !forget
        });
    }

    /// `sf_clone(ticket)` on the parent's vCPU thread: captures the
    /// parent's state and forks it. Returns once the parent may resume.
    pub fn sf_clone(&self, ticket: u64, guest: &mut dyn GuestCall) -> Result<(), u32> {
        let requested_at = Instant::now();
        let (granted, pool) = match lock(&self.inner).tickets.get(&ticket) {
            Some(Ticket::Reserved(n, pool)) => (*n, pool.clone()),
            _ => return Err(abi::STATUS_REFUSED),
        };
        if let Err(e) = self.check_forkable(guest.memory()) {
            tracing::warn!("sf_clone refused: {e}");
            return Err(abi::STATUS_REFUSED);
        }
        let state = guest.capture().map_err(|e| {
            tracing::warn!("sf_clone: cannot capture the parent: {}", chain(&e));
            abi::STATUS_REFUSED
        })?;
        let req = ForkRequest {
            ticket,
            page_gpa: guest.page_gpa(),
            answer: Answer::SfClone,
            state,
            memory: guest.memory().clone(),
            requested_at,
            tuning: None,
        };
        let plan = lock(&self.placement).as_ref().and_then(|p| p.plan(granted));
        match self.do_fork(req, granted, pool, plan) {
            Ok(family) => {
                lock(&self.inner)
                    .tickets
                    .insert(ticket, Ticket::Forked(family.clone()));
                self.add_family(family);
                Ok(())
            }
            Err(e) => {
                tracing::error!("fork failed: {}", chain(&e));
                Err(abi::STATUS_REFUSED)
            }
        }
    }

    fn do_fork(
        &self,
        req: ForkRequest,
        granted: u64,
        pool: Option<Arc<ShellPool>>,
        plan: Option<RemotePlan>,
    ) -> Result<Arc<Family>, ForkError> {
        // This fork's distribution and heuristics.
        let opts = self.opts.tuned(req.tuning);
        // A random id and a secret per family: only holders of the secret
        // (the family's clones) can read its pages from the memory server.
        let key = FamilyKey::generate().map_err(ForkError::Key)?;
        let id = key.id();
        let region = req.memory.iter().next().ok_or(ForkError::NoMemory)?;
        // The descriptor first (the parent is stopped, its memory is as at
        // the fork instant), then the family, then the clones are built
        // while the memory is frozen: their reads wait for the image.
        let desc = ForkDescriptor::build(id, &req.memory, req.state, req.page_gpa, req.answer)?;
        // Every clone's MAC and IP, unique among the live clones of all
        // families, before anything else is set up.
        let leases = (1..=granted)
            .map(|i| opts.identities.lease(i))
            .collect::<Result<Vec<_>, _>>()?;
        let (leases, remote) = match &plan {
            Some(p) => {
                let cpu = cpu_fingerprint()?;
                let (local, share) = p.split(leases);
                (local, Some((p.hosts.clone(), share, cpu)))
            }
            None => (leases, None),
        };
        let encoded = desc.encode()?;
        let pending = Arc::new(PendingImage::new(region.len() / PAGE_SIZE as u64));
        let source = pending.clone() as Arc<dyn PageSource>;
        // Multicast only if some clone gets its pages over the network.
        let over_network = remote.is_some() || !opts.local_direct;
        let multicast = if opts.distribution == Distribution::Multicast && over_network {
            // Push what the guest allocator had handed out at the fork
            // (a heuristic: off, every page goes out on demand).
            let push = match (&desc.alloc, opts.prefetch) {
                (Some(a), true) => a.allocated.clone(),
                _ => Vec::new(),
            };
            let endpoint = self
                .memserver
                .add_family_multicast(key.clone(), source, push)
                .map_err(ForkError::MemServer)?;
            // The push waits for this host's launcher and, with clones
            // elsewhere, for every clone host to have joined.
            let parties = 1 + usize::from(remote.is_some());
            Some(FamilyMulticast::new(endpoint, parties))
        } else {
            self.memserver
                .add_family_with_key(key.clone(), source)
                .map_err(ForkError::MemServer)?;
            None
        };
        let family = Arc::new(Family {
            id,
            key,
            image: pending.clone(),
            _memory: req.memory.clone(),
            memserver: self.memserver.clone(),
            multicast,
            running: AtomicU64::new(granted),
            kill: AtomicBool::new(false),
            released: AtomicBool::new(false),
            live_faults: Mutex::default(),
            report: Mutex::new(FamilyReport {
                family: id,
                clones_granted: granted,
                descriptor_bytes: encoded.len() as u64,
                descriptor_pages: desc.pages.len() as u64,
                identities: (leases.iter().map(|l| l.identity))
                    .chain(remote.iter().flat_map(|(_, s, _)| {
                        s.hosts
                            .iter()
                            .flat_map(|(_, ls)| ls.iter().map(|l| l.identity))
                    }))
                    .collect(),
                hosts: remote
                    .as_ref()
                    .map(|(_, s, _)| s.placement())
                    .unwrap_or_default(),
                distribution: opts.distribution,
                heuristics: opts.heuristics(),
                ..Default::default()
            }),
            threads: Mutex::new(Vec::new()),
            ended: (Mutex::new(()), Condvar::new()),
            guests: Default::default(),
        });
        let encoded_remote = if remote.is_some() {
            encoded.clone()
        } else {
            Vec::new()
        };
        let launcher = {
            let family = family.clone();
            let opts = opts.clone();
            let server = self.memserver.local_addr();
            let requested_at = req.requested_at;
            std::thread::Builder::new()
                .name(format!("fork-{id}"))
                .spawn(move || {
                    let shells = pool.map(|p| p.take()).unwrap_or_default();
                    launch(family, encoded, leases, opts, server, requested_at, shells)
                })
                .map_err(|source| {
                    self.memserver.remove_family(id);
                    ForkError::Thread {
                        what: "launcher",
                        source,
                    }
                })?
        };
        lock(&family.threads).push(launcher);
        if let Some((hosts, share, cpu)) = remote {
            let server = self.memserver.local_addr();
            let job = remote::RemoteJob {
                hosts,
                share,
                descriptor: encoded_remote,
                memserver: server,
                cpu,
                avoidance: opts.avoidance,
                prefetch: opts.prefetch,
                requested_at: req.requested_at,
            };
            match remote::start(family.clone(), job) {
                Ok(t) => lock(&family.threads).push(t),
                Err(source) => {
                    family.kill.store(true, Ordering::Release);
                    self.memserver.remove_family(id);
                    return Err(ForkError::Thread {
                        what: "remote clones",
                        source,
                    });
                }
            }
        }
        let t = Instant::now();
        // SAFETY: the region is the parent's private anonymous guest memory
        // mapping (page aligned); the GuestMemory clone stored in the family
        // keeps it mapped for as long as the image lives, and forkd registers
        // parent memory with no other userfaultfd.
        let frozen = unsafe { FrozenImage::freeze(region.as_ptr(), region.len() as usize) }
            .map_err(ForkError::Freeze)
            .and_then(|image| {
                if self.opts.copy_out {
                    image.start_copy_out().map_err(ForkError::Freeze)?;
                }
                Ok(image)
            });
        match frozen {
            Ok(image) => pending.set(image),
            Err(e) => {
                // The clones being built fail on their first read; stop them.
                pending.fail(&chain(&e));
                family.kill.store(true, Ordering::Release);
                return Err(e);
            }
        }
        lock(&family.report).freeze = t.elapsed();
        lock(&family.report).parent_stopped = req.requested_at.elapsed();
        Ok(family)
    }
}

impl ForkHub {
    /// `sf_request_ticket(n)` → (ticket, clones granted), for a VM of
    /// `mem_bytes` (the hub may start building the clones' VMs now).
    pub fn ticket(&self, wanted: u64, mem_bytes: u64) -> Result<(u64, u64), u32> {
        let granted = wanted.min(self.opts.max_clones);
        if granted == 0 {
            return Err(abi::STATUS_BAD_ARGS);
        }
        let mut inner = lock(&self.inner);
        // Unused warm pools go after a while; forked tickets of ended
        // families go; a guest cannot hoard tickets without bound.
        for t in inner.tickets.values_mut() {
            if let Ticket::Reserved(_, pool) = t {
                if pool
                    .as_ref()
                    .is_some_and(|p| p.created.elapsed() > POOL_TTL)
                {
                    if let Some(p) = pool.take() {
                        drop(p.take());
                    }
                }
            }
        }
        inner
            .tickets
            .retain(|_, t| !matches!(t, Ticket::Forked(f) if f.is_released()));
        let reserved = inner
            .tickets
            .values()
            .filter(|t| matches!(t, Ticket::Reserved(..)))
            .count();
        if reserved >= MAX_RESERVED_TICKETS {
            return Err(abi::STATUS_REFUSED);
        }
        inner.next_ticket += 1;
        let t = inner.next_ticket;
        // One warm pool at a time: a guest asking for tickets it never uses
        // cannot make us build VMs without bound.
        let pooled = inner
            .tickets
            .values()
            .any(|t| matches!(t, Ticket::Reserved(_, Some(_))));
        // Only the clones this host will run get a warm VM: with a default
        // placement the others are built on their own hosts.
        let local = lock(&self.placement)
            .as_ref()
            .and_then(|p| p.plan(granted))
            .map_or(granted, |p| p.local);
        let pool = (self.opts.warm_pool && !pooled && local > 0)
            .then(|| ShellPool::start(local, mem_bytes));
        inner.tickets.insert(t, Ticket::Reserved(granted, pool));
        Ok((t, granted))
    }

    /// The tickets granted and not forked yet: (ticket, clones granted),
    /// what a VM that migrates takes along ([`ForkHub::adopt_tickets`]).
    pub fn pending_tickets(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<_> = lock(&self.inner)
            .tickets
            .iter()
            .filter_map(|(id, t)| match t {
                Ticket::Reserved(n, _) => Some((*id, *n)),
                Ticket::Forked(_) => None,
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// Grants a VM that arrived by migration the tickets its old hub had
    /// granted (same ids, so its `sf_clone` finds them; counts capped by
    /// this hub's limit, no warm pool; at most [`MAX_RESERVED_TICKETS`]).
    pub fn adopt_tickets(&self, tickets: &[(u64, u64)]) {
        let mut inner = lock(&self.inner);
        for &(id, n) in tickets.iter().take(MAX_RESERVED_TICKETS) {
            let granted = n.min(self.opts.max_clones);
            if granted == 0 || inner.tickets.contains_key(&id) {
                continue;
            }
            inner.tickets.insert(id, Ticket::Reserved(granted, None));
            inner.next_ticket = inner.next_ticket.max(id);
        }
    }

    /// `sf_join(ticket)` → clones still running; waits up to `max` for them
    /// to end first, so the guest's join loop does not spin a host core.
    pub fn join_wait(&self, ticket: u64, max: Duration) -> Result<u64, u32> {
        let family = match lock(&self.inner).tickets.get(&ticket) {
            Some(Ticket::Forked(f)) => f.clone(),
            Some(Ticket::Reserved(..)) => return Ok(0),
            None => return Err(abi::STATUS_REFUSED),
        };
        Ok(family.wait_running(max))
    }

    /// `sf_kill(ticket)`.
    pub fn kill(&self, ticket: u64) -> Result<(), u32> {
        match lock(&self.inner).tickets.get(&ticket) {
            Some(Ticket::Forked(f)) => {
                f.kill.store(true, Ordering::Release);
                Ok(())
            }
            Some(Ticket::Reserved(..)) => Ok(()),
            None => Err(abi::STATUS_REFUSED),
        }
    }

    /// Host-initiated join: ends the live family (its clones' clients go
    /// back to the parent) — its clones are killed, here and on other
    /// hosts, waited for, and the frozen image released. Returns the
    /// family's id; `None` if no family is live.
    pub fn join_live_family(&self) -> Option<u64> {
        let f = lock(&self.families)
            .iter()
            .find(|f| !f.is_released())
            .cloned()?;
        f.kill.store(true, Ordering::Release);
        f.join_threads();
        f.release();
        Some(f.id())
    }

    /// The parent is going away: end every family and release its image.
    pub fn end_families(&self) {
        for f in self.families() {
            f.kill.store(true, Ordering::Release);
            f.join_threads();
            f.release();
        }
        // Warm-pool VMs go too.
        let tickets = std::mem::take(&mut lock(&self.inner).tickets);
        for t in tickets.into_values() {
            if let Ticket::Reserved(_, Some(pool)) = t {
                drop(pool.take());
            }
        }
    }
}
