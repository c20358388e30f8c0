//! Guest loaders: each turns a guest description into memory contents and the entry
//! state of every vCPU.
//!
//! - [`builtin`]: the embedded CPL3 test guest, entered directly in 64-bit user mode.

pub mod builtin;
