//! SnowFlock's in-guest API as hypercalls: the parent's [`ForkHub`] and a
//! clone's [`CloneService`] are the VM's `HypercallService`. Both run on
//! the calling vCPU's thread with no device lock held.
//!
//! | call | parent | clone |
//! |---|---|---|
//! | `sf_request_ticket(n)` | ticket, clones granted | refused |
//! | `sf_clone(ticket)` | fork; 0 in the parent | (answered in the descriptor) |
//! | `sf_join(ticket)` | clones still running (waits a little) | refused |
//! | `sf_kill(ticket)` | ends the family | refused |
//! | `sf_exit(status)` | unknown | ends the clone |
//! | `will_overwrite(gpa, len)` | nothing to do | zero-fills whole pages |

use crate::fork::clone::CloneService;
use crate::fork::parent::ForkHub;
use crate::vmm::services::{CallOutcome, GuestCall, HypercallService};
use guest_agent::abi::{self, HypercallPage};
use std::time::Duration;
use vm_memory::GuestMemoryBackend;

/// The longest an `sf_join` call sleeps in the VMM before answering (so a
/// pause waits at most this long).
const JOIN_WAIT: Duration = Duration::from_millis(5);

fn answer(r: Result<[u64; 4], u32>) -> CallOutcome {
    match r {
        Ok(ret) => CallOutcome::Answer {
            status: abi::STATUS_OK,
            ret,
        },
        Err(status) => CallOutcome::status(status),
    }
}

impl HypercallService for ForkHub {
    fn call(&self, page: &HypercallPage, guest: &mut dyn GuestCall) -> CallOutcome {
        let a = page.args;
        match page.op {
            abi::OP_SF_TICKET => {
                let mem_bytes = guest.memory().last_addr().0 + 1;
                answer(self.ticket(a[0], mem_bytes).map(|(t, n)| [t, n, 0, 0]))
            }
            abi::OP_SF_CLONE => answer(self.sf_clone(a[0], guest).map(|()| [0; 4])),
            abi::OP_SF_JOIN => answer(self.join_wait(a[0], JOIN_WAIT).map(|n| [n, 0, 0, 0])),
            abi::OP_SF_KILL => answer(self.kill(a[0]).map(|()| [0; 4])),
            // The parent's memory is all there; nothing to avoid.
            abi::OP_WILL_OVERWRITE => CallOutcome::status(abi::STATUS_OK),
            _ => CallOutcome::status(abi::STATUS_UNKNOWN_OP),
        }
    }

    fn shutdown(&self) {
        self.end_families();
    }
}

impl HypercallService for CloneService {
    fn call(&self, page: &HypercallPage, _guest: &mut dyn GuestCall) -> CallOutcome {
        let a = page.args;
        match page.op {
            abi::OP_SF_EXIT => CallOutcome::Exit(a[0].min(255) as u8),
            abi::OP_WILL_OVERWRITE => answer(self.will_overwrite(a[0], a[1]).map(|()| [0; 4])),
            // Clones do not fork again.
            abi::OP_SF_TICKET | abi::OP_SF_CLONE | abi::OP_SF_JOIN | abi::OP_SF_KILL => {
                CallOutcome::status(abi::STATUS_REFUSED)
            }
            _ => CallOutcome::status(abi::STATUS_UNKNOWN_OP),
        }
    }
}
