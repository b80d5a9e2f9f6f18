//! SnowFlock's in-guest API over the hypercall channel: reserve clones,
//! fork, join, exit, kill. Without forkd (under QEMU) every call fails
//! with [`SfError::NoVmm`].

use crate::abi::{
    OP_SF_CLONE, OP_SF_EXIT, OP_SF_JOIN, OP_SF_KILL, OP_SF_TICKET, OP_WILL_OVERWRITE, STATUS_OK,
};
use crate::hypercall;
use crate::io;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SfError {
    /// No VMM answered the hypercall.
    NoVmm,
    /// The VMM refused the call with this status.
    Refused(u32),
}

impl core::fmt::Display for SfError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SfError::NoVmm => write!(f, "no VMM with the fork service answered"),
            SfError::Refused(s) => write!(f, "the VMM refused the call (status {s})"),
        }
    }
}

fn call(op: u32, arg0: u64) -> Result<[u64; 4], SfError> {
    let mut args = [0u64; 8];
    args[0] = arg0;
    match hypercall::call(op, args) {
        None => Err(SfError::NoVmm),
        Some((STATUS_OK, ret)) => Ok(ret),
        Some((status, _)) => Err(SfError::Refused(status)),
    }
}

/// A reservation of up to `granted` clones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    pub id: u64,
    pub granted: u64,
}

/// Reserves up to `n` clones.
pub fn sf_request_ticket(n: u64) -> Result<Ticket, SfError> {
    let ret = call(OP_SF_TICKET, n)?;
    Ok(Ticket {
        id: ret[0],
        granted: ret[1],
    })
}

/// Forks: returns 0 in the parent and the clone id (1..=granted) in each
/// clone, which continue from here with the parent's memory as of now.
pub fn sf_clone(ticket: &Ticket) -> Result<u64, SfError> {
    Ok(call(OP_SF_CLONE, ticket.id)?[0])
}

/// Blocks (polling every ~`poll_us` µs by the TSC) until every clone of
/// the ticket has called `sf_exit` or was killed.
pub fn sf_join(ticket: &Ticket, tsc_per_us: u64, poll_us: u64) -> Result<(), SfError> {
    loop {
        if call(OP_SF_JOIN, ticket.id)?[0] == 0 {
            return Ok(());
        }
        let due = io::rdtsc() + poll_us * tsc_per_us;
        while io::rdtsc() < due {
            core::hint::spin_loop();
        }
    }
}

/// Ends this clone with `status`. Returns only if no VMM took the call.
pub fn sf_exit(status: u64) -> SfError {
    match call(OP_SF_EXIT, status) {
        Ok(_) => SfError::NoVmm,
        Err(e) => e,
    }
}

/// Ends every clone of the ticket.
pub fn sf_kill(ticket: &Ticket) -> Result<(), SfError> {
    call(OP_SF_KILL, ticket.id).map(|_| ())
}

/// Tells the VMM the guest will fully overwrite `len` bytes at `gpa`
/// before reading them (avoidance heuristic for I/O buffers). Advisory:
/// errors are ignored.
pub fn will_overwrite(gpa: u64, len: u64) {
    let mut args = [0u64; 8];
    args[0] = gpa;
    args[1] = len;
    let _ = hypercall::call(OP_WILL_OVERWRITE, args);
}
