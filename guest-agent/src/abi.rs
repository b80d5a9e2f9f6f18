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

/// The guest's own tick load, written by the guest after every tick (all
/// TSC values in the guest's TSC; read by the daemon, never by the VMM):
/// ticks done so far,
pub const AGENT_WORD_TICKS_DONE: usize = 12;
/// TSC the last tick was busy (its work, not the pacing wait),
pub const AGENT_WORD_BUSY_TSC_LAST: usize = 13;
/// TSC all ticks were busy,
pub const AGENT_WORD_BUSY_TSC_TOTAL: usize = 14;
/// the tick's budget (`tick_us` in TSC; 0 when unpaced),
pub const AGENT_WORD_TICK_BUDGET_TSC: usize = 15;
/// and the guest's TSC ticks per microsecond.
pub const AGENT_WORD_TSC_PER_US: usize = 16;
/// The client inbox ring ([`INBOX_MAGIC`]): its guest-physical address
/// (4 KiB aligned, 0: none) and size in bytes, written by the guest
/// before `OP_HELLO` declares the agent page. The daemon bounds both
/// against guest memory before it writes a byte.
pub const AGENT_WORD_INBOX_GPA: usize = 17;
pub const AGENT_WORD_INBOX_BYTES: usize = 18;
/// Members of the fork family this VM belongs to (parent included; 0 or
/// 1: not forked). Written by the VMM's host fork into the parent before
/// the freeze (so every clone inherits it) and reset to 1 by the daemon
/// at a join; a guest fork (`sf_clone`) sets it itself. A member with
/// clone id `i` of `m` members applies only the client updates with
/// `client_id % m == i` (others are answered [`SLOT_NOT_MINE`]).
pub const AGENT_WORD_FAMILY_SIZE: usize = 19;

/// The client inbox ring (`clients=host`): one header page, then `slots`
/// slots of [`INBOX_SLOT_BYTES`]. The daemon (producer) writes a slot,
/// then advances `producer`; the guest (consumer) applies slots in order,
/// writes each slot's status, then advances `consumer`. Positions count
/// slots ever written (slot = position % slots); the producer never gets
/// more than `slots` ahead of the consumer. The header words, LE u64:
pub const INBOX_MAGIC: u64 = 0x584f_424e_4944_4b46; // "FKDINBOX"
pub const INBOX_VERSION: u64 = 1;
pub const INBOX_WORD_MAGIC: usize = 0;
pub const INBOX_WORD_VERSION: usize = 1;
/// Slots in the ring (a power of two).
pub const INBOX_WORD_SLOTS: usize = 2;
/// Bytes per slot ([`INBOX_SLOT_BYTES`]).
pub const INBOX_WORD_SLOT_BYTES: usize = 3;
/// Written by the producer only.
pub const INBOX_WORD_PRODUCER: usize = 4;
/// Written by the consumer only.
pub const INBOX_WORD_CONSUMER: usize = 5;
/// Guest counters: updates applied, duplicates skipped, updates of other
/// family members skipped, malformed slots.
pub const INBOX_WORD_APPLIED: usize = 6;
pub const INBOX_WORD_DUPLICATES: usize = 7;
pub const INBOX_WORD_NOT_MINE: usize = 8;
pub const INBOX_WORD_MALFORMED: usize = 9;
/// Bytes of the header before the first slot.
pub const INBOX_HEADER_BYTES: u64 = 4096;
/// One slot: client id (u32), payload length (u32), sequence number
/// (u64), status (u32, written by the guest), reserved up to
/// [`SLOT_HEADER_BYTES`], then the payload.
pub const INBOX_SLOT_BYTES: u64 = 576;
pub const SLOT_HEADER_BYTES: u64 = 64;
pub const SLOT_OFF_CLIENT: u64 = 0;
pub const SLOT_OFF_LEN: u64 = 4;
pub const SLOT_OFF_SEQ: u64 = 8;
pub const SLOT_OFF_STATUS: u64 = 16;
/// Payload bytes per update: at most this many (the DVE's 256–512 B).
pub const UPDATE_PAYLOAD_MAX: u64 = INBOX_SLOT_BYTES - SLOT_HEADER_BYTES;
/// Slot status: written as `SLOT_NEW` by the producer; the guest answers
/// applied, duplicate (`seq` ≤ the last applied for that client: applied
/// before), not mine (another family member's client), malformed.
pub const SLOT_NEW: u32 = 0;
pub const SLOT_APPLIED: u32 = 1;
pub const SLOT_DUPLICATE: u32 = 2;
pub const SLOT_NOT_MINE: u32 = 3;
pub const SLOT_MALFORMED: u32 = 4;
/// Slots of the zone guest's ring (`clients=host`): 288 KiB + the header.
pub const INBOX_SLOTS: u64 = 512;

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
