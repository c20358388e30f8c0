//! luvisor-runtime: the VMM core.
//!
//! - [`vstate`]: KVM itself: the `/dev/kvm` handle, VM and vCPU file descriptors, guest
//!   memory, and the vCPU threads with their run loop.
//! - [`devices`]: what the guest talks to: the serial console and the paravirtual
//!   exit/ready/idle/clock ports (later: the virtio-mmio transport and virtio devices).
//! - [`boot`]: loaders that turn a guest description into memory contents and vCPU
//!   entry state (today: the built-in CPL3 test guest).
//! - [`storage`]: disk images (raw, qcow2 overlays) and their locks.
//! - [`builder`]: the recipe that turns a VM's configuration into a machine.
//! - [`vm`]: one VM's lifecycle (`created → running ⇄ paused → stopped`, or `crashed`).
//! - [`registry`]: the set of VMs a process manages, addressed by id and name.
//! - [`host`]: what this host's KVM is (PVM or hardware) and what it supports.
//! - [`migration`]: the authenticated channel between hosts, and live migration.
//! - [`lab`]: sets of VMs from one template, each disk a copy-on-write overlay, brought up
//!   in parallel until ready; [`pool`]: warm pools of ready VMs restored from a snapshot;
//!   [`readiness`]: when a started VM counts as ready (a console pattern, a guest KVP key).
//! - [`remote`]: remote control of a `luvisor serve` host over that channel.
//! - [`agent`]: the agent channel's services (heartbeat, time, key-value pairs,
//!   shutdown, exec) on top of its virtio-console device.
//! - [`events`]: events about VMs (a lost heartbeat) for whoever subscribes.
//!
//! No Lua in here: `luvisor-lua` calls this crate's plain Rust API.

pub mod agent;
pub mod boot;
pub mod builder;
pub mod devices;
pub mod events;
pub mod host;
pub mod lab;
pub mod migration;
pub mod pool;
pub mod readiness;
pub mod registry;
pub mod remote;
pub mod size;
pub mod snapshot;
pub mod storage;
pub mod vm;
pub mod vstate;

pub use registry::{Registry, RegistryError, VmId};

/// An error and its sources, joined with ": " (for messages that cross a process or a
/// language boundary, where the source chain would otherwise be lost).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
pub use vm::{GuestSpec, Vm, VmConfig, VmError, VmOutcome, VmState, WaitError};
