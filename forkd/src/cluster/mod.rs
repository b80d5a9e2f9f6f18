//! Several hosts. Today: a local cluster on one machine (`forkd cluster
//! up|status|down`): N hosts `h1..hN`, each a network namespace with a veth
//! into a bridge (itself in a namespace of its own) and its own
//! `forkd serve`, whose API listens on a Unix socket and on TCP at the
//! host's address with a bearer token. On a LAN the same daemons run on
//! real hosts.
//!
//! This layer sits above `api` and `vmm` (neither imports it):
//! - `state`: names, addresses and the state file;
//! - `netns`: `ip` commands, with errors that name the command;
//! - `process`: the daemons seen through `/proc`, and stopping them;
//! - `status`: what exists and runs;
//! - `local`: `up` and `down`.

pub mod local;
pub mod netns;
pub mod process;
pub mod state;
pub mod status;
