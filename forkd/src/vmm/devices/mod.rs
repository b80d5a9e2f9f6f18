//! The VM's devices, all on port I/O: the COM1 console, the hypercall
//! doorbell and the exit port. No interrupts: the zone guest polls nothing
//! and needs none, so no in-kernel irqchip is created for it.

pub mod console;
pub mod hypercall;
pub mod serial;

use crate::fork::ForkService;
use crate::vmm::memory::GuestMemory;
use guest_agent::abi::{EXIT_PORT, HYPERCALL_PORT, SERIAL_PORT_BASE, SERIAL_PORT_COUNT};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

pub use console::{Console, ConsoleLog};
pub use hypercall::{GuestInfo, HypercallAction, HypercallDevice};
pub use serial::SerialDevice;

/// What the vCPU loop does after a port write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    /// The guest wrote its exit status to the exit port (or called
    /// `sf_exit` in a clone).
    Exit(u8),
    /// The guest called `sf_clone`.
    Fork {
        page_gpa: u64,
        ticket: u64,
    },
    /// The guest called `sf_join`.
    Join {
        page_gpa: u64,
        ticket: u64,
    },
    /// The guest called `OP_SLEEP` (answered): sleep up to `ns`.
    Sleep {
        ns: u64,
    },
}

/// Device state that goes into a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DevicesState {
    pub serial: serial::SerialDeviceState,
    pub hypercall: hypercall::HypercallState,
    /// Console bytes of a line the guest had not finished at the snapshot.
    pub console_partial: Vec<u8>,
}

pub struct Devices {
    pub serial: SerialDevice,
    pub hypercall: HypercallDevice,
    /// Port I/O to ports nobody owns (reads see all ones, writes vanish).
    pub unhandled_pio: u64,
}

impl Devices {
    pub fn new(memory: GuestMemory, console: Console, fork: Option<Arc<dyn ForkService>>) -> Self {
        Devices {
            hypercall: HypercallDevice::new(memory, console.clone(), fork),
            serial: SerialDevice::new(console),
            unhandled_pio: 0,
        }
    }

    pub fn restore(
        memory: GuestMemory,
        console: Console,
        state: &DevicesState,
        fork: Option<Arc<dyn ForkService>>,
    ) -> Self {
        console.restore_partial(&state.console_partial);
        Devices {
            hypercall: HypercallDevice::restore(memory, console.clone(), &state.hypercall, fork),
            serial: SerialDevice::restore(console, &state.serial),
            unhandled_pio: 0,
        }
    }

    pub fn save(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.save(),
            hypercall: self.hypercall.save(),
            console_partial: self.serial.console().partial(),
        }
    }

    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> PioAction {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_COUNT).contains(&p) => {
                if let Some(&b) = data.first() {
                    self.serial.write((p - SERIAL_PORT_BASE) as u8, b);
                }
            }
            EXIT_PORT => return PioAction::Exit(data.first().copied().unwrap_or(0)),
            HYPERCALL_PORT => match self.hypercall.doorbell(data) {
                HypercallAction::Done => {}
                HypercallAction::Exit(status) => return PioAction::Exit(status),
                HypercallAction::Fork { page_gpa, ticket } => {
                    return PioAction::Fork { page_gpa, ticket }
                }
                HypercallAction::Join { page_gpa, ticket } => {
                    return PioAction::Join { page_gpa, ticket }
                }
                HypercallAction::Sleep { ns } => return PioAction::Sleep { ns },
            },
            _ => self.unhandled_pio += 1,
        }
        PioAction::Continue
    }

    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + SERIAL_PORT_COUNT).contains(&p) => {
                let v = self.serial.read((p - SERIAL_PORT_BASE) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = v;
                }
            }
            _ => {
                self.unhandled_pio += 1;
                data.fill(0xff);
            }
        }
    }
}
