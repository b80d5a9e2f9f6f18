//! Snapshot files. A snapshot directory holds:
//! - `vm.state`: a 24-byte header (magic `FORKDVM\0`, format version u32,
//!   payload length u64, CRC-32 of the payload u32; little endian) and a
//!   bincode payload, [`StateFile`]: the [`VmState`] and (since version 2)
//!   the memory file's checksum table, a CRC-32 per 2 MiB chunk
//!   ([`MemoryDigest`]);
//! - `memory.bin`: guest memory, a sparse file of the guest's full size.
//!
//! Both are written to temporary names, fsynced and renamed, memory first,
//! and the directory is fsynced after each rename, so a directory with a
//! `vm.state` always holds a complete snapshot, also after a crash, and a
//! VM restored from a directory can snapshot into it again safely.

use crate::vmm::cpu_state::VcpuState;
use crate::vmm::devices::DevicesState;
use crate::vmm::integrity::{IntegrityError, MemoryDigest, CHUNK_BYTES};
use crate::vmm::memory::{self, GuestMemory};
use bincode::Options;
use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "memory.bin";
pub const MAGIC: [u8; 8] = *b"FORKDVM\0";
/// Bumped whenever [`StateFile`] changes shape (2: memory checksum table).
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 24;
/// A state file is a few tens of KiB; refuse absurd sizes before reading.
const MAX_PAYLOAD: u64 = 64 << 20;

/// Everything but memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub mem_bytes: u64,
    pub guest: String,
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC, when the VM has an in-kernel irqchip.
    pub irqchip: Option<Vec<kvm_irqchip>>,
    pub clock: Option<kvm_clock_data>,
    pub devices: DevicesState,
}

/// A state file's payload.
#[derive(Debug, Serialize, Deserialize)]
pub struct StateFile {
    pub vm: VmState,
    /// Checksums of `memory.bin`, checked on restore.
    pub memory: MemoryDigest,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("snapshot directory {0} does not exist")]
    NoDirectory(PathBuf),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0} is not a forkd state file (bad magic)")]
    BadMagic(PathBuf),
    #[error("{path} has format version {found}; this forkd reads version {FORMAT_VERSION}")]
    WrongVersion { path: PathBuf, found: u32 },
    #[error("{path} is truncated: header says {expected} payload bytes, file has {actual}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} is damaged: checksum {actual:#010x}, header says {expected:#010x}")]
    Checksum {
        path: PathBuf,
        expected: u32,
        actual: u32,
    },
    #[error("{path} cannot be decoded")]
    Decode {
        path: PathBuf,
        #[source]
        source: bincode::Error,
    },
    #[error("{path}: {len} bytes is too large for a state file")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("the VM state cannot be encoded")]
    Encode(#[source] bincode::Error),
    #[error("{path} does not describe its memory file")]
    Table {
        path: PathBuf,
        #[source]
        source: IntegrityError,
    },
    #[error("cannot write guest memory to {path}")]
    WriteMemory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new().with_limit(MAX_PAYLOAD)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PersistError + '_ {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Encodes a state file (header + payload).
pub fn encode_state(state: &StateFile) -> Result<Vec<u8>, PersistError> {
    let payload = codec().serialize(state).map_err(PersistError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks a state file's bytes.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<StateFile, PersistError> {
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err(PersistError::BadMagic(path.to_path_buf()));
    }
    let u32_at =
        |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return Err(PersistError::WrongVersion {
            path: path.to_path_buf(),
            found: version,
        });
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let expected = u64::from_le_bytes(len);
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != expected {
        return Err(PersistError::Truncated {
            path: path.to_path_buf(),
            expected,
            actual: payload.len() as u64,
        });
    }
    let crc = crc32fast::hash(payload);
    if crc != u32_at(20) {
        return Err(PersistError::Checksum {
            path: path.to_path_buf(),
            expected: u32_at(20),
            actual: crc,
        });
    }
    let state: StateFile = codec()
        .deserialize(payload)
        .map_err(|source| PersistError::Decode {
            path: path.to_path_buf(),
            source,
        })?;
    state
        .memory
        .check_shape(state.vm.mem_bytes)
        .map_err(|source| PersistError::Table {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(state)
}

/// Reads and checks `dir/vm.state`.
pub fn read_state(dir: &Path) -> Result<StateFile, PersistError> {
    if !dir.is_dir() {
        return Err(PersistError::NoDirectory(dir.to_path_buf()));
    }
    let path = dir.join(STATE_FILE);
    let len = fs::metadata(&path).map_err(io_err(&path))?.len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(PersistError::TooLarge { path, len });
    }
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    decode_state(&path, &bytes)
}

/// Makes the directory's entries (renames, removals) durable.
fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `dir/vm.state` through a temporary file (fsynced, renamed, the
/// directory fsynced); returns its size.
pub fn write_state(dir: &Path, state: &StateFile) -> Result<u64, PersistError> {
    let path = dir.join(STATE_FILE);
    let bytes = encode_state(state)?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(bytes.len() as u64)
}

/// Creates the temporary memory file; `commit_memory` renames it.
pub fn create_memory_tmp(dir: &Path) -> Result<(PathBuf, File), PersistError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let f = File::create(&tmp).map_err(io_err(&tmp))?;
    Ok((tmp, f))
}

/// Renames the (already fsynced) temporary memory file into place, after
/// removing any earlier state file, which describes the old memory.
pub fn commit_memory(dir: &Path, tmp: &Path) -> Result<(), PersistError> {
    let path = dir.join(MEMORY_FILE);
    let state = dir.join(STATE_FILE);
    if state.exists() {
        fs::remove_file(&state).map_err(io_err(&state))?;
        // The removal must be on disk before the new memory file is.
        sync_dir(dir)?;
    }
    fs::rename(tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

/// What [`write_snapshot`] wrote.
#[derive(Debug, Clone, Copy)]
pub struct Written {
    pub state_bytes: u64,
    pub memory_bytes: u64,
}

/// Writes a whole snapshot of a paused VM into `dir` (created if needed):
/// the memory file with its checksum table, then the state file.
pub fn write_snapshot(dir: &Path, mem: &GuestMemory, vm: VmState) -> Result<Written, PersistError> {
    let (tmp, file) = create_memory_tmp(dir)?;
    let write_err = |source| PersistError::WriteMemory {
        path: tmp.clone(),
        source,
    };
    let w = memory::write_sparse(mem, &file, CHUNK_BYTES).map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    drop(file);
    commit_memory(dir, &tmp)?;
    let state_bytes = write_state(
        dir,
        &StateFile {
            vm,
            memory: w.digest,
        },
    )?;
    Ok(Written {
        state_bytes,
        memory_bytes: w.written,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        StateFile {
            vm: VmState {
                mem_bytes: 1 << 30,
                guest: "g".into(),
                cmdline: "ticks=1".into(),
                vcpus: vec![],
                irqchip: None,
                clock: None,
                devices: DevicesState::default(),
            },
            memory: MemoryDigest {
                chunk_bytes: CHUNK_BYTES,
                crcs: vec![0; 512],
            },
        }
    }

    #[test]
    fn damaged_state_files_are_refused() {
        let p = Path::new("x");
        let good = encode_state(&sample()).unwrap();
        assert_eq!(decode_state(p, &good).unwrap().vm.mem_bytes, 1 << 30);
        let mut short = sample();
        short.memory.crcs.pop();
        assert!(matches!(
            decode_state(p, &encode_state(&short).unwrap()),
            Err(PersistError::Table { .. })
        ));
        let mut bad = good.clone();
        bad[HEADER_LEN + 1] ^= 0x40;
        assert!(matches!(
            decode_state(p, &bad),
            Err(PersistError::Checksum { .. })
        ));
        let mut v2 = good.clone();
        v2[8] = 1;
        assert!(matches!(
            decode_state(p, &v2),
            Err(PersistError::WrongVersion { found: 1, .. })
        ));
        assert!(matches!(
            decode_state(p, &good[..good.len() - 1]),
            Err(PersistError::Truncated { .. })
        ));
        assert!(matches!(
            decode_state(p, b"junk"),
            Err(PersistError::BadMagic(_))
        ));
        assert!(matches!(
            read_state(Path::new("/nonexistent/forkd")),
            Err(PersistError::NoDirectory(_))
        ));
    }
}
