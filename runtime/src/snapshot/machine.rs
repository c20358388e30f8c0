//! The state of a whole machine apart from guest memory: vCPUs, the in-kernel irqchip,
//! the KVM clock, the run clock, the device layout and every device.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::devices::legacy::serial::SerialDeviceState;
use crate::devices::manager::DeviceLayout;
use crate::devices::virtio::mmio::TransportState;
use crate::vstate::vcpu_state::VcpuState;

/// The in-kernel interrupt controllers: both PICs and the IOAPIC. (Each vCPU's local
/// APIC is part of its [`VcpuState`]. No PIT is created: the built-in guest keeps time
/// through the clock port.)
#[derive(Serialize, Deserialize)]
pub struct IrqchipState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
}

#[derive(Debug, thiserror::Error)]
#[error("{op} failed")]
pub struct KvmStateError {
    pub op: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn chip(vm_fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm_fd
        .get_irqchip(&mut chip)
        .map_err(|source| KvmStateError {
            op: "KVM_GET_IRQCHIP",
            source,
        })?;
    Ok(chip)
}

impl IrqchipState {
    pub fn save(vm_fd: &VmFd) -> Result<IrqchipState, KvmStateError> {
        Ok(IrqchipState {
            pic_master: chip(vm_fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm_fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm_fd, KVM_IRQCHIP_IOAPIC)?,
        })
    }

    /// Each saved chip goes back to the chip it came from, whatever a file claims.
    pub fn restore(&self, vm_fd: &VmFd) -> Result<(), KvmStateError> {
        for (saved, chip_id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            let mut chip = *saved;
            chip.chip_id = chip_id;
            vm_fd.set_irqchip(&chip).map_err(|source| KvmStateError {
                op: "KVM_SET_IRQCHIP",
                source,
            })?;
        }
        Ok(())
    }
}

/// The KVM clock (kvmclock's view of time). Restored without flags: `KVM_SET_CLOCK`
/// refuses those `KVM_GET_CLOCK` reports about the host.
pub fn save_clock(vm_fd: &VmFd) -> Result<kvm_clock_data, KvmStateError> {
    vm_fd.get_clock().map_err(|source| KvmStateError {
        op: "KVM_GET_CLOCK",
        source,
    })
}

pub fn restore_clock(vm_fd: &VmFd, saved: &kvm_clock_data) -> Result<(), KvmStateError> {
    let clock = kvm_clock_data {
        clock: saved.clock,
        ..Default::default()
    };
    vm_fd.set_clock(&clock).map_err(|source| KvmStateError {
        op: "KVM_SET_CLOCK",
        source,
    })
}

/// Everything about a paused machine except guest memory.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub irqchip: IrqchipState,
    pub kvm_clock: kvm_clock_data,
    /// The guest's running time (what the clock port reads), in nanoseconds.
    pub run_time_ns: u64,
    /// COM1, with input the guest has not read yet.
    pub serial: SerialDeviceState,
    pub layout: DeviceLayout,
    /// One per slot of `layout`, in order.
    pub devices: Vec<TransportState>,
}
