//! Saved machine state: the one persistence trait every component implements, and (in
//! later steps) the snapshot file format built from it. Snapshot is "migration to a
//! file": live migration sends the same states over a socket.

pub mod file;
pub mod machine;
mod persist;

pub use persist::Persist;
