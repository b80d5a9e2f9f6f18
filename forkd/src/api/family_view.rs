//! A fork family as the API shows it (`GET /v1/vms/{id}` → `families`):
//! every clone's state, exit, times and fault counters, and the
//! multicast receivers' figures per host.

use std::collections::BTreeMap;
use std::time::Duration;

use super::types::{CloneInfo, CloneState, ExitInfo, FamilyInfo, HostReceiverInfo, StartFailure};
use crate::fork::parent::Family;

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// `rates`: the clones' fault rates, by (family, clone id).
pub(super) fn family_info(f: &Family, rates: &BTreeMap<(u64, u64), f64>) -> FamilyInfo {
    // The count first: a clone's report entry is written before the count
    // drops, so a count of 0 read here means every clone's entry is in the
    // report read next.
    let running = f.running();
    let report = f.report();
    let host = |i: u64| report.hosts.get(&i).cloned();
    let clones = report
        .identities
        .iter()
        .map(|identity| {
            let i = identity.clone_id;
            let mut info = if let Some(c) = report.clones.iter().find(|c| c.clone_id == i) {
                let mut info = CloneInfo::new(identity, CloneState::Exited);
                info.exit = Some(ExitInfo::from(&c.exit));
                info.last_line = c.last_line.clone();
                info.start_us = c.start_latency.map(micros);
                info.done_us = c.done_latency.map(micros);
                info.faults = Some(c.faults.counts());
                info
            } else if let Some((_, why)) = report.start_failures.iter().find(|(id, _)| *id == i) {
                let mut info = CloneInfo::new(identity, CloneState::Failed);
                info.error = Some(why.clone());
                info
            } else {
                CloneInfo::new(identity, CloneState::Running)
            };
            info.host = host(i);
            info.faults_per_s = rates.get(&(report.family, i)).copied();
            info
        })
        .collect();
    let local = report.host_receiver.as_ref().map(|s| HostReceiverInfo {
        host: "local".into(),
        figures: s.into(),
    });
    let receivers = local
        .into_iter()
        .chain(
            report
                .remote_receivers
                .iter()
                .map(|(h, figures)| HostReceiverInfo {
                    host: h.clone(),
                    figures: *figures,
                }),
        )
        .collect();
    FamilyInfo {
        family: report.family,
        clones_granted: report.clones_granted,
        running,
        distribution: report.distribution,
        heuristics: report.heuristics,
        parent_stopped_us: micros(report.parent_stopped),
        clones,
        start_failures: report
            .start_failures
            .iter()
            .map(|(clone_id, error)| StartFailure {
                clone_id: *clone_id,
                error: error.clone(),
            })
            .collect(),
        receivers,
    }
}
