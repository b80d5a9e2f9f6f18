//! What a migration takes, and migrating clones.
//!
//! A migration's subject is a booted VM of this host (taken out of its
//! registry entry, given back on abort) or a clone hosted here for a
//! parent on another host. A clone's reaper lends the running VM to the
//! migration worker ([`crate::fork::handover`]); it goes by pre-copy like
//! any VM, with its origin in the open request: its family, the family's
//! key and memory server, its identity. Its pages not populated here are
//! not sent (round 0 sends its populated zero pages as `Zeros`): on the
//! destination they fault in from the family's memory server
//! ([`crate::fork::clone::rehome`]), as they did here. Committed: the
//! clone is recorded here as moved (its family's status says where, so
//! the parent's host, polling, watches it there from then on) and joins
//! the family's share on the destination, made for it if that host had
//! none. Not committed: the reaper watches it again.
//!
//! A clone does not move onto its parent's host (clones there live in the
//! parent's process) and does not post-copy (its missing pages would have
//! two sources); both are refused with 422, and `auto` stays pre-copy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::ApiError;
use super::migration_open::{CloneOrigin, OpenIncoming, PendingTicket};
use super::registry::{Entry, Registry};
use super::types::vm_id;
use crate::clients::Target;
use crate::fork::clone::FamilySource;
use crate::fork::envelope::to_hex;
use crate::fork::fault::FaultStatsView;
use crate::fork::handover::{Answer, HandoverError};
use crate::fork::hosted::{HostedClone, HostedFamily};
use crate::migrate::Mode;
use crate::sync::lock;
use crate::vmm::Vm;

/// How long a clone's reaper may take to hand its VM over.
const BORROW_TIMEOUT: Duration = Duration::from_secs(2);

/// The VM a migration worker holds, and where it goes when done.
pub(super) enum Subject {
    Booted(Arc<Entry>),
    Clone {
        family: Arc<HostedFamily>,
        clone: Arc<HostedClone>,
        answer: Answer<Vm>,
    },
}

impl Subject {
    pub(super) fn is_clone(&self) -> bool {
        matches!(self, Subject::Clone { .. })
    }

    /// Not committed: the VM runs (or stays paused, in doubt) here again.
    pub(super) fn give_back(self, reg: &Registry, vm: Vm) {
        match self {
            Subject::Booted(entry) => reg.give_back(&entry, vm),
            Subject::Clone { answer, .. } => answer.give_back(vm),
        }
    }

    /// Committed: the guest runs on `destination`; this copy goes.
    pub(super) fn committed(self, reg: &Registry, id: u64, mut vm: Vm, destination: &str) {
        vm.kill();
        drop(vm);
        // Its clients are redirected there from now on.
        let target = match &self {
            Subject::Booted(_) => Target::Vm(id),
            Subject::Clone { family, clone, .. } => Target::HostedClone {
                family: family.family,
                clone_id: clone.clone_id,
            },
        };
        reg.zone_moved(id, target, destination);
        match self {
            Subject::Booted(_) => reg.forget_migrated(id),
            Subject::Clone {
                family,
                clone,
                answer,
            } => {
                tracing::info!(
                    "clone {} of family {} ({}) moved to {destination}",
                    clone.clone_id,
                    family.family,
                    vm_id(id)
                );
                answer.moved(destination.to_owned());
            }
        }
    }
}

impl Registry {
    /// Takes the VM `id` for a migration to `destination` in `mode`: the
    /// subject, its VM, and what the destination is told of it.
    pub(super) fn take_subject(
        &self,
        id: u64,
        destination: &str,
        mode: Mode,
    ) -> Result<(Subject, Vm, OpenIncoming), ApiError> {
        let me = self
            .peers()
            .map(|p| p.name().to_owned())
            .unwrap_or_default();
        let source = format!("{me}/{}", vm_id(id));
        let Some((family, clone)) = self.hosted_clone(id) else {
            let (entry, vm) = self.take_for_migration(id)?;
            let open = OpenIncoming {
                source,
                vm: vm_id(id),
                mem_mib: entry.mem_mib,
                vcpus: entry.vcpus,
                cmdline: entry.cmdline.clone(),
                name: entry.name.clone(),
                guest: Some(entry.guest.clone()),
                tickets: entry
                    .hub
                    .pending_tickets()
                    .into_iter()
                    .map(|(id, clones)| PendingTicket { id, clones })
                    .collect(),
                clone: None,
            };
            return Ok((Subject::Booted(entry), vm, open));
        };
        if mode == Mode::Postcopy {
            return Err(ApiError::Unprocessable(format!(
                "{} is a clone: it migrates by pre-copy only (its missing pages are its family's)",
                vm_id(id)
            )));
        }
        if destination == family.parent_host {
            return Err(ApiError::Unprocessable(format!(
                "{} is a clone of a parent on {destination}: clones there live in the parent's process, so it cannot move there",
                vm_id(id)
            )));
        }
        let (vm, answer) = clone.borrow(BORROW_TIMEOUT).map_err(|e| match e {
            HandoverError::Busy => {
                ApiError::Conflict(format!("{} is being migrated already", vm_id(id)))
            }
            HandoverError::Ended => ApiError::Conflict(format!("{} has ended", vm_id(id))),
            e @ HandoverError::Timeout(_) => ApiError::Internal(e.to_string()),
        })?;
        let identity = clone.identity;
        let origin = CloneOrigin {
            family: family.family,
            secret: to_hex(family.key.secret()),
            parent_host: family.parent_host.clone(),
            memserver: family.memserver,
            clone_id: clone.clone_id,
            mac: identity.mac_u64(),
            ip: identity.ip,
            generation: identity.generation_hex(),
            age_us: u64::try_from(family.received.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        let open = OpenIncoming {
            source,
            vm: vm_id(id),
            mem_mib: vm.mem_bytes() >> 20,
            vcpus: 1,
            cmdline: String::new(),
            name: None,
            guest: None,
            tickets: Vec::new(),
            clone: Some(origin),
        };
        let subject = Subject::Clone {
            family,
            clone,
            answer,
        };
        Ok((subject, vm, open))
    }

    /// Destination: checks a clone's origin before its migration opens;
    /// where its missing pages will come from.
    pub(super) fn check_origin(&self, o: &CloneOrigin) -> Result<FamilySource, ApiError> {
        o.identity()?;
        let key = o.key()?;
        let me = self
            .peers()
            .map(|p| p.name().to_owned())
            .unwrap_or_default();
        if o.parent_host == me {
            return Err(ApiError::Unprocessable(format!(
                "clone {} of family {}: its parent runs here, and clones here live in the parent's process",
                o.clone_id, o.family
            )));
        }
        if o.parent_host.len() > 64 {
            return Err(ApiError::BadRequest("clone.parent_host: too long".into()));
        }
        let hosted = lock(&self.hosted);
        if let Some(f) = hosted.get(&o.family) {
            if f.parent_host != o.parent_host {
                return Err(ApiError::Conflict(format!(
                    "family {} of {} is hosted here already, for {}",
                    o.family, o.parent_host, f.parent_host
                )));
            }
        }
        let max = self.limits().max_vms as u64 * self.limits().max_clones;
        let live: u64 = hosted.values().map(|f| f.running() as u64).sum();
        if live >= max {
            return Err(ApiError::TooManyVms(max as usize));
        }
        Ok(FamilySource {
            server: o.memserver,
            key,
        })
    }

    /// Destination, at commit: the clone that arrived joins its family's
    /// share here (made for it if there is none) as VM `id`.
    pub(super) fn adopt_clone(
        &self,
        o: &CloneOrigin,
        id: u64,
        vm: Vm,
        faults: Option<FaultStatsView>,
    ) -> Result<(), ApiError> {
        let identity = o.identity()?;
        let key = o.key()?;
        let received = Instant::now()
            .checked_sub(Duration::from_micros(o.age_us))
            .unwrap_or_else(Instant::now);
        let family = {
            let mut hosted = lock(&self.hosted);
            hosted
                .entry(o.family)
                .or_insert_with(|| {
                    HostedFamily::for_arrivals(
                        o.family,
                        o.parent_host.clone(),
                        key,
                        o.memserver,
                        received,
                    )
                })
                .clone()
        };
        if family.parent_host != o.parent_host {
            return Err(ApiError::Conflict(format!(
                "family {} is hosted here for {}",
                o.family, family.parent_host
            )));
        }
        family
            .adopt(o.clone_id, id, identity, vm, faults)
            .map_err(|e| ApiError::Internal(format!("the clone's reaper: {e}")))?;
        self.zone_arrived(
            id,
            Target::HostedClone {
                family: o.family,
                clone_id: o.clone_id,
            },
        );
        Ok(())
    }
}
