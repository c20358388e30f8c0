//! virtio-balloon (virtio 1.2, 5.5): the host takes guest memory back and hands it out
//! again, learns the guest's memory statistics, and releases pages the guest reports
//! free.
//!
//! - [`device`]: features, configuration space, the four queues, state;
//! - [`pages`]: the set of held pages and the RAM layout frame numbers are checked
//!   against;
//! - [`stats`]: parsing the statistics buffer.

pub mod device;
pub mod pages;
pub mod stats;

pub use device::{Balloon, BalloonArgs, BalloonCounters, BalloonState};

#[cfg(test)]
pub(crate) mod hostile_tests;
