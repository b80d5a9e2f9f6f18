//! The zone guest. Everything lives in `guest-agent` (boot, console,
//! hypercalls, allocator, zone workload); this crate only links it at the
//! PVH load address.
#![no_std]
#![no_main]

extern crate guest_agent;
