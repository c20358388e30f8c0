//! COM1: `vm-superio`'s 16550 model on port 0x3f8, raising IRQ 4 through an irqfd.
//!
//! Output goes to the VM's console. Input comes from the host ([`SerialDevice::queue_input`],
//! `vm:send` in Lua): the 16550's receive FIFO holds only [`FIFO_SIZE`] bytes, so what
//! does not fit waits in a bounded host-side buffer and moves into the FIFO as the guest
//! drains it (checked on every register read, so a guest polling the line status register
//! sees it). Queuing input wakes idle vCPUs, because the built-in guest polls with
//! interrupts off and sleeps on the idle port between polls.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{BusDevice, IoAction};
use crate::devices::console::{Console, ConsoleWriter};
use crate::snapshot::Persist;

/// The legacy IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of UART registers (the port range length).
pub const COM1_PORT_COUNT: u64 = 8;
/// Depth of the 16550 receive FIFO as `vm-superio` models it.
pub const FIFO_SIZE: usize = 64;
/// Most input bytes that wait on the host for room in the FIFO. Input beyond this is
/// refused whole: a guest that does not read its console cannot make the host buffer
/// without bound.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;

// 16550 register offsets and bits this file needs (the model keeps its own private copies).
const MCR: u8 = 4;
const MCR_LOOP: u8 = 0x10;
const LSR_DATA_READY: u8 = 0x01;
/// Interrupt-enable bits a 16550 has; the model masks every IER write with them.
const IER_VALID: u8 = 0x0f;
/// Interrupt-identification bits the model stores: "none pending", THR empty, data ready.
const IIR_VALID: u8 = 0x07;

/// Wakes idle vCPUs so that a polling guest sees new input now rather than at its next
/// deadline.
pub type InputWaker = Box<dyn Fn() + Send + Sync>;

/// Raises the serial interrupt by signalling an eventfd registered as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Why serial input or a serial state was refused.
#[derive(Debug, Error)]
pub enum SerialError {
    #[error("{len} bytes of serial input do not fit: {room} bytes are free ({queued} sent earlier wait for the guest to read them; at most {MAX_PENDING_INPUT} can wait beyond the {FIFO_SIZE}-byte FIFO); nothing was queued")]
    InputFull {
        len: usize,
        room: usize,
        queued: usize,
    },
    #[error("serial state holds {len} unread FIFO bytes; the FIFO holds at most {FIFO_SIZE}")]
    FifoTooLong { len: usize },
    #[error("serial state holds {len} pending input bytes; at most {MAX_PENDING_INPUT} can wait")]
    PendingTooLong { len: usize },
    #[error("serial state has {register} = {value:#04x}, which the 16550 model never holds (only bits {valid:#04x} exist)")]
    BadRegister {
        register: &'static str,
        value: u8,
        valid: u8,
    },
    #[error("serial state says data is {} but the FIFO holds {fifo} bytes", if *data_ready { "ready" } else { "not ready" })]
    DataReadyMismatch { data_ready: bool, fifo: usize },
    #[error("serial state: cannot rebuild the 16550 model: {0}")]
    Model(String),
}

type Uart = Serial<IrqTrigger, NoEvents, ConsoleWriter>;

pub struct SerialDevice {
    uart: Uart,
    /// Host input that did not fit in the FIFO yet, oldest first.
    pending_input: VecDeque<u8>,
    wake_vcpus: InputWaker,
}

impl SerialDevice {
    pub fn new(irq: EventFd, console: Arc<Console>, wake_vcpus: InputWaker) -> SerialDevice {
        SerialDevice {
            uart: Serial::new(IrqTrigger(irq), ConsoleWriter(console)),
            pending_input: VecDeque::new(),
            wake_vcpus,
        }
    }

    fn in_loop_mode(&mut self) -> bool {
        // Reading MCR has no side effects.
        self.uart.read(MCR) & MCR_LOOP != 0
    }

    /// Bytes queued for the guest that it has not read: the FIFO and the host buffer.
    pub fn queued_input(&self) -> usize {
        (FIFO_SIZE - self.uart.fifo_capacity()) + self.pending_input.len()
    }

    /// How many more input bytes [`SerialDevice::queue_input`] accepts now.
    pub fn input_room(&mut self) -> usize {
        self.refill_fifo();
        // The FIFO takes input only while nothing older waits on the host (order) and
        // the UART is not in loopback mode (the model ignores input then).
        let fifo_room = if self.pending_input.is_empty() && !self.in_loop_mode() {
            self.uart.fifo_capacity()
        } else {
            0
        };
        fifo_room + (MAX_PENDING_INPUT - self.pending_input.len())
    }

    /// Queues `input` for the guest's receiver, all of it or (when it does not fit)
    /// none of it, and wakes idle vCPUs. Bytes reach the FIFO in order; the data-ready
    /// interrupt is raised as the 16550 would.
    pub fn queue_input(&mut self, input: &[u8]) -> Result<(), SerialError> {
        if input.is_empty() {
            return Ok(());
        }
        let room = self.input_room();
        if input.len() > room {
            return Err(SerialError::InputFull {
                len: input.len(),
                room,
                queued: self.queued_input(),
            });
        }
        self.pending_input.extend(input);
        self.refill_fifo();
        (self.wake_vcpus)();
        Ok(())
    }

    /// Moves waiting host input into the FIFO, as much as it has room for.
    fn refill_fifo(&mut self) {
        // In loopback mode the model takes no input: it waits until the guest leaves it.
        while !self.pending_input.is_empty()
            && self.uart.fifo_capacity() > 0
            && !self.in_loop_mode()
        {
            // The ring may have wrapped: one pass per slice.
            let (front, _) = self.pending_input.as_slices();
            let taken = front.len().min(self.uart.fifo_capacity());
            match self.uart.enqueue_raw_bytes(&front[..taken]) {
                Ok(_) => {}
                Err(vm_superio::serial::Error::Trigger(e)) => {
                    // The model queues the bytes before it raises the interrupt, so they
                    // are in the FIFO and a polling guest still sees them.
                    tracing::warn!(error = %e, "serial: cannot raise the input interrupt");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "serial: cannot queue input");
                    return;
                }
            }
            self.pending_input.drain(..taken);
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Every read (line status or receive buffer, typically) first tops the FIFO up,
        // so the guest sees waiting input as soon as it has room for it.
        self.refill_fifo();
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

/// A saved [`SerialDevice`]: every 16550 register, the unread FIFO bytes and the input
/// still waiting on the host. (vm-superio's own `SerialState` has no serde support, so
/// its fields are mirrored here.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Received bytes the guest has not read, oldest first.
    pub fifo: Vec<u8>,
    /// Host input waiting for room in the FIFO, oldest first.
    pub pending_input: Vec<u8>,
}

impl SerialDeviceState {
    /// Refuses what no working device could have saved.
    fn check(&self) -> Result<(), SerialError> {
        if self.fifo.len() > FIFO_SIZE {
            return Err(SerialError::FifoTooLong {
                len: self.fifo.len(),
            });
        }
        if self.pending_input.len() > MAX_PENDING_INPUT {
            return Err(SerialError::PendingTooLong {
                len: self.pending_input.len(),
            });
        }
        for (register, value, valid) in [
            ("IER", self.interrupt_enable, IER_VALID),
            ("IIR", self.interrupt_identification, IIR_VALID),
        ] {
            if value & !valid != 0 {
                return Err(SerialError::BadRegister {
                    register,
                    value,
                    valid,
                });
            }
        }
        let data_ready = self.line_status & LSR_DATA_READY != 0;
        if data_ready == self.fifo.is_empty() {
            return Err(SerialError::DataReadyMismatch {
                data_ready,
                fifo: self.fifo.len(),
            });
        }
        Ok(())
    }
}

/// What a restored [`SerialDevice`] gets from the new machine.
pub struct SerialArgs {
    /// The irqfd of [`COM1_IRQ`].
    pub irq: EventFd,
    pub console: Arc<Console>,
    pub wake_vcpus: InputWaker,
}

impl Persist for SerialDevice {
    type State = SerialDeviceState;
    type Args = SerialArgs;
    type Error = SerialError;

    fn save(&self) -> Result<SerialDeviceState, SerialError> {
        let uart = self.uart.state();
        Ok(SerialDeviceState {
            baud_divisor_low: uart.baud_divisor_low,
            baud_divisor_high: uart.baud_divisor_high,
            interrupt_enable: uart.interrupt_enable,
            interrupt_identification: uart.interrupt_identification,
            line_control: uart.line_control,
            line_status: uart.line_status,
            modem_control: uart.modem_control,
            modem_status: uart.modem_status,
            scratch: uart.scratch,
            fifo: uart.in_buffer,
            pending_input: self.pending_input.iter().copied().collect(),
        })
    }

    fn restore(args: SerialArgs, state: &SerialDeviceState) -> Result<SerialDevice, SerialError> {
        state.check()?;
        let uart_state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.fifo.clone(),
        };
        // `from_state` re-raises an interrupt the saved registers say is pending.
        let uart = Serial::from_state(
            &uart_state,
            IrqTrigger(args.irq),
            NoEvents,
            ConsoleWriter(args.console),
        )
        .map_err(|e| SerialError::Model(e.to_string()))?;
        Ok(SerialDevice {
            uart,
            pending_input: state.pending_input.iter().copied().collect(),
            wake_vcpus: args.wake_vcpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR_REG: u64 = MCR as u64;
    const LSR: u64 = 5;
    const SCR: u64 = 7;

    fn counting_waker() -> (Arc<AtomicUsize>, InputWaker) {
        let wakes = Arc::new(AtomicUsize::new(0));
        let counter = wakes.clone();
        (
            wakes,
            Box::new(move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }),
        )
    }

    fn device() -> (SerialDevice, Arc<AtomicUsize>) {
        let (wakes, waker) = counting_waker();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        (
            SerialDevice::new(irq, Console::new(4096, None), waker),
            wakes,
        )
    }

    fn read(dev: &mut SerialDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    /// Reads the receiver the way a polling driver does, until no data is ready.
    fn drain(dev: &mut SerialDevice) -> Vec<u8> {
        let mut got = Vec::new();
        while read(dev, LSR) & LSR_DATA_READY != 0 {
            got.push(read(dev, DATA));
        }
        got
    }

    fn input(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn input_beyond_the_fifo_arrives_in_order_as_the_guest_reads() {
        let (mut dev, wakes) = device();
        assert_eq!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
        let bytes = input(1000);
        dev.queue_input(&bytes[..600]).unwrap();
        dev.queue_input(&bytes[600..]).unwrap();
        assert_eq!(wakes.load(Ordering::SeqCst), 2, "each send wakes the vCPUs");
        assert_eq!(dev.queued_input(), 1000);
        assert_eq!(dev.pending_input.len(), 1000 - FIFO_SIZE);
        assert_eq!(drain(&mut dev), bytes);
        assert_eq!(dev.queued_input(), 0);
        dev.queue_input(&[]).unwrap();
        assert_eq!(
            wakes.load(Ordering::SeqCst),
            2,
            "nothing sent, nobody woken"
        );
    }

    #[test]
    fn input_that_does_not_fit_is_refused_whole() {
        let (mut dev, wakes) = device();
        let room = dev.input_room();
        assert_eq!(room, FIFO_SIZE + MAX_PENDING_INPUT);
        dev.queue_input(&input(room - 10)).unwrap();
        let err = dev.queue_input(&input(11)).unwrap_err();
        assert!(
            matches!(
                err,
                SerialError::InputFull {
                    len: 11,
                    room: 10,
                    queued
                } if queued == room - 10
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("nothing was queued"), "{err}");
        assert_eq!(
            dev.queued_input(),
            room - 10,
            "a refused send queues nothing"
        );
        assert_eq!(wakes.load(Ordering::SeqCst), 1);
        // Reading makes room again.
        read(&mut dev, DATA);
        dev.queue_input(&input(11)).unwrap();
        assert_eq!(dev.input_room(), 0);
    }

    #[test]
    fn input_raises_the_data_interrupt_when_enabled() {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = irq.try_clone().unwrap();
        let mut dev = SerialDevice::new(irq, Console::new(4096, None), Box::new(|| {}));
        dev.write(IER, &[0x01]);
        dev.queue_input(b"x").unwrap();
        assert_eq!(probe.read().unwrap(), 1);
        assert_eq!(read(&mut dev, IIR) & 0x0f, 0x04, "IIR says received data");
    }

    /// Puts a device through register writes, input and partial reads.
    fn busy_device() -> (SerialDevice, Vec<u8>) {
        let (mut dev, _) = device();
        dev.write(LCR, &[0x80]); // DLAB on: offsets 0 and 1 are the divisor
        dev.write(0, &[0x34]);
        dev.write(1, &[0x12]);
        dev.write(LCR, &[0x1b]); // DLAB off, 8 bits, even parity
        dev.write(IER, &[0x01]);
        dev.write(MCR_REG, &[0x0b]);
        dev.write(SCR, &[0x5a]);
        dev.write(DATA, b"o"); // output: goes to the console
        let bytes = input(300);
        dev.queue_input(&bytes).unwrap();
        for _ in 0..10 {
            read(&mut dev, DATA);
        }
        // A polling driver's next status read tops the FIFO up and raises the interrupt.
        assert_ne!(read(&mut dev, LSR) & LSR_DATA_READY, 0);
        (dev, bytes[10..].to_vec())
    }

    fn all_registers(dev: &mut SerialDevice) -> Vec<u8> {
        let mut regs: Vec<u8> = [IER, IIR, LCR, MCR_REG, LSR, 6, SCR]
            .iter()
            .map(|&r| read(dev, r))
            .collect();
        dev.write(LCR, &[0x9b]);
        regs.push(read(dev, 0));
        regs.push(read(dev, 1));
        dev.write(LCR, &[0x1b]);
        regs
    }

    #[test]
    fn saved_state_restores_an_identical_device() {
        let (mut original, remaining) = busy_device();
        let state = original.save().unwrap();
        assert_eq!(state.fifo.len(), FIFO_SIZE);
        assert_eq!(state.pending_input.len(), 300 - 10 - FIFO_SIZE);
        let bytes = postcard::to_stdvec(&state).unwrap();
        let decoded: SerialDeviceState = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(decoded, state);

        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let probe = irq.try_clone().unwrap();
        let args = SerialArgs {
            irq,
            console: Console::new(4096, None),
            wake_vcpus: Box::new(|| {}),
        };
        let mut restored = SerialDevice::restore(args, &decoded).unwrap();
        assert_eq!(
            probe.read().unwrap(),
            1,
            "the pending data interrupt is raised again"
        );
        assert_eq!(restored.save().unwrap(), state);
        assert_eq!(all_registers(&mut restored), all_registers(&mut original));
        assert_eq!(all_registers(&mut restored)[6], 0x5a);
        assert_eq!(all_registers(&mut restored)[7..], [0x34, 0x12]);
        assert_eq!(drain(&mut restored), remaining);
        assert_eq!(drain(&mut original), remaining);
        assert_eq!(all_registers(&mut restored), all_registers(&mut original));
    }

    fn restore(state: &SerialDeviceState) -> Result<SerialDevice, SerialError> {
        let args = SerialArgs {
            irq: EventFd::new(EFD_NONBLOCK).unwrap(),
            console: Console::new(4096, None),
            wake_vcpus: Box::new(|| {}),
        };
        SerialDevice::restore(args, state)
    }

    #[test]
    fn restore_refuses_nonsense() {
        let (dev, _) = busy_device();
        let good = dev.save().unwrap();
        restore(&good).unwrap();
        type Spoil = fn(&mut SerialDeviceState);
        let cases: Vec<(Spoil, &str)> = vec![
            (|s| s.fifo = vec![0; FIFO_SIZE + 1], "65 unread FIFO bytes"),
            (
                |s| s.pending_input = vec![0; MAX_PENDING_INPUT + 1],
                "65537 pending input bytes",
            ),
            (|s| s.interrupt_enable = 0xff, "IER = 0xff"),
            (|s| s.interrupt_identification = 0xc1, "IIR = 0xc1"),
            (
                |s| s.fifo.clear(),
                "data is ready but the FIFO holds 0 bytes",
            ),
            (
                |s| s.line_status &= !LSR_DATA_READY,
                "data is not ready but the FIFO holds 64 bytes",
            ),
        ];
        for (spoil, message) in cases {
            let mut bad = good.clone();
            spoil(&mut bad);
            let err = restore(&bad).err().expect("restore must refuse");
            assert!(err.to_string().contains(message), "{err}");
        }
    }
}
