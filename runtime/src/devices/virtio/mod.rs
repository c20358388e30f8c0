//! virtio devices (virtio 1.2, modern interface only) on the MMIO transport.
//!
//! - [`mmio`] is the transport, built once for every device: feature negotiation, device
//!   status, config space, queue setup and notifications.
//! - [`block`] is virtio-blk.
//! - [`balloon`] is virtio-balloon.
//! - [`agent`] is virtio-console carrying the agent channel (`crate::agent`).
//! - [`timer`] is the periodic timer a device may keep (the balloon's statistics).
//! - `test_driver` (tests only) drives a device through its transport and rings as a
//!   guest would; each device's hostile-driver tests are built on it.
//!
//! Every device looks the same from the transport's side: it implements
//! [`VirtioDevice`]. Queue notifications reach the VM's event thread through ioeventfds,
//! so device work never runs on a vCPU thread; completions raise the device's interrupt
//! through an irqfd (for interrupt-driven guests such as Linux) and wake idle vCPUs (for
//! the built-in guest, which polls its used rings with interrupts off).

pub mod agent;
pub mod balloon;
pub mod block;
pub mod mmio;
pub mod timer;

#[cfg(test)]
pub(crate) mod test_driver;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::vstate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Device status bits (virtio 1.2, 2.1), from `virtio-bindings`.
pub mod status {
    use virtio_bindings::virtio_config as c;
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Feature bits every device offers.
pub mod features {
    pub const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
}

/// Bits of the MMIO InterruptStatus register.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Why a queue could not be served: the driver set it up or filled it wrongly. The
/// transport answers by setting DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
#[error("queue {queue} is broken: {source}")]
pub struct QueueError {
    pub queue: usize,
    #[source]
    pub source: virtio_queue::Error,
}

/// The next available chain of `queue` (number `index`), or `None` when the driver has
/// posted nothing more. A head the iterator cannot use (an index beyond the queue) would
/// block the queue forever: an error, so the device asks for a reset.
pub(crate) fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestRam,
    index: usize,
) -> Result<Option<DescriptorChain<&'m GuestRam>>, QueueError> {
    let broken = |source| QueueError {
        queue: index,
        source,
    };
    // What the driver has published so far; the iterator sees at least this much.
    let published = queue.avail_idx(mem, Ordering::Acquire).map_err(broken)?;
    let next = queue.iter(mem).map_err(broken)?.next();
    match next {
        Some(chain) => Ok(Some(chain)),
        None if published.0 == queue.next_avail() => Ok(None),
        None => Err(broken(virtio_queue::Error::InvalidDescriptorIndex)),
    }
}

/// The saved state of whichever device sits behind a transport. Every device kind has
/// a variant; the device manager restores each one from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum VirtioDeviceState {
    Block(block::BlockState),
    Balloon(balloon::BalloonState),
    Agent(Box<agent::AgentState>),
}

/// Why a device's saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    #[error("invalid saved device state: {0}")]
    Invalid(String),
    #[error("the saved state is for a {saved} device, not {wanted}")]
    WrongKind {
        saved: &'static str,
        wanted: &'static str,
    },
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (2 for block).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers, including [`features::VERSION_1`].
    fn features(&self) -> u64;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device-specific configuration space; read-only by default.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver finished setup (DRIVER_OK) having accepted `acked_features`.
    fn activate(&mut self, acked_features: u64);
    /// The driver reset the device.
    fn reset(&mut self) {}
    /// The device's own state (features it agreed, anything in flight). Called only
    /// while the VM is paused.
    fn save_state(&self) -> VirtioDeviceState;
    /// Hands the device its interrupt, so it can raise it itself (for work that does not
    /// come from a queue notification) and announce configuration changes with
    /// [`VirtioInterrupt::config_changed`]. Called once, when the transport is made.
    fn attach_interrupt(&mut self, _interrupt: Arc<VirtioInterrupt>) {}
    /// A timer the VM's event thread watches for the device, for work on its own
    /// schedule rather than the driver's (the balloon's statistics requests). Asked for
    /// once, when the device is wired.
    fn timer(&self) -> Option<Arc<timer::DeviceTimer>> {
        None
    }
    /// The timer fired: the queue to serve now, if any (see
    /// [`MmioTransport::serve_timer`](mmio::MmioTransport::serve_timer)).
    fn timer_fired(&mut self) -> Option<usize> {
        None
    }
    /// The concrete device, for control calls that address one kind (a snapshot
    /// switching a disk's image, the balloon's target).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
    /// Serves every available buffer of queue `index`. Returns whether any used buffer
    /// was added (the driver then gets an interrupt).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError>;
}

/// A device's interrupt: the status register, an irqfd into the in-kernel irqchip, and a
/// waker for idle vCPUs.
pub struct VirtioInterrupt {
    status: AtomicU32,
    /// ConfigGeneration: changes whenever the device changes its configuration space, so
    /// a driver reading a multi-word field can tell it read a consistent value.
    config_generation: AtomicU32,
    irqfd: EventFd,
    wake_vcpus: Box<dyn Fn() + Send + Sync>,
}

impl VirtioInterrupt {
    pub fn new(irqfd: EventFd, wake_vcpus: Box<dyn Fn() + Send + Sync>) -> VirtioInterrupt {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            irqfd,
            wake_vcpus,
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Restores ConfigGeneration from a saved state.
    pub fn set_config_generation(&self, generation: u32) {
        self.config_generation.store(generation, Ordering::Release);
    }

    /// The device changed its configuration space: ConfigGeneration goes up and the
    /// driver gets a configuration-change interrupt (virtio 1.2, 2.5.1 and 4.2.2.1). The
    /// generation changes before the interrupt, so a driver woken by it reads the new
    /// one.
    pub fn config_changed(&self) {
        self.config_generation.fetch_add(1, Ordering::AcqRel);
        self.signal(INTERRUPT_CONFIG_CHANGE);
    }

    /// Sets the status register as a saved state had it, without raising anything: the
    /// restored irqchip already holds whatever was pending.
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::Release);
    }

    /// Sets `bits` in the status register and notifies the guest.
    ///
    /// The interrupt is raised only when one of `bits` was clear: while it is still set
    /// the driver has not acknowledged the last interrupt, and its handler (which
    /// acknowledges first, then looks at the rings) will see this event too. A busy
    /// queue thus costs one interrupt per handler run rather than one per batch; each
    /// one forces the vCPU out of the guest. Idle vCPUs are woken every time (cheap: a
    /// message, no syscall unless the vCPU sleeps).
    pub fn signal(&self, bits: u32) {
        let before = self.status.fetch_or(bits, Ordering::AcqRel);
        if before & bits != bits {
            if let Err(e) = self.irqfd.write(1) {
                tracing::warn!(error = %e, "virtio: cannot signal the irqfd");
            }
        }
        (self.wake_vcpus)();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// The irqfd fires when a status bit rises; until the driver acknowledges it, more
    /// events only set the bit again (its handler acknowledges first, then reads the
    /// rings, so it sees them). Idle vCPUs are woken every time.
    #[test]
    fn interrupt_fires_once_per_acknowledgement() {
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let wakes = Arc::new(AtomicUsize::new(0));
        let counted = wakes.clone();
        let interrupt = VirtioInterrupt::new(
            irqfd.try_clone().unwrap(),
            Box::new(move || {
                counted.fetch_add(1, Ordering::Relaxed);
            }),
        );
        interrupt.signal(INTERRUPT_USED_BUFFER);
        interrupt.signal(INTERRUPT_USED_BUFFER);
        assert_eq!(irqfd.read().unwrap(), 1);
        assert_eq!(interrupt.status(), INTERRUPT_USED_BUFFER);
        // A different cause raises it again.
        interrupt.signal(INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irqfd.read().unwrap(), 1);
        interrupt.acknowledge(INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE);
        interrupt.signal(INTERRUPT_USED_BUFFER);
        assert_eq!(irqfd.read().unwrap(), 1);
        assert!(irqfd.read().is_err(), "no further interrupt was raised");
        assert_eq!(wakes.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_config_change_bumps_the_generation_and_interrupts() {
        let irqfd = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = VirtioInterrupt::new(irqfd.try_clone().unwrap(), Box::new(|| {}));
        assert_eq!(interrupt.config_generation(), 0);
        interrupt.config_changed();
        assert_eq!(interrupt.config_generation(), 1);
        assert_eq!(interrupt.status(), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(irqfd.read().unwrap(), 1);
    }
}
