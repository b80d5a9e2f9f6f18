//! Guest memory: one region at guest-physical 0, either anonymous
//! (MAP_PRIVATE | MAP_NORESERVE, so a 1 GiB guest costs only what it
//! touches) or a private mapping of a snapshot's memory file (pages load on
//! first touch; the file is never written through).

use crate::vmm::digest::{data_extents, hash_zeros, IntegrityError, MemoryDigest, ZeroCrc};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
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
    #[error("cannot map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    #[error("cannot map guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    #[error("cannot map guest memory")]
    MapRegion(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory has no region")]
    NoRegion,
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    /// A lazily restored guest whose memory file failed its check.
    #[error("guest memory was restored from a damaged memory file")]
    Unverified(#[source] Arc<IntegrityError>),
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
    GuestMemory::from_ranges(&[(GuestAddress(0), bytes as usize)]).map_err(MemoryError::Map)
}

fn file_err(path: &Path) -> impl Fn(io::Error) -> MemoryError + '_ {
    move |source| MemoryError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Opens a memory file that must hold exactly `bytes`.
pub(crate) fn open_sized(path: &Path, bytes: u64) -> Result<File, MemoryError> {
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
    .map_err(MemoryError::MapRegion)?;
    let region = GuestRegion::new(region, GuestAddress(0)).ok_or(MemoryError::NoRegion)?;
    GuestMemory::from_regions(vec![region]).map_err(MemoryError::Regions)
}

/// Fresh anonymous guest memory loaded with the contents of `path`: only
/// the file's data extents are read (SEEK_DATA/SEEK_HOLE), holes stay
/// untouched zero pages. Slower to start than [`from_file`] but the guest
/// then runs on anonymous memory (transparent huge pages, no later faults
/// into the page cache). Unchecked: restore uses
/// [`crate::vmm::integrity::load_eager`], which checks each chunk.
pub fn from_file_eager(path: &Path, bytes: u64) -> Result<GuestMemory, MemoryError> {
    let file = open_sized(path, bytes)?;
    let mem = anonymous(bytes)?;
    let region = region(&mem)?;
    // SAFETY: the region is a fresh private mapping of `bytes` bytes owned
    // by `mem`; no vCPU runs on it yet, so we are its only user.
    let dst = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), bytes as usize) };
    for (start, end) in data_extents(&file, bytes).map_err(file_err(path))? {
        file.read_exact_at(&mut dst[start as usize..end as usize], start)
            .map_err(file_err(path))?;
    }
    Ok(mem)
}

/// The single region of guest memory.
fn region(mem: &GuestMemory) -> Result<&GuestRegion, MemoryError> {
    mem.iter().next().ok_or(MemoryError::NoRegion)
}

/// Host view of the single region.
fn region_slice(region: &GuestRegion) -> &[u8] {
    // SAFETY: the region is a live mapping of `len()` bytes owned by the
    // guest memory, which outlives the slice. Its contents may change under
    // a running guest; callers only read a paused guest's memory.
    unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) }
}

/// Which 4 KiB pages of an anonymous mapping are resident (mincore).
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

/// pagemap: the page is in RAM (63) or in swap (62).
const PM_PRESENT_OR_SWAPPED: u64 = (1 << 63) | (1 << 62);

/// Whether each page of `pages` host pages from `addr` is populated (in
/// RAM or in swap), from `/proc/self/pagemap` (8 bytes per page).
pub(crate) fn populated(
    pagemap: &File,
    addr: usize,
    raw: &mut Vec<u8>,
    out: &mut [bool],
) -> io::Result<()> {
    raw.resize(out.len() * 8, 0);
    pagemap.read_exact_at(raw, (addr / PAGE) as u64 * 8)?;
    for (o, e) in out.iter_mut().zip(raw.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(e);
        *o = u64::from_ne_bytes(b) & PM_PRESENT_OR_SWAPPED != 0;
    }
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    // OR-folding 64-byte blocks vectorizes; `any` over bytes does not.
    page.chunks(64)
        .all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

/// What [`write_sparse`] wrote.
#[derive(Debug)]
pub struct SparseWrite {
    /// Bytes of data written (the rest of the file is holes).
    pub written: u64,
    /// Checksum of each chunk as the file reads back.
    pub digest: MemoryDigest,
}

/// Writes guest memory to `file` as a sparse file of the full guest size,
/// with a CRC-32 per `chunk_bytes` chunk. Only populated, non-zero pages are
/// written; holes read back as zeros. Populated means, from pagemap: in RAM
/// or in swap (mincore would miss swapped-out pages). A page neither is:
/// - in anonymous memory, one never touched: zero;
/// - in a private mapping of a snapshot's memory file (a restored guest),
///   the file's content: it is looked at when the file holds data there,
///   and is zero over the file's holes.
pub fn write_sparse(mem: &GuestMemory, file: &File, chunk_bytes: u64) -> io::Result<SparseWrite> {
    let region = region(mem).map_err(io::Error::other)?;
    let bytes = region_slice(region);
    let len = bytes.len() as u64;
    // Data extents of the file behind the mapping, relative to the mapping.
    let backing = match region.file_offset() {
        Some(fo) => Some(
            data_extents(fo.file(), fo.start() + len)?
                .into_iter()
                .filter(|&(_, e)| e > fo.start())
                .map(|(s, e)| (s.saturating_sub(fo.start()), e - fo.start()))
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let pagemap = File::open("/proc/self/pagemap")?;
    file.set_len(len)?;
    let zero = ZeroCrc::new(chunk_bytes);
    let chunks = len.div_ceil(chunk_bytes) as usize;
    let mut digest = MemoryDigest {
        chunk_bytes,
        crcs: Vec::with_capacity(chunks),
    };
    let mut written = 0u64;
    let mut raw = Vec::new();
    let mut keep = Vec::new();
    let mut cursor = 0usize;
    for chunk in 0..chunks {
        let start = chunk as u64 * chunk_bytes;
        let end = (start + chunk_bytes).min(len);
        let (first, npages) = ((start as usize) / PAGE, (end - start) as usize / PAGE);
        keep.resize(npages, false);
        populated(
            &pagemap,
            bytes.as_ptr() as usize + first * PAGE,
            &mut raw,
            &mut keep,
        )?;
        for (i, k) in keep.iter_mut().enumerate() {
            let off = ((first + i) * PAGE) as u64;
            if let (false, Some(ext)) = (*k, &backing) {
                while cursor < ext.len() && ext[cursor].1 <= off {
                    cursor += 1;
                }
                *k = cursor < ext.len() && ext[cursor].0 <= off;
            }
            *k = *k && !is_zero(&bytes[off as usize..off as usize + PAGE]);
        }
        if !keep.iter().any(|&k| k) {
            digest.crcs.push(zero.get((end - start) as usize));
            continue;
        }
        let mut h = crc32fast::Hasher::new();
        let mut run: Option<usize> = None;
        // One more step past the end closes the last run.
        for (p, k) in keep.iter().copied().chain([false]).enumerate() {
            if p < npages {
                let off = (first + p) * PAGE;
                if k {
                    h.update(&bytes[off..off + PAGE]);
                } else {
                    hash_zeros(&mut h, PAGE);
                }
            }
            match (k, run) {
                (true, None) => run = Some(p),
                (false, Some(s)) => {
                    let (a, b) = ((first + s) * PAGE, (first + p) * PAGE);
                    file.write_all_at(&bytes[a..b], a as u64)?;
                    written += (b - a) as u64;
                    run = None;
                }
                _ => {}
            }
        }
        digest.crcs.push(h.finalize());
    }
    Ok(SparseWrite { written, digest })
}

/// Drops pages `first..first + count` of anonymous guest memory
/// (`MADV_DONTNEED`): they read as zero, or fault to a userfaultfd that
/// registers the range, on their next touch.
pub fn discard(mem: &GuestMemory, first: u64, count: u64) -> io::Result<()> {
    let r = region(mem).map_err(io::Error::other)?;
    if r.file_offset().is_some() {
        return Err(io::Error::other(
            "file-backed guest memory cannot be discarded",
        ));
    }
    let pages = r.len() / PAGE as u64;
    let end = first
        .checked_add(count)
        .filter(|e| *e <= pages)
        .ok_or_else(|| io::Error::other(format!("pages {first}+{count} outside {pages}")))?;
    if count == 0 {
        return Ok(());
    }
    let addr = r.as_ptr() as usize + (first as usize) * PAGE;
    let len = ((end - first) as usize) * PAGE;
    // SAFETY: `addr..addr + len` lies inside the region's private anonymous
    // mapping (checked above), which lives as long as `mem`; dropping pages
    // of it only makes them read as zero (or fault to a registered
    // userfaultfd), it never invalidates the mapping.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of guest memory currently resident (touched) in this process.
pub fn resident_bytes(mem: &GuestMemory) -> io::Result<u64> {
    let r = resident_pages(region_slice(region(mem).map_err(io::Error::other)?))?;
    Ok(r.iter().filter(|b| **b & 1 == 1).count() as u64 * PAGE as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::integrity::{load_eager, verify_file, CHUNK_BYTES};
    use std::sync::atomic::AtomicBool;
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
        let w = write_sparse(&mem, &f, CHUNK_BYTES).unwrap();
        assert_eq!(w.written, 2 * 4096);
        assert_eq!(w.digest.chunks(), 8);
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

        // Checked eager load, then the same file with one byte changed.
        let checked = load_eager(&path, &w.digest, 16 << 20).unwrap();
        checked
            .read_slice(&mut tail, GuestAddress(0xfff000))
            .unwrap();
        assert_eq!(tail, [9u8; 3]);
        let stop = AtomicBool::new(false);
        verify_file(
            &path,
            &File::open(&path).unwrap(),
            &w.digest,
            16 << 20,
            &stop,
        )
        .unwrap();
        let bad = dir.path().join("bad");
        std::fs::copy(&path, &bad).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&bad).unwrap();
        f.write_all_at(&[0xee], 0xfff001).unwrap();
        drop(f);
        let err = load_eager(&bad, &w.digest, 16 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                MemoryError::Integrity(IntegrityError::Mismatch { chunk: 7, .. })
            ),
            "{err}"
        );
        let err = verify_file(&bad, &File::open(&bad).unwrap(), &w.digest, 16 << 20, &stop);
        assert!(matches!(
            err,
            Err(IntegrityError::Mismatch { chunk: 7, .. })
        ));
    }

    /// A restored (file-backed) guest snapshotted again: pages it never
    /// touched are the old file's content, not zeros.
    #[test]
    fn file_backed_guest_snapshots_its_file_content() {
        let mem = anonymous(8 << 20).unwrap();
        mem.write_slice(&[3u8; 4096], GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[4u8; 4096], GuestAddress(0x700000))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        write_sparse(&mem, &File::create(&first).unwrap(), 1 << 16).unwrap();
        let restored = from_file(&first, 8 << 20).unwrap();
        // Touch one page only; 0x700000 stays untouched (not present).
        restored
            .write_slice(&[5u8; 2], GuestAddress(0x3000))
            .unwrap();
        let second = dir.path().join("second");
        let w = write_sparse(&restored, &File::create(&second).unwrap(), 1 << 16).unwrap();
        assert_eq!(w.written, 2 * 4096);
        let back = load_eager(&second, &w.digest, 8 << 20).unwrap();
        let mut b = [0u8; 3];
        back.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!(b, [5, 5, 3]);
        back.read_slice(&mut b, GuestAddress(0x700000)).unwrap();
        assert_eq!(b, [4, 4, 4]);
    }
}
