//! The agent channel's device: a virtio-console (virtio 1.2, 5.3) with a single port,
//! whose two byte streams carry the framed protocol of `crate::agent`.
//!
//! Why a console rather than vsock: one byte stream is all one agent needs, the device
//! is small, and a Linux guest gets it as `/dev/hvc0` with the stock driver (QEMU's
//! guest agent runs over a virtio-serial port the same way); vsock would need a
//! userspace backend with its own connection and credit state machine.
//!
//! - [`device`]: features, the two queues, state.

pub mod device;

pub use device::{Agent, AgentArgs, AgentState};

#[cfg(test)]
mod flood_tests;
#[cfg(test)]
pub(crate) mod hostile_tests;
