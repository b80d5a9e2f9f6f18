//! Running clones' guest memory for writers above the VMM (the client
//! ingress writes a clone's inbox ring): a clone's entry exists from its
//! start until its reaper removes it, before the clone's VM (and its
//! memory server) goes; a writer holds the lock while it writes, so the
//! clone cannot go meanwhile. The load sampler reads a running clone's
//! vCPU time here too.

use crate::sync::lock;
use crate::vmm::cpu_clock::CpuClock;
use crate::vmm::memory::GuestMemory;
use crate::vmm::page_bitmap::VmmWrites;
use crate::vmm::Vm;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One clone's memory, its VMM write log, its agent page and its vCPU
/// clocks.
pub struct CloneGuest {
    pub memory: GuestMemory,
    pub writes: VmmWrites,
    pub agent_gpa: u64,
    cpu: Vec<Arc<CpuClock>>,
}

impl CloneGuest {
    pub fn of(vm: &Vm) -> CloneGuest {
        CloneGuest {
            memory: vm.memory().clone(),
            writes: vm.vmm_writes(),
            agent_gpa: vm.guest_info().map_or(0, |g| g.agent_gpa),
            cpu: vm.cpu_clocks(),
        }
    }

    /// Its vCPU time so far.
    pub fn cpu_time(&self) -> Duration {
        crate::vmm::cpu_clock::total(&self.cpu)
    }
}

/// Running clones by clone id.
#[derive(Default)]
pub struct CloneGuests(Mutex<BTreeMap<u64, CloneGuest>>);

impl CloneGuests {
    pub fn insert(&self, clone_id: u64, g: CloneGuest) {
        lock(&self.0).insert(clone_id, g);
    }

    /// The clone is going: waits for a writer that holds it.
    pub fn remove(&self, clone_id: u64) {
        lock(&self.0).remove(&clone_id);
    }

    /// Each running clone's vCPU time so far, by clone id.
    pub fn cpu_times(&self) -> Vec<(u64, Duration)> {
        lock(&self.0)
            .iter()
            .map(|(id, g)| (*id, g.cpu_time()))
            .collect()
    }

    /// Runs `f` on clone `clone_id` if it runs, the lock held.
    pub fn with<R>(&self, clone_id: u64, f: impl FnOnce(&CloneGuest) -> R) -> Option<R> {
        lock(&self.0).get(&clone_id).map(f)
    }
}
