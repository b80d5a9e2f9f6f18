//! forkd: the VM fork service's VMM and its command-line front end.

pub mod api;
pub mod cli;
pub mod clients;
pub mod cluster;
pub mod errors;
pub mod fork;
pub mod guest;
pub mod migrate;
pub mod policy;
pub mod sync;
pub mod vmm;
