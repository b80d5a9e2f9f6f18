//! Guest memory: one region at guest-physical 0, either anonymous
//! (MAP_PRIVATE | MAP_NORESERVE, so a 1 GiB guest costs only what it
//! touches) or a private mapping of a snapshot's memory file (pages load on
//! first touch; the file is never written through).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;
pub type GuestRegion = vm_memory::GuestRegionMmap<()>;

/// Largest guest: the zone guest identity-maps the first 4 GiB, and we keep
/// the top GiB free as an MMIO hole.
pub const MAX_MEM_MIB: u64 = 3072;
/// Smallest guest: the image lives at 1 MiB and the heap starts at 2 MiB.
pub const MIN_MEM_MIB: u64 = 8;
const PAGE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is out of range ({MIN_MEM_MIB}..={MAX_MEM_MIB} MiB)")]
    BadSize(u64),
    #[error("cannot map guest memory: {0}")]
    Map(String),
    #[error("memory file {path}: {source}")]
    File { path: String, source: io::Error },
    #[error("memory file {path} holds {actual} bytes, the snapshot needs {expected}")]
    Truncated {
        path: String,
        actual: u64,
        expected: u64,
    },
}

pub fn check_size(mib: u64) -> Result<u64, MemoryError> {
    if (MIN_MEM_MIB..=MAX_MEM_MIB).contains(&mib) {
        Ok(mib << 20)
    } else {
        Err(MemoryError::BadSize(mib))
    }
}

/// Fresh anonymous guest memory of `bytes`.
pub fn anonymous(bytes: u64) -> Result<GuestMemory, MemoryError> {
    GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)])
        .map_err(|e| MemoryError::Map(e.to_string()))
}

fn file_err(path: &Path) -> impl Fn(io::Error) -> MemoryError + '_ {
    move |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Opens a memory file that must hold exactly `bytes`.
fn open_sized(path: &Path, bytes: u64) -> Result<File, MemoryError> {
    let file = File::open(path).map_err(file_err(path))?;
    let actual = file.metadata().map_err(file_err(path))?.len();
    if actual != bytes {
        return Err(MemoryError::Truncated {
            path: path.display().to_string(),
            actual,
            expected: bytes,
        });
    }
    Ok(file)
}

/// Guest memory backed by a private (copy-on-write) mapping of `path`.
pub fn from_file(path: &Path, bytes: u64) -> Result<GuestMemory, MemoryError> {
    let file = open_sized(path, bytes)?;
    let region = MmapRegion::build(
        Some(FileOffset::new(file, 0)),
        bytes as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .map_err(|e| MemoryError::Map(e.to_string()))?;
    let region = GuestRegion::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Map("region overflows".into()))?;
    GuestMemory::from_regions(vec![region]).map_err(|e| MemoryError::Map(e.to_string()))
}

/// Fresh anonymous guest memory loaded with the contents of `path`: only
/// the file's data extents are read (SEEK_DATA/SEEK_HOLE), holes stay
/// untouched zero pages. Slower to start than [`from_file`] but the guest
/// then runs on anonymous memory (transparent huge pages, no later faults
/// into the page cache).
pub fn from_file_eager(path: &Path, bytes: u64) -> Result<GuestMemory, MemoryError> {
    let file = open_sized(path, bytes)?;
    let mem = anonymous(bytes)?;
    let region = mem.iter().next().expect("guest memory has one region");
    // SAFETY: the region is a fresh private mapping of `bytes` bytes owned
    // by `mem`; no vCPU runs on it yet, so we are its only user.
    let dst = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), bytes as usize) };
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    let mut pos: i64 = 0;
    while (pos as u64) < bytes {
        // SAFETY: lseek on a file descriptor we own; no memory involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `pos`
            }
            return Err(file_err(path)(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 {
            bytes
        } else {
            (hole as u64).min(bytes)
        };
        file.read_exact_at(&mut dst[data as usize..end as usize], data as u64)
            .map_err(file_err(path))?;
        pos = end as i64;
    }
    Ok(mem)
}

/// Host view of the single region.
fn region_slice(mem: &GuestMemory) -> &[u8] {
    let region = mem.iter().next().expect("guest memory has one region");
    // SAFETY: the region is a live mapping of `len()` bytes owned by `mem`,
    // which outlives the slice. Its contents may change under a running
    // guest; callers only read a paused guest's memory.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

/// Which 4 KiB pages of an anonymous mapping were ever touched (mincore).
fn resident_pages(mem: &[u8]) -> io::Result<Vec<u8>> {
    let mut vec = vec![0u8; mem.len().div_ceil(PAGE)];
    // SAFETY: `mem` is a page-aligned mapping of `mem.len()` bytes and `vec`
    // has one byte per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(mem.as_ptr() as *mut _, mem.len(), vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec)
}

/// Writes guest memory to `file` as a sparse file of the full guest size:
/// only non-zero pages are written, holes read back as zeros. For anonymous
/// memory only resident pages are looked at; a file-backed guest (restored
/// from a snapshot) is scanned whole. Returns the bytes written.
pub fn write_sparse(mem: &GuestMemory, file: &File) -> io::Result<u64> {
    let bytes = region_slice(mem);
    let anonymous = mem
        .iter()
        .next()
        .map(|r| r.file_offset().is_none())
        .unwrap_or(true);
    let resident = if anonymous {
        Some(resident_pages(bytes)?)
    } else {
        None
    };
    file.set_len(bytes.len() as u64)?;
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let pages = bytes.len() / PAGE;
    for p in 0..=pages {
        let keep = p < pages
            && resident.as_ref().is_none_or(|r| r[p] & 1 == 1)
            && bytes[p * PAGE..(p + 1) * PAGE].iter().any(|&b| b != 0);
        match (keep, run_start) {
            (true, None) => run_start = Some(p),
            (false, Some(s)) => {
                file.write_all_at(&bytes[s * PAGE..p * PAGE], (s * PAGE) as u64)?;
                written += ((p - s) * PAGE) as u64;
                run_start = None;
            }
            _ => {}
        }
    }
    Ok(written)
}

/// Bytes of guest memory currently resident (touched) in this process.
pub fn resident_bytes(mem: &GuestMemory) -> io::Result<u64> {
    let r = resident_pages(region_slice(mem))?;
    Ok(r.iter().filter(|b| **b & 1 == 1).count() as u64 * PAGE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn sparse_round_trip() {
        let mem = anonymous(16 << 20).unwrap();
        mem.write_slice(&[7u8; 10], GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[9u8; 3], GuestAddress(0xfff000)).unwrap();
        // Touched but zero: not written.
        mem.write_slice(&[0u8; 8], GuestAddress(0x9000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        let f = File::create(&path).unwrap();
        assert_eq!(write_sparse(&mem, &f).unwrap(), 2 * 4096);
        drop(f);
        let back = from_file(&path, 16 << 20).unwrap();
        let mut buf = [0u8; 10];
        back.read_slice(&mut buf, GuestAddress(0x5000)).unwrap();
        assert_eq!(buf, [7u8; 10]);
        // Writes to the restored guest do not reach the file.
        back.write_slice(&[1u8; 4], GuestAddress(0x5000)).unwrap();
        let again = from_file(&path, 16 << 20).unwrap();
        again.read_slice(&mut buf, GuestAddress(0x5000)).unwrap();
        assert_eq!(buf, [7u8; 10]);
        assert!(matches!(
            from_file(&path, 32 << 20),
            Err(MemoryError::Truncated { .. })
        ));
        let eager = from_file_eager(&path, 16 << 20).unwrap();
        eager.read_slice(&mut buf, GuestAddress(0x5000)).unwrap();
        assert_eq!(buf, [7u8; 10]);
        let mut tail = [0u8; 3];
        eager.read_slice(&mut tail, GuestAddress(0xfff000)).unwrap();
        assert_eq!(tail, [9u8; 3]);
        assert!(matches!(check_size(4), Err(MemoryError::BadSize(4))));
    }
}
