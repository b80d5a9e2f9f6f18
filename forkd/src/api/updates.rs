//! Client updates in the daemon: the registry as the client ingress's
//! [`Directory`] (where zones, their fork families and their clones run;
//! which zones migrated away), the guests' tick load, and `GET
//! /v1/clients`. The ingress itself is `crate::clients::ingress`.
//!
//! Routing of a forked zone: member 0 is the VM here; a clone on this host
//! is written directly; a clone on another host gets its clients' updates
//! **forwarded** to that host's ingress (peer address, this daemon's
//! ingress port: every host of a cluster uses the same port), which
//! acknowledges the clients itself. After a join (or once every clone
//! ended) the zone's updates go to the parent again, and the daemon sets
//! the parent's family size back to 1 before it writes the next update.
//! A zone that migrated away is answered with a redirect to the
//! destination's ingress.

use std::net::SocketAddr;
use std::sync::{Arc, TryLockError, Weak};

use guest_agent::abi;
use serde::Serialize;

use super::registry::{Entry, Registry};
use super::types::vm_id;
use crate::clients::ingress::IngressStats;
use crate::clients::ring::guest_load;
use crate::clients::{
    Access, ClientCounters, Directory, GuestView, Ingress, Route, Routing, Target,
};
use crate::sync::lock;

/// `GET /v1/clients`: the ingress and every target's counters.
#[derive(Debug, Clone, Serialize)]
pub struct ClientsInfo {
    #[serde(flatten)]
    pub ingress: IngressStats,
    pub targets: Vec<TargetInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// `vm-N` for a VM here; `vm-N.clone-I` for a local clone of VM N;
    /// `family-F.clone-I` for a clone hosted here.
    pub target: String,
    #[serde(flatten)]
    pub counters: ClientCounters,
}

fn target_name(t: &Target) -> String {
    match t {
        Target::Vm(id) => vm_id(*id),
        Target::LocalClone {
            parent, clone_id, ..
        } => format!("{}.clone-{clone_id}", vm_id(*parent)),
        Target::HostedClone { family, clone_id } => format!("family-{family}.clone-{clone_id}"),
    }
}

impl Registry {
    /// A VM's load: sampled figures, client counters, the guest's own.
    pub(super) fn vm_load(&self, e: &Entry) -> Option<super::load::VmLoad> {
        let clients = self.client_counters(e.id);
        let guest = *lock(&e.guest_load);
        let load = e.load.get();
        if load.is_none() && clients.is_none() && guest.is_none() {
            return None;
        }
        let mut l = load.unwrap_or_default();
        l.clients = clients;
        l.guest = guest;
        Some(l)
    }

    /// The client ingress, if this daemon runs one.
    pub(super) fn ingress(&self) -> Option<&Arc<Ingress>> {
        self.clients.ingress.get()
    }

    /// Starts the client ingress on `bind` (`serve --clients-udp`).
    pub fn start_ingress(self: &Arc<Self>, bind: SocketAddr) -> std::io::Result<SocketAddr> {
        let dir = Arc::new(RegistryDirectory(Arc::downgrade(self)));
        let mut cfg = crate::clients::IngressConfig::new(bind);
        cfg.forward_key = self
            .envelope_key()
            .map(|k| crate::clients::wire::forward_key(&k));
        let ingress = Ingress::start(cfg, dir)?;
        let addr = ingress.local_addr();
        let _ = self.clients.ingress.set(Arc::new(ingress));
        Ok(addr)
    }

    pub(super) fn stop_ingress(&self) {
        if let Some(i) = self.ingress() {
            i.stop();
        }
    }

    /// A committed migration: `id` (ring target `t`) now runs on `host`.
    pub(super) fn zone_moved(&self, id: u64, t: Target, host: &str) {
        {
            let mut m = lock(&self.clients.moved);
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert(id, host.to_owned());
        }
        if let Some(i) = self.ingress() {
            i.forget(id, t);
        }
    }

    /// A VM of id `id` (ring target `t`) runs here (again): no redirect
    /// for it, and its ring is taken over where it stands now.
    pub(super) fn zone_arrived(&self, id: u64, t: Target) {
        lock(&self.clients.moved).remove(&id);
        if let Some(i) = self.ingress() {
            i.forget(id, t);
        }
    }

    /// The client counters of VM `id` here.
    pub(super) fn client_counters(&self, id: u64) -> Option<ClientCounters> {
        self.ingress()?.counters(Target::Vm(id))
    }

    /// A hosted clone's load: its client counters and its guest's own.
    pub(super) fn hosted_load(
        &self,
        family: u64,
        c: &crate::fork::hosted::HostedClone,
    ) -> Option<super::load::VmLoad> {
        let clients = self.ingress().and_then(|i| {
            i.counters(Target::HostedClone {
                family,
                clone_id: c.clone_id,
            })
        });
        let guest = c
            .guest
            .with(c.clone_id, |g| {
                guest_load(&GuestView {
                    memory: &g.memory,
                    writes: &g.writes,
                    agent_gpa: g.agent_gpa,
                })
            })
            .flatten();
        let cpu_cores = self.host_load.hosted_core(family, c.clone_id);
        (clients.is_some() || guest.is_some() || cpu_cores.is_some()).then(|| super::load::VmLoad {
            cpu_cores: cpu_cores.unwrap_or(0.0),
            cpu_seconds: c
                .guest
                .cpu_times()
                .first()
                .map_or(0.0, |(_, t)| t.as_secs_f64()),
            clients,
            guest,
            ..Default::default()
        })
    }

    /// `GET /v1/clients`.
    pub fn clients_info(&self) -> Option<ClientsInfo> {
        let stats = self.ingress()?.stats();
        let targets = stats
            .targets
            .iter()
            .map(|(t, c)| TargetInfo {
                target: target_name(t),
                counters: *c,
            })
            .collect();
        Some(ClientsInfo {
            ingress: stats,
            targets,
        })
    }

    /// The ingress of `host` (a peer): its API address's IP, this
    /// daemon's ingress port.
    fn peer_ingress(&self, host: &str) -> Option<SocketAddr> {
        let port = self.ingress()?.local_addr().port();
        let api = self.peers()?.addr(host).ok()?;
        Some(SocketAddr::new(api.ip(), port))
    }

    fn routing(&self, vm: u64) -> Routing {
        if let Ok(e) = self.entry(vm) {
            if !e.is_running() {
                return Routing::Single(Route::Unknown);
            }
            let here = self.host_name();
            let live = e.hub.families().into_iter().find(|f| !f.is_released());
            let Some(f) = live else {
                return Routing::Single(Route::Here(Target::Vm(vm)));
            };
            let r = f.report();
            let n = r.clones_granted.max(r.identities.len() as u64);
            let mut members = vec![Route::Here(Target::Vm(vm))];
            for i in 1..=n {
                members.push(match r.hosts.get(&i) {
                    Some(h) if *h != here => match self.peer_ingress(h) {
                        Some(to) => Route::Forward {
                            to,
                            family: f.id(),
                            clone_id: i,
                        },
                        None => Route::Unknown,
                    },
                    _ => Route::Here(Target::LocalClone {
                        parent: vm,
                        family: f.id(),
                        clone_id: i,
                    }),
                });
            }
            return Routing::Family(members);
        }
        if let Some(t) = self.hosted_target_of_vm(vm) {
            return Routing::Single(Route::Here(t));
        }
        let moved = lock(&self.clients.moved).get(&vm).cloned();
        match moved.and_then(|h| self.peer_ingress(&h)) {
            Some(to) => Routing::Single(Route::Moved(to)),
            None => Routing::Single(Route::Unknown),
        }
    }

    /// A clone hosted here, addressed by its VM id here.
    fn hosted_target_of_vm(&self, vm: u64) -> Option<Target> {
        lock(&self.hosted).values().find_map(|f| {
            f.clones()
                .into_iter()
                .find(|c| c.vm_id == vm && c.is_running())
                .map(|c| Target::HostedClone {
                    family: f.family,
                    clone_id: c.clone_id,
                })
        })
    }

    fn forwarded_target(&self, family: u64, clone_id: u64) -> Option<Target> {
        let hosted = lock(&self.hosted);
        let f = hosted.get(&family)?;
        f.clones()
            .iter()
            .any(|c| c.clone_id == clone_id && c.is_running())
            .then_some(Target::HostedClone { family, clone_id })
    }

    fn with_vm_guest(&self, id: u64, f: &mut dyn FnMut(&GuestView)) -> Access {
        let Ok(e) = self.entry(id) else {
            return Access::Gone;
        };
        let guard = match e.vm.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return Access::Busy,
        };
        // Looked at under the lock `take_for_migration` sets it under: a
        // VM out with a migration worker waits (its updates queue).
        if e.migrating.load(std::sync::atomic::Ordering::Acquire) {
            return Access::Busy;
        }
        let Some(vm) = guard.as_ref() else {
            return Access::Gone;
        };
        if !e.is_running() {
            return Access::Gone;
        }
        let Some(info) = vm.guest_info() else {
            return Access::Busy;
        };
        let writes = vm.vmm_writes();
        let view = GuestView {
            memory: vm.memory(),
            writes: &writes,
            agent_gpa: info.agent_gpa,
        };
        reset_family_size(&e, &view);
        f(&view);
        Access::Done
    }
}

/// No live family: the parent is the zone's only member again.
fn reset_family_size(e: &Entry, v: &GuestView) {
    if v.agent_word(abi::AGENT_WORD_FAMILY_SIZE).unwrap_or(0) > 1
        && e.hub.families().iter().all(|f| f.is_released())
    {
        let _ = v.set_agent_word(abi::AGENT_WORD_FAMILY_SIZE, 1);
    }
}

/// The registry as the ingress sees it (weak: the ingress must not keep
/// a daemon alive).
struct RegistryDirectory(Weak<Registry>);

impl Directory for RegistryDirectory {
    fn routing(&self, vm: u64) -> Routing {
        match self.0.upgrade() {
            Some(r) => r.routing(vm),
            None => Routing::Single(Route::Unknown),
        }
    }

    fn forwarded(&self, family: u64, clone_id: u64) -> Option<Target> {
        self.0.upgrade()?.forwarded_target(family, clone_id)
    }

    fn with_guest(&self, t: Target, f: &mut dyn FnMut(&GuestView)) -> Access {
        let Some(reg) = self.0.upgrade() else {
            return Access::Gone;
        };
        let run = |g: &crate::fork::guests::CloneGuest, f: &mut dyn FnMut(&GuestView)| {
            f(&GuestView {
                memory: &g.memory,
                writes: &g.writes,
                agent_gpa: g.agent_gpa,
            })
        };
        match t {
            Target::Vm(id) => reg.with_vm_guest(id, f),
            Target::LocalClone {
                parent,
                family,
                clone_id,
            } => {
                let Ok(e) = reg.entry(parent) else {
                    return Access::Gone;
                };
                let fam = e.hub.families().into_iter().find(|x| x.id() == family);
                match fam.and_then(|x| x.guests().with(clone_id, |g| run(g, f))) {
                    Some(()) => Access::Done,
                    None => Access::Gone,
                }
            }
            Target::HostedClone { family, clone_id } => {
                let fam = lock(&reg.hosted).get(&family).cloned();
                let Some(fam) = fam else {
                    return Access::Gone;
                };
                let clones = fam.clones();
                let Some(c) = clones.iter().find(|c| c.clone_id == clone_id) else {
                    return Access::Gone;
                };
                match c.guest.with(clone_id, |g| run(g, f)) {
                    Some(()) => Access::Done,
                    // Lent to a migration: its updates wait.
                    None if c.is_running() => Access::Busy,
                    None => Access::Gone,
                }
            }
        }
    }
}
