//! Integrity of a snapshot's memory file: a CRC-32 per chunk of guest
//! memory (the [`MemoryDigest`], kept in the state file), computed while
//! the memory file is written and checked on restore.
//!
//! - Eager restore checks each chunk right after copying it into guest
//!   memory (the bytes are still in cache) and fails the restore naming the
//!   first damaged chunk.
//! - Lazy restore starts the guest at once and checks the file in a
//!   low-priority background thread ([`Verifier`]) that reads it with
//!   `pread` (never through the guest's mapping, whose pages the guest may
//!   have changed). A mismatch stops the VM with a clear error; a guest that
//!   ends before the check is done has its exit held until the check ends,
//!   so a damaged file never yields a successful run, and a snapshot of such
//!   a VM is refused.
//!
//! Holes (chunks the file holds no data for) have the known checksum of a
//! chunk of zeros, so they cost nothing to check.

pub use crate::vmm::digest::{
    data_extents, hash_zeros, zero_crc, IntegrityError, MemoryDigest, ZeroCrc, CHUNK_BYTES,
};
use crate::vmm::memory::{self, GuestMemory, MemoryError};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Read-and-hash step on restore.
const STEP: u64 = 128 << 10;

/// Reads chunk `[start, end)` of `file` into `buf` (chunk-relative; only
/// the data extents are read, `buf` is left as is over holes) and returns
/// its checksum, holes counted as zeros. `cursor` walks `extents` across
/// calls made in increasing chunk order.
fn read_chunk(
    file: &File,
    extents: &[(u64, u64)],
    cursor: &mut usize,
    (start, end): (u64, u64),
    buf: &mut [u8],
    zero: &ZeroCrc,
) -> io::Result<u32> {
    while *cursor < extents.len() && extents[*cursor].1 <= start {
        *cursor += 1;
    }
    let mut h = crc32fast::Hasher::new();
    let mut pos = start;
    let mut any = false;
    let mut i = *cursor;
    while i < extents.len() && extents[i].0 < end {
        let (ds, de) = (extents[i].0.max(start), extents[i].1.min(end));
        hash_zeros(&mut h, (ds - pos) as usize);
        // Read and hash in cache-sized steps: the CRC then runs on bytes
        // still in L2, whatever the chunk size.
        let mut at = ds;
        while at < de {
            let step = (de - at).min(STEP);
            let piece = &mut buf[(at - start) as usize..(at - start + step) as usize];
            file.read_exact_at(piece, at)?;
            h.update(piece);
            at += step;
        }
        any = true;
        pos = de;
        if extents[i].1 > end {
            break; // the extent goes on into the next chunk
        }
        i += 1;
    }
    if !any {
        return Ok(zero.get((end - start) as usize));
    }
    hash_zeros(&mut h, (end - pos) as usize);
    Ok(h.finalize())
}

/// Fresh anonymous guest memory loaded with `path`, chunk by chunk, each
/// chunk checked against `digest` right after it is copied.
pub fn load_eager(
    path: &Path,
    digest: &MemoryDigest,
    mem_bytes: u64,
) -> Result<GuestMemory, MemoryError> {
    digest.check_shape(mem_bytes)?;
    let file = memory::open_sized(path, mem_bytes)?;
    let mem = memory::anonymous(mem_bytes)?;
    let region = mem.iter().next().ok_or(MemoryError::NoRegion)?;
    // SAFETY: the region is a fresh private mapping of `mem_bytes` bytes
    // owned by `mem`; no vCPU runs on it yet, so we are its only user.
    let dst = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), region.len() as usize) };
    let read_err = |source| IntegrityError::Read {
        path: path.to_path_buf(),
        source,
    };
    let extents = data_extents(&file, mem_bytes).map_err(read_err)?;
    let zero = ZeroCrc::new(digest.chunk_bytes);
    let mut cursor = 0;
    for (chunk, &expected) in digest.crcs.iter().enumerate() {
        let (start, end) = digest.range(chunk, mem_bytes);
        let buf = &mut dst[start as usize..end as usize];
        let actual =
            read_chunk(&file, &extents, &mut cursor, (start, end), buf, &zero).map_err(read_err)?;
        check(path, chunk, (start, end), expected, actual)?;
    }
    Ok(mem)
}

fn check(
    path: &Path,
    chunk: usize,
    (start, end): (u64, u64),
    expected: u32,
    actual: u32,
) -> Result<(), IntegrityError> {
    if expected == actual {
        Ok(())
    } else {
        Err(IntegrityError::Mismatch {
            path: path.to_path_buf(),
            chunk,
            start,
            end,
            expected,
            actual,
        })
    }
}

/// Checks the whole of `file` against `digest` (through a chunk-sized
/// buffer); stops early, returning `Ok`, when `stop` is set.
pub fn verify_file(
    path: &Path,
    file: &File,
    digest: &MemoryDigest,
    mem_bytes: u64,
    stop: &AtomicBool,
) -> Result<(), IntegrityError> {
    let read_err = |source| IntegrityError::Read {
        path: path.to_path_buf(),
        source,
    };
    let extents = data_extents(file, mem_bytes).map_err(read_err)?;
    let zero = ZeroCrc::new(digest.chunk_bytes);
    let mut buf = vec![0u8; digest.chunk_bytes as usize];
    let mut cursor = 0;
    for (chunk, &expected) in digest.crcs.iter().enumerate() {
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let (start, end) = digest.range(chunk, mem_bytes);
        let buf = &mut buf[..(end - start) as usize];
        let actual =
            read_chunk(file, &extents, &mut cursor, (start, end), buf, &zero).map_err(read_err)?;
        check(path, chunk, (start, end), expected, actual)?;
    }
    Ok(())
}

#[derive(Default)]
struct VerifierState {
    stop: AtomicBool,
    failure: Mutex<Option<Arc<IntegrityError>>>,
}

/// The background check of a lazily restored VM's memory file.
pub struct Verifier {
    shared: Arc<VerifierState>,
    thread: Option<JoinHandle<()>>,
}

impl Verifier {
    /// Starts checking `path` (already open as `file`) against `digest`.
    pub fn spawn(
        path: &Path,
        file: File,
        digest: MemoryDigest,
        mem_bytes: u64,
    ) -> Result<Verifier, IntegrityError> {
        digest.check_shape(mem_bytes)?;
        let shared = Arc::new(VerifierState::default());
        let s = shared.clone();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("mem-verify".into())
            .spawn(move || {
                // Yield the CPU to the vCPUs: nice 10 for this thread only.
                // SAFETY: plain syscalls on this thread's own id; no memory.
                unsafe {
                    let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                    libc::setpriority(libc::PRIO_PROCESS, tid, 10);
                }
                if let Err(e) = verify_file(&path, &file, &digest, mem_bytes, &s.stop) {
                    *s.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(e));
                }
            })
            .map_err(IntegrityError::Spawn)?;
        Ok(Verifier {
            shared,
            thread: Some(thread),
        })
    }

    /// The mismatch (or read error) found so far, if any; does not block.
    pub fn failure(&self) -> Option<Arc<IntegrityError>> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for the check to end; its result.
    pub fn finish(&mut self) -> Result<(), Arc<IntegrityError>> {
        if let Some(t) = self.thread.take() {
            // The thread does not panic; a panic would leave no failure.
            let _ = t.join();
        }
        self.failure().map_or(Ok(()), Err)
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Restore-time guest memory from `path`: eager (copied and checked) or
/// lazy (mapped, with a background [`Verifier`]).
pub fn restore_memory(
    path: &Path,
    digest: &MemoryDigest,
    mem_bytes: u64,
    eager: bool,
) -> Result<(GuestMemory, Option<Verifier>), MemoryError> {
    digest.check_shape(mem_bytes)?;
    if eager {
        let mem = load_eager(path, digest, mem_bytes)?;
        return Ok((mem, None));
    }
    let mem = memory::from_file(path, mem_bytes)?;
    let file = File::open(path).map_err(|source| MemoryError::File {
        path: path.display().to_string(),
        source,
    })?;
    let verifier = Verifier::spawn(path, file, digest.clone(), mem_bytes)?;
    Ok((mem, Some(verifier)))
}

/// Once the guest has ended: waits for the background check (if any) and
/// returns its failure, which then replaces the guest's own ending.
pub fn failed_at_end(verifier: &mut Option<Verifier>) -> Option<String> {
    match verifier.as_mut().map(Verifier::finish) {
        Some(Err(e)) => Some(failure_text(&e)),
        _ => None,
    }
}

/// The failure found so far by the background check, as exit text.
pub fn failed(verifier: &Option<Verifier>) -> Option<String> {
    verifier.as_ref()?.failure().map(|e| failure_text(&e))
}

/// Refuses to go on (e.g. snapshot) with memory from a damaged file;
/// waits for the check to end.
pub fn ensure_verified(verifier: &mut Option<Verifier>) -> Result<(), MemoryError> {
    match verifier.as_mut().map(Verifier::finish) {
        Some(Err(e)) => Err(MemoryError::Unverified(e)),
        _ => Ok(()),
    }
}

/// An error and its causes on one line.
fn failure_text(e: &IntegrityError) -> String {
    let mut s = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_chunks_have_the_known_checksum() {
        let mut h = crc32fast::Hasher::new();
        h.update(&vec![0u8; 3 << 20]);
        assert_eq!(zero_crc(3 << 20), h.finalize());
        let z = ZeroCrc::new(1 << 20);
        assert_eq!(z.get(1 << 20), zero_crc(1 << 20));
        assert_eq!(z.get(4096), zero_crc(4096));
    }

    #[test]
    fn table_shape_is_checked() {
        let d = MemoryDigest {
            chunk_bytes: 2 << 20,
            crcs: vec![0; 4],
        };
        assert!(d.check_shape(8 << 20).is_ok());
        assert!(d.check_shape(7 << 20).is_ok());
        assert!(d.check_shape(16 << 20).is_err());
        let odd = MemoryDigest {
            chunk_bytes: 3000,
            crcs: vec![0; 4],
        };
        assert!(odd.check_shape(12000).is_err());
    }
}
