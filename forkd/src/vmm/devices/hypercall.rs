//! The hypercall device: the guest writes the address of its hypercall
//! page to the doorbell port; we read the call from guest memory, carry it
//! out and write the answer back. One exit per call.

use super::console::Console;
use crate::vmm::memory::GuestMemory;
use crate::vmm::page_bitmap::VmmWrites;
use guest_agent::abi::{self, HypercallPage};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Largest allocator bitmap a guest may announce: one bit per 4 KiB page
/// of the 4 GiB a guest can address (its memory is at most 3 GiB).
pub const MAX_BITMAP_BYTES: u64 = (4 << 30) / abi::PAGE_SIZE / 8;

/// What the guest told us in `OP_HELLO`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GuestInfo {
    pub abi_version: u64,
    /// Guest-physical address and size of the page-allocator bitmap.
    pub bitmap_gpa: u64,
    pub bitmap_bytes: u64,
    pub heap_start: u64,
    pub heap_end: u64,
    pub state_gpa: u64,
    pub state_bytes: u64,
    /// The guest's agent page (0: none), see `abi::AGENT_WORD_*`.
    pub agent_gpa: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HypercallState {
    pub guest: Option<GuestInfo>,
    pub calls: u64,
    pub rejected: u64,
}

pub struct HypercallDevice {
    memory: GuestMemory,
    console: Console,
    state: HypercallState,
    /// Pages this device writes, recorded while dirty tracking is on.
    writes: VmmWrites,
}

/// What the vCPU loop must do after a doorbell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HypercallAction {
    /// Answered in guest memory (or refused as malformed); continue.
    Done,
    /// A call the VMM does not handle itself: the vCPU thread hands it to
    /// the VM's hypercall service, with no device lock held, then answers
    /// with [`HypercallDevice::complete`].
    Service { page_gpa: u64, page: HypercallPage },
    /// The guest broke the hypercall contract in a way that makes the VM
    /// unsafe to go on with (a hostile HELLO): fail it with this reason.
    Fail(String),
    /// `OP_SLEEP`, already answered: the vCPU thread sleeps up to `ns`
    /// (at most `abi::SLEEP_MAX_NS`), no device lock held.
    Sleep { ns: u64 },
}

impl HypercallDevice {
    pub fn new(memory: GuestMemory, console: Console) -> Self {
        HypercallDevice {
            memory,
            console,
            state: HypercallState::default(),
            writes: VmmWrites::default(),
        }
    }

    pub fn restore(memory: GuestMemory, console: Console, state: &HypercallState) -> Self {
        HypercallDevice {
            memory,
            console,
            state: state.clone(),
            writes: VmmWrites::default(),
        }
    }

    pub fn save(&self) -> HypercallState {
        self.state.clone()
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The pages this device writes into guest memory (dirty tracking).
    pub fn writes(&self) -> &VmmWrites {
        &self.writes
    }

    /// Writes an answered page back into the guest, recording the write.
    fn write_page(&self, page: &HypercallPage, gpa: u64) {
        let bytes = page.to_bytes();
        // The page was just read from memory, so the write cannot fail.
        let _ = self.memory.write_slice(&bytes, GuestAddress(gpa));
        self.writes.record(gpa, bytes.len() as u64);
    }

    pub fn guest_info(&self) -> Option<GuestInfo> {
        self.state.guest
    }

    fn in_memory(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len)
            .is_some_and(|end| end <= self.memory.last_addr().0 + 1)
    }

    /// Everything the guest announces is bounded before anyone uses it: the
    /// layers above read the bitmap (one bit per 4 KiB page of the 4 GiB a
    /// guest can address, so never more than [`MAX_BITMAP_BYTES`]), the zone
    /// state and the agent page at these addresses.
    fn check_hello(&self, info: &GuestInfo) -> Result<(), &'static str> {
        let mem = self.memory.last_addr().0 + 1;
        if info.abi_version != abi::ABI_VERSION {
            return Err("unknown ABI version");
        }
        if info.bitmap_bytes > MAX_BITMAP_BYTES || !info.bitmap_bytes.is_multiple_of(8) {
            return Err("allocator bitmap larger than one bit per page of 4 GiB");
        }
        if !self.in_memory(info.bitmap_gpa, info.bitmap_bytes) {
            return Err("allocator bitmap outside guest memory");
        }
        if !self.in_memory(info.state_gpa, info.state_bytes) {
            return Err("zone state outside guest memory");
        }
        if info.heap_start > info.heap_end || info.heap_end > mem {
            return Err("heap outside guest memory");
        }
        if !info.agent_gpa.is_multiple_of(abi::PAGE_SIZE)
            || (info.agent_gpa != 0 && !self.in_memory(info.agent_gpa, abi::PAGE_SIZE))
        {
            return Err("agent page unaligned or outside guest memory");
        }
        Ok(())
    }

    /// A doorbell write: `data` is the little-endian address of the page.
    /// Malformed rings (wrong size, unaligned or outside memory) are
    /// counted and ignored; the guest then sees `STATUS_NO_VMM`.
    pub fn doorbell(&mut self, data: &[u8]) -> HypercallAction {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.state.rejected += 1;
            return HypercallAction::Done;
        };
        let gpa = u32::from_le_bytes(bytes) as u64;
        if !gpa.is_multiple_of(abi::PAGE_SIZE) || !self.in_memory(gpa, HypercallPage::SIZE as u64) {
            self.state.rejected += 1;
            return HypercallAction::Done;
        }
        let mut raw = [0u8; HypercallPage::SIZE];
        if self.memory.read_slice(&mut raw, GuestAddress(gpa)).is_err() {
            self.state.rejected += 1;
            return HypercallAction::Done;
        }
        let mut page = HypercallPage::from_bytes(&raw);
        self.state.calls += 1;
        if page.op == abi::OP_SLEEP {
            // Answer before sleeping: a pause or save during the sleep
            // then saves a finished call.
            let ns = page.args[0].min(abi::SLEEP_MAX_NS);
            page.status = abi::STATUS_OK;
            page.ret = [ns, 0, 0, 0];
            self.write_page(&page, gpa);
            return HypercallAction::Sleep { ns };
        }
        if page.op == abi::OP_HELLO {
            if let Err(why) = self.hello(&page) {
                self.state.rejected += 1;
                return HypercallAction::Fail(format!("guest HELLO refused: {why}"));
            }
            page.status = abi::STATUS_OK;
            page.ret = [0; 4];
            self.write_page(&page, gpa);
            return HypercallAction::Done;
        }
        if page.op != abi::OP_CONSOLE {
            return HypercallAction::Service {
                page_gpa: gpa,
                page,
            };
        }
        page.status = self.handle(&mut page);
        self.write_page(&page, gpa);
        HypercallAction::Done
    }

    /// Answers a call the vCPU thread carried out (the VM's service).
    pub fn complete(&mut self, page_gpa: u64, status: u32, ret: [u64; 4]) {
        let mut raw = [0u8; HypercallPage::SIZE];
        if self
            .memory
            .read_slice(&mut raw, GuestAddress(page_gpa))
            .is_ok()
        {
            let mut page = HypercallPage::from_bytes(&raw);
            page.status = status;
            page.ret = ret;
            self.write_page(&page, page_gpa);
        }
    }

    /// `OP_HELLO`: records what the guest announces, once it is bounded.
    fn hello(&mut self, page: &HypercallPage) -> Result<(), &'static str> {
        let a = &page.args;
        let info = GuestInfo {
            abi_version: a[abi::HELLO_ABI_VERSION],
            bitmap_gpa: a[abi::HELLO_BITMAP_GPA],
            bitmap_bytes: a[abi::HELLO_BITMAP_BYTES],
            heap_start: a[abi::HELLO_HEAP_START],
            heap_end: a[abi::HELLO_HEAP_END],
            state_gpa: a[abi::HELLO_STATE_GPA],
            state_bytes: a[abi::HELLO_STATE_BYTES],
            agent_gpa: a[abi::HELLO_AGENT_GPA],
        };
        self.check_hello(&info)?;
        self.state.guest = Some(info);
        Ok(())
    }

    fn handle(&mut self, page: &mut HypercallPage) -> u32 {
        match page.op {
            abi::OP_CONSOLE => {
                let (gpa, len) = (page.args[0], page.args[1]);
                if len > abi::CONSOLE_MAX || !self.in_memory(gpa, len) {
                    return abi::STATUS_BAD_ARGS;
                }
                let mut bytes = vec![0u8; len as usize];
                if self
                    .memory
                    .read_slice(&mut bytes, GuestAddress(gpa))
                    .is_err()
                {
                    return abi::STATUS_BAD_ARGS;
                }
                self.console.push_bytes(&bytes);
                abi::STATUS_OK
            }
            _ => abi::STATUS_UNKNOWN_OP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::memory;

    #[test]
    fn hello_is_recorded_and_bad_rings_are_counted() {
        let mem = memory::anonymous(16 << 20).unwrap();
        let console = Console::new(false, None);
        let mut dev = HypercallDevice::new(mem.clone(), console.clone());
        let mut page = HypercallPage {
            op: abi::OP_HELLO,
            status: abi::STATUS_NO_VMM,
            ..Default::default()
        };
        page.args[abi::HELLO_ABI_VERSION] = abi::ABI_VERSION;
        page.args[abi::HELLO_BITMAP_GPA] = 0x10_0000;
        page.args[abi::HELLO_BITMAP_BYTES] = 4096;
        mem.write_slice(&page.to_bytes(), GuestAddress(0x3000))
            .unwrap();
        assert_eq!(
            dev.doorbell(&0x3000u32.to_le_bytes()),
            HypercallAction::Done
        );
        let mut raw = [0u8; HypercallPage::SIZE];
        mem.read_slice(&mut raw, GuestAddress(0x3000)).unwrap();
        assert_eq!(HypercallPage::from_bytes(&raw).status, abi::STATUS_OK);
        assert_eq!(dev.guest_info().unwrap().bitmap_gpa, 0x10_0000);
        dev.doorbell(&0x3001u32.to_le_bytes());
        dev.doorbell(&[1, 2]);
        dev.doorbell(&0xffff_f000u32.to_le_bytes());
        assert_eq!(dev.save().rejected, 3);

        mem.write_slice(b"hi there\n", GuestAddress(0x5000))
            .unwrap();
        page.op = abi::OP_CONSOLE;
        page.args = [0x5000, 9, 0, 0, 0, 0, 0, 0];
        mem.write_slice(&page.to_bytes(), GuestAddress(0x3000))
            .unwrap();
        dev.doorbell(&0x3000u32.to_le_bytes());
        assert_eq!(console.lines(), vec!["hi there".to_string()]);
        page.args = [0x5000, abi::CONSOLE_MAX + 1, 0, 0, 0, 0, 0, 0];
        mem.write_slice(&page.to_bytes(), GuestAddress(0x3000))
            .unwrap();
        dev.doorbell(&0x3000u32.to_le_bytes());
        mem.read_slice(&mut raw, GuestAddress(0x3000)).unwrap();
        assert_eq!(HypercallPage::from_bytes(&raw).status, abi::STATUS_BAD_ARGS);
    }

    #[test]
    fn sleep_is_answered_first_and_capped() {
        let mem = memory::anonymous(16 << 20).unwrap();
        let mut dev = HypercallDevice::new(mem.clone(), Console::new(false, None));
        for (asked, granted) in [(5_000_000, 5_000_000), (u64::MAX, abi::SLEEP_MAX_NS)] {
            let mut page = HypercallPage {
                op: abi::OP_SLEEP,
                status: abi::STATUS_NO_VMM,
                ..Default::default()
            };
            page.args[0] = asked;
            mem.write_slice(&page.to_bytes(), GuestAddress(0x3000))
                .unwrap();
            assert_eq!(
                dev.doorbell(&0x3000u32.to_le_bytes()),
                HypercallAction::Sleep { ns: granted }
            );
            let mut raw = [0u8; HypercallPage::SIZE];
            mem.read_slice(&mut raw, GuestAddress(0x3000)).unwrap();
            let answer = HypercallPage::from_bytes(&raw);
            assert_eq!((answer.status, answer.ret[0]), (abi::STATUS_OK, granted));
        }
    }
}
