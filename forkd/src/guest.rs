//! The embedded default guest: the zone guest ELF built by this crate's
//! build script (see `build.rs`) for `x86_64-unknown-none`.

use std::path::PathBuf;

/// Absolute path of the zone guest ELF built with this forkd.
pub fn default_guest() -> PathBuf {
    PathBuf::from(env!("FORKD_GUEST_PATH"))
}
