//! COM1: vm-superio's 16550 model, without an interrupt line (the zone
//! guest writes the transmit register and never waits for interrupts).

use super::console::{Console, ConsoleWriter};
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// The UART's interrupt line goes nowhere.
pub struct NoInterrupt;

impl Trigger for NoInterrupt {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        Ok(())
    }
}

/// The UART registers, as saved in a snapshot.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct SerialDeviceState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

pub struct SerialDevice {
    uart: Serial<NoInterrupt, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    pub fn new(console: Console) -> Self {
        SerialDevice {
            uart: Serial::new(NoInterrupt, ConsoleWriter(console)),
        }
    }

    pub fn restore(console: Console, s: &SerialDeviceState) -> Self {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &state,
            NoInterrupt,
            NoEvents,
            ConsoleWriter(console.clone()),
        )
        // Only an over-full input FIFO is refused; start from reset then.
        .unwrap_or_else(|_| Serial::new(NoInterrupt, ConsoleWriter(console)));
        SerialDevice { uart }
    }

    pub fn save(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    pub fn console(&self) -> &Console {
        &self.uart.writer().0
    }

    pub fn write(&mut self, offset: u8, value: u8) {
        // The only error is the (absent) interrupt trigger failing.
        let _ = self.uart.write(offset, value);
    }

    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }
}
