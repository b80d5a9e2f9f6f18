//! Builds the zone guest (`../zone-guest`) for `x86_64-unknown-none` with a
//! separate cargo invocation (one cargo run builds for one target) into
//! `target/guest`, and tells forkd where the ELF is (`FORKD_GUEST_PATH`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest
        .parent()
        .expect("forkd lives in the workspace")
        .to_path_buf();
    let guest_dir = root.join("zone-guest");
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"))
        .join("guest");
    for p in [
        "zone-guest/src",
        "zone-guest/Cargo.toml",
        "zone-guest/link.ld",
        "zone-guest/build.rs",
        "zone-guest/.cargo/config.toml",
        "guest-agent/src",
        "guest-agent/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(&target_dir);
    // Do not leak the outer build's settings (host flags, jobserver, target)
    // into the guest build.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO_") && k != "CARGO_HOME"
            || k == "RUSTFLAGS"
            || k == "RUSTC_WRAPPER"
            || k == "RUSTC_WORKSPACE_WRAPPER"
            || k.starts_with("RUSTDOC")
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("cannot run cargo for the zone guest");
    if !status.success() {
        panic!(
            "building the zone guest failed; is the x86_64-unknown-none target installed? \
             (rustup target add x86_64-unknown-none)"
        );
    }
    let elf = target_dir.join("x86_64-unknown-none/release/zone-guest");
    println!("cargo:rustc-env=FORKD_GUEST_PATH={}", elf.display());
}
