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
    /// Attach the agent channel (a virtio-console device carrying heartbeat, time,
    /// key-value pairs, shutdown and exec; see `crate::agent`). On by default.
    pub agent: bool,
}

impl VmConfig {
    /// Where this VM's devices go: one virtio-blk per disk, in order, then a balloon
    /// when memory is dynamic (min < max), then the agent channel unless turned off.
    pub fn device_layout(&self) -> Result<DeviceLayout, LayoutError> {
        DeviceLayout::for_vm(self.disks.len(), self.has_balloon(), self.agent)
    }

    /// Whether the VM gets a balloon: its memory is dynamic (min < max).
    pub fn has_balloon(&self) -> bool {
        self.dynamic_memory.is_some_and(|k| k.is_dynamic())
    }

    /// The devices the VM adds `virtio_mmio.device` entries for, for messages: "its 2
    /// disks, balloon and agent channel".
    fn devices_described(&self) -> String {
        let mut parts = Vec::new();
        match self.disks.len() {
            0 => {}
            1 => parts.push("1 disk".to_string()),
            n => parts.push(format!("{n} disks")),
        }
        if self.has_balloon() {
            parts.push("balloon".into());
        }
        if self.agent {
            parts.push("agent channel".into());
        }
        match parts.split_last() {
            None => String::new(),
            Some((last, [])) => format!("its {last}"),
            Some((last, rest)) => format!("its {} and {last}", rest.join(", ")),
        }
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
            agent: true,
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
                        devices: self.devices_described(),
                        total,
                    });
                }
                Ok(())
            }
        }
    }
}

/// "" or " (N of them for the virtio_mmio.device entries the VM adds for its ...)",
/// for messages.
fn device_entries_note(given: usize, devices: &str, total: usize) -> String {
    if devices.is_empty() {
        return String::new();
    }
    format!(
        " ({} of them for the virtio_mmio.device entries the VM adds for {devices})",
        total - given
    )
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("vm name '{0}' is invalid: use a non-empty name without control characters")]
    Name(String),
    #[error("vcpus = {0} is out of range: a VM has 1 to {MAX_VCPUS} vCPUs")]
    Vcpus(u64),
    #[error("memory = {0} bytes is invalid: give a multiple of 4K between {min} and {max}", min = format_size(MIN_MEMORY), max = format_size(MAX_MEMORY))]
    Memory(u64),
    #[error("the guest command line is {total} bytes{note}; the limit is {MAX_CMDLINE}", note = device_entries_note(*given, devices, *total))]
    Cmdline {
        /// Bytes of the configured command line.
        given: usize,
        /// The devices that add entries ("its 16 disks and agent channel").
        devices: String,
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
    fn cmdline_without_devices_may_fill_the_limit() {
        let mut c = config(&"x".repeat(MAX_CMDLINE));
        c.agent = false;
        assert_eq!(c.validate(), Ok(()));
        c.guest = GuestSpec::Builtin {
            cmdline: "x".repeat(MAX_CMDLINE + 1),
        };
        let err = c.validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the guest command line is {} bytes; the limit is {MAX_CMDLINE}",
                MAX_CMDLINE + 1
            )
        );
    }

    #[test]
    fn the_agent_channel_counts_in_the_cmdline_limit() {
        let entry = " virtio_mmio.device=4K@0xd0000000:5".len();
        assert_eq!(config(&"x".repeat(MAX_CMDLINE - entry)).validate(), Ok(()));
        let err = config(&"x".repeat(MAX_CMDLINE - entry + 1))
            .validate()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the guest command line is {} bytes ({entry} of them for the \
                 virtio_mmio.device entries the VM adds for its agent channel); the limit \
                 is {MAX_CMDLINE}",
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
