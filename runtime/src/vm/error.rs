//! What can go wrong when controlling a VM or waiting for it.

use std::time::Duration;

use thiserror::Error;

use super::state::VmState;
use crate::boot::builtin::BuiltinBootError;
use crate::devices::bus::BusError;
use crate::devices::legacy::SerialError;
use crate::storage::StorageError;
use crate::vstate::memory::MemoryError;
use crate::vstate::KvmOpenError;

/// How long `pause`/`resume` wait for every vCPU to acknowledge.
pub(super) const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum VmError {
    #[error("cannot {op} vm '{name}': it is {state}")]
    InvalidState {
        name: String,
        op: &'static str,
        state: VmState,
    },
    #[error("cannot start vm '{name}'")]
    Kvm {
        name: String,
        #[source]
        source: KvmOpenError,
    },
    #[error("cannot start vm '{name}': {step} failed")]
    Setup {
        name: String,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot start vm '{name}': creating the KVM VM")]
    Prepare {
        name: String,
        #[source]
        source: crate::vstate::prepared::PrepareError,
    },
    #[error("cannot start vm '{name}': guest memory")]
    Memory {
        name: String,
        #[source]
        source: MemoryError,
    },
    #[error("cannot start vm '{name}': loading the guest")]
    Boot {
        name: String,
        #[source]
        source: BuiltinBootError,
    },
    #[error("cannot start vm '{name}': attaching a disk")]
    Disk {
        name: String,
        #[source]
        source: StorageError,
    },
    #[error("cannot start vm '{name}': registering a device")]
    Device {
        name: String,
        #[source]
        source: BusError,
    },
    #[error("cannot start vm '{name}': the device layout")]
    Layout {
        name: String,
        #[source]
        source: crate::devices::manager::LayoutError,
    },
    #[error("cannot start vm '{name}': building its devices")]
    Devices {
        name: String,
        #[source]
        source: crate::devices::manager::DeviceError,
    },
    #[error("vm '{name}': snapshot")]
    Snapshot {
        name: String,
        #[source]
        source: crate::snapshot::file::SnapshotError,
    },
    #[error("vm '{name}': {reason}")]
    Balloon { name: String, reason: String },
    #[error("vm '{name}': guest-physical range {gpa:#x}+{len} is not all RAM")]
    GuestRange { name: String, gpa: u64, len: u64 },
    #[error("cannot restore vm '{name}': {reason}")]
    Restore { name: String, reason: String },
    #[error("vm '{name}': vcpu state")]
    VcpuState {
        name: String,
        #[source]
        source: crate::vstate::vcpu_state::VcpuStateError,
    },
    #[error("vm '{name}': machine state")]
    KvmState {
        name: String,
        #[source]
        source: crate::snapshot::machine::KvmStateError,
    },
    #[error("cannot start vm '{name}': creating a thread")]
    Thread {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vm '{name}': vcpu threads did not {op} within {secs} s", secs = VCPU_ACK_TIMEOUT.as_secs())]
    VcpuTimeout { name: String, op: &'static str },
    #[error("cannot send input to vm '{name}'")]
    Input {
        name: String,
        #[source]
        source: SerialError,
    },
    #[error("cannot migrate vm '{name}' to {to} ({left})")]
    Migration {
        name: String,
        to: String,
        /// Where that leaves the VM, e.g. "it goes on running here".
        left: String,
        #[source]
        source: Box<crate::migration::MigrationError>,
    },
}

/// Why a wait ended without what was awaited.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum WaitError {
    #[error("timed out after {timeout:?} waiting for {what} of vm '{name}'; it is {state}, last console line: {last_line:?}")]
    TimedOut {
        name: String,
        what: String,
        timeout: Duration,
        state: VmState,
        last_line: String,
    },
    #[error("vm '{name}' is {state} ({outcome}) and its console never showed {pattern:?}; last console line: {last_line:?}")]
    Ended {
        name: String,
        pattern: String,
        state: VmState,
        outcome: String,
        last_line: String,
    },
    #[error("interrupted while waiting for {what} of vm '{name}'")]
    Cancelled { name: String, what: String },
    #[error("cannot wait for vm '{name}': it was never started")]
    NotStarted { name: String },
}
