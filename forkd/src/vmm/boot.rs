//! PVH boot: load the guest ELF at its physical addresses (linux-loader),
//! write the command line, start_info and memory map, and set up the vCPU
//! the way the PVH protocol says: 32-bit protected mode, paging off, flat
//! segments, `%ebx` = start_info.

use crate::vmm::memory::GuestMemory;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use std::fs::File;
use std::path::Path;
use vm_memory::GuestAddress;

pub const START_INFO_ADDR: u64 = 0x6000;
pub const MEMMAP_ADDR: u64 = 0x7000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// Low RAM ends where the legacy EBDA would start.
const LOW_RAM_END: u64 = 0x9_fc00;
const HIGH_RAM_START: u64 = 0x10_0000;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open guest ELF {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("guest {path} is not a loadable ELF: {reason}")]
    Elf { path: String, reason: String },
    #[error("guest {0} is not a PVH ELF (no XEN_ELFNOTE_PHYS32_ENTRY note)")]
    NotPvh(String),
    #[error("guest cmdline of {len} bytes is too long (at most {max})")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("guest cmdline is invalid")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("cannot load the guest cmdline")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    #[error("cannot write boot parameters")]
    BootParams(#[source] linux_loader::configurator::Error),
}

/// Loads the guest and its boot parameters into `mem`; returns the PVH
/// entry point.
pub fn load(mem: &GuestMemory, elf: &Path, cmdline: &str) -> Result<u64, BootError> {
    let path = elf.display().to_string();
    let mut file = File::open(elf).map_err(|source| BootError::Open {
        path: path.clone(),
        source,
    })?;
    let loaded = Elf::load(mem, None, &mut file, None).map_err(|e| BootError::Elf {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.0,
        _ => return Err(BootError::NotPvh(path)),
    };

    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: CMDLINE_MAX - 1,
        });
    }
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    if !cmdline.trim().is_empty() {
        cl.insert_str(cmdline.trim()).map_err(BootError::Cmdline)?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl).map_err(BootError::LoadCmdline)?;

    let mem_end = vm_memory::GuestMemoryBackend::last_addr(mem).0 + 1;
    let memmap = [
        hvm_memmap_table_entry {
            addr: 0,
            size: LOW_RAM_END,
            type_: E820_RAM,
            reserved: 0,
        },
        hvm_memmap_table_entry {
            addr: HIGH_RAM_START,
            size: mem_end - HIGH_RAM_START,
            type_: E820_RAM,
            reserved: 0,
        },
    ];
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(BootError::BootParams)?;
    Ok(entry)
}

fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// The PVH entry state: registers and segment registers (on top of what
/// KVM_GET_SREGS returns for a fresh vCPU).
pub fn entry_state(entry: u64, mut sregs: kvm_sregs) -> (kvm_regs, kvm_sregs) {
    let regs = kvm_regs {
        rip: entry,
        rbx: START_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    let code = flat_segment(0x08, 0xb);
    let data = flat_segment(0x10, 0x3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        limit: 0x67,
        type_: 0xb,
        s: 0,
        db: 0,
        g: 0,
        selector: 0,
        ..flat_segment(0, 0)
    };
    sregs.cr0 = 0x11; // PE | ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    (regs, sregs)
}
