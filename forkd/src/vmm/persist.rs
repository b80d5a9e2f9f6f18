//! Snapshot files. A snapshot directory holds:
//! - `vm.state`: a 24-byte header (magic `FORKDVM\0`, format version u32,
//!   payload length u64, CRC-32 of the payload u32; little endian) and a
//!   bincode payload, [`VmState`];
//! - `memory.bin`: guest memory, a sparse file of the guest's full size.
//!
//! Both are written to temporary names and renamed, memory first, so a
//! directory with a `vm.state` always holds a complete snapshot, and a VM
//! restored from a directory can snapshot into it again safely.

use crate::vmm::cpu_state::VcpuState;
use crate::vmm::devices::DevicesState;
use bincode::Options;
use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "memory.bin";
pub const MAGIC: [u8; 8] = *b"FORKDVM\0";
/// Bumped whenever [`VmState`] changes shape.
pub const FORMAT_VERSION: u32 = 1;
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
    #[error("{path} cannot be decoded: {reason}")]
    Decode { path: PathBuf, reason: String },
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
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, String> {
    let payload = codec().serialize(state).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks a state file's bytes.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<VmState, PersistError> {
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
    codec()
        .deserialize(payload)
        .map_err(|e| PersistError::Decode {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Reads and checks `dir/vm.state`.
pub fn read_state(dir: &Path) -> Result<VmState, PersistError> {
    if !dir.is_dir() {
        return Err(PersistError::NoDirectory(dir.to_path_buf()));
    }
    let path = dir.join(STATE_FILE);
    let len = fs::metadata(&path).map_err(io_err(&path))?.len();
    if len > MAX_PAYLOAD + HEADER_LEN as u64 {
        return Err(PersistError::Decode {
            path,
            reason: format!("{len} bytes is too large for a state file"),
        });
    }
    let bytes = fs::read(&path).map_err(io_err(&path))?;
    decode_state(&path, &bytes)
}

/// Writes `dir/vm.state` through a temporary file; returns its size.
pub fn write_state(dir: &Path, state: &VmState) -> Result<u64, PersistError> {
    let path = dir.join(STATE_FILE);
    let bytes = encode_state(state).map_err(|reason| PersistError::Decode {
        path: path.clone(),
        reason,
    })?;
    let tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(&bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    Ok(bytes.len() as u64)
}

/// Creates the temporary memory file; `commit_memory` renames it.
pub fn create_memory_tmp(dir: &Path) -> Result<(PathBuf, File), PersistError> {
    fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let f = File::create(&tmp).map_err(io_err(&tmp))?;
    Ok((tmp, f))
}

pub fn commit_memory(dir: &Path, tmp: &Path) -> Result<(), PersistError> {
    let path = dir.join(MEMORY_FILE);
    // Any earlier state file describes the old memory: drop it first.
    let state = dir.join(STATE_FILE);
    if state.exists() {
        fs::remove_file(&state).map_err(io_err(&state))?;
    }
    fs::rename(tmp, &path).map_err(io_err(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VmState {
        VmState {
            mem_bytes: 1 << 30,
            guest: "g".into(),
            cmdline: "ticks=1".into(),
            vcpus: vec![],
            irqchip: None,
            clock: None,
            devices: DevicesState::default(),
        }
    }

    #[test]
    fn damaged_state_files_are_refused() {
        let p = Path::new("x");
        let good = encode_state(&sample()).unwrap();
        assert_eq!(decode_state(p, &good).unwrap().mem_bytes, 1 << 30);
        let mut bad = good.clone();
        bad[HEADER_LEN + 1] ^= 0x40;
        assert!(matches!(
            decode_state(p, &bad),
            Err(PersistError::Checksum { .. })
        ));
        let mut v2 = good.clone();
        v2[8] = 2;
        assert!(matches!(
            decode_state(p, &v2),
            Err(PersistError::WrongVersion { found: 2, .. })
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
