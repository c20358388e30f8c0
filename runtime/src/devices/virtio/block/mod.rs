//! virtio-blk (virtio 1.2, 5.2): one request queue served from a [`DiskBackend`].
//!
//! - [`device`]: features, configuration space, and the queue loop;
//! - [`request`]: parsing a descriptor chain into a request and executing it.
//!
//! [`DiskBackend`]: crate::storage::DiskBackend

pub mod device;
pub mod request;

pub use device::{Block, BlockArgs, BlockState};

#[cfg(test)]
pub(crate) mod hostile_tests;
