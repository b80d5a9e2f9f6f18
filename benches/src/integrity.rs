//! Cost of the memory file's integrity check: a CRC-32 per chunk, computed
//! while the snapshot is written and checked on restore (eager: while
//! copying; lazy: by the background verifier, or up front). Measured on a
//! 1 GiB guest memory whose every page holds data, so each figure is also
//! the cost per GiB; the file is in the page cache (just written).

use crate::stats::{ms, Report};
use anyhow::{Context, Result};
use forkd::vmm::integrity::{self, MemoryDigest};
use forkd::vmm::memory;
use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

const GIB: u64 = 1 << 30;

fn filled_memory() -> Result<memory::GuestMemory> {
    let mem = memory::anonymous(GIB).context("1 GiB of guest memory")?;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for mib in 0..(GIB >> 20) {
        for w in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        mem.write_slice(&buf, GuestAddress(mib << 20))
            .context("fill guest memory")?;
    }
    Ok(mem)
}

fn time<T>(f: impl FnOnce() -> Result<T>) -> Result<(f64, T)> {
    let t = Instant::now();
    let v = f()?;
    Ok((ms(t.elapsed()), v))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Integrity figures for 64 KiB and 2 MiB chunks, `runs` samples each.
pub fn integrity(report: &mut Report, runs: usize) -> Result<()> {
    eprintln!("integrity: 1 GiB of data, chunks of 64 KiB and 2 MiB, {runs} runs");
    let tmp = tempfile::Builder::new()
        .prefix("forkd-bench-integrity")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let mem = filled_memory()?;
    let path = tmp.path().join("memory.bin");
    for (chunk, tag) in [(64u64 << 10, "64 KiB"), (2 << 20, "2 MiB")] {
        let file = File::create(&path).context("memory file")?;
        let (write_ms, w) =
            time(|| memory::write_sparse(&mem, &file, chunk).context("write the memory file"))?;
        drop(file);
        let digest: MemoryDigest = w.digest;
        report.add(
            &format!("sparse write + CRC, {tag} chunks"),
            "ms/GiB",
            &[write_ms],
        );
        let (mut plain, mut checked, mut verify) = (vec![], vec![], vec![]);
        for _ in 0..runs {
            let (t, m) = time(|| memory::from_file_eager(&path, GIB).context("eager load"))?;
            drop(m);
            plain.push(t);
            let (t, m) =
                time(|| integrity::load_eager(&path, &digest, GIB).context("checked eager load"))?;
            drop(m);
            checked.push(t);
            let f = File::open(&path).context("memory file")?;
            let stop = AtomicBool::new(false);
            let (t, ()) =
                time(|| integrity::verify_file(&path, &f, &digest, GIB, &stop).context("verify"))?;
            verify.push(t);
        }
        report.add(&format!("eager load unchecked, {tag}"), "ms/GiB", &plain);
        report.add(&format!("eager load checked, {tag}"), "ms/GiB", &checked);
        let cost = median(&mut checked) - median(&mut plain);
        report.add(&format!("eager check cost, {tag}"), "ms/GiB", &[cost]);
        report.add(
            &format!("lazy verify (pread+CRC), {tag}"),
            "ms/GiB",
            &verify,
        );
    }
    // The CRC alone, on a chunk in cache: what the check adds to a copy
    // that reads the chunk anyway (eager restore, snapshot write).
    for (chunk, tag) in [(64usize << 10, "64 KiB"), (2 << 20, "2 MiB")] {
        let buf: Vec<u8> = (0..chunk).map(|i| (i * 31 % 251) as u8).collect();
        let mut crc = vec![];
        for _ in 0..runs {
            let (t, ()) = time(|| {
                for _ in 0..(GIB as usize / chunk) {
                    std::hint::black_box(crc32fast::hash(std::hint::black_box(&buf)));
                }
                Ok(())
            })?;
            crc.push(t);
        }
        report.add(&format!("CRC-32 of a cached {tag} chunk"), "ms/GiB", &crc);
    }
    Ok(())
}
