//! The virtio-mmio transport (virtio 1.2, 4.2.2), version 2 (modern) only.
//!
//! One 4 KiB window per device: registers from 0x000, device configuration from 0x100.
//! Register accesses are 32-bit and aligned; anything else is ignored (reads return 0),
//! as is any write that arrives in the wrong device state. A guest that sets up a broken
//! queue gets DEVICE_NEEDS_RESET, never a host panic.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::snapshot::Persist;
use crate::vstate::memory::GuestRam;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{
    features, status, DeviceStateError, QueueError, VirtioDevice, VirtioDeviceState,
    VirtioInterrupt, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER,
};
use crate::devices::bus::{BusDevice, IoAction};

/// Size of each device's MMIO window.
pub const MMIO_WINDOW: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c55_5653; // "LUVS"

/// Register offsets (virtio 1.2, 4.2.2), from `virtio-bindings`, widened for matching
/// against bus offsets.
pub(crate) mod reg {
    use virtio_bindings::virtio_mmio as m;
    pub const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
    pub const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
    pub const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
    pub const VENDOR_ID: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
    pub const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
    pub const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
    pub const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
    pub const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
    pub const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
    pub const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
    pub const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
    pub const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
    pub const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
    pub const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
    pub const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
    pub const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
    pub const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
    pub const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
    pub const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
    pub const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
    pub const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
    pub const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
    pub const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;
    pub const CONFIG: u64 = m::VIRTIO_MMIO_CONFIG as u64;
}

/// Offset of the QueueNotify register, where ioeventfds are registered.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// How long a queue that ran dry is watched for new requests before the device sleeps
/// until notified (see [`MmioTransport::process_queue`]).
const POLL: Duration = Duration::from_micros(50);
/// While polling, the clock is read and the CPU offered to other threads every this
/// many looks at the ring: on a busy host a spinning device thread would otherwise hold
/// the core the guest's vCPU needs to post the next requests.
const YIELD_EVERY: u32 = 32;
/// Longest one call serves a queue before returning to the event loop.
const SERVE_LIMIT: Duration = Duration::from_millis(2);

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestRam>,
    queues: Vec<Queue>,
    /// Signalled on QueueNotify writes that KVM did not catch with an ioeventfd.
    queue_events: Vec<EventFd>,
    interrupt: Arc<VirtioInterrupt>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
}

/// One queue's registers and ring positions (`virtio-queue`'s `QueueState`, which has no
/// serde support).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueRegisters {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

/// Everything the transport holds, with its device's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub status: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub queues: Vec<QueueRegisters>,
    pub device: VirtioDeviceState,
}

/// What a restored transport is plugged into: its device (already restored from
/// `TransportState::device`), guest memory, queue notification eventfds and interrupt.
pub struct TransportArgs {
    pub device: Box<dyn VirtioDevice>,
    pub mem: Arc<GuestRam>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
}

impl Persist for MmioTransport {
    type State = TransportState;
    type Args = TransportArgs;
    type Error = DeviceStateError;

    fn save(&self) -> Result<TransportState, DeviceStateError> {
        Ok(TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueRegisters {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx_enabled: s.event_idx_enabled,
                    }
                })
                .collect(),
            device: self.device.save_state(),
        })
    }

    fn restore(args: TransportArgs, state: &TransportState) -> Result<Self, DeviceStateError> {
        let TransportArgs {
            device,
            mem,
            queue_events,
            interrupt,
        } = args;
        let max_sizes = device.queue_max_sizes();
        if state.queues.len() != max_sizes.len() {
            return Err(DeviceStateError::Invalid(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                max_sizes.len()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, (q, &max)) in state.queues.iter().zip(max_sizes).enumerate() {
            if q.max_size != max {
                return Err(DeviceStateError::Invalid(format!(
                    "queue {i} was saved with {} entries at most, the device has {max}",
                    q.max_size
                )));
            }
            let queue = Queue::try_from(QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx_enabled,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            })
            .map_err(|e| DeviceStateError::Invalid(format!("queue {i}: {e}")))?;
            if queue.ready() && state.status & status::DRIVER_OK != 0 && !queue.is_valid(&*mem) {
                return Err(DeviceStateError::Invalid(format!(
                    "queue {i}'s rings are not inside guest memory"
                )));
            }
            queues.push(queue);
        }
        interrupt.set_status(state.interrupt_status);
        interrupt.set_config_generation(state.config_generation);
        let mut device = device;
        device.attach_interrupt(interrupt.clone());
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_events,
            interrupt,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            acked_features: state.acked_features,
            queue_sel: state.queue_sel,
            status: state.status,
        })
    }
}

impl MmioTransport {
    /// Wraps `device`; `queue_events[i]` is what a notification of queue `i` signals.
    pub fn new(
        mut device: Box<dyn VirtioDevice>,
        mem: Arc<GuestRam>,
        queue_events: Vec<EventFd>,
        interrupt: Arc<VirtioInterrupt>,
    ) -> MmioTransport {
        device.attach_interrupt(interrupt.clone());
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
            .collect();
        MmioTransport {
            device,
            mem,
            queues,
            queue_events,
            interrupt,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
        }
    }

    /// Called after a restore: the used rings may still carry NO_NOTIFY from polling
    /// that the saved machine was doing, and notifications signalled on the old machine's
    /// eventfds are gone. Clearing the flag and serving each ready queue once picks up
    /// every request the driver had posted, so none is lost.
    pub fn resume_after_restore(&mut self) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        for (i, q) in self.queues.iter_mut().enumerate() {
            if q.ready() {
                let _ = q.enable_notification(self.mem.as_ref());
                if let Some(evt) = self.queue_events.get(i) {
                    let _ = evt.write(1);
                }
            }
        }
    }

    /// The device's timer fired: serves the queue it names, as for a notification.
    pub fn serve_timer(&mut self) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        if let Some(queue) = self.device.timer_fired() {
            self.process_queue(queue);
        }
    }

    /// The device, for control calls that address it.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn device_status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may change only before the queue is enabled, and the driver must
    /// be between FEATURES_OK and DRIVER_OK.
    fn queue_configurable(&self) -> bool {
        let s = self.status;
        s & status::FEATURES_OK != 0 && s & (status::DRIVER_OK | status::FAILED) == 0
    }

    fn reset(&mut self) {
        for q in &mut self.queues {
            // A reset while the queue was being polled must not leave NO_NOTIFY in a used
            // ring the driver may set up again without zeroing it.
            if q.ready() {
                let _ = q.enable_notification(self.mem.as_ref());
            }
            q.reset();
        }
        self.device.reset();
        self.interrupt.clear();
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.status = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            // Drivers only add bits (clearing needs a reset); ignore anything else.
            tracing::debug!(
                old = self.status,
                new = value,
                "virtio-mmio: status bits cleared without reset"
            );
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            let valid = self.acked_features & !offered == 0
                && self.acked_features & features::VERSION_1 != 0;
            if !valid {
                // Leaving FEATURES_OK clear tells the driver the subset is unacceptable.
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                return;
            }
            let broken = self
                .queues
                .iter()
                .any(|q| q.ready() && !q.is_valid(self.mem.as_ref()));
            self.status = value;
            if broken {
                self.needs_reset();
            } else {
                self.device.activate(self.acked_features);
            }
            return;
        }
        self.status = value;
    }

    /// The device hit something it cannot recover from without a reset.
    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        if self.status & status::DRIVER_OK != 0 {
            self.interrupt.signal(INTERRUPT_CONFIG_CHANGE);
        }
    }

    /// Serves queue `index` (called by the event thread when its ioeventfd fires).
    ///
    /// Every guest notification is a trapped MMIO write, which costs tens of
    /// microseconds on PVM, more than a request served from the page cache. So while
    /// this runs the used ring carries NO_NOTIFY, and after the queue runs dry the
    /// thread watches it for [`POLL`] more before re-enabling notifications: a driver
    /// that keeps requests flowing then posts them without exits. Each round that
    /// completed requests signals the driver at once, so a guest that went idle waiting
    /// for one is not held up by the polling.
    pub fn process_queue(&mut self, index: usize) {
        if self.status & status::DRIVER_OK == 0 || self.status & status::DEVICE_NEEDS_RESET != 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        let broken = |source| QueueError {
            queue: index,
            source,
        };
        let pending = |queue: &Queue, mem: &GuestRam| {
            queue
                .avail_idx(mem, Ordering::Acquire)
                .map(|idx| idx.0 != queue.next_avail())
        };
        let mem = &*self.mem;
        let started = Instant::now();
        let result = (|| -> Result<(), QueueError> {
            queue.disable_notification(mem).map_err(broken)?;
            loop {
                if self.device.process_queue(index, queue, mem)? {
                    self.interrupt.signal(INTERRUPT_USED_BUFFER);
                }
                let dry = Instant::now();
                if dry.duration_since(started) >= SERVE_LIMIT {
                    // Back to the event loop so teardown is not starved by a guest that
                    // never stops posting; a self-notification brings us back here.
                    if queue.enable_notification(mem).map_err(broken)? {
                        if let Some(evt) = self.queue_events.get(index) {
                            let _ = evt.write(1);
                        }
                    }
                    return Ok(());
                }
                let mut more = pending(queue, mem).map_err(broken)?;
                let mut spins = 0u32;
                while !more {
                    spins += 1;
                    if spins.is_multiple_of(YIELD_EVERY) {
                        if dry.elapsed() >= POLL {
                            break;
                        }
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                    more = pending(queue, mem).map_err(broken)?;
                }
                if more {
                    continue;
                }
                // The driver checks NO_NOTIFY after publishing; re-check after clearing
                // it so a request posted in between is not left waiting.
                if !queue.enable_notification(mem).map_err(broken)? {
                    return Ok(());
                }
                queue.disable_notification(mem).map_err(broken)?;
            }
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "virtio: the driver broke a queue; the device needs a reset");
            self.needs_reset();
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size() as u32),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready() as u32),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let configurable = self.queue_configurable();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::DRIVER_FEATURES => {
                if self.status & (status::FEATURES_OK | status::DRIVER_OK) != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | value as u64,
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | ((value as u64) << 32)
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM if configurable => {
                let Some(q) = self.selected_queue().filter(|q| !q.ready()) else {
                    return;
                };
                let valid = value != 0 && value.is_power_of_two() && value <= q.max_size() as u32;
                if valid {
                    q.set_size(value as u16);
                } else {
                    tracing::warn!(
                        size = value,
                        "virtio-mmio: invalid queue size; the device needs a reset"
                    );
                    self.needs_reset();
                }
            }
            reg::QUEUE_READY if configurable => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_events.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.set_status(value),
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH
                if configurable =>
            {
                let Some(q) = self.selected_queue().filter(|q| !q.ready()) else {
                    return;
                };
                let (low, high) = if offset.is_multiple_of(8) {
                    (Some(value), None)
                } else {
                    (None, Some(value))
                };
                match offset & !7 {
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                    _ => q.set_used_ring_address(low, high),
                }
            }
            _ => tracing::trace!(offset, value, "virtio-mmio: ignored register write"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            data.fill(0);
            self.device.read_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> IoAction {
        if offset >= reg::CONFIG {
            self.device.write_config(offset - reg::CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            self.write_register(
                offset,
                u32::from_le_bytes(data.try_into().expect("length checked")),
            );
        }
        IoAction::None
    }
}
