//! The checksum table of a snapshot's memory file ([`MemoryDigest`]: a
//! CRC-32 per chunk, holes counted as zeros) and the file facts both the
//! writer (`memory::write_sparse`) and the checker (`integrity`) need.

use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

/// Default chunk: 2 MiB (see BENCHMARKS.md, "restore integrity": the check
/// costs the same per GiB at 64 KiB and 2 MiB, and 2 MiB keeps the table at
/// 2 KiB per GiB of guest and one `pread` per 2 MiB).
pub const CHUNK_BYTES: u64 = 2 << 20;
const MIN_CHUNK: u64 = 4096;
const MAX_CHUNK: u64 = 1 << 30;
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// CRC-32 (crc32fast) of each `chunk_bytes` piece of guest memory as the
/// memory file reads back (holes as zeros); the last chunk may be short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryDigest {
    pub chunk_bytes: u64,
    pub crcs: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error(
        "memory file {path} is damaged: chunk {chunk} (bytes {start:#x}..{end:#x}) has checksum \
         {actual:#010x}, the state file says {expected:#010x}"
    )]
    Mismatch {
        path: PathBuf,
        chunk: usize,
        start: u64,
        end: u64,
        expected: u32,
        actual: u32,
    },
    #[error("cannot read memory file {path} to check it")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the state file's memory checksum table does not fit the guest: {chunks} chunks of \
         {chunk_bytes} bytes for {mem_bytes} bytes of memory"
    )]
    BadTable {
        chunks: usize,
        chunk_bytes: u64,
        mem_bytes: u64,
    },
    #[error("cannot start the memory verifier thread")]
    Spawn(#[source] io::Error),
}

impl MemoryDigest {
    pub fn chunks(&self) -> usize {
        self.crcs.len()
    }

    /// Checks that the table describes `mem_bytes` of memory.
    pub fn check_shape(&self, mem_bytes: u64) -> Result<(), IntegrityError> {
        let ok = self.chunk_bytes.is_power_of_two()
            && (MIN_CHUNK..=MAX_CHUNK).contains(&self.chunk_bytes)
            && self.crcs.len() as u64 == mem_bytes.div_ceil(self.chunk_bytes);
        if ok {
            Ok(())
        } else {
            Err(IntegrityError::BadTable {
                chunks: self.crcs.len(),
                chunk_bytes: self.chunk_bytes,
                mem_bytes,
            })
        }
    }

    pub(crate) fn range(&self, chunk: usize, mem_bytes: u64) -> (u64, u64) {
        let start = chunk as u64 * self.chunk_bytes;
        (start, (start + self.chunk_bytes).min(mem_bytes))
    }
}

/// Feeds `len` zero bytes to `h`.
pub fn hash_zeros(h: &mut crc32fast::Hasher, mut len: usize) {
    while len > 0 {
        let n = len.min(ZEROS.len());
        h.update(&ZEROS[..n]);
        len -= n;
    }
}

/// CRC-32 of `len` zero bytes (the checksum of a hole chunk).
pub fn zero_crc(len: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    hash_zeros(&mut h, len);
    h.finalize()
}

/// Caches the zero checksum of full-size chunks.
pub struct ZeroCrc {
    chunk: usize,
    full: u32,
}

impl ZeroCrc {
    pub fn new(chunk_bytes: u64) -> ZeroCrc {
        ZeroCrc {
            chunk: chunk_bytes as usize,
            full: zero_crc(chunk_bytes as usize),
        }
    }

    pub fn get(&self, len: usize) -> u32 {
        if len == self.chunk {
            self.full
        } else {
            zero_crc(len)
        }
    }
}

/// The data extents of `file` below `limit` (SEEK_DATA/SEEK_HOLE): a
/// filesystem without hole support reports one extent, which is read and
/// checked like any data.
pub fn data_extents(file: &File, limit: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < limit {
        // SAFETY: lseek on a file descriptor `file` owns; no memory involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `pos`
            }
            return Err(e);
        }
        if data as u64 >= limit {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = (hole as u64).min(limit);
        out.push((data as u64, end));
        pos = end as i64;
    }
    Ok(out)
}
