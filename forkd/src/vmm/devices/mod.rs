//! The VM's devices, all on port I/O: the COM1 console, the hypercall
//! doorbell and the exit port. No interrupts: the zone guest polls nothing
//! and needs none, so no in-kernel irqchip is created for it.

pub mod console;
pub mod hypercall;
pub mod serial;

use crate::vmm::memory::GuestMemory;
use guest_agent::abi::{
    HypercallPage, EXIT_PORT, HYPERCALL_PORT, SERIAL_PORT_BASE, SERIAL_PORT_COUNT,
};
use serde::{Deserialize, Serialize};

pub use console::{Console, ConsoleLog};
pub use hypercall::{GuestInfo, HypercallAction, HypercallDevice, MAX_BITMAP_BYTES};
pub use serial::SerialDevice;

/// What the vCPU loop does after a port write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PioAction {
    Continue,
    /// The guest wrote its exit status to the exit port.
    Exit(u8),
    /// A hypercall for the VM's hypercall service (see
    /// [`HypercallAction::Service`]).
    Service {
        page_gpa: u64,
        page: HypercallPage,
    },
    /// The guest broke the device contract: fail the VM with this reason.
    Fail(String),
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
    pub fn new(memory: GuestMemory, console: Console) -> Self {
        Devices {
            hypercall: HypercallDevice::new(memory, console.clone()),
            serial: SerialDevice::new(console),
            unhandled_pio: 0,
        }
    }

    pub fn restore(memory: GuestMemory, console: Console, state: &DevicesState) -> Self {
        console.restore_partial(&state.console_partial);
        Devices {
            hypercall: HypercallDevice::restore(memory, console.clone(), &state.hypercall),
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
                HypercallAction::Service { page_gpa, page } => {
                    return PioAction::Service { page_gpa, page }
                }
                HypercallAction::Fail(why) => return PioAction::Fail(why),
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
