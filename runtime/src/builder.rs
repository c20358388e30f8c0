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
//! 4. one virtio-blk device per disk on the MMIO bus at [`VIRTIO_MMIO_BASE`] + i × 4 KiB,
//!    IRQ [`VIRTIO_IRQ_BASE`] + i, its queue notifications caught by an ioeventfd; the
//!    guest learns of each from a `virtio_mmio.device=4K@<addr>:<irq>` command-line entry;
//! 5. the guest image, page tables and boot-info block;
//! 6. vCPUs with CPUID and their entry registers.

use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::vstate::memory::GuestRam;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::boot::builtin;
use crate::devices::bus::Bus;
use crate::devices::console::Console;
use crate::devices::legacy::{serial, system_ports, SerialDevice, SystemPorts};
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET};
use crate::devices::virtio::VirtioInterrupt;
use crate::vm::{GuestSpec, VmConfig, VmError};
use crate::vstate::clock::RunClock;
use crate::vstate::kvm;
use crate::vstate::prepared::{self, PreparedVm};
use crate::vstate::vcpu::{self, Vcpu, VcpuCommand, VcpuHost};

/// Where the first virtio-mmio device sits (inside the MMIO hole below 4 GiB).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The first virtio device's IRQ line (COM1 has 4).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Most disks per VM (IRQs 5 to 20 on the 24-pin IOAPIC).
pub const MAX_DISKS: usize = 16;

/// The command-line entry that tells the guest of virtio device `index`:
/// ` virtio_mmio.device=4K@<addr>:<irq>`, with its leading space.
pub fn virtio_cmdline_entry(index: usize) -> String {
    let base = VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW;
    let irq = VIRTIO_IRQ_BASE + index as u32;
    format!(" virtio_mmio.device=4K@{base:#x}:{irq}")
}

/// The guest's whole command line: the configured one, then one entry per disk.
pub fn full_cmdline(cmdline: &str, disks: usize) -> String {
    let mut full = cmdline.to_string();
    for i in 0..disks {
        full.push_str(&virtio_cmdline_entry(i));
    }
    full
}

/// A queue notification the VM's event thread waits for.
pub struct QueueEventSource {
    pub event: EventFd,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub queue: usize,
}

/// A machine, built and not yet running.
pub struct BuiltMachine {
    pub vm_fd: VmFd,
    pub memory: Arc<GuestRam>,
    /// Each vCPU with the sending side of its command channel.
    pub vcpus: Vec<(Vcpu, Sender<VcpuCommand>)>,
    pub queue_events: Vec<QueueEventSource>,
    /// COM1, which the VM also reaches to send the guest input.
    pub serial: Arc<Mutex<SerialDevice>>,
}

/// What the builder needs from the VM it builds for.
pub struct BuildContext<'a> {
    pub config: &'a VmConfig,
    pub console: Arc<Console>,
    pub clock: Arc<RunClock>,
    pub host: Arc<dyn VcpuHost>,
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
    let PreparedVm { vm_fd, memory } = match prepared::take(config.memory) {
        Some(ready) => ready,
        None => prepared::prepare(config.memory).map_err(|source| VmError::Prepare {
            name: name(),
            source,
        })?,
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
    let wake_vcpus = Arc::new(wake_vcpus);

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
    let serial_device = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        ctx.console.clone(),
        Box::new(move || waker()),
    )));
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

    // virtio-blk devices.
    let mut mmio = Bus::new();
    let mut queue_events = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let backend = disk.attach().map_err(|source| VmError::Disk {
            name: name(),
            source,
        })?;
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(os_error)?;
        vm_fd
            .register_irqfd(&irqfd, irq)
            .map_err(setup("KVM_IRQFD (virtio)"))?;
        let notify = EventFd::new(EFD_NONBLOCK).map_err(os_error)?;
        vm_fd
            .register_ioevent(
                &notify,
                &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                0u32,
            )
            .map_err(setup("KVM_IOEVENTFD (virtio)"))?;
        let waker = wake_vcpus.clone();
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd, Box::new(move || waker())));
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            Box::new(Block::new(disk, backend)),
            memory.clone(),
            vec![notify.try_clone().map_err(os_error)?],
            interrupt,
        )));
        mmio.insert(base, MMIO_WINDOW, transport.clone())
            .map_err(device_error)?;
        queue_events.push(QueueEventSource {
            event: notify,
            transport,
            queue: 0,
        });
    }

    let entry = match &config.guest {
        GuestSpec::Builtin { cmdline } => {
            let full = full_cmdline(cmdline, config.disks.len());
            builtin::load(&memory, &full, config.vcpus).map_err(|source| VmError::Boot {
                name: name(),
                source,
            })?
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
        for entry in cpuid.as_mut_slice().iter_mut().filter(|e| e.function == 1) {
            // Leaf 1 EBX[31:24] is the initial APIC ID.
            entry.ebx = (entry.ebx & 0x00FF_FFFF) | ((index as u32) << 24);
        }
        fd.set_cpuid2(&cpuid).map_err(setup("KVM_SET_CPUID2"))?;
        builtin::setup_vcpu(&fd, index, entry).map_err(|source| VmError::Boot {
            name: name(),
            source,
        })?;
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
    Ok(BuiltMachine {
        vm_fd,
        memory,
        vcpus,
        queue_events,
        serial: serial_device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_names_every_disk() {
        assert_eq!(full_cmdline("hello", 0), "hello");
        assert_eq!(
            full_cmdline("hello", 2),
            "hello virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6"
        );
        assert_eq!(
            virtio_cmdline_entry(MAX_DISKS - 1),
            " virtio_mmio.device=4K@0xd000f000:20"
        );
    }
}
