//! Bad input gives a clear error and a non-zero exit: never a panic, never
//! a hang (every command runs under a time limit).

use std::fs::{self, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Output;
use tests::{forkd, stdout_lines};

const PACED: &str = "ticks=200 seed=5 state_mib=16 tick_us=2000";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Non-zero exit, no panic, and `needle` in stderr.
fn fails_with(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got {o:?}");
    assert!(!err.contains("panicked"), "forkd panicked: {err}");
    assert!(err.contains(needle), "stderr lacks '{needle}': {err}");
}

fn make_snapshot(dir: &Path) {
    let d = dir.to_str().unwrap();
    let out = forkd(&[
        "run",
        "--cmdline",
        PACED,
        "--snapshot-after-ms",
        "100",
        "--snapshot-dir",
        d,
    ]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn missing_snapshot_directory() {
    let out = forkd(&["restore", "/nonexistent/forkd-snapshot"]);
    fails_with(&out, "does not exist");
}

#[test]
fn damaged_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_snapshot(dir.path());
    let state = dir.path().join("vm.state");
    let good = fs::read(&state).unwrap();
    let d = dir.path().to_str().unwrap();

    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x5a;
    fs::write(&state, &bad).unwrap();
    fails_with(&forkd(&["restore", d]), "damaged");

    let mut v = good.clone();
    v[8..12].copy_from_slice(&99u32.to_le_bytes());
    fs::write(&state, &v).unwrap();
    fails_with(&forkd(&["restore", d]), "format version 99");

    fs::write(&state, &good[..good.len() - 7]).unwrap();
    fails_with(&forkd(&["restore", d]), "truncated");

    fs::write(&state, b"hello").unwrap();
    fails_with(&forkd(&["restore", d]), "not a forkd state file");

    fs::write(&state, &good).unwrap();
    let mem = dir.path().join("memory.bin");
    let len = fs::metadata(&mem).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    fails_with(&forkd(&["restore", d]), "the snapshot needs");

    fs::remove_file(&mem).unwrap();
    fails_with(&forkd(&["restore", d]), "memory.bin");
}

/// 256 KiB of pseudo-random bytes (xorshift; no two runs need differ).
fn noise(len: usize, mut x: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

const MODES: [&str; 2] = ["lazy", "eager"];

#[test]
fn corrupted_memory_file_is_refused_lazy_and_eager() {
    let dir = tempfile::tempdir().unwrap();
    make_snapshot(dir.path());
    let d = dir.path().to_str().unwrap();
    let mem = dir.path().join("memory.bin");
    // 4 MiB is inside the zone's state (heap from 2 MiB, 16 MiB of state):
    // data the snapshot wrote, in chunk 2 of 2 MiB.
    let at = 4 << 20;
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&mem)
        .unwrap();
    let mut old = vec![0u8; 256 << 10];
    f.read_exact_at(&mut old, at).unwrap();
    assert!(old.iter().any(|&b| b != 0), "no data at {at:#x}");
    f.write_all_at(&noise(256 << 10, 0x9e37_79b9_7f4a_7c15), at)
        .unwrap();
    drop(f);
    for mode in MODES {
        let out = forkd(&["restore", d, "--memory", mode]);
        fails_with(&out, "is damaged: chunk 2 (bytes 0x400000..0x600000)");
        assert!(
            !stdout_lines(&out)
                .iter()
                .any(|l| l.starts_with("zone: done")),
            "{mode}: a damaged guest finished: {out:?}"
        );
    }
    // Random bytes in a hole (past the state) are damage too.
    let f = OpenOptions::new().write(true).open(&mem).unwrap();
    f.write_all_at(&old, at).unwrap();
    f.write_all_at(&noise(256 << 10, 7), 300 << 20).unwrap();
    drop(f);
    for mode in MODES {
        fails_with(&forkd(&["restore", d, "--memory", mode]), "chunk 150");
    }
}

#[test]
fn truncated_memory_and_corrupted_state_are_refused_lazy_and_eager() {
    let dir = tempfile::tempdir().unwrap();
    make_snapshot(dir.path());
    let d = dir.path().to_str().unwrap();
    let state = dir.path().join("vm.state");
    let good = fs::read(&state).unwrap();
    // A byte of the payload's end: the memory checksum table.
    let mut bad = good.clone();
    let last = bad.len() - 3;
    bad[last] ^= 0x01;
    fs::write(&state, &bad).unwrap();
    for mode in MODES {
        fails_with(&forkd(&["restore", d, "--memory", mode]), "is damaged");
    }
    fs::write(&state, &good).unwrap();
    let mem = dir.path().join("memory.bin");
    let len = fs::metadata(&mem).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(len - 4096)
        .unwrap();
    for mode in MODES {
        fails_with(
            &forkd(&["restore", d, "--memory", mode]),
            "the snapshot needs",
        );
    }
}

#[test]
fn bad_cmdline_key_is_reported_by_the_guest() {
    let out = forkd(&["run", "--cmdline", "ticks=5 bogus=1"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let lines = stdout_lines(&out);
    assert!(
        lines
            .iter()
            .any(|l| l == "zone: error: unknown cmdline key 'bogus'"),
        "{lines:?}"
    );
    let out = forkd(&["run", "--cmdline", "ticks=5 fork_at=9 clones=2"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

/// A little-endian field of `len` bytes at `at` of an ELF image.
fn elf_field(elf: &[u8], at: usize, len: usize) -> usize {
    let mut b = [0u8; 8];
    b[..len].copy_from_slice(&elf[at..at + len]);
    usize::try_from(u64::from_le_bytes(b)).expect("ELF field fits usize")
}

/// The program headers of an ELF64 image: (p_type, p_offset, p_filesz)
/// each, and where the table ends.
fn elf_program_headers(elf: &[u8]) -> (Vec<(usize, usize, usize)>, usize) {
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not an ELF64 image");
    let (phoff, phentsize, phnum) = (
        elf_field(elf, 0x20, 8),
        elf_field(elf, 0x36, 2),
        elf_field(elf, 0x38, 2),
    );
    let phdrs = (0..phnum)
        .map(|i| phoff + i * phentsize)
        .map(|h| {
            let p_type = elf_field(elf, h, 4);
            (p_type, elf_field(elf, h + 8, 8), elf_field(elf, h + 32, 8))
        })
        .collect();
    (phdrs, phoff + phnum * phentsize)
}

#[test]
fn guests_that_are_not_pvh_elves() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("not-an-elf");
    fs::write(&text, "just text\n").unwrap();
    fails_with(
        &forkd(&["run", "--guest", text.to_str().unwrap()]),
        "not a loadable ELF",
    );
    // The zone guest with its PVH note (type XEN_ELFNOTE_PHYS32_ENTRY, 18,
    // owner "Xen") retyped: a valid ELF that loads, but is not PVH.
    let image = fs::read(tests::guest()).unwrap();
    let elf = dir.path().join("no-pvh-note");
    fs::write(&elf, &image).unwrap();
    let mut f = OpenOptions::new().write(true).open(&elf).unwrap();
    let mut retyped = 0;
    const PT_NOTE: usize = 4;
    let notes = elf_program_headers(&image).0.into_iter();
    for (_, offset, filesz) in notes.filter(|&(p_type, ..)| p_type == PT_NOTE) {
        let mut note = offset;
        while note + 12 <= offset + filesz {
            let (namesz, descsz) = (elf_field(&image, note, 4), elf_field(&image, note + 4, 4));
            if elf_field(&image, note + 8, 4) == 18 && image[note + 12..].starts_with(b"Xen\0") {
                f.seek(SeekFrom::Start(note as u64 + 8)).unwrap();
                f.write_all(&0x7fff_u32.to_le_bytes()).unwrap();
                retyped += 1;
            }
            note += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    drop(f);
    assert_eq!(retyped, 1, "the zone guest should have one PVH note");
    let path = elf.to_str().unwrap();
    fails_with(
        &forkd(&["run", "--guest", path]),
        &format!("guest {path} is not a PVH ELF (no XEN_ELFNOTE_PHYS32_ENTRY note)"),
    );
    fails_with(
        &forkd(&["run", "--guest", "/nonexistent/guest"]),
        "cannot open guest ELF",
    );
}

#[test]
fn truncated_guest_elf() {
    // The zone guest cut after its program headers: the headers parse, the
    // first PT_LOAD's bytes are missing.
    let image = fs::read(tests::guest()).unwrap();
    let headers_end = elf_program_headers(&image).1;
    assert!(image.len() > headers_end, "zone guest is only headers");
    let dir = tempfile::tempdir().unwrap();
    let elf = dir.path().join("truncated-elf");
    fs::write(&elf, &image[..headers_end]).unwrap();
    let path = elf.to_str().unwrap();
    fails_with(
        &forkd(&["run", "--guest", path]),
        // linux-loader prefixes both its error layers with "Kernel Loader".
        &format!(
            "guest {path} is not a loadable ELF: Kernel Loader: failed to load \
             ELF kernel image: Kernel Loader: Unable to read kernel image"
        ),
    );
}

#[test]
fn bad_machine_sizes() {
    fails_with(&forkd(&["run", "--mem", "4"]), "out of range");
    fails_with(&forkd(&["run", "--mem", "999999"]), "out of range");
    fails_with(&forkd(&["run", "--vcpus", "0"]), "vCPUs");
    fails_with(&forkd(&["run", "--snapshot-after-ms", "5"]), "snapshot-dir");
}

#[test]
fn snapshot_point_after_the_guest_ended() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("s");
    let out = forkd(&[
        "run",
        "--cmdline",
        "ticks=1 state_mib=1",
        "--snapshot-after-ms",
        "3000",
        "--snapshot-dir",
        d.to_str().unwrap(),
    ]);
    fails_with(&out, "before the snapshot point");
    assert!(!d.join("vm.state").exists());
}

#[test]
fn timeout_stops_a_guest_that_runs_too_long() {
    let out = forkd(&[
        "run",
        "--cmdline",
        "ticks=100000 tick_us=1000",
        "--timeout-s",
        "1",
    ]);
    fails_with(&out, "did not finish");
}
