//! What the cluster benches (`snowflock`, `migrate`) share: their own local
//! cluster of forkd daemons ([`cluster`]), a host's API ([`api`]), QEMU
//! running the zone guest and QMP ([`qemu`]), the SVG figures' common
//! parts ([`plot`]), finding
//! the forkd binary, the machine's load, and reading saved JSON lines back.

pub mod api;
pub mod cluster;
pub mod plot;
pub mod qemu;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// `arg`, or `forkd` next to this binary; an error if it is no file.
pub fn forkd_bin(arg: Option<PathBuf>) -> Result<PathBuf> {
    let p = match arg {
        Some(p) => p,
        None => std::env::current_exe()
            .context("cannot find this binary")?
            .parent()
            .context("this binary has no directory")?
            .join("forkd"),
    };
    if !p.is_file() {
        bail!(
            "no forkd binary at {}: build it (cargo build --release -p forkd) or pass --forkd-bin",
            p.display()
        );
    }
    Ok(p)
}

/// The machine's 1-minute load average (/proc/loadavg).
pub fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every line starting with `{` of these files, as a `what` record
/// (earlier `--json` output).
pub fn read_jsonl<T: DeserializeOwned>(files: &[PathBuf], what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    for f in files {
        v.extend(read_one(f, what)?);
    }
    Ok(v)
}

fn read_one<T: DeserializeOwned>(f: &Path, what: &str) -> Result<Vec<T>> {
    let text =
        std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with('{'))
        .map(|(n, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a {what} record", f.display(), n + 1))
        })
        .collect()
}

/// Makes `/dev/kvm`'s absence a clear error.
pub fn need_kvm(bench: &str) -> Result<()> {
    if !Path::new("/dev/kvm").exists() {
        bail!("/dev/kvm is missing: the {bench} bench needs KVM");
    }
    Ok(())
}
