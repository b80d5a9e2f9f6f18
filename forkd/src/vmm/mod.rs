//! The virtual machine monitor: KVM, guest memory, PVH boot, devices, vCPU
//! threads, whole-VM state and its persistence, and the interfaces
//! ([`services`]) through which the fork and migration layers plug in.
//! Nothing here knows of fork or migration.

pub mod boot;
pub mod builder;
pub mod cpu_clock;
pub mod cpu_state;
pub mod devices;
pub mod digest;
pub mod dirty;
pub mod dirty_log_state;
pub mod dirty_window;
pub mod integrity;
pub mod kvm;
pub mod memory;
pub mod page_bitmap;
pub mod persist;
pub mod services;
pub mod shared;
pub mod vcpu;
pub mod vm;

pub use vm::{RestoreMemory, RestoreOptions, SnapshotStats, Vm, VmConfig, VmError, VmExit};
