//! The CPL 3 runtime: entry from the boot path, the zone's platform
//! (allocator, TSC pacing, fork hooks) and the panic handler.

use crate::abi::{self, EXIT_BAD_CMDLINE, EXIT_FATAL, EXIT_OK, OP_HELLO, PAGE_SIZE};
use crate::clients::{self, Applied, Update};
use crate::console::Console;
use crate::palloc::PageAllocator;
use crate::zone::{self, Platform, ZoneError};
use crate::{boot, cmdline, hypercall, io, pace, pvh, sf};
use core::fmt::Write;

const TWO_MIB: u64 = 2 << 20;
/// Pause between the parent's `sf_join` calls (forkd itself waits up to
/// a few ms inside each call, so this spin stays short).
const JOIN_POLL_US: u64 = 50;
/// The boot page tables map the first 4 GiB.
const MAPPED_END: u64 = 4 << 30;
const BITMAP_WORDS: usize = (MAPPED_END / PAGE_SIZE / 64) as usize;

/// The agent page (see `abi::AgentPage` words): written by the VMM.
#[repr(C, align(4096))]
struct AgentPage([u64; 512]);
static mut AGENT: AgentPage = AgentPage([0; 512]);

fn agent_word(i: usize) -> u64 {
    // SAFETY: AGENT is a static page; the VMM may change it between reads,
    // hence the volatile read; i < 512 at every call site.
    unsafe { core::ptr::addr_of!(AGENT.0[i]).read_volatile() }
}

fn set_agent_word(i: usize, v: u64) {
    // SAFETY: a volatile store into the static agent page (i < 512 at every
    // call site); the guest is single-threaded.
    unsafe { core::ptr::addr_of_mut!(AGENT.0[i]).write_volatile(v) }
}

/// The client inbox ring (`abi::INBOX_*`) at `gpa`, identity-mapped.
struct Inbox {
    base: *mut u8,
    slots: u64,
}

impl Inbox {
    fn word(&self, i: usize) -> *mut u64 {
        // SAFETY (of the callers' accesses): the ring's header page was
        // handed out by the allocator for the ring alone; i < 512.
        self.base.wrapping_add(8 * i) as *mut u64
    }

    fn get(&self, i: usize) -> u64 {
        // SAFETY: inside the ring's header page; the daemon writes it
        // concurrently, hence volatile.
        unsafe { self.word(i).read_volatile() }
    }

    fn set(&self, i: usize, v: u64) {
        // SAFETY: as for `get`; the guest writes only its own words.
        unsafe { self.word(i).write_volatile(v) }
    }

    /// Applies every slot between the consumer and the producer.
    fn drain(&self, apply: &mut dyn FnMut(&Update) -> Applied) {
        let producer = self.get(abi::INBOX_WORD_PRODUCER);
        let mut consumer = self.get(abi::INBOX_WORD_CONSUMER);
        // Never trust the producer to be sane: at most one ring's worth.
        let producer = producer.min(consumer.wrapping_add(self.slots));
        let mut counts = [0u64; 4];
        while consumer < producer {
            let off = abi::INBOX_HEADER_BYTES + (consumer % self.slots) * abi::INBOX_SLOT_BYTES;
            let slot = self.base.wrapping_add(off as usize);
            // SAFETY: the slot lies inside the ring the allocator handed out
            // (header + slots × slot bytes); the producer does not touch a
            // slot between producer and consumer, so reading it as plain
            // memory is sound. Field reads are unaligned-safe by offset.
            let (client, len, seq) = unsafe {
                (
                    (slot.add(abi::SLOT_OFF_CLIENT as usize) as *const u32).read_volatile(),
                    (slot.add(abi::SLOT_OFF_LEN as usize) as *const u32).read_volatile(),
                    (slot.add(abi::SLOT_OFF_SEQ as usize) as *const u64).read_volatile(),
                )
            };
            let len = (len as u64).min(abi::UPDATE_PAYLOAD_MAX + 1);
            let outcome = if len > abi::UPDATE_PAYLOAD_MAX {
                Applied::Malformed
            } else {
                // SAFETY: `len` ≤ the slot's payload bytes, inside the slot.
                let payload = unsafe {
                    core::slice::from_raw_parts(
                        slot.add(abi::SLOT_HEADER_BYTES as usize),
                        len as usize,
                    )
                };
                apply(&Update {
                    client,
                    seq,
                    payload,
                })
            };
            let status = outcome.slot_status();
            counts[(status as usize).saturating_sub(1).min(3)] += 1;
            // SAFETY: the status word of the slot, written by the guest only.
            unsafe {
                (slot.add(abi::SLOT_OFF_STATUS as usize) as *mut u32).write_volatile(status);
            }
            consumer += 1;
        }
        for (i, w) in [
            abi::INBOX_WORD_APPLIED,
            abi::INBOX_WORD_DUPLICATES,
            abi::INBOX_WORD_NOT_MINE,
            abi::INBOX_WORD_MALFORMED,
        ]
        .into_iter()
        .enumerate()
        {
            if counts[i] != 0 {
                self.set(w, self.get(w).wrapping_add(counts[i]));
            }
        }
        // The statuses are written before the consumer passes them (x86
        // keeps stores in order; the fence keeps the compiler from moving).
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::Release);
        self.set(abi::INBOX_WORD_CONSUMER, consumer);
    }
}

/// A clone prints the identity the VMM gave it in the agent page (its
/// generation id, MAC and IP; it would reseed from the entropy words). The
/// checksum never depends on them. Nothing is printed without a VMM.
fn note_identity(clone_id: u64) {
    let (lo, hi) = (
        agent_word(abi::AGENT_WORD_GENERATION),
        agent_word(abi::AGENT_WORD_GENERATION + 1),
    );
    if lo | hi == 0 {
        return;
    }
    let ip = agent_word(abi::AGENT_WORD_IP) as u32;
    let _ = writeln!(
        Console,
        "zone: clone identity clone={clone_id} generation={hi:016x}{lo:016x} mac={:012x} ip={}.{}.{}.{}",
        agent_word(abi::AGENT_WORD_MAC),
        ip >> 24,
        (ip >> 16) & 0xff,
        (ip >> 8) & 0xff,
        ip & 0xff
    );
}

/// Allocation bitmap: one bit per 4 KiB page of the first 4 GiB (128 KiB).
static mut ALLOC_BITMAP: [u64; BITMAP_WORDS] = [0; BITMAP_WORDS];

extern "C" {
    /// End of the guest image (linker script).
    static _end: u8;
}

fn fail(status: u8, args: core::fmt::Arguments) -> ! {
    let _ = writeln!(Console, "zone: error: {args}");
    io::exit(status)
}

/// TSC ticks per microsecond, from the hypervisor timing leaf or the
/// processor's frequency leaves; 2000 if nothing says.
fn tsc_per_us() -> u64 {
    use core::arch::x86_64::__cpuid;
    let (hv, basic) = (__cpuid(0x4000_0000).eax, __cpuid(0).eax);
    if hv >= 0x4000_0010 {
        let khz = __cpuid(0x4000_0010).eax as u64;
        if khz > 0 {
            return khz.div_ceil(1000);
        }
    }
    if basic >= 0x15 {
        let l = __cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return (l.ecx as u64 * l.ebx as u64 / l.eax as u64 / 1_000_000).max(1);
        }
    }
    if basic >= 0x16 {
        let mhz = __cpuid(0x16).eax as u64;
        if mhz > 0 {
            return mhz;
        }
    }
    2000
}

struct GuestPlatform {
    alloc: PageAllocator<'static>,
    tsc_start: u64,
    tsc_per_us: u64,
    /// The ticket of the fork this zone did, if any.
    ticket: Option<sf::Ticket>,
    /// The agent page's fork epoch when last looked at.
    fork_epoch: u64,
    /// Wait for ticks asleep in the VMM (`OP_SLEEP`); cleared when no VMM
    /// answers (QEMU) or `pace_spin=1`.
    can_sleep: bool,
    /// `clients=host`: the inbox ring.
    inbox: Option<Inbox>,
    /// The TSC when the current tick's work began (after its pacing).
    tick_start: u64,
    busy_total: u64,
}

/// The TSC and the VMM's sleep, for `pace::wait_until`.
struct TscClock;

impl pace::Clock for TscClock {
    fn now(&mut self) -> u64 {
        io::rdtsc()
    }
    fn sleep_ns(&mut self, ns: u64) -> bool {
        hypercall::sleep(ns)
    }
}

impl Platform for GuestPlatform {
    fn with_scratch(
        &mut self,
        words: usize,
        f: &mut dyn FnMut(&mut [u64]),
    ) -> Result<(), ZoneError> {
        let pages = (words as u64 * 8).div_ceil(PAGE_SIZE);
        let mark = self.alloc.mark();
        let gpa = self
            .alloc
            .alloc(pages)
            .ok_or(ZoneError::OutOfMemory { mib: pages / 256 })?;
        // SAFETY: the allocator just handed out these pages to us alone;
        // memory is identity-mapped, so the address is a valid pointer.
        let buf = unsafe { core::slice::from_raw_parts_mut(gpa as *mut u64, words) };
        f(buf);
        self.alloc.release(mark);
        Ok(())
    }

    fn fork(&mut self, clones: u64) -> Result<u64, ZoneError> {
        let refused = |e| match e {
            sf::SfError::NoVmm => ZoneError::ForkUnavailable,
            sf::SfError::Refused(status) => ZoneError::ForkRefused(status),
        };
        let ticket = match self.ticket {
            Some(t) => t,
            None => sf::sf_request_ticket(clones).map_err(refused)?,
        };
        let id = sf::sf_clone(&ticket).map_err(refused)?;
        set_agent_word(abi::AGENT_WORD_FAMILY_SIZE, ticket.granted + 1);
        self.ticket = Some(ticket);
        if id != 0 {
            note_identity(id);
        }
        Ok(id)
    }

    fn host_fork(&mut self) -> Option<u64> {
        let epoch = agent_word(abi::AGENT_WORD_EPOCH);
        if epoch == self.fork_epoch {
            return None;
        }
        self.fork_epoch = epoch;
        let id = agent_word(abi::AGENT_WORD_CLONE_ID);
        if id != 0 {
            note_identity(id);
        }
        Some(id)
    }

    fn note_host_fork(&mut self, tick: u64, clone_id: u64) {
        let _ = writeln!(
            Console,
            "zone: forked by the host before tick {tick}: clone={clone_id}"
        );
    }

    fn finishing(&mut self) {
        // SAFETY: a volatile store to the static agent page, which only this
        // thread writes on the guest side.
        unsafe {
            core::ptr::addr_of_mut!(AGENT.0[abi::AGENT_WORD_FINISHED]).write_volatile(1);
        }
    }

    fn drain_inbox(&mut self, _tick: u64, apply: &mut dyn FnMut(&Update) -> Applied) -> bool {
        if let Some(inbox) = &self.inbox {
            inbox.drain(apply);
        }
        false
    }

    fn family_size(&mut self) -> Option<u64> {
        match agent_word(abi::AGENT_WORD_FAMILY_SIZE) {
            0 => None,
            m => Some(m),
        }
    }

    fn set_family_members(&mut self, members: u64) {
        // sf_clone wrote the granted count already; as_clone has no VMM.
        if agent_word(abi::AGENT_WORD_FAMILY_SIZE) == 0 {
            set_agent_word(abi::AGENT_WORD_FAMILY_SIZE, members);
        }
    }

    fn tick_done(&mut self, tick: u64) {
        let busy = io::rdtsc().saturating_sub(self.tick_start);
        self.busy_total = self.busy_total.wrapping_add(busy);
        set_agent_word(abi::AGENT_WORD_BUSY_TSC_LAST, busy);
        set_agent_word(abi::AGENT_WORD_BUSY_TSC_TOTAL, self.busy_total);
        set_agent_word(abi::AGENT_WORD_TICKS_DONE, tick + 1);
        self.tick_start = io::rdtsc();
    }

    fn will_overwrite(&mut self, buf: &[u64]) {
        sf::will_overwrite(buf.as_ptr() as u64, core::mem::size_of_val(buf) as u64);
    }

    fn pace(&mut self, tick: u64, tick_us: u64) {
        let due = self.tsc_start + tick * tick_us * self.tsc_per_us;
        pace::wait_until(due, self.tsc_per_us, &mut self.can_sleep, &mut TscClock);
        self.tick_start = io::rdtsc();
    }
}

/// First Rust code, at CPL 3, called by the boot path with the PVH
/// start_info address.
#[no_mangle]
extern "C" fn guest_user_entry(start_info: u64) -> ! {
    boot::install_exception_gates();
    let image_end = core::ptr::addr_of!(_end) as u64;
    let heap_start = image_end.next_multiple_of(TWO_MIB);
    Console::probe_vmm();
    let info = match pvh::read(start_info, heap_start) {
        Ok(i) => i,
        Err(e) => fail(EXIT_FATAL, format_args!("{e}")),
    };
    let _ = writeln!(Console, "zone: boot cmdline=\"{}\"", info.cmdline);
    let cfg = match cmdline::parse(info.cmdline) {
        Ok(c) => c,
        Err(e) => fail(EXIT_BAD_CMDLINE, format_args!("{e}")),
    };
    if info.ram_end <= heap_start {
        fail(
            EXIT_FATAL,
            format_args!("no guest RAM above the image at {heap_start:#x}"),
        );
    }
    // SAFETY: the bitmap is only ever used through this one allocator.
    let bitmap = unsafe { &mut *core::ptr::addr_of_mut!(ALLOC_BITMAP) };
    let mut alloc = PageAllocator::new(bitmap, heap_start, info.ram_end.min(MAPPED_END));
    let state_bytes = cfg.state_mib << 20;
    let Some(state_gpa) = alloc.alloc(state_bytes / PAGE_SIZE) else {
        fail(
            EXIT_BAD_CMDLINE,
            format_args!(
                "state_mib={} does not fit in guest RAM ({} MiB free)",
                cfg.state_mib,
                alloc.free_pages() / 256
            ),
        )
    };
    let inbox_bytes = (zone::INBOX_WORDS * 8) as u64;
    let Some(inbox_gpa) = alloc.alloc(inbox_bytes / PAGE_SIZE) else {
        fail(
            EXIT_BAD_CMDLINE,
            format_args!("no guest RAM left for the client inbox"),
        )
    };
    // clients=host: the inbox ring the daemon fills and the client table.
    let (mut ring_gpa, mut table_gpa) = (0, 0);
    let ring_bytes = abi::INBOX_HEADER_BYTES + abi::INBOX_SLOTS * abi::INBOX_SLOT_BYTES;
    let table_bytes = (clients::TABLE_WORDS * 8) as u64;
    if cfg.host_clients {
        match (
            alloc.alloc(ring_bytes.div_ceil(PAGE_SIZE)),
            alloc.alloc(table_bytes.div_ceil(PAGE_SIZE)),
        ) {
            (Some(r), Some(t)) => (ring_gpa, table_gpa) = (r, t),
            _ => fail(
                EXIT_BAD_CMDLINE,
                format_args!("no guest RAM left for the client ring and table"),
            ),
        }
        // SAFETY: the allocator handed these pages out for the ring alone.
        let header = unsafe { core::slice::from_raw_parts_mut(ring_gpa as *mut u64, 512) };
        header.fill(0);
        header[abi::INBOX_WORD_MAGIC] = abi::INBOX_MAGIC;
        header[abi::INBOX_WORD_VERSION] = abi::INBOX_VERSION;
        header[abi::INBOX_WORD_SLOTS] = abi::INBOX_SLOTS;
        header[abi::INBOX_WORD_SLOT_BYTES] = abi::INBOX_SLOT_BYTES;
        set_agent_word(abi::AGENT_WORD_INBOX_GPA, ring_gpa);
        set_agent_word(abi::AGENT_WORD_INBOX_BYTES, ring_bytes);
    }
    let (heap_lo, heap_hi) = alloc.heap();
    let mut args = [0u64; 8];
    args[abi::HELLO_ABI_VERSION] = abi::ABI_VERSION;
    args[abi::HELLO_BITMAP_GPA] = core::ptr::addr_of!(ALLOC_BITMAP) as u64;
    args[abi::HELLO_BITMAP_BYTES] = (BITMAP_WORDS * 8) as u64;
    args[abi::HELLO_HEAP_START] = heap_lo;
    args[abi::HELLO_HEAP_END] = heap_hi;
    args[abi::HELLO_STATE_GPA] = state_gpa;
    args[abi::HELLO_STATE_BYTES] = state_bytes;
    // SAFETY: only the address is taken, and the magic written before the
    // VMM learns where the page is.
    unsafe {
        core::ptr::addr_of_mut!(AGENT.0[abi::AGENT_WORD_MAGIC]).write_volatile(abi::AGENT_MAGIC);
    }
    args[abi::HELLO_AGENT_GPA] = core::ptr::addr_of!(AGENT) as u64;
    match cfg.hostile_hello {
        1 => args[abi::HELLO_BITMAP_BYTES] = 1 << 40,
        2 => {
            args[abi::HELLO_STATE_GPA] = u64::MAX - 4095;
            args[abi::HELLO_HEAP_END] = u64::MAX;
        }
        _ => {}
    }
    let answered = hypercall::call(OP_HELLO, args).is_some();
    let vmm = if answered { "forkd" } else { "none" };
    let _ = writeln!(
        Console,
        "zone: start ticks={} state_mib={} ram_mib={} vmm={vmm}",
        cfg.ticks,
        cfg.state_mib,
        info.ram_end >> 20
    );
    // SAFETY: the allocator handed these pages out for the zone state and
    // never hands them out again; identity mapping makes the address valid.
    let state = unsafe {
        core::slice::from_raw_parts_mut(state_gpa as *mut u64, (state_bytes / 8) as usize)
    };
    // SAFETY: as for the state: pages handed out for the inbox alone.
    let inbox =
        unsafe { core::slice::from_raw_parts_mut(inbox_gpa as *mut u64, zone::INBOX_WORDS) };
    let table: &mut [u64] = if table_gpa == 0 {
        &mut []
    } else {
        // SAFETY: pages the allocator handed out for the client table alone.
        unsafe { core::slice::from_raw_parts_mut(table_gpa as *mut u64, clients::TABLE_WORDS) }
    };
    let tsc_per_us = tsc_per_us();
    set_agent_word(abi::AGENT_WORD_TSC_PER_US, tsc_per_us);
    set_agent_word(abi::AGENT_WORD_TICK_BUDGET_TSC, cfg.tick_us * tsc_per_us);
    let now = io::rdtsc();
    let mut platform = GuestPlatform {
        alloc,
        tsc_start: now,
        tsc_per_us,
        ticket: None,
        fork_epoch: 0,
        can_sleep: answered && !cfg.pace_spin,
        inbox: (ring_gpa != 0).then_some(Inbox {
            base: ring_gpa as *mut u8,
            slots: abi::INBOX_SLOTS,
        }),
        tick_start: now,
        busy_total: 0,
    };
    // Reserve the clones now (SnowFlock's ticket): the VMM can build their
    // VMs while the zone runs up to `fork_at`.
    if let (Some(_), None, Some(clones)) = (cfg.fork_at, cfg.as_clone, cfg.clones) {
        platform.ticket = sf::sf_request_ticket(clones).ok();
    }
    match zone::run(&cfg, state, inbox, table, &mut platform) {
        Ok(o) => {
            if let (Some(t), 0) = (&platform.ticket, o.clone_id) {
                if let Err(e) = sf::sf_join(t, platform.tsc_per_us, JOIN_POLL_US) {
                    fail(EXIT_FATAL, format_args!("sf_join: {e}"));
                }
            }
            let _ = writeln!(
                Console,
                "zone: done clone={} ticks={} checksum={:016x}",
                o.clone_id, o.ticks, o.checksum
            );
            if o.clone_id != 0 && platform.ticket.is_some() {
                sf::sf_exit(EXIT_OK as u64);
            }
            io::exit(EXIT_OK)
        }
        Err(e @ ZoneError::ForkUnavailable) => fail(EXIT_BAD_CMDLINE, format_args!("{e}")),
        Err(e) => fail(EXIT_FATAL, format_args!("{e}")),
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Console, "zone: fatal: {info}");
    io::exit(EXIT_FATAL)
}
