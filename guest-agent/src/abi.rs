//! The contract between the zone guest and the VMM: I/O ports, the hypercall
//! page layout and the operations it carries. Shared by both sides.

/// COM1 base port (16550 UART, eight registers).
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Number of COM1 registers.
pub const SERIAL_PORT_COUNT: u16 = 8;
/// QEMU's isa-debug-exit convention: a byte written here ends the VM with
/// that status (QEMU reports `(status << 1) | 1`, forkd reports `status`).
pub const EXIT_PORT: u16 = 0xf4;
/// Hypercall doorbell: a 32-bit `out` of the guest-physical address of a
/// 4 KiB aligned [`HypercallPage`]. One exit per call, whatever it carries.
pub const HYPERCALL_PORT: u16 = 0x510;

/// Version of this ABI; the guest passes it in [`OP_HELLO`].
pub const ABI_VERSION: u64 = 1;

/// Written by the guest before ringing; a VMM that handled the call
/// overwrites it. Under QEMU (no hypercall device) it stays as is.
pub const STATUS_NO_VMM: u32 = 0xffff_ffff;
pub const STATUS_OK: u32 = 0;
pub const STATUS_UNKNOWN_OP: u32 = 1;
pub const STATUS_BAD_ARGS: u32 = 2;

/// The guest introduces itself. Arguments (see `HELLO_*` indices): ABI
/// version, where its page-allocator bitmap lives, its heap and its zone
/// state. Lets the VMM read which pages the guest allocator handed out.
pub const OP_HELLO: u32 = 1;
pub const HELLO_ABI_VERSION: usize = 0;
pub const HELLO_BITMAP_GPA: usize = 1;
pub const HELLO_BITMAP_BYTES: usize = 2;
pub const HELLO_HEAP_START: usize = 3;
pub const HELLO_HEAP_END: usize = 4;
pub const HELLO_STATE_GPA: usize = 5;
pub const HELLO_STATE_BYTES: usize = 6;
/// Guest-physical address of the guest's [`AgentPage`].
pub const HELLO_AGENT_GPA: usize = 7;

/// A page the guest reads every tick and the VMM writes: how it learns of
/// a fork the host started (the VMM bumps `fork_epoch` and sets `clone_id`
/// in the parent and in each clone's copy). Words, little endian.
pub const AGENT_MAGIC: u64 = 0x544e_4547_4144_4b46; // "FKDAGENT"
pub const AGENT_WORD_MAGIC: usize = 0;
pub const AGENT_WORD_EPOCH: usize = 1;
pub const AGENT_WORD_CLONE_ID: usize = 2;
/// Set by the guest just before its last look at the epoch: a fork from
/// then on would go unnoticed, so the VMM refuses it.
pub const AGENT_WORD_FINISHED: usize = 3;
/// A clone's generation id (128 bits, two words, low first; 0 in a VM
/// that was never cloned): new in every clone, like a VM generation id.
pub const AGENT_WORD_GENERATION: usize = 4;
/// 32 bytes of fresh entropy per clone (four words), to reseed from.
pub const AGENT_WORD_ENTROPY: usize = 6;
/// The clone's MAC (low 48 bits) and IPv4 address (low 32 bits).
pub const AGENT_WORD_MAC: usize = 10;
pub const AGENT_WORD_IP: usize = 11;

/// Console output: `args[0]` is the guest-physical address of `args[1]`
/// bytes (at most [`CONSOLE_MAX`]) to print. A zero-length call probes
/// whether the VMM takes console output this way.
pub const OP_CONSOLE: u32 = 2;
pub const CONSOLE_MAX: u64 = 4096;

/// SnowFlock's in-guest API (see `guest_agent::sf`).
/// `sf_request_ticket(n)`: `args[0]` = clones wanted; `ret[0]` = ticket,
/// `ret[1]` = clones granted (may be fewer).
pub const OP_SF_TICKET: u32 = 3;
/// `sf_clone(ticket)`: `args[0]` = ticket; `ret[0]` = clone id (0 in the
/// parent, 1..=n in clones), `ret[1]` = the clone's MAC (low 48 bits),
/// `ret[2]` = its IPv4 address (0 in the parent).
pub const OP_SF_CLONE: u32 = 4;
/// `sf_join(ticket)`: `ret[0]` = clones of the ticket still running. The
/// guest polls until it reads 0.
pub const OP_SF_JOIN: u32 = 5;
/// `sf_exit()` in a clone: `args[0]` = exit status; the clone ends.
pub const OP_SF_EXIT: u32 = 6;
/// `sf_kill(ticket)`: ends every clone of the ticket.
pub const OP_SF_KILL: u32 = 7;
/// The guest will fully overwrite `args[1]` bytes from guest-physical
/// `args[0]` before reading them: a clone need not fetch those pages.
pub const OP_WILL_OVERWRITE: u32 = 8;
/// A ticket is unknown, already used, or the VMM cannot fork this VM.
pub const STATUS_REFUSED: u32 = 3;
/// The guest has nothing to do for `args[0]` nanoseconds: the VMM parks
/// the vCPU (no host CPU used) for at most that long and at most
/// [`SLEEP_MAX_NS`], and less when it must pause, save or stop the VM.
/// The call is answered (`ret[0]` = the ns granted) before the sleep, so
/// a VM saved while asleep resumes after the call. The guest must check
/// its own clock on return and call again (or spin) if it woke early.
/// Timing only: nothing the guest computes may depend on it.
pub const OP_SLEEP: u32 = 9;
/// The longest one [`OP_SLEEP`] sleeps (a guest wanting more calls again).
pub const SLEEP_MAX_NS: u64 = 1_000_000_000;

/// Exit codes the zone guest writes to [`EXIT_PORT`].
pub const EXIT_OK: u8 = 0;
pub const EXIT_BAD_CMDLINE: u8 = 2;
pub const EXIT_FATAL: u8 = 3;

/// Guest page size used by the allocator bitmap.
pub const PAGE_SIZE: u64 = 4096;

/// Layout of the shared hypercall page (the first bytes of it).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HypercallPage {
    /// One of the `OP_*` constants.
    pub op: u32,
    /// [`STATUS_NO_VMM`] on entry, a `STATUS_*` value after the call.
    pub status: u32,
    /// Operation arguments.
    pub args: [u64; 8],
    /// Operation results.
    pub ret: [u64; 4],
}

impl HypercallPage {
    /// Bytes of the page that carry the call.
    pub const SIZE: usize = core::mem::size_of::<HypercallPage>();

    /// Decodes the call from the bytes the guest wrote (little endian).
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(w)
        };
        let mut page = HypercallPage {
            op: u32_at(0),
            status: u32_at(4),
            ..Default::default()
        };
        for (i, a) in page.args.iter_mut().enumerate() {
            *a = u64_at(8 + 8 * i);
        }
        for (i, r) in page.ret.iter_mut().enumerate() {
            *r = u64_at(72 + 8 * i);
        }
        page
    }

    /// Encodes the page as the guest sees it.
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..4].copy_from_slice(&self.op.to_le_bytes());
        b[4..8].copy_from_slice(&self.status.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        for (i, r) in self.ret.iter().enumerate() {
            b[72 + 8 * i..80 + 8 * i].copy_from_slice(&r.to_le_bytes());
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypercall_page_round_trips() {
        let p = HypercallPage {
            op: OP_HELLO,
            status: STATUS_NO_VMM,
            args: [1, 2, 3, 4, 5, 6, 7, u64::MAX],
            ret: [9, 8, 7, 6],
        };
        assert_eq!(HypercallPage::SIZE, 104);
        assert_eq!(HypercallPage::from_bytes(&p.to_bytes()), p);
    }
}
