//! COM1: `vm-superio`'s 16550 model on port 0x3f8, raising IRQ 4 through an irqfd.

use std::sync::Arc;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{BusDevice, IoAction};
use crate::devices::console::{Console, ConsoleWriter};

/// The legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of UART registers (the port range length).
pub const COM1_PORT_COUNT: u64 = 8;

/// Raises the serial interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, console: Arc<Console>) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), ConsoleWriter(console)),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(first), Ok(reg)) = (data.first_mut(), u8::try_from(offset)) {
            *first = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if let (Some(&value), Ok(reg)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.uart.write(reg, value) {
                tracing::warn!(error = ?e, "serial: cannot raise the interrupt");
            }
        }
        IoAction::None
    }
}
