//! Helpers shared by the end-to-end tests: KVM check, booting the zone
//! guest through the library and the `forkd` binary, and QEMU as an
//! independent oracle for the same ELF and cmdline.

use forkd::vmm::{Vm, VmConfig, VmExit};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(120);

/// Fails the test (never skips it) when KVM is missing.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("these tests need /dev/kvm (KVM) and it cannot be opened: {e}");
    }
}

pub fn guest() -> PathBuf {
    let g = forkd::guest::default_guest();
    assert!(g.is_file(), "zone guest ELF missing at {}", g.display());
    g
}

/// The `forkd` binary of this build (target/<profile>/forkd).
pub fn forkd_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = dir.join("forkd");
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p forkd; scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn config(cmdline: &str, mem_mib: u64) -> VmConfig {
    VmConfig {
        guest: guest(),
        mem_mib,
        vcpus: 1,
        cmdline: cmdline.to_string(),
        echo: false,
        name: None,
    }
}

pub fn boot(cmdline: &str, mem_mib: u64) -> Vm {
    require_kvm();
    Vm::boot(&config(cmdline, mem_mib)).expect("boot the zone guest")
}

/// The guest's final `zone: done ...` line.
pub fn done_line(lines: &[String]) -> String {
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("zone: done"))
        .cloned()
        .unwrap_or_else(|| panic!("no 'zone: done' line in console output: {lines:?}"))
}

/// Waits for a VM to end successfully and returns its `zone: done` line.
pub fn finish(vm: &mut Vm) -> String {
    let exit = vm.wait(Some(WAIT)).expect("guest finishes in time");
    let lines = vm.console().lines();
    assert_eq!(exit, VmExit::Guest(0), "guest failed; console: {lines:?}");
    done_line(&lines)
}

/// Boots `cmdline` and runs it to the end, uninterrupted.
pub fn straight_run(cmdline: &str, mem_mib: u64) -> String {
    let mut vm = boot(cmdline, mem_mib);
    finish(&mut vm)
}

/// Runs a command with a time limit; kills it and fails the test if the
/// limit passes.
pub fn run_with_timeout(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait on child") {
            break s;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Runs `forkd ARGS...`.
pub fn forkd(args: &[&str]) -> Output {
    require_kvm();
    run_with_timeout(Command::new(forkd_bin()).args(args), WAIT)
}

pub fn stdout_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `zone: done` line QEMU prints for the same guest and cmdline.
pub fn qemu_done_line(cmdline: &str, mem_mib: u64) -> String {
    let qemu = "qemu-system-x86_64";
    let found = Command::new(qemu)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{qemu} is not installed; the test command installs it (apt-get install qemu-system-x86)"
    );
    let g = guest();
    let out = run_with_timeout(
        Command::new(qemu).args([
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host,-arch-capabilities",
            "-m",
            &mem_mib.to_string(),
            "-nographic",
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4",
            "-kernel",
            &g.display().to_string(),
            "-append",
            cmdline,
        ]),
        WAIT,
    );
    // isa-debug-exit: status 0 from the guest is process status 1.
    assert_eq!(
        out.status.code(),
        Some(1),
        "QEMU run failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    done_line(&stdout_lines(&out))
}
