//! What the registry keeps for the client ingress (`api::updates`): the
//! ingress and the zones that migrated away; and a guest's own tick load.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::clients::ring::guest_load;
use crate::clients::{GuestLoad, GuestView, Ingress};
use crate::vmm::Vm;

/// What the daemon keeps for client routing.
#[derive(Default)]
pub(super) struct ClientsState {
    /// The ingress, once started (`serve --clients-udp`).
    pub(super) ingress: std::sync::OnceLock<Arc<Ingress>>,
    /// Zones that migrated away: VM id → destination host.
    pub(super) moved: Mutex<HashMap<u64, String>>,
}

/// The guest's tick load, read from its agent page.
pub(super) fn vm_guest_load(vm: &Vm) -> Option<GuestLoad> {
    let writes = vm.vmm_writes();
    let agent_gpa = vm.guest_info()?.agent_gpa;
    guest_load(&GuestView {
        memory: vm.memory(),
        writes: &writes,
        agent_gpa,
    })
}
