//! The VMM knows nothing of the layers above it: no file under
//! `forkd/src/vmm` names the fork, API, CLI or cluster modules (they implement the
//! interfaces of `vmm::services` instead).

use std::path::Path;

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn vmm_imports_nothing_from_the_layers_above() {
    let vmm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forkd/src/vmm");
    let mut files = Vec::new();
    rust_files(&vmm, &mut files);
    assert!(files.len() > 5, "found only {files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        for upper in [
            "crate::fork",
            "crate::api",
            "crate::cli",
            "crate::cluster",
            "crate::migrate",
        ] {
            assert!(
                !text.contains(upper),
                "{} imports from {upper}",
                f.display()
            );
        }
    }
}
