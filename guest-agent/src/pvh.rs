//! The PVH start_info the loader hands us (Xen's `hvm_start_info`, version
//! 1 with a memory map).

const MAGIC: u32 = 0x336e_c578;
const MAX_CMDLINE: usize = 4096;
const E820_RAM: u32 = 1;

#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

pub struct BootInfo {
    pub cmdline: &'static str,
    /// End of the RAM region that contains `above` (0 if none found).
    pub ram_end: u64,
}

/// Reads start_info at `paddr`. Memory is identity-mapped, so physical
/// addresses are pointers.
pub fn read(paddr: u64, above: u64) -> Result<BootInfo, &'static str> {
    if paddr == 0 {
        return Err("no PVH start_info");
    }
    // SAFETY: the loader put a start_info at this address; it is identity
    // mapped and stays untouched for the life of the guest.
    let si = unsafe { &*(paddr as *const StartInfo) };
    if si.magic != MAGIC {
        return Err("bad PVH start_info magic");
    }
    let cmdline = if si.cmdline_paddr == 0 {
        ""
    } else {
        let base = si.cmdline_paddr as *const u8;
        let mut len = 0;
        // SAFETY: the loader wrote a NUL-terminated string there; we stop at
        // MAX_CMDLINE bytes whatever happens.
        while len < MAX_CMDLINE && unsafe { base.add(len).read() } != 0 {
            len += 1;
        }
        // SAFETY: `len` bytes from `base` were just read above.
        let bytes = unsafe { core::slice::from_raw_parts(base, len) };
        core::str::from_utf8(bytes).map_err(|_| "cmdline is not UTF-8")?
    };
    let mut ram_end = 0;
    if si.version >= 1 && si.memmap_paddr != 0 {
        let n = si.memmap_entries.min(128) as usize;
        // SAFETY: the loader wrote `memmap_entries` entries there.
        let map = unsafe { core::slice::from_raw_parts(si.memmap_paddr as *const MemmapEntry, n) };
        for e in map {
            let end = e.addr.saturating_add(e.size);
            if e.kind == E820_RAM && e.addr <= above && above < end {
                ram_end = end;
            }
        }
    }
    Ok(BootInfo { cmdline, ram_end })
}
