//! A fork family: the clones of one fork of a parent, its report, and the
//! options forks run with. The hub (`parent`) makes families, the launcher
//! (`launch`) and the remote watcher (`remote`) end their clones.

use crate::fork::fault::{FaultStats, FaultStatsView};
use crate::fork::identity::{CloneIdentity, IdentityPool};
use crate::fork::mcdist::{Distribution, FamilyMulticast, ReceiverFigures};
use crate::fork::pending::PendingImage;
use crate::sync::lock;
use crate::vmm::memory::GuestMemory;
use crate::vmm::VmExit;
use memserver::mcdist::host::HostStats;
use memserver::server::MemServer;
use memserver::FamilyKey;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ForkOptions {
    /// Most clones one ticket may grant.
    pub max_clones: u64,
    /// Print clone consoles to stdout, lines prefixed `[<prefix>clone-I]`.
    pub echo: bool,
    pub name_prefix: String,
    pub avoidance: bool,
    pub readahead: u64,
    /// Copy the parent's populated pages aside in the background right
    /// after the freeze, so its writes stop taking write-protect faults
    /// (memory: a copy of the parent's touched pages while clones run).
    pub copy_out: bool,
    /// Clones fetch the pages the guest allocator had handed out at the
    /// fork in the background, ahead of their faults (unicast; with
    /// multicast the server pushes them to the family's group instead).
    pub prefetch: bool,
    /// How pages go out: unicast per clone, or multicast to the family
    /// with one shared receiver per host (`fork::mcdist`).
    pub distribution: Distribution,
    /// Build the clones' VMs from `sf_request_ticket` on, ahead of the fork.
    pub warm_pool: bool,
    /// This host's clones read the frozen image directly, without the
    /// network (off: through the memory server like remote clones, to
    /// compare or to test the network path on one host).
    pub local_direct: bool,
    /// Where clone MACs and IPs come from (default: the process's pool,
    /// shared by every hub, so families never collide).
    pub identities: Arc<IdentityPool>,
    /// Forks and clones made, counted for the daemon's metrics (shared by
    /// the hubs of one daemon).
    pub counters: Arc<ForkCounters>,
}

/// Forks made and clones they granted, since the counters were made.
#[derive(Debug, Default)]
pub struct ForkCounters {
    pub families: AtomicU64,
    pub clones: AtomicU64,
}

impl Default for ForkOptions {
    fn default() -> Self {
        ForkOptions {
            max_clones: 64,
            echo: false,
            name_prefix: String::new(),
            avoidance: true,
            readahead: 32,
            copy_out: true,
            prefetch: true,
            distribution: Distribution::Unicast,
            warm_pool: true,
            local_direct: true,
            identities: IdentityPool::global(),
            counters: Arc::default(),
        }
    }
}

/// One fork's choices that may differ from its hub's options (the fork
/// API's `distribution` and `heuristics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkTuning {
    pub distribution: Distribution,
    /// Page avoidance and the push (multicast) or prefetch (unicast) of
    /// the pages allocated at the fork; off: every page on demand.
    pub heuristics: bool,
}

impl ForkOptions {
    /// These options with `tuning` applied.
    pub fn tuned(&self, tuning: Option<ForkTuning>) -> ForkOptions {
        let mut o = self.clone();
        if let Some(t) = tuning {
            o.distribution = t.distribution;
            o.avoidance = t.heuristics;
            o.prefetch = t.heuristics;
        }
        o
    }

    /// Whether both heuristics are on.
    pub fn heuristics(&self) -> bool {
        self.avoidance && self.prefetch
    }
}

/// How one clone went.
#[derive(Debug, Clone)]
pub struct CloneReport {
    pub clone_id: u64,
    pub identity: CloneIdentity,
    /// `sf_clone` on the parent → the clone's first KVM_RUN.
    pub start_latency: Option<Duration>,
    /// `sf_clone` on the parent → the clone's `zone: done` console line
    /// (its newline reached the console), if it printed one.
    pub done_latency: Option<Duration>,
    pub exit: VmExit,
    pub last_line: Option<String>,
    /// The line where the guest printed the identity it found in its agent
    /// page (`zone: clone identity ...`), if it did.
    pub identity_line: Option<String>,
    /// Shared: a report is cloned on every API `GET`, its histogram is not.
    pub faults: Arc<FaultStats>,
    pub pages_declared: u64,
}

/// How one fork went.
#[derive(Debug, Clone, Default)]
pub struct FamilyReport {
    pub family: u64,
    pub clones_granted: u64,
    pub descriptor_bytes: u64,
    pub descriptor_pages: u64,
    /// `sf_clone` → parent may resume (freeze, descriptor, registration).
    pub parent_stopped: Duration,
    pub freeze: Duration,
    pub clones: Vec<CloneReport>,
    /// Clones that could not be started, with why.
    pub start_failures: Vec<(u64, String)>,
    /// Every clone's identity, clone 1 first (leased at the fork).
    pub identities: Vec<CloneIdentity>,
    pub distribution: Distribution,
    /// Avoidance and push/prefetch were on.
    pub heuristics: bool,
    /// Multicast: this host's receiver's counters (cache, re-requests,
    /// rejected frames).
    pub host_receiver: Option<HostStats>,
    /// Clones placed on other hosts: clone id → host (`fork::remote`).
    pub hosts: std::collections::BTreeMap<u64, String>,
    /// Multicast: the other hosts' receivers, as they last reported.
    pub remote_receivers: std::collections::BTreeMap<String, ReceiverFigures>,
}

pub struct Family {
    pub(super) id: u64,
    /// The family's id and secret on the memory server.
    pub(super) key: FamilyKey,
    pub(super) image: Arc<PendingImage>,
    /// Keeps the parent's mapping alive as long as the image reads it.
    pub(super) _memory: GuestMemory,
    pub(super) memserver: Arc<MemServer>,
    /// Multicast distribution: the family's group and this host's receiver.
    pub(super) multicast: Option<FamilyMulticast>,
    pub(super) running: AtomicU64,
    pub(super) kill: AtomicBool,
    pub(super) released: AtomicBool,
    pub(super) report: Mutex<FamilyReport>,
    /// The fault counters of this host's clones still running (an ended
    /// clone's are in its report).
    pub(super) live_faults: Mutex<std::collections::BTreeMap<u64, FaultStatsView>>,
    pub(super) threads: Mutex<Vec<JoinHandle<()>>>,
    /// Signalled whenever a clone ends.
    pub(super) ended: (Mutex<()>, Condvar),
    /// This host's running clones' memory (`fork::guests`).
    pub(super) guests: crate::fork::guests::CloneGuests,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field("id", &self.id)
            .field("running", &self.running())
            .finish()
    }
}

impl Family {
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn report(&self) -> FamilyReport {
        let mut r = lock(&self.report).clone();
        r.host_receiver = self.multicast.as_ref().and_then(|m| m.stats());
        r
    }

    /// Faults the family's clones have taken so far: the ended clones'
    /// (on any host) and this host's running ones'.
    pub fn faults_so_far(&self) -> u64 {
        self.faults_by_clone().iter().map(|(_, n)| n).sum()
    }

    /// Each clone's faults so far, by clone id: this host's running
    /// clones' and every ended clone's (a clone ending meanwhile counts
    /// once, by its report).
    pub fn faults_by_clone(&self) -> Vec<(u64, u64)> {
        let mut v: std::collections::BTreeMap<u64, u64> = lock(&self.live_faults)
            .iter()
            .map(|(id, f)| (*id, f.get().faults))
            .collect();
        v.extend(
            lock(&self.report)
                .clones
                .iter()
                .map(|c| (c.clone_id, c.faults.faults)),
        );
        v.into_iter().collect()
    }

    /// This host's running clones' guest memory.
    pub fn guests(&self) -> &crate::fork::guests::CloneGuests {
        &self.guests
    }

    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Acquire)
    }

    pub(crate) fn key(&self) -> &FamilyKey {
        &self.key
    }

    /// Whether the family was killed (`sf_kill`, or the parent ended).
    pub(crate) fn killed(&self) -> bool {
        self.kill.load(Ordering::Acquire)
    }

    /// One party of a multicast family has joined its group (this host's
    /// launcher, or the remote sender once every clone host answered):
    /// the last one starts the push (if the family has push ranges).
    pub(crate) fn ready_for_push(&self) {
        let Some(m) = &self.multicast else { return };
        if m.arrive() {
            match self.memserver.start_push(self.id) {
                Ok(n) => tracing::debug!(family = self.id, pages = n, "push started"),
                Err(e) => tracing::warn!("family {}: no push: {e}", self.id),
            }
        }
    }

    /// The family's multicast endpoint, if it is distributed by multicast.
    pub(crate) fn multicast_endpoint(&self) -> Option<memserver::mcdist::McEndpoint> {
        self.multicast.as_ref().map(|m| m.endpoint)
    }

    /// A clone host's receiver figures (`fork::remote`).
    pub(crate) fn remote_receiver(&self, host: &str, figures: ReceiverFigures) {
        lock(&self.report)
            .remote_receivers
            .insert(host.to_owned(), figures);
    }

    /// A clone on another host migrated to `host` (`fork::remote`).
    pub(crate) fn remote_moved(&self, clone_id: u64, host: &str) {
        lock(&self.report).hosts.insert(clone_id, host.to_owned());
    }

    /// A clone on another host ended (`fork::remote`).
    pub(crate) fn remote_ended(&self, report: CloneReport) {
        lock(&self.report).clones.push(report);
        self.clone_ended();
    }

    /// A clone on another host could not start, or its host vanished.
    pub(crate) fn remote_failed(&self, clone_id: u64, why: String) {
        lock(&self.report).start_failures.push((clone_id, why));
        self.clone_ended();
    }

    pub(super) fn clone_ended(&self) {
        if self.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.release();
        }
        let _guard = lock(&self.ended.0);
        self.ended.1.notify_all();
    }

    /// Waits up to `max` for every clone to end; returns how many run.
    pub fn wait_running(&self, max: Duration) -> u64 {
        let deadline = Instant::now() + max;
        let mut guard = lock(&self.ended.0);
        loop {
            let left = self.running();
            let now = Instant::now();
            if left == 0 || now >= deadline {
                return left;
            }
            guard = match self.ended.1.wait_timeout(guard, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    /// Whether the family is over and its image released.
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    /// Drops the frozen image once no clone needs it.
    pub(super) fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.memserver.remove_family(self.key.id());
            if let Some(m) = &self.multicast {
                m.close();
            }
            self.image.fail("the fork family has ended");
        }
    }

    pub(super) fn join_threads(&self) {
        crate::sync::join_all(&self.threads);
    }
}
