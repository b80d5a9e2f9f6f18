//! The virtual machine monitor: KVM, guest memory, PVH boot, devices, vCPU
//! threads, whole-VM state and its persistence.

pub mod boot;
pub mod cpu_state;
pub mod devices;
pub mod integrity;
pub mod kvm;
pub mod memory;
pub mod persist;
pub mod vcpu;
pub mod vm;

pub use vm::{RestoreMemory, RestoreOptions, SnapshotStats, Vm, VmConfig, VmError, VmExit};
