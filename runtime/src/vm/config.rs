//! What a VM is made of: its configuration and the checks on it.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::builder::MAX_DISKS;
use crate::devices::console::DEFAULT_CONSOLE_CAPACITY;
use crate::size::format_size;
use crate::storage::Disk;
use crate::vstate::memory::{MAX_MEMORY, MIN_MEMORY};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 8;

/// What runs inside the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestSpec {
    /// The embedded CPL3 test guest with this command line.
    Builtin { cmdline: String },
}

/// Everything needed to create a VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub name: String,
    pub vcpus: u8,
    pub memory: u64,
    pub guest: GuestSpec,
    /// Also append console output to this file.
    pub console_file: Option<PathBuf>,
    /// Bytes of console output kept in memory.
    pub console_capacity: usize,
    /// Disks, attached as virtio-blk devices in this order.
    pub disks: Vec<Arc<Disk>>,
}

impl VmConfig {
    pub fn new(name: impl Into<String>, guest: GuestSpec) -> VmConfig {
        VmConfig {
            name: name.into(),
            vcpus: 1,
            memory: 128 << 20,
            guest,
            console_file: None,
            console_capacity: DEFAULT_CONSOLE_CAPACITY,
            disks: Vec::new(),
        }
    }

    /// Checks every field, naming the first one that is out of range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.chars().any(|c| c.is_control()) {
            return Err(ConfigError::Name(self.name.clone()));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus as u64));
        }
        if !(MIN_MEMORY..=MAX_MEMORY).contains(&self.memory) || !self.memory.is_multiple_of(4096) {
            return Err(ConfigError::Memory(self.memory));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Disks(self.disks.len()));
        }
        if let Err(e) = crate::storage::disk::check_distinct(&self.disks) {
            return Err(ConfigError::DiskListedTwice(e.to_string()));
        }
        match &self.guest {
            GuestSpec::Builtin { cmdline } if cmdline.len() > luvisor_guest_abi::MAX_CMDLINE => {
                Err(ConfigError::Cmdline(cmdline.len()))
            }
            GuestSpec::Builtin { .. } => Ok(()),
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vm name '{0}' is invalid: use a non-empty name without control characters")]
    Name(String),
    #[error("vcpus = {0} is out of range: a VM has 1 to {MAX_VCPUS} vCPUs")]
    Vcpus(u64),
    #[error("memory = {0} bytes is invalid: give a multiple of 4K between {min} and {max}", min = format_size(MIN_MEMORY), max = format_size(MAX_MEMORY))]
    Memory(u64),
    #[error("the guest command line is {0} bytes; the limit is {max}", max = luvisor_guest_abi::MAX_CMDLINE)]
    Cmdline(usize),
    #[error("{0} disks given; a VM has at most {MAX_DISKS}")]
    Disks(usize),
    #[error("{0}")]
    DiskListedTwice(String),
}
