//! What a VM is made of: its configuration and the checks on it.

use std::path::PathBuf;
use std::sync::Arc;

use thiserror::Error;

use crate::boot::builtin::MAX_CMDLINE;
use crate::builder::MAX_DISKS;
use crate::devices::console::DEFAULT_CONSOLE_CAPACITY;
use crate::devices::manager::{DeviceLayout, LayoutError};
use crate::size::format_size;
use crate::storage::Disk;
use crate::vm::dynamic_memory::MemoryKnobs;
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
    /// Dynamic memory knobs; `memory` is then their `max`. `None`: a fixed size.
    pub dynamic_memory: Option<MemoryKnobs>,
}

impl VmConfig {
    /// Where this VM's devices go: one virtio-blk per disk, in order, then a balloon
    /// when memory is dynamic (min < max).
    pub fn device_layout(&self) -> Result<DeviceLayout, LayoutError> {
        let balloon = self.dynamic_memory.is_some_and(|k| k.is_dynamic());
        DeviceLayout::for_vm(self.disks.len(), balloon)
    }

    pub fn new(name: impl Into<String>, guest: GuestSpec) -> VmConfig {
        VmConfig {
            name: name.into(),
            vcpus: 1,
            memory: 128 << 20,
            guest,
            console_file: None,
            console_capacity: DEFAULT_CONSOLE_CAPACITY,
            disks: Vec::new(),
            dynamic_memory: None,
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
        if let Some(knobs) = &self.dynamic_memory {
            knobs.check().map_err(ConfigError::MemoryKnobs)?;
            if knobs.max != self.memory {
                return Err(ConfigError::MemoryKnobs(format!(
                    "memory.max ({}) must be the VM's memory size ({})",
                    format_size(knobs.max),
                    format_size(self.memory)
                )));
            }
            if knobs.min < MIN_MEMORY {
                return Err(ConfigError::MemoryKnobs(format!(
                    "memory.min ({}) is less than the smallest VM ({})",
                    format_size(knobs.min),
                    format_size(MIN_MEMORY)
                )));
            }
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::Disks(self.disks.len()));
        }
        let layout = self
            .device_layout()
            .map_err(|e| ConfigError::Devices(e.to_string()))?;
        if let Err(e) = crate::storage::disk::check_distinct(&self.disks) {
            return Err(ConfigError::DiskListedTwice(e.to_string()));
        }
        match &self.guest {
            GuestSpec::Builtin { cmdline } => {
                if let Some(at) = cmdline.bytes().position(|b| b == 0) {
                    return Err(ConfigError::CmdlineNul { at });
                }
                // Checked with what the VM adds at start, so that a VM that was
                // accepted does not fail to start for it.
                let total = cmdline.len() + layout.cmdline_entries().len();
                if total > MAX_CMDLINE {
                    return Err(ConfigError::Cmdline {
                        given: cmdline.len(),
                        disks: self.disks.len(),
                        total,
                    });
                }
                Ok(())
            }
        }
    }
}

/// "" or " (N bytes of it are the disks' virtio_mmio.device entries)", for messages.
fn disk_entries_note(given: usize, disks: usize, total: usize) -> String {
    match disks {
        0 => String::new(),
        n => format!(
            " ({} of them for the virtio_mmio.device entries the VM adds for its {n} disk{})",
            total - given,
            if n == 1 { "" } else { "s" }
        ),
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
    #[error("the guest command line is {total} bytes{note}; the limit is {MAX_CMDLINE}", note = disk_entries_note(*given, *disks, *total))]
    Cmdline {
        /// Bytes of the configured command line.
        given: usize,
        disks: usize,
        /// Bytes with every entry the VM adds.
        total: usize,
    },
    #[error(
        "the guest command line has a NUL byte at offset {at}; it must be text without NUL bytes"
    )]
    CmdlineNul { at: usize },
    #[error("{0} disks given; a VM has at most {MAX_DISKS}")]
    Disks(usize),
    #[error("{0}")]
    DiskListedTwice(String),
    #[error("{0}")]
    Devices(String),
    #[error("{0}")]
    MemoryKnobs(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cmdline: &str) -> VmConfig {
        VmConfig::new(
            "t",
            GuestSpec::Builtin {
                cmdline: cmdline.into(),
            },
        )
    }

    #[test]
    fn memory_limit_is_the_stated_one() {
        let mut c = config("");
        c.memory = MAX_MEMORY;
        assert_eq!(c.validate(), Ok(()));
        c.memory = MAX_MEMORY + 4096;
        assert_eq!(c.validate(), Err(ConfigError::Memory(MAX_MEMORY + 4096)));
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "memory = 67645739008 bytes is invalid: give a multiple of 4K between 4M and 63G"
        );
        c.memory = MIN_MEMORY - 4096;
        assert!(c.validate().is_err());
    }

    #[test]
    fn cmdline_without_disks_may_fill_the_limit() {
        assert_eq!(config(&"x".repeat(MAX_CMDLINE)).validate(), Ok(()));
        let err = config(&"x".repeat(MAX_CMDLINE + 1)).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the guest command line is {} bytes; the limit is {MAX_CMDLINE}",
                MAX_CMDLINE + 1
            )
        );
    }

    #[test]
    fn nul_in_cmdline_is_refused() {
        assert_eq!(
            config("a\0b").validate(),
            Err(ConfigError::CmdlineNul { at: 1 })
        );
    }
}
