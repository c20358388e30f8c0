//! Devices the guest talks to.
//!
//! Every device registers on a [`bus::Bus`] (port I/O or MMIO) through the same path and
//! is called from vCPU threads with the bus lock released. Devices that need work off the
//! vCPU threads (virtio queues, later) add their file descriptors to the VM's event
//! thread.
//!
//! - [`console`]: the captured console output of a VM (ring buffer, waiters, tee file).
//! - [`legacy`]: the 16550 serial port and the paravirtual exit/ready/idle/clock ports.
//! - [`manager`]: the device manager: layout (MMIO windows, IRQs), the virtio devices by
//!   id, their saved state.
//! - [`virtio`]: the virtio-mmio transport and virtio devices.

pub mod bus;
pub mod console;
pub mod legacy;
pub mod manager;
pub mod virtio;
