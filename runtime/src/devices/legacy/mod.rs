//! Legacy and paravirtual port-I/O devices.
//!
//! - [`serial`]: COM1, a 16550 UART from `vm-superio`, printing into the VM's console.
//! - [`system_ports`]: the exit, ready, idle and clock ports of the built-in guest ABI.

pub mod serial;
pub mod system_ports;

pub use serial::{SerialDevice, SerialError};
pub use system_ports::SystemPorts;
