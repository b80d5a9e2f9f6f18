//! The fork descriptor: what a clone needs before it can run. The
//! parent's VM state (vCPU, clock, devices: what a snapshot carries but
//! memory), and the few pages the guest touches before anything else
//! (page tables, GDT, IDT, TSS, the top of the stack, the hypercall page),
//! plus which pages the guest allocator had handed out at the fork (for
//! the avoidance heuristics). Everything else faults in on demand.

use crate::fork::Answer;
use crate::vmm::devices::{GuestInfo, MAX_BITMAP_BYTES};
use crate::vmm::memory::GuestMemory;
use crate::vmm::persist::VmState;
use bincode::Options;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Bumped whenever the descriptor changes shape.
pub const DESCRIPTOR_VERSION: u32 = 3;
const PAGE: u64 = 4096;
/// Bound on page-table pages collected (a sane guest needs a handful).
const MAX_TABLE_PAGES: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    #[error("guest page {0:#x} cannot be read")]
    Read(u64),
    #[error("the parent's state has {0} vCPUs; a descriptor carries one")]
    Vcpus(usize),
    #[error("descriptor encoding failed")]
    Encode(#[source] bincode::Error),
    #[error("descriptor decoding failed")]
    Decode(#[source] bincode::Error),
    #[error("descriptor version {found}, this forkd reads {DESCRIPTOR_VERSION}")]
    Version { found: u32 },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DescriptorPage {
    pub gpa: u64,
    pub bytes: Vec<u8>,
}

/// The guest allocator's state at the fork: its bitmap's location and the
/// page ranges (first page, count) that were handed out.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllocAtFork {
    pub bitmap_gpa: u64,
    pub bitmap_bytes: u64,
    pub allocated: Vec<(u64, u64)>,
}

impl AllocAtFork {
    pub fn was_allocated(&self, page: u64) -> bool {
        let i = self.allocated.partition_point(|&(start, _)| start <= page);
        i > 0 && {
            let (start, count) = self.allocated[i - 1];
            page < start + count
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ForkDescriptor {
    pub version: u32,
    pub family: u64,
    /// The parent's state at the fork (one vCPU).
    pub state: VmState,
    /// The page that tells each clone which clone it is, and how.
    pub answer_page: u64,
    /// The guest's agent page, where each clone finds its identity
    /// (generation id, entropy, MAC, IP), if the guest has one.
    pub agent_page: Option<u64>,
    pub answer: Answer,
    pub pages: Vec<DescriptorPage>,
    pub alloc: Option<AllocAtFork>,
}

impl ForkDescriptor {
    /// Builds the descriptor from the stopped parent (memory as of now).
    pub fn build(
        family: u64,
        memory: &GuestMemory,
        state: VmState,
        answer_page: u64,
        answer: Answer,
    ) -> Result<Self, DescriptorError> {
        let mem_bytes = memory.last_addr().0 + 1;
        let [vcpu] = state.vcpus.as_slice() else {
            return Err(DescriptorError::Vcpus(state.vcpus.len()));
        };
        let mut wanted = BTreeSet::new();
        page_table_pages(memory, vcpu.sregs.cr3, &mut wanted);
        // Segment tables the guest set up: base and limit are the guest's
        // own (limits are 16 or 20 bits), so the end is computed without
        // overflow and clipped to memory.
        for (base, limit) in [
            (vcpu.sregs.gdt.base, vcpu.sregs.gdt.limit as u64),
            (vcpu.sregs.idt.base, vcpu.sregs.idt.limit as u64),
            (vcpu.sregs.tr.base, (vcpu.sregs.tr.limit as u64).min(0xffff)),
        ] {
            let end = base.saturating_add(limit).min(mem_bytes.saturating_sub(1));
            let mut p = base & !(PAGE - 1);
            while p <= end {
                wanted.insert(p);
                p += PAGE;
            }
        }
        let rsp = vcpu.regs.rsp & !(PAGE - 1);
        wanted.insert(rsp);
        wanted.insert(rsp.saturating_sub(PAGE));
        wanted.insert(answer_page & !(PAGE - 1));
        let agent_page = state
            .devices
            .hypercall
            .guest
            .map(|g| g.agent_gpa)
            .filter(|a| *a != 0 && a.is_multiple_of(PAGE) && *a < mem_bytes);
        wanted.extend(agent_page);
        let mut pages = Vec::with_capacity(wanted.len());
        for gpa in wanted.into_iter().filter(|g| *g < mem_bytes) {
            let mut bytes = vec![0u8; PAGE as usize];
            memory
                .read_slice(&mut bytes, GuestAddress(gpa))
                .map_err(|_| DescriptorError::Read(gpa))?;
            pages.push(DescriptorPage { gpa, bytes });
        }
        let alloc = state
            .devices
            .hypercall
            .guest
            .and_then(|g| alloc_at_fork(memory, &g));
        Ok(ForkDescriptor {
            version: DESCRIPTOR_VERSION,
            family,
            state,
            answer_page,
            agent_page,
            answer,
            pages,
            alloc,
        })
    }

    pub fn encode(&self) -> Result<Vec<u8>, DescriptorError> {
        bincode::DefaultOptions::new()
            .serialize(self)
            .map_err(DescriptorError::Encode)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DescriptorError> {
        let d: ForkDescriptor = bincode::DefaultOptions::new()
            .with_limit(64 << 20)
            .deserialize(bytes)
            .map_err(DescriptorError::Decode)?;
        if d.version != DESCRIPTOR_VERSION {
            return Err(DescriptorError::Version { found: d.version });
        }
        Ok(d)
    }
}

/// Page-table pages reachable from `cr3` (4-level paging), bounded.
fn page_table_pages(memory: &GuestMemory, cr3: u64, out: &mut BTreeSet<u64>) {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let read_entry = |table: u64, i: u64| -> Option<u64> {
        memory.read_obj::<u64>(GuestAddress(table + 8 * i)).ok()
    };
    let mut level = vec![cr3 & ADDR];
    for depth in 0..4 {
        let mut next = Vec::new();
        for table in level {
            if out.len() >= MAX_TABLE_PAGES || !out.insert(table) {
                continue;
            }
            if depth == 3 {
                continue;
            }
            for i in 0..512 {
                let Some(e) = read_entry(table, i) else { break };
                // Present, and not a large page below the PML4 level.
                if e & 1 == 1 && (depth == 0 || e & 0x80 == 0) {
                    next.push(e & ADDR);
                }
            }
        }
        level = next;
    }
}

/// The allocated page ranges of the guest's allocator bitmap.
fn alloc_at_fork(memory: &GuestMemory, g: &GuestInfo) -> Option<AllocAtFork> {
    // Bounded when the guest announced it; checked again, as it is the
    // guest's number.
    if g.bitmap_bytes > MAX_BITMAP_BYTES {
        return None;
    }
    let mut words = vec![0u8; g.bitmap_bytes as usize];
    memory
        .read_slice(&mut words, GuestAddress(g.bitmap_gpa))
        .ok()?;
    let mut allocated: Vec<(u64, u64)> = Vec::new();
    for (wi, chunk) in words.chunks_exact(8).enumerate() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        let mut word = u64::from_le_bytes(w);
        while word != 0 {
            let bit = word.trailing_zeros() as u64;
            word &= word - 1;
            let page = wi as u64 * 64 + bit;
            match allocated.last_mut() {
                Some((start, count)) if *start + *count == page => *count += 1,
                _ => allocated.push((page, 1)),
            }
        }
    }
    Some(AllocAtFork {
        bitmap_gpa: g.bitmap_gpa,
        bitmap_bytes: g.bitmap_bytes,
        allocated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_ranges_lookup() {
        let a = AllocAtFork {
            bitmap_gpa: 0,
            bitmap_bytes: 0,
            allocated: vec![(10, 5), (100, 1)],
        };
        assert!(!a.was_allocated(9));
        assert!(a.was_allocated(10));
        assert!(a.was_allocated(14));
        assert!(!a.was_allocated(15));
        assert!(a.was_allocated(100));
        assert!(!a.was_allocated(101));
    }
}
