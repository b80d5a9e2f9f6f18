//! In-guest runtime of the zone guest.
//!
//! Built twice: for `x86_64-unknown-none` as the runtime of the `zone-guest`
//! binary (boot code, console, hypercalls, page allocator), and for the host,
//! where the VMM uses [`abi`] and the tests run the pure parts ([`cmdline`],
//! [`palloc`], [`pace`], [`zone`], [`clients`]) directly.
#![cfg_attr(not(test), no_std)]

pub mod abi;
pub mod clients;
pub mod cmdline;
pub mod mix;
pub mod pace;
pub mod palloc;
#[cfg(not(target_os = "none"))]
pub mod reference;
pub mod zone;

#[cfg(all(not(target_os = "none"), not(test)))]
extern crate std;

#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod console;
#[cfg(target_os = "none")]
mod hypercall;
#[cfg(target_os = "none")]
mod io;
#[cfg(target_os = "none")]
mod pvh;
#[cfg(target_os = "none")]
mod rt;
#[cfg(target_os = "none")]
pub mod sf;
