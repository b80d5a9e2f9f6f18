//! The memory server of a fork family.
//!
//! - [`source`]: the [`PageSource`] trait clones fault pages from.
//! - [`image`]: a frozen parent image: copy-before-write of the parent's
//!   memory at the fork instant, while the parent runs on.
//! - [`auth`]: family keys (random id, random secret), datagram MACs and
//!   the replay window.
//! - [`wire`]: the versioned UDP wire format (page requests and replies).
//! - [`server`]: the page server, one session per fork family.
//! - [`client`]: a [`PageSource`] that fetches from a server over UDP.
//! - [`mcdist`]: pages by IP multicast: the server's per-family senders
//!   and the per-host receiver with its page cache.

pub mod auth;
pub mod client;
pub mod image;
pub mod mcdist;
pub mod server;
pub mod source;
mod sync;
pub mod wire;

pub use auth::FamilyKey;
pub use source::{PageSource, SourceError, PAGE_SIZE};
