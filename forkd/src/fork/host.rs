//! Host-initiated fork: the daemon forks a running VM (the fork API). The
//! VM pauses, its state is captured, the hub forks it, and the guest
//! learns of the fork at its next tick boundary through its agent page
//! (clone id 0 in the parent, 1..=clones in the clones).

use crate::fork::family::ForkTuning;
use crate::fork::parent::{Family, ForkHub};
use crate::fork::remote::RemotePlan;
use crate::fork::{Answer, ForkError, ForkRequest};
use crate::vmm::{Vm, VmError};
use guest_agent::abi;
use std::sync::Arc;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

#[derive(Debug, thiserror::Error)]
pub enum HostForkError {
    #[error("{requested} clones requested; 1..={max} allowed")]
    BadClones { requested: u64, max: u64 },
    #[error("the VM has already exited")]
    Exited,
    #[error("the VM has {0} vCPUs; only single-vCPU VMs fork")]
    MultipleVcpus(u8),
    #[error("the guest agent has not started yet; try again shortly")]
    AgentNotReady,
    #[error("the guest has finished its work and would not notice a fork")]
    GuestFinished,
    #[error("cannot read or write the guest's agent page")]
    AgentPage(#[source] vm_memory::GuestMemoryError),
    #[error("cannot pause, capture or resume the VM")]
    Vm(#[from] VmError),
    #[error(transparent)]
    Fork(#[from] ForkError),
}

impl HostForkError {
    /// Whether the VM is in a state that refuses this fork (it may work
    /// later, or never for this VM), as opposed to a failure.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            HostForkError::Exited
                | HostForkError::MultipleVcpus(_)
                | HostForkError::AgentNotReady
                | HostForkError::GuestFinished
                | HostForkError::Fork(ForkError::FamilyLive(_))
                | HostForkError::Fork(ForkError::FileBackedMemory)
        )
    }
}

/// Forks the running `vm` (whose hypercall service is `hub`) into
/// `clones` clones.
pub fn fork_vm(vm: &mut Vm, hub: &ForkHub, clones: u64) -> Result<Arc<Family>, HostForkError> {
    fork_vm_placed(vm, hub, clones, None, None)
}

/// [`fork_vm`] with some clones on other hosts (`plan`, whose total must
/// be `clones`), and this fork's own distribution and heuristics
/// (`tuning`; `None`: the hub's).
pub fn fork_vm_placed(
    vm: &mut Vm,
    hub: &ForkHub,
    clones: u64,
    plan: Option<RemotePlan>,
    tuning: Option<ForkTuning>,
) -> Result<Arc<Family>, HostForkError> {
    let requested_at = Instant::now();
    if clones == 0 || clones > hub.max_clones() {
        return Err(HostForkError::BadClones {
            requested: clones,
            max: hub.max_clones(),
        });
    }
    if vm.exit().is_some() {
        return Err(HostForkError::Exited);
    }
    if vm.vcpu_count() != 1 {
        return Err(HostForkError::MultipleVcpus(vm.vcpu_count()));
    }
    hub.check_forkable(vm.memory())?;
    let agent = vm
        .guest_info()
        .map(|g| g.agent_gpa)
        .filter(|a| *a != 0)
        .ok_or(HostForkError::AgentNotReady)?;
    let word = |w: usize| GuestAddress(agent + 8 * w as u64);
    let read = |vm: &Vm, w: usize| {
        vm.memory()
            .read_obj::<u64>(word(w))
            .map_err(HostForkError::AgentPage)
    };
    vm.pause().map_err(|e| match e {
        VmError::Exited => HostForkError::Exited,
        e => HostForkError::Vm(e),
    })?;
    let forked = (|| -> Result<Arc<Family>, HostForkError> {
        // Read while paused: past this mark the guest no longer looks.
        if read(vm, abi::AGENT_WORD_FINISHED)? != 0 {
            return Err(HostForkError::GuestFinished);
        }
        // Every member learns the family's size from its agent page (the
        // clones inherit this write through the frozen image).
        vm.memory()
            .write_obj(clones + 1, word(abi::AGENT_WORD_FAMILY_SIZE))
            .map_err(HostForkError::AgentPage)?;
        let state = vm.capture_state()?;
        let epoch = read(vm, abi::AGENT_WORD_EPOCH)?.wrapping_add(1);
        let req = ForkRequest {
            ticket: 0,
            page_gpa: agent,
            answer: Answer::Agent { epoch },
            state,
            memory: vm.memory().clone(),
            requested_at,
            tuning,
        };
        let family = match plan {
            Some(plan) => hub.fork_paused_placed(req, plan)?,
            None => hub.fork_paused(req, clones)?,
        };
        // The parent is clone 0 of the same fork.
        vm.memory()
            .write_obj(0u64, word(abi::AGENT_WORD_CLONE_ID))
            .and_then(|()| vm.memory().write_obj(epoch, word(abi::AGENT_WORD_EPOCH)))
            .map_err(HostForkError::AgentPage)?;
        Ok(family)
    })();
    let resumed = vm.resume();
    let family = forked?;
    resumed?;
    Ok(family)
}
