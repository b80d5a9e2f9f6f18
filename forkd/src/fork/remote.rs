//! Clones on other hosts, the parent's side. The parent's host leases every
//! clone's identity, builds the descriptor once and sends each clone host
//! one sealed envelope ([`crate::fork::envelope`]) naming its clones; then
//! a watcher thread polls every clone host (every [`POLL_EVERY`]) for its
//! clones' state, so the family's `running` count and report cover remote
//! clones, forwards `sf_kill` (and the parent's end) as a kill of the
//! family on each host, and marks the clones of a host that stops
//! answering for [`HOST_SILENCE`] as failed, so `sf_join` returns. A clone
//! its host reports as moved (migrated) is watched on its new host from
//! then on.
//!
//! The transport is the layer above's: it implements [`CloneHosts`].

use crate::fork::envelope::{EnvelopeBody, EnvelopeClone, EnvelopeMulticast};
use crate::fork::family::{CloneReport, Family};
use crate::fork::fault::{FaultCounts, FaultStats};
use crate::fork::identity::IdentityLease;
use crate::fork::mcdist::ReceiverFigures;
use crate::vmm::VmExit;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the parent's host asks each clone host about its clones.
pub const POLL_EVERY: Duration = Duration::from_millis(50);
/// A clone host silent this long has its clones marked failed.
pub const HOST_SILENCE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("unknown host '{0}'")]
    UnknownHost(String),
    #[error("host {host}: {why}")]
    Transport { host: String, why: String },
    #[error("host {host} refused: {status} {error}")]
    Refused {
        host: String,
        status: u16,
        error: String,
    },
}

/// A remote clone's state as its host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteCloneState {
    Running,
    /// Ended: `forkd run`'s exit code and the reason in words.
    Exited {
        code: i32,
        reason: String,
    },
    /// Could not be built or started.
    Failed(String),
    /// Migrated to `host`, which runs it now.
    Moved {
        host: String,
    },
}

#[derive(Debug, Clone)]
pub struct RemoteClone {
    pub clone_id: u64,
    pub state: RemoteCloneState,
    pub last_line: Option<String>,
    /// Its host got the envelope → the clone's first KVM_RUN.
    pub start_after: Option<Duration>,
    /// Its host got the envelope → its `zone: done` line.
    pub done_after: Option<Duration>,
    /// Its fault counters, once it has ended.
    pub faults: Option<FaultCounts>,
}

/// A family's clones on one host, and that host's multicast receiver.
#[derive(Debug, Clone, Default)]
pub struct RemoteFamily {
    pub clones: Vec<RemoteClone>,
    pub receiver: Option<ReceiverFigures>,
}

/// The other hosts a daemon can place clones on (implemented by the API
/// layer: HTTP with the cluster's bearer token).
pub trait CloneHosts: Send + Sync {
    /// This daemon's own host name.
    fn local_name(&self) -> &str;
    /// The key envelopes are sealed with.
    fn envelope_key(&self) -> [u8; 32];
    /// Hands a sealed envelope to `host`, which builds and starts its
    /// clones; returns how long the host took (envelope in → answer out).
    fn send_family(&self, host: &str, envelope: &[u8]) -> Result<Duration, RemoteError>;
    /// The clones of `family` on `host`.
    fn family_status(&self, host: &str, family: u64) -> Result<RemoteFamily, RemoteError>;
    /// Kills the clones of `family` on `host`.
    fn kill_family(&self, host: &str, family: u64) -> Result<(), RemoteError>;
}

/// Where a fork's clones go: `local` on this host, the rest on others.
#[derive(Clone)]
pub struct RemotePlan {
    pub hosts: Arc<dyn CloneHosts>,
    pub local: u64,
    /// Other hosts and their clone counts, in clone-id order.
    pub remote: Vec<(String, u64)>,
}

impl RemotePlan {
    pub fn total(&self) -> u64 {
        self.local + self.remote.iter().map(|(_, n)| n).sum::<u64>()
    }

    /// Splits the leases (clone 1 first): this host's come first, then
    /// each remote host's in order.
    pub fn split(&self, mut leases: Vec<IdentityLease>) -> (Vec<IdentityLease>, RemoteShare) {
        let rest = leases.split_off((self.local as usize).min(leases.len()));
        let mut rest = rest.into_iter();
        let hosts = self
            .remote
            .iter()
            .map(|(h, n)| (h.clone(), rest.by_ref().take(*n as usize).collect()))
            .collect();
        (leases, RemoteShare { hosts })
    }
}

/// `clones` shared out evenly over `hosts` (the first named take the
/// remainder).
pub fn spread_counts(clones: u64, hosts: &[String]) -> BTreeMap<String, u64> {
    let n = hosts.len().max(1) as u64;
    hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.clone(), clones / n + u64::from((i as u64) < clones % n)))
        .collect()
}

/// A VM's default placement for the forks its guest starts (`sf_clone`):
/// fixed counts per host, or an even spread.
#[derive(Clone)]
pub struct DefaultPlacement {
    pub hosts: Arc<dyn CloneHosts>,
    /// Clones per host; used when they add up to the clones granted,
    /// otherwise the clones are spread over the same hosts.
    pub counts: BTreeMap<String, u64>,
}

impl DefaultPlacement {
    /// The plan for a fork of `clones` (`None`: all here).
    pub fn plan(&self, clones: u64) -> Option<RemotePlan> {
        let sum: u64 = self.counts.values().sum();
        let counts = if sum == clones {
            self.counts.clone()
        } else {
            let names: Vec<String> = self.counts.keys().cloned().collect();
            spread_counts(clones, &names)
        };
        let me = self.hosts.local_name();
        let local = counts.get(me).copied().unwrap_or(0);
        let remote: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(h, n)| h != me && *n > 0)
            .collect();
        (!remote.is_empty()).then(|| RemotePlan {
            hosts: self.hosts.clone(),
            local,
            remote,
        })
    }
}

/// The remote hosts' leases (held here until their clones end).
pub struct RemoteShare {
    pub hosts: Vec<(String, Vec<IdentityLease>)>,
}

impl RemoteShare {
    /// Clone id → host, for the family's report.
    pub fn placement(&self) -> BTreeMap<u64, String> {
        self.hosts
            .iter()
            .flat_map(|(h, ls)| ls.iter().map(move |l| (l.identity.clone_id, h.clone())))
            .collect()
    }
}

fn exit_of(code: i32, reason: String) -> VmExit {
    match code {
        0..=99 => VmExit::Guest(code as u8),
        101 => VmExit::Halted,
        102 => VmExit::TripleFault,
        104 => VmExit::Stopped,
        _ => VmExit::Failed(reason),
    }
}

fn report(
    lease: &IdentityLease,
    exit: VmExit,
    clone: Option<&RemoteClone>,
    offset: Duration,
) -> CloneReport {
    CloneReport {
        clone_id: lease.identity.clone_id,
        identity: lease.identity,
        start_latency: clone.and_then(|c| c.start_after).map(|d| offset + d),
        done_latency: clone.and_then(|c| c.done_after).map(|d| offset + d),
        exit,
        last_line: clone.and_then(|c| c.last_line.clone()),
        identity_line: None,
        faults: Arc::new(
            clone
                .and_then(|c| c.faults)
                .map(FaultStats::from_counts)
                .unwrap_or_default(),
        ),
        pages_declared: 0,
    }
}

/// One clone host's clones still running, and when it last answered.
struct HostWatch {
    name: String,
    pending: Vec<IdentityLease>,
    last_ok: Instant,
    /// The fork request → the host's receipt of the envelope (estimated:
    /// the send's start plus half the round trip the host did not spend
    /// handling it), added to the times the host reports.
    offset: Duration,
}

/// What the remote side of a fork needs besides the family.
pub struct RemoteJob {
    pub hosts: Arc<dyn CloneHosts>,
    pub share: RemoteShare,
    /// The encoded descriptor.
    pub descriptor: Vec<u8>,
    /// The memory server's unicast endpoint.
    pub memserver: SocketAddr,
    pub cpu: [u8; 32],
    pub avoidance: bool,
    pub prefetch: bool,
    pub requested_at: Instant,
}

/// Sends the envelopes and starts the watcher thread.
pub fn start(family: Arc<Family>, job: RemoteJob) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("remote-{}", family.id()))
        .spawn(move || run(family, job))
}

fn run(family: Arc<Family>, job: RemoteJob) {
    let key = job.hosts.envelope_key();
    let multicast = family.multicast_endpoint().map(|e| EnvelopeMulticast {
        group: e.group,
        port: e.port,
        server: e.server,
    });
    let envelope = |leases: &[IdentityLease]| EnvelopeBody {
        family: family.key().id(),
        secret: *family.key().secret(),
        parent_host: job.hosts.local_name().to_owned(),
        memserver: job.memserver,
        multicast,
        avoidance: job.avoidance,
        prefetch: job.prefetch,
        cpu: job.cpu,
        clones: leases
            .iter()
            .map(|l| EnvelopeClone {
                clone_id: l.identity.clone_id,
                mac: l.identity.mac,
                ip: l.identity.ip,
                generation: [
                    l.identity.generation as u64,
                    (l.identity.generation >> 64) as u64,
                ],
            })
            .collect(),
        descriptor: job.descriptor.clone(),
    };
    // Every clone host at once: each builds its clones while the others
    // get their envelopes.
    let hosts = job.hosts.as_ref();
    let sent: Vec<_> = std::thread::scope(|scope| {
        let handles: Vec<_> = job
            .share
            .hosts
            .into_iter()
            .filter(|(_, leases)| !leases.is_empty())
            .map(|(host, leases)| {
                let body = envelope(&leases);
                let requested_at = job.requested_at;
                let sending = scope.spawn(move || {
                    let t = Instant::now();
                    let r = body
                        .seal(&key)
                        .map_err(|e| crate::errors::chain(&e))
                        .and_then(|b| {
                            hosts
                                .send_family(&host, &b)
                                .map_err(|e| crate::errors::chain(&e))
                        });
                    let offset = r.as_ref().ok().map(|handled| {
                        let transit = t.elapsed().saturating_sub(*handled);
                        t.saturating_duration_since(requested_at) + transit / 2
                    });
                    (host, r, offset)
                });
                (sending, leases)
            })
            .collect();
        handles
            .into_iter()
            .map(|(h, leases)| (h.join(), leases))
            .collect()
    });
    let mut watches = Vec::new();
    for (joined, leases) in sent {
        let (host, why, offset) = match joined {
            Ok((host, Ok(_), offset)) => (host, None, offset.unwrap_or_default()),
            Ok((host, Err(why), _)) => (host, Some(why), Duration::ZERO),
            Err(_) => (
                "?".to_owned(),
                Some("the sending thread panicked".to_owned()),
                Duration::ZERO,
            ),
        };
        match why {
            None => watches.push(HostWatch {
                name: host,
                pending: leases,
                last_ok: Instant::now(),
                offset,
            }),
            Some(why) => {
                tracing::warn!("family {}: clones on {host}: {why}", family.id());
                for l in leases {
                    family.remote_failed(l.identity.clone_id, format!("on {host}: {why}"));
                }
            }
        }
    }
    // Every clone host has joined the group (or failed): push.
    family.ready_for_push();
    watch(&family, hosts, watches);
}

/// Polls the clone hosts until every remote clone has ended.
fn watch(family: &Family, hosts: &dyn CloneHosts, mut watches: Vec<HostWatch>) {
    while watches.iter().any(|w| !w.pending.is_empty()) {
        if family.killed() {
            for w in &mut watches {
                if w.pending.is_empty() {
                    continue;
                }
                if let Err(e) = hosts.kill_family(&w.name, family.id()) {
                    tracing::warn!("family {}: kill on {}: {e}", family.id(), w.name);
                }
                for l in w.pending.drain(..) {
                    family.remote_ended(report(&l, VmExit::Stopped, None, w.offset));
                }
            }
            return;
        }
        let mut moved = Vec::new();
        for w in &mut watches {
            if w.pending.is_empty() {
                continue;
            }
            match hosts.family_status(&w.name, family.id()) {
                Ok(st) => {
                    w.last_ok = Instant::now();
                    if let Some(r) = st.receiver {
                        family.remote_receiver(&w.name, r);
                    }
                    moved.extend(settle(family, w, &st.clones));
                }
                Err(e) => {
                    if w.last_ok.elapsed() > HOST_SILENCE {
                        let why = format!(
                            "host {} stopped answering for more than {HOST_SILENCE:?}: {e}",
                            w.name
                        );
                        tracing::warn!("family {}: {why}", family.id());
                        for l in w.pending.drain(..) {
                            family.remote_failed(l.identity.clone_id, why.clone());
                        }
                    }
                }
            }
        }
        for (lease, host, offset) in moved {
            follow(family, &mut watches, lease, host, offset);
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Watches a clone that migrated on its new host from now on.
fn follow(
    family: &Family,
    watches: &mut Vec<HostWatch>,
    lease: IdentityLease,
    host: String,
    offset: Duration,
) {
    family.remote_moved(lease.identity.clone_id, &host);
    match watches.iter_mut().find(|w| w.name == host) {
        Some(w) => {
            // A host that had gone quiet gets a fresh chance for it.
            if w.pending.is_empty() {
                w.last_ok = Instant::now();
            }
            w.pending.push(lease);
        }
        None => watches.push(HostWatch {
            name: host,
            pending: vec![lease],
            last_ok: Instant::now(),
            offset,
        }),
    }
}

/// Records the clones a host says have ended; returns those it says have
/// migrated, with their new host (no longer pending here).
fn settle(
    family: &Family,
    w: &mut HostWatch,
    clones: &[RemoteClone],
) -> Vec<(IdentityLease, String, Duration)> {
    let mut moved = Vec::new();
    let mut i = 0;
    while i < w.pending.len() {
        let id = w.pending[i].identity.clone_id;
        let state = clones.iter().find(|c| c.clone_id == id);
        if let Some(RemoteCloneState::Moved { host }) = state.map(|c| &c.state) {
            moved.push((w.pending.swap_remove(i), host.clone(), w.offset));
            continue;
        }
        let done = match state {
            None => Some(Err(format!("host {} does not know clone {id}", w.name))),
            Some(c) => match &c.state {
                RemoteCloneState::Running => None,
                RemoteCloneState::Exited { code, reason } => {
                    Some(Ok((exit_of(*code, reason.clone()), c)))
                }
                RemoteCloneState::Failed(why) => Some(Err(format!("on {}: {why}", w.name))),
                RemoteCloneState::Moved { .. } => None,
            },
        };
        match done {
            None => i += 1,
            Some(r) => {
                let lease = w.pending.swap_remove(i);
                match r {
                    Ok((exit, c)) => family.remote_ended(report(&lease, exit, Some(c), w.offset)),
                    Err(why) => family.remote_failed(id, why),
                }
            }
        }
    }
    moved
}
