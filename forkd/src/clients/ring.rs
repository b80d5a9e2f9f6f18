//! The daemon's side of a zone's inbox ring (`guest_agent::abi::INBOX_*`)
//! and of the tick load the guest publishes in its agent page. Everything
//! the guest declared is bounded against its memory before a byte is
//! written, and every write goes through [`GuestView::write`], which
//! records the page in the VMM's write log so a live migration sends it.

use crate::vmm::memory::GuestMemory;
use crate::vmm::page_bitmap::VmmWrites;
use guest_agent::abi;
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::wire::WireUpdate;

/// Most slots a ring may declare.
const MAX_SLOTS: u64 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    #[error("the guest has not declared an agent page yet")]
    NoAgent,
    #[error("the guest declared no inbox ring (its cmdline lacks clients=host?)")]
    NoRing,
    #[error("the inbox ring at {gpa:#x} ({bytes} bytes) is unaligned or outside guest memory")]
    Bounds { gpa: u64, bytes: u64 },
    #[error("the inbox ring's header is not what this daemon writes: {0}")]
    Header(&'static str),
    #[error("cannot access guest memory at {0:#x}")]
    Memory(u64),
}

/// A VM's guest memory as a writer of it sees it.
#[derive(Clone, Copy)]
pub struct GuestView<'a> {
    pub memory: &'a GuestMemory,
    /// The VMM's write log (dirty tracking of the VMM's own writes).
    pub writes: &'a VmmWrites,
    /// The guest's agent page (from its HELLO; 0: none yet).
    pub agent_gpa: u64,
}

impl GuestView<'_> {
    fn read_u64(&self, gpa: u64) -> Result<u64, RingError> {
        self.memory
            .read_obj::<u64>(GuestAddress(gpa))
            .map_err(|_| RingError::Memory(gpa))
    }

    fn read_u32(&self, gpa: u64) -> Result<u32, RingError> {
        self.memory
            .read_obj::<u32>(GuestAddress(gpa))
            .map_err(|_| RingError::Memory(gpa))
    }

    /// Writes `bytes` at `gpa` and records the pages as written.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), RingError> {
        self.memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(|_| RingError::Memory(gpa))?;
        self.writes.record(gpa, bytes.len() as u64);
        Ok(())
    }

    fn in_memory(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| end <= self.memory.last_addr().0 + 1)
    }

    /// Agent word `w`, if the agent page is declared and inside memory.
    pub fn agent_word(&self, w: usize) -> Result<u64, RingError> {
        if self.agent_gpa == 0 || !self.in_memory(self.agent_gpa, abi::PAGE_SIZE) {
            return Err(RingError::NoAgent);
        }
        self.read_u64(self.agent_gpa + 8 * w as u64)
    }

    /// Sets agent word `w` (the family size at a join).
    pub fn set_agent_word(&self, w: usize, v: u64) -> Result<(), RingError> {
        self.agent_word(w)?;
        self.write(self.agent_gpa + 8 * w as u64, &v.to_le_bytes())
    }
}

/// Where a guest's ring is, once checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring {
    gpa: u64,
    slots: u64,
}

impl Ring {
    /// Finds and checks the ring the guest declared in its agent page.
    pub fn attach(v: &GuestView) -> Result<Ring, RingError> {
        let gpa = v.agent_word(abi::AGENT_WORD_INBOX_GPA)?;
        let bytes = v.agent_word(abi::AGENT_WORD_INBOX_BYTES)?;
        if gpa == 0 {
            return Err(RingError::NoRing);
        }
        if !gpa.is_multiple_of(abi::PAGE_SIZE) || !v.in_memory(gpa, bytes) {
            return Err(RingError::Bounds { gpa, bytes });
        }
        let word = |w: usize| v.read_u64(gpa + 8 * w as u64);
        if word(abi::INBOX_WORD_MAGIC)? != abi::INBOX_MAGIC {
            return Err(RingError::Header("bad magic"));
        }
        if word(abi::INBOX_WORD_VERSION)? != abi::INBOX_VERSION {
            return Err(RingError::Header("unknown version"));
        }
        if word(abi::INBOX_WORD_SLOT_BYTES)? != abi::INBOX_SLOT_BYTES {
            return Err(RingError::Header("unknown slot size"));
        }
        let slots = word(abi::INBOX_WORD_SLOTS)?;
        if slots == 0 || slots > MAX_SLOTS || !slots.is_power_of_two() {
            return Err(RingError::Header(
                "slot count not a power of two up to 65536",
            ));
        }
        if abi::INBOX_HEADER_BYTES + slots * abi::INBOX_SLOT_BYTES > bytes {
            return Err(RingError::Header("slots do not fit the declared size"));
        }
        Ok(Ring { gpa, slots })
    }

    pub fn slots(&self) -> u64 {
        self.slots
    }

    fn word_gpa(&self, w: usize) -> u64 {
        self.gpa + 8 * w as u64
    }

    fn slot_gpa(&self, pos: u64) -> u64 {
        self.gpa + abi::INBOX_HEADER_BYTES + (pos % self.slots) * abi::INBOX_SLOT_BYTES
    }

    pub fn word(&self, v: &GuestView, w: usize) -> Result<u64, RingError> {
        v.read_u64(self.word_gpa(w))
    }

    pub fn producer(&self, v: &GuestView) -> Result<u64, RingError> {
        self.word(v, abi::INBOX_WORD_PRODUCER)
    }

    /// The guest's consumer position, never past the producer's.
    pub fn consumer(&self, v: &GuestView) -> Result<u64, RingError> {
        Ok(self
            .word(v, abi::INBOX_WORD_CONSUMER)?
            .min(self.producer(v)?))
    }

    /// Writes `u` into the slot of position `pos` (not yet published).
    pub fn write_slot(&self, v: &GuestView, pos: u64, u: &WireUpdate) -> Result<(), RingError> {
        let mut b = [0u8; abi::INBOX_SLOT_BYTES as usize];
        let len = u.payload.len().min(abi::UPDATE_PAYLOAD_MAX as usize);
        b[0..4].copy_from_slice(&u.client.to_le_bytes());
        b[4..8].copy_from_slice(&(len as u32).to_le_bytes());
        b[8..16].copy_from_slice(&u.seq.to_le_bytes());
        b[16..20].copy_from_slice(&abi::SLOT_NEW.to_le_bytes());
        let p = abi::SLOT_HEADER_BYTES as usize;
        b[p..p + len].copy_from_slice(&u.payload[..len]);
        v.write(self.slot_gpa(pos), &b[..p + len])
    }

    /// Makes the slots before `producer` visible to the guest (after
    /// their contents: x86 keeps stores in order, the fence keeps the
    /// compiler from reordering).
    pub fn publish(&self, v: &GuestView, producer: u64) -> Result<(), RingError> {
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        v.write(
            self.word_gpa(abi::INBOX_WORD_PRODUCER),
            &producer.to_le_bytes(),
        )
    }

    /// What the guest answered for the slot of position `pos`.
    pub fn status(&self, v: &GuestView, pos: u64) -> Result<u32, RingError> {
        v.read_u32(self.slot_gpa(pos) + abi::SLOT_OFF_STATUS)
    }
}

/// The guest's own tick load, from its agent page (and ring counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct GuestLoad {
    pub ticks: u64,
    /// Busy time of the last tick and of all ticks (µs).
    pub busy_us_last: f64,
    pub busy_us_total: f64,
    /// The tick's budget (`tick_us`; 0: unpaced).
    pub tick_us: f64,
    /// Busy ÷ budget of the last tick (0 when unpaced).
    pub load: f64,
    /// `clients=host`: updates applied, duplicates and other members'
    /// updates skipped, and the guest's consumer position in its ring.
    pub updates_applied: u64,
    pub duplicates: u64,
    pub not_mine: u64,
    pub consumed: u64,
}

/// Reads the guest's tick load; `None` before its agent page exists.
pub fn guest_load(v: &GuestView) -> Option<GuestLoad> {
    let w = |i| v.agent_word(i).ok();
    let per_us = w(abi::AGENT_WORD_TSC_PER_US)?.max(1) as f64;
    let last = w(abi::AGENT_WORD_BUSY_TSC_LAST)? as f64 / per_us;
    let budget = w(abi::AGENT_WORD_TICK_BUDGET_TSC)? as f64 / per_us;
    let mut g = GuestLoad {
        ticks: w(abi::AGENT_WORD_TICKS_DONE)?,
        busy_us_last: last,
        busy_us_total: w(abi::AGENT_WORD_BUSY_TSC_TOTAL)? as f64 / per_us,
        tick_us: budget,
        load: if budget > 0.0 { last / budget } else { 0.0 },
        ..GuestLoad::default()
    };
    if let Ok(r) = Ring::attach(v) {
        let word = |i| r.word(v, i).unwrap_or(0);
        g.updates_applied = word(abi::INBOX_WORD_APPLIED);
        g.duplicates = word(abi::INBOX_WORD_DUPLICATES);
        g.not_mine = word(abi::INBOX_WORD_NOT_MINE);
        g.consumed = r.consumer(v).unwrap_or(0);
    }
    Some(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;

    pub(crate) fn fake_guest(mem: &GuestMemory, ring: u64) -> u64 {
        let agent = 0x10_0000;
        let put = |gpa: u64, v: u64| mem.write_obj(v, GuestAddress(gpa)).unwrap();
        put(agent + 8 * abi::AGENT_WORD_INBOX_GPA as u64, ring);
        let bytes = abi::INBOX_HEADER_BYTES + 8 * abi::INBOX_SLOT_BYTES;
        put(agent + 8 * abi::AGENT_WORD_INBOX_BYTES as u64, bytes);
        put(ring, abi::INBOX_MAGIC);
        put(ring + 8, abi::INBOX_VERSION);
        put(ring + 16, 8);
        put(ring + 24, abi::INBOX_SLOT_BYTES);
        agent
    }

    #[test]
    fn writes_are_bounded_and_recorded() {
        let mem = memory::anonymous(4 << 20).unwrap();
        let writes = VmmWrites::default();
        writes.start(1024);
        let agent = fake_guest(&mem, 0x20_0000);
        let v = GuestView {
            memory: &mem,
            writes: &writes,
            agent_gpa: agent,
        };
        let ring = Ring::attach(&v).unwrap();
        assert_eq!(ring.slots(), 8);
        let p = [5u8; 300];
        let u = WireUpdate {
            client: 3,
            seq: 9,
            floor: 9,
            ts: 0,
            payload: &p,
        };
        ring.write_slot(&v, 9, &u).unwrap();
        ring.publish(&v, 10).unwrap();
        assert_eq!(ring.producer(&v).unwrap(), 10);
        assert_eq!(ring.consumer(&v).unwrap(), 0);
        let slot = 0x20_0000 + abi::INBOX_HEADER_BYTES + abi::INBOX_SLOT_BYTES;
        assert_eq!(mem.read_obj::<u64>(GuestAddress(slot + 8)).unwrap(), 9);
        let dirty = writes.take().unwrap();
        assert!(dirty[(slot / 4096) as usize] && dirty[0x200]);
        // A ring declared past the end of memory is refused.
        mem.write_obj(
            u64::MAX - 4095,
            GuestAddress(agent + 8 * abi::AGENT_WORD_INBOX_GPA as u64),
        )
        .unwrap();
        assert!(matches!(Ring::attach(&v), Err(RingError::Bounds { .. })));
        let none = GuestView { agent_gpa: 0, ..v };
        assert_eq!(Ring::attach(&none), Err(RingError::NoAgent));
    }
}
