//! The recipe that turns a [`VmConfig`] into a machine ready to run: KVM VM, guest
//! memory, devices, the loaded guest and configured vCPUs. Nothing runs yet; the
//! [`Vm`](crate::Vm) spawns the threads.
//!
//! Boot sequence:
//! 1. `KVM_CREATE_VM`, the in-kernel irqchip;
//! 2. guest RAM (anonymous, `MAP_NORESERVE`) registered as memory slots (steps 1 and 2
//!    usually come ready-made from [`prepared`], built in the background);
//! 3. legacy devices on the port bus: COM1 (IRQ 4 through an irqfd) and the paravirtual
//!    exit/ready/idle/clock ports;
//! 4. the virtio devices (one virtio-blk per disk, then a virtio-balloon for a VM with
//!    dynamic memory, then the agent channel's virtio-console), built by the
//!    [`DeviceManager`] from
//!    the VM's [`DeviceLayout`] (an MMIO window and IRQ line each, queue notifications
//!    caught by ioeventfds); the guest learns of each from a
//!    `virtio_mmio.device=4K@<addr>:<irq>` command-line entry;
//! 5. the guest image, page tables and boot-info block;
//! 6. vCPUs with CPUID and their entry registers.
//!
//! A restore ([`BuildContext::restore`]) follows the same steps with the snapshot's
//! layout and states: memory comes from the snapshot's memory file instead of the
//! loader, devices and vCPUs are put back in their saved state, then the irqchip and
//! clocks.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestRam;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::builtin;
use crate::devices::bus::Bus;
use crate::devices::console::Console;
use crate::devices::legacy::serial::SerialArgs;
use crate::devices::legacy::{serial, system_ports, SerialDevice, SystemPorts};
use crate::devices::manager::{DeviceContext, DeviceLayout, DeviceManager};
use crate::snapshot::machine::{restore_clock, MachineState};
use crate::snapshot::Persist;
use crate::vm::{GuestSpec, VmConfig, VmError};
use crate::vstate::clock::RunClock;
use crate::vstate::kvm;
use crate::vstate::prepared::{self, PreparedVm};
use crate::vstate::vcpu::{self, Vcpu, VcpuCommand, VcpuHost};

/// Most disks per VM. The device manager has room for more virtio devices (one per IRQ
/// line); the rest are kept for devices other than disks.
pub const MAX_DISKS: usize = 16;

/// The guest's whole command line: the configured one, then one entry per device of a
/// VM with `disks` disks and the default devices (the agent channel).
pub fn full_cmdline(cmdline: &str, disks: usize) -> String {
    let layout = DeviceLayout::for_vm(disks.min(MAX_DISKS), false, true).unwrap_or_default();
    format!("{cmdline}{}", layout.cmdline_entries())
}

/// A machine, built and not yet running.
pub struct BuiltMachine {
    pub vm_fd: VmFd,
    pub memory: Arc<GuestRam>,
    /// Each vCPU with the sending side of its command channel.
    pub vcpus: Vec<(Vcpu, Sender<VcpuCommand>)>,
    pub devices: Arc<DeviceManager>,
    /// COM1, which the VM also reaches to send the guest input.
    pub serial: Arc<Mutex<SerialDevice>>,
}

/// What the builder needs from the VM it builds for.
pub struct BuildContext<'a> {
    pub config: &'a VmConfig,
    pub console: Arc<Console>,
    pub clock: Arc<RunClock>,
    pub host: Arc<dyn VcpuHost>,
    /// Shared with the balloon (if the VM has one), and the target it starts with.
    pub balloon_status: Arc<crate::vm::dynamic_memory::BalloonStatus>,
    pub memory_target: u64,
    /// The VM's agent channel, for its agent device (when it has one).
    pub agent: Option<Arc<crate::agent::AgentChannel>>,
    /// Restore this saved machine instead of booting; `memory` is its guest RAM, already
    /// filled from the snapshot's memory file and registered with `vm_fd`.
    pub restore: Option<RestoreParts<'a>>,
}

/// What a restore brings to the builder.
pub struct RestoreParts<'a> {
    pub state: &'a MachineState,
    pub vm_fd: VmFd,
    pub memory: GuestRam,
}

pub fn build(ctx: BuildContext<'_>) -> Result<BuiltMachine, VmError> {
    let config = ctx.config;
    let name = || config.name.clone();
    let setup = |step| {
        move |source| VmError::Setup {
            name: name(),
            step,
            source,
        }
    };
    let os_error = |source| VmError::Thread {
        name: name(),
        source,
    };

    let kvm = kvm().map_err(|source| VmError::Kvm {
        name: name(),
        source,
    })?;
    let (vm_fd, memory, restore) = match ctx.restore {
        Some(parts) => (parts.vm_fd, parts.memory, Some(parts.state)),
        None => {
            let kind = prepared::Kind {
                size: config.memory,
                log_dirty: false,
            };
            let PreparedVm { vm_fd, memory } = match prepared::take(kind) {
                Some(ready) => ready,
                None => prepared::prepare(config.memory).map_err(|source| VmError::Prepare {
                    name: name(),
                    source,
                })?,
            };
            (vm_fd, memory, None)
        }
    };
    let memory = Arc::new(memory);

    // vCPU command channels exist before the devices, so devices can wake idle vCPUs.
    let channels: Vec<_> = (0..config.vcpus).map(|_| vcpu::command_channel()).collect();
    let wakers: Vec<Sender<VcpuCommand>> = channels.iter().map(|(tx, _)| tx.clone()).collect();
    let wake_vcpus = move || {
        for waker in &wakers {
            let _ = waker.send(VcpuCommand::Wake);
        }
    };
    let wake_vcpus: Arc<dyn Fn() + Send + Sync> = Arc::new(wake_vcpus);

    // Legacy devices.
    let device_error = |source| VmError::Device {
        name: name(),
        source,
    };
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(os_error)?;
    vm_fd
        .register_irqfd(&serial_irq, serial::COM1_IRQ)
        .map_err(setup("KVM_IRQFD (serial)"))?;
    let waker = wake_vcpus.clone();
    let serial_waker: Box<dyn Fn() + Send + Sync> = Box::new(move || waker());
    let serial_device = match restore {
        None => SerialDevice::new(serial_irq, ctx.console.clone(), serial_waker),
        Some(state) => SerialDevice::restore(
            SerialArgs {
                irq: serial_irq,
                console: ctx.console.clone(),
                wake_vcpus: serial_waker,
            },
            &state.serial,
        )
        .map_err(|e| VmError::Restore {
            name: name(),
            reason: format!("serial port: {e}"),
        })?,
    };
    let serial_device = Arc::new(Mutex::new(serial_device));
    let mut pio = Bus::new();
    pio.insert(
        luvisor_guest_abi::ports::SERIAL_COM1 as u64,
        serial::COM1_PORT_COUNT,
        serial_device.clone(),
    )
    .map_err(device_error)?;
    pio.insert(
        system_ports::BASE as u64,
        system_ports::LEN,
        Arc::new(Mutex::new(SystemPorts::new(ctx.clock.clone()))),
    )
    .map_err(device_error)?;

    // virtio devices.
    let mut mmio = Bus::new();
    let layout = match restore {
        Some(state) => state.layout.clone(),
        None => config.device_layout().map_err(|source| VmError::Layout {
            name: name(),
            source,
        })?,
    };
    let devices = DeviceManager::build(
        DeviceContext {
            vm_fd: &vm_fd,
            mmio: &mut mmio,
            memory: &memory,
            disks: &config.disks,
            wake_vcpus: wake_vcpus.clone(),
            balloon_status: ctx.balloon_status.clone(),
            memory_target: ctx.memory_target,
            agent: ctx.agent.clone(),
        },
        &layout,
        restore.map(|s| s.devices.as_slice()),
    )
    .map_err(|source| match source {
        // A disk that cannot be attached reads as before the device manager existed.
        crate::devices::manager::DeviceError::Disk(source) => VmError::Disk {
            name: name(),
            source,
        },
        source => VmError::Devices {
            name: name(),
            source,
        },
    })?;

    let entry = match (&config.guest, restore) {
        (_, Some(_)) => None,
        (GuestSpec::Builtin { cmdline }, None) => {
            let full = format!("{cmdline}{}", layout.cmdline_entries());
            Some(
                builtin::load(&memory, &full, config.vcpus).map_err(|source| VmError::Boot {
                    name: name(),
                    source,
                })?,
            )
        }
    };

    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(setup("KVM_GET_SUPPORTED_CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for (index, (tx, rx)) in channels.into_iter().enumerate() {
        let fd = vm_fd
            .create_vcpu(index as u64)
            .map_err(setup("KVM_CREATE_VCPU"))?;
        match (restore, entry) {
            (Some(state), _) => {
                let saved = state.vcpus.get(index).ok_or_else(|| VmError::Restore {
                    name: name(),
                    reason: format!("the snapshot has no state for vcpu {index}"),
                })?;
                saved
                    .restore(&fd, index)
                    .map_err(|source| VmError::VcpuState {
                        name: name(),
                        source,
                    })?;
            }
            (None, Some(entry)) => {
                for leaf in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
                    // Leaf 1 EBX[31:24] is the initial APIC ID.
                    leaf.ebx = (leaf.ebx & 0x00FF_FFFF) | ((index as u32) << 24);
                }
                fd.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
                builtin::setup_vcpu(&fd, index, entry).map_err(|source| VmError::Boot {
                    name: name(),
                    source,
                })?;
            }
            (None, None) => unreachable!("a VM that is not restored has a loaded guest"),
        }
        let vcpu = Vcpu {
            index,
            fd,
            pio: pio.clone(),
            mmio: mmio.clone(),
            host: ctx.host.clone(),
            commands: rx,
            wake_pending: false,
        };
        vcpus.push((vcpu, tx));
    }
    if let Some(state) = restore {
        // After the vCPUs exist (their local APICs were restored with them).
        let kvm_state = |source| VmError::KvmState {
            name: name(),
            source,
        };
        state.irqchip.restore(&vm_fd).map_err(kvm_state)?;
        restore_clock(&vm_fd, &state.kvm_clock).map_err(kvm_state)?;
        ctx.clock
            .set_elapsed(std::time::Duration::from_nanos(state.run_time_ns));
    }
    Ok(BuiltMachine {
        vm_fd,
        memory,
        vcpus,
        devices: Arc::new(devices),
        serial: serial_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_names_every_disk() {
        assert_eq!(
            full_cmdline("hello", 0),
            "hello virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            full_cmdline("hello", 2),
            "hello virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        assert!(full_cmdline("", MAX_DISKS).ends_with(" virtio_mmio.device=4K@0xd0010000:21"));
    }
}
