//! Hypercall channel: the guest fills a shared page and rings the doorbell
//! with one 32-bit port write of the page's address. A page the VMM did not
//! answer keeps `STATUS_NO_VMM` (under QEMU the write just vanishes).

use crate::abi::{HypercallPage, HYPERCALL_PORT, OP_SLEEP, STATUS_NO_VMM, STATUS_OK};
use crate::io::outl;

#[repr(C, align(4096))]
struct PageBuf(HypercallPage);

static mut PAGE: PageBuf = PageBuf(HypercallPage {
    op: 0,
    status: 0,
    args: [0; 8],
    ret: [0; 4],
});

/// Result of a call: `None` when no VMM answered.
pub fn call(op: u32, args: [u64; 8]) -> Option<(u32, [u64; 4])> {
    // SAFETY: only the address is taken here.
    let page = unsafe { core::ptr::addr_of_mut!(PAGE.0) };
    let request = HypercallPage {
        op,
        status: STATUS_NO_VMM,
        args,
        ret: [0; 4],
    };
    // SAFETY: the guest is single-threaded; PAGE is only touched here, and
    // identity-mapped, so its address is its guest-physical address (< 4 GiB).
    unsafe {
        page.write_volatile(request);
        outl(HYPERCALL_PORT, page as u64 as u32);
        let answer = page.read_volatile();
        (answer.status != STATUS_NO_VMM).then_some((answer.status, answer.ret))
    }
}

/// `OP_SLEEP`: asks the VMM to park this vCPU for up to `ns`. True if it
/// took the call (it may still have woken us early); false without one.
pub fn sleep(ns: u64) -> bool {
    let mut args = [0u64; 8];
    args[0] = ns;
    matches!(call(OP_SLEEP, args), Some((STATUS_OK, _)))
}
