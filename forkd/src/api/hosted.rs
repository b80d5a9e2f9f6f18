//! Families hosted here for parents on other hosts (`POST /v1/families`):
//! their clones are VMs of this daemon (listed, console, DELETE), and the
//! parent's daemon polls `GET /v1/families/{id}` and ends them with
//! `DELETE /v1/families/{id}`. Ended families beyond the last
//! [`ENDED_KEPT`] are forgotten; at most `max_vms × max_clones` hosted
//! clones at once.

use std::sync::Arc;
use std::time::Duration;

use crate::fork::envelope::{from_hex, EnvelopeBody};
use crate::fork::hosted::{HostedClone, HostedFamily, HostedOptions};
use crate::fork::remote::RemoteCloneState;
use crate::sync::lock;

use super::error::ApiError;
use super::registry::Registry;
use super::types::{
    vm_id, ConsoleLines, ExitInfo, FamilyStatus, HostedCloneInfo, PostFamily, VmDetail, VmState,
    VmSummary,
};

/// Ended hosted families kept for their status.
const ENDED_KEPT: usize = 16;
/// Longest wait for a host a clone moved to, passing a kill on.
const KILL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

fn clone_info(c: &HostedClone) -> HostedCloneInfo {
    let st = c.status();
    let (state, exit, error, moved_to) = match st.state {
        RemoteCloneState::Running => ("running", None, None, None),
        RemoteCloneState::Exited { code, reason } => {
            ("exited", Some(ExitInfo { code, reason }), None, None)
        }
        RemoteCloneState::Failed(why) => ("failed", None, Some(why), None),
        RemoteCloneState::Moved { host } => ("migrated", None, None, Some(host)),
    };
    let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    HostedCloneInfo {
        clone_id: c.clone_id,
        id: vm_id(c.vm_id),
        state: state.into(),
        moved_to,
        exit,
        last_line: st.last_line,
        error,
        start_us: st.start_after.map(us),
        done_us: st.done_after.map(us),
        faults: st.faults,
    }
}

fn status(f: &HostedFamily) -> FamilyStatus {
    FamilyStatus {
        family: f.family,
        parent_host: f.parent_host.clone(),
        running: f.running() as u64,
        clones: f.clones().iter().map(|c| clone_info(c)).collect(),
        receiver: f.receiver(),
        handled_us: None,
    }
}

fn summary(f: &HostedFamily, c: &HostedClone) -> VmSummary {
    let exit = c.exit();
    let (last_line, console_lines) = match c.console.get() {
        Some(con) => {
            let log = con.log();
            (
                log.last_line().map(str::to_owned),
                log.lines.len() as u64 + log.dropped_lines,
            )
        }
        None => (None, 0),
    };
    VmSummary {
        id: vm_id(c.vm_id),
        name: None,
        state: if exit.is_some() {
            VmState::Exited
        } else {
            VmState::Running
        },
        exit: exit.as_ref().map(ExitInfo::from),
        last_line,
        console_lines,
        family: Some(f.family),
        clone_id: Some(c.clone_id),
        parent_host: Some(f.parent_host.clone()),
    }
}

impl Registry {
    /// `POST /v1/families`: opens the envelope (MAC with the cluster key)
    /// and builds and starts its clones here.
    pub fn host_family(&self, req: PostFamily) -> Result<FamilyStatus, ApiError> {
        if self.is_closed() {
            return Err(ApiError::ShuttingDown);
        }
        let key = self
            .envelope_key()
            .ok_or(ApiError::NoCluster("host clones for other hosts"))?;
        let bytes = from_hex(&req.envelope)
            .ok_or_else(|| ApiError::BadRequest("envelope: not hex".into()))?;
        let body = EnvelopeBody::open(&bytes, &key).map_err(|e| ApiError::Hosted(e.into()))?;
        if lock(&self.hosted).contains_key(&body.family) {
            return Err(ApiError::Conflict(format!(
                "family {} is already hosted here",
                body.family
            )));
        }
        let max = self.limits().max_vms as u64 * self.limits().max_clones;
        let live: u64 = lock(&self.hosted)
            .values()
            .map(|f| f.running() as u64)
            .sum();
        if live + body.clones.len() as u64 > max {
            return Err(ApiError::TooManyVms(max as usize));
        }
        let opts = HostedOptions {
            name_prefix: format!("{}.", body.parent_host),
            readahead: 32,
        };
        let family =
            HostedFamily::start(body, &opts, || self.next_vm_id()).map_err(ApiError::Hosted)?;
        let mut st = status(&family);
        st.handled_us = Some(u64::try_from(family.received.elapsed().as_micros()).unwrap_or(0));
        let mut hosted = lock(&self.hosted);
        hosted.insert(family.family, family);
        // Forget the oldest ended families beyond the last few.
        let ended: Vec<u64> = hosted
            .iter()
            .filter(|(_, f)| f.running() == 0)
            .map(|(id, _)| *id)
            .collect();
        let forget = ended.len().saturating_sub(ENDED_KEPT);
        let gone: Vec<_> = ended
            .iter()
            .take(forget)
            .filter_map(|id| hosted.remove(id))
            .collect();
        drop(hosted);
        drop(gone);
        Ok(st)
    }

    pub fn family_status(&self, family: u64) -> Result<FamilyStatus, ApiError> {
        let f = lock(&self.hosted)
            .get(&family)
            .cloned()
            .ok_or(ApiError::NoSuchFamily(family))?;
        Ok(status(&f))
    }

    /// `DELETE /v1/families/{id}`: kills the family's clones here, and
    /// passes the kill on to the hosts its clones migrated to (the
    /// parent's host may not know of the move yet).
    pub fn kill_family(&self, family: u64) -> Result<(), ApiError> {
        let f = lock(&self.hosted)
            .remove(&family)
            .ok_or(ApiError::NoSuchFamily(family))?;
        let clones = f.clones();
        for c in &clones {
            self.cancel_out(c.vm_id);
        }
        f.kill();
        let mut moved: Vec<String> = clones.iter().filter_map(|c| c.moved_to()).collect();
        moved.sort();
        moved.dedup();
        if let (Some(peers), false) = (self.peers().cloned(), moved.is_empty()) {
            let pass_on = move || {
                let path = format!("/v1/families/{family}");
                for host in moved {
                    let r = peers.call(&host, "DELETE", &path, None, KILL_TIMEOUT);
                    if let Err(e) = r {
                        tracing::warn!("family {family}: passing the kill on to {host}: {e}");
                    }
                }
            };
            if let Err(e) = std::thread::Builder::new()
                .name(format!("kill-moved-{family}"))
                .spawn(pass_on)
            {
                tracing::warn!("family {family}: the kill is not passed on: {e}");
            }
        }
        Ok(())
    }

    /// Every hosted clone not deleted, as VMs of this host.
    pub(super) fn hosted_summaries(&self) -> Vec<VmSummary> {
        let families: Vec<_> = lock(&self.hosted).values().cloned().collect();
        families
            .iter()
            .flat_map(|f| f.clones().into_iter().map(move |c| (f, c)))
            .filter(|(_, c)| !c.is_removed() && c.moved_to().is_none())
            .map(|(f, c)| summary(f, &c))
            .collect()
    }

    /// The vCPU time so far of each clone running here for a parent
    /// elsewhere, by (parent's host, family, clone id).
    pub(super) fn hosted_cpu_times(&self) -> Vec<(super::load::HostedKey, Duration)> {
        let families: Vec<_> = lock(&self.hosted).values().cloned().collect();
        families
            .iter()
            .flat_map(|f| {
                f.clones().into_iter().flat_map(move |c| {
                    c.guest
                        .cpu_times()
                        .into_iter()
                        .map(move |(id, t)| ((f.parent_host.clone(), f.family, id), t))
                })
            })
            .collect()
    }

    /// A hosted clone that runs here (or ended here) by its VM id.
    pub(super) fn hosted_clone(&self, id: u64) -> Option<(Arc<HostedFamily>, Arc<HostedClone>)> {
        lock(&self.hosted).values().find_map(|f| {
            f.clones()
                .into_iter()
                .find(|c| c.vm_id == id && !c.is_removed() && c.moved_to().is_none())
                .map(|c| (f.clone(), c))
        })
    }

    pub(super) fn hosted_detail(&self, id: u64) -> Option<VmDetail> {
        let (f, c) = self.hosted_clone(id)?;
        Some(VmDetail {
            summary: summary(&f, &c),
            cmdline: String::new(),
            mem_mib: c.mem_bytes >> 20,
            vcpus: 1,
            guest: String::new(),
            families: Vec::new(),
            load: self.hosted_load(f.family, &c),
        })
    }

    pub(super) fn hosted_console(&self, id: u64) -> Option<ConsoleLines> {
        let (_, c) = self.hosted_clone(id)?;
        Some(match c.console.get() {
            Some(con) => {
                let log = con.log();
                ConsoleLines {
                    lines: log.lines.clone(),
                    dropped_lines: log.dropped_lines,
                }
            }
            None => ConsoleLines {
                lines: Vec::new(),
                dropped_lines: 0,
            },
        })
    }

    /// DELETE of a hosted clone: killed, and gone from the VM list (its
    /// family's status keeps it, as stopped, for the parent's host).
    pub(super) fn remove_hosted(&self, id: u64) -> bool {
        match self.hosted_clone(id) {
            Some((_, c)) => {
                self.cancel_out(id);
                c.remove();
                true
            }
            None => false,
        }
    }

    pub(super) fn kill_hosted(&self) {
        let all: Vec<_> = std::mem::take(&mut *lock(&self.hosted))
            .into_values()
            .collect();
        for f in all {
            for c in f.clones() {
                self.cancel_out(c.vm_id);
            }
            f.kill();
        }
    }
}
