//! The device manager: the one owner of a VM's virtio devices.
//!
//! It plans the machine's layout (an MMIO window and an IRQ line per device, handed out
//! by `vm-allocator`'s allocators), records it so a restore rebuilds exactly the same
//! machine, wires each device to KVM (irqfd, ioeventfd, the MMIO bus) and keeps them
//! by id so control calls can reach a device. The layout is a plain value: the command
//! line the guest reads its devices from is derived from it, and it is saved with every
//! snapshot.

use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSubscriber, Events};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use vm_allocator::{AddressAllocator, AllocPolicy, IdAllocator};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::Bus;
use super::virtio::agent::device::RECEIVE_QUEUE;
use super::virtio::agent::{Agent, AgentArgs};
use super::virtio::balloon::pages::RamLayout;
use super::virtio::balloon::{Balloon, BalloonArgs};
use super::virtio::block::Block;
use super::virtio::mmio::{
    MmioTransport, TransportArgs, TransportState, MMIO_WINDOW, QUEUE_NOTIFY_OFFSET,
};
use super::virtio::timer::DeviceTimer;
use super::virtio::{DeviceStateError, VirtioDevice, VirtioDeviceState, VirtioInterrupt};
use crate::agent::AgentChannel;
use crate::snapshot::Persist;
use crate::storage::{Disk, StorageError};
use crate::vm::dynamic_memory::BalloonStatus;
use crate::vstate::memory::GuestRam;

/// Where virtio-mmio windows are handed out (inside the MMIO hole below 4 GiB).
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Room for virtio-mmio windows: 256 of them; IRQ lines run out long before.
pub const VIRTIO_MMIO_SIZE: u64 = 256 * MMIO_WINDOW;
/// IRQ lines for virtio devices on the 24-pin IOAPIC: COM1 has 4, and 0–3 stay free for
/// legacy devices.
pub const VIRTIO_IRQ_FIRST: u32 = 5;
pub const VIRTIO_IRQ_LAST: u32 = 23;
/// Most virtio devices a VM may have: one per IRQ line.
pub const MAX_VIRTIO_DEVICES: usize = (VIRTIO_IRQ_LAST - VIRTIO_IRQ_FIRST + 1) as usize;

/// Every kind of device the manager can create.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// virtio-blk serving disk `n` of the VM's configuration.
    Block { disk: usize },
    /// virtio-balloon, for a VM with dynamic memory (at most one).
    Balloon,
    /// virtio-console carrying the agent channel (at most one; every VM has it unless
    /// created with `agent = false`).
    Agent,
}

impl DeviceKind {
    /// One of each kind, for tests that must cover every device.
    pub const EXAMPLES: &'static [DeviceKind] = &[
        DeviceKind::Block { disk: 0 },
        DeviceKind::Balloon,
        DeviceKind::Agent,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            DeviceKind::Block { .. } => "virtio-blk",
            DeviceKind::Balloon => "virtio-balloon",
            DeviceKind::Agent => "virtio-console (agent)",
        }
    }

    /// The id control calls use: `disk0`, `disk1`, ..., `balloon`, `agent`.
    pub fn id(&self) -> String {
        match self {
            DeviceKind::Block { disk } => format!("disk{disk}"),
            DeviceKind::Balloon => "balloon".into(),
            DeviceKind::Agent => "agent".into(),
        }
    }
}

/// Where one device sits in the machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSlot {
    /// The id control calls use (`disk0`, `disk1`, ...).
    pub id: String,
    pub kind: DeviceKind,
    pub mmio_base: u64,
    pub irq: u32,
}

/// The machine's device layout.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeviceLayout {
    pub slots: Vec<DeviceSlot>,
}

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(
        "{wanted} devices asked for; a VM has room for {MAX_VIRTIO_DEVICES} \
         (one IRQ line each, {VIRTIO_IRQ_FIRST} to {VIRTIO_IRQ_LAST})"
    )]
    TooManyDevices { wanted: usize },
    #[error("device {id}: {reason}")]
    BadSlot { id: String, reason: String },
}

impl DeviceLayout {
    /// Plans windows and IRQs for `kinds`, in order.
    pub fn plan(kinds: &[DeviceKind]) -> Result<DeviceLayout, LayoutError> {
        let too_many = || LayoutError::TooManyDevices {
            wanted: kinds.len(),
        };
        if kinds.len() > MAX_VIRTIO_DEVICES {
            return Err(too_many());
        }
        let mut windows = AddressAllocator::new(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE)
            .expect("the virtio MMIO range is a valid constant range");
        let mut irqs = IdAllocator::new(VIRTIO_IRQ_FIRST, VIRTIO_IRQ_LAST)
            .expect("the virtio IRQ range is a valid constant range");
        let mut slots = Vec::with_capacity(kinds.len());
        for (i, &kind) in kinds.iter().enumerate() {
            let window = windows
                .allocate(MMIO_WINDOW, MMIO_WINDOW, AllocPolicy::FirstMatch)
                .map_err(|_| too_many())?;
            let irq = irqs.allocate_id().map_err(|_| too_many())?;
            debug_assert!(slots.len() == i);
            slots.push(DeviceSlot {
                id: kind.id(),
                kind,
                mmio_base: window.start(),
                irq,
            });
        }
        Ok(DeviceLayout { slots })
    }

    /// The layout for a VM with `disks` disks and nothing else.
    pub fn for_disks(disks: usize) -> Result<DeviceLayout, LayoutError> {
        DeviceLayout::for_vm(disks, false, false)
    }

    /// The layout for a VM with `disks` disks, then a balloon if it has one, then the
    /// agent channel if it has one (last, so that adding it moved no other device).
    pub fn for_vm(disks: usize, balloon: bool, agent: bool) -> Result<DeviceLayout, LayoutError> {
        let mut kinds: Vec<_> = (0..disks).map(|disk| DeviceKind::Block { disk }).collect();
        if balloon {
            kinds.push(DeviceKind::Balloon);
        }
        if agent {
            kinds.push(DeviceKind::Agent);
        }
        DeviceLayout::plan(&kinds)
    }

    /// Checks a layout read from a snapshot: every window inside the virtio range,
    /// aligned and distinct, every IRQ in range and distinct, ids unique.
    pub fn check(&self) -> Result<(), LayoutError> {
        if self.slots.len() > MAX_VIRTIO_DEVICES {
            return Err(LayoutError::TooManyDevices {
                wanted: self.slots.len(),
            });
        }
        let mut windows = AddressAllocator::new(VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE)
            .expect("the virtio MMIO range is a valid constant range");
        let mut irqs_seen = Vec::new();
        let mut ids_seen = Vec::new();
        for slot in &self.slots {
            let bad = |reason: String| LayoutError::BadSlot {
                id: slot.id.clone(),
                reason,
            };
            windows
                .allocate(
                    MMIO_WINDOW,
                    MMIO_WINDOW,
                    AllocPolicy::ExactMatch(slot.mmio_base),
                )
                .map_err(|e| bad(format!("window at {:#x}: {e}", slot.mmio_base)))?;
            if !(VIRTIO_IRQ_FIRST..=VIRTIO_IRQ_LAST).contains(&slot.irq)
                || irqs_seen.contains(&slot.irq)
            {
                return Err(bad(format!("IRQ {} is out of range or taken", slot.irq)));
            }
            if ids_seen.contains(&&slot.id) {
                return Err(bad("the id appears twice".into()));
            }
            if slot.id != slot.kind.id() {
                return Err(bad(format!(
                    "a {} must have the id {}",
                    slot.kind.name(),
                    slot.kind.id()
                )));
            }
            irqs_seen.push(slot.irq);
            ids_seen.push(&slot.id);
        }
        Ok(())
    }

    /// Whether the machine has the agent channel's device.
    pub fn has_agent(&self) -> bool {
        self.slots.iter().any(|s| s.kind == DeviceKind::Agent)
    }

    /// The command-line entries that tell the guest of each device:
    /// ` virtio_mmio.device=4K@<addr>:<irq>` each, with a leading space.
    pub fn cmdline_entries(&self) -> String {
        self.slots
            .iter()
            .map(|s| format!(" virtio_mmio.device=4K@{:#x}:{}", s.mmio_base, s.irq))
            .collect()
    }
}

/// Why the manager could not build a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("cannot create an eventfd for device {id}")]
    EventFd {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{step} failed for device {id}")]
    Kvm {
        id: String,
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("device {id} asks for disk {disk}, which the VM does not have")]
    NoSuchDisk { id: String, disk: usize },
    #[error("device {id} is the agent channel, but the VM has none to connect it to")]
    NoAgentChannel { id: String },
    #[error("cannot create the timer of device {id}")]
    Timer {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Disk(#[from] StorageError),
    #[error("device {id}: {source}")]
    State {
        id: String,
        #[source]
        source: DeviceStateError,
    },
    #[error("device {id}: {source}")]
    Bus {
        id: String,
        #[source]
        source: super::bus::BusError,
    },
    #[error("the snapshot has state for {saved} devices, the layout has {layout}")]
    StateCount { saved: usize, layout: usize },
}

/// A device the manager owns.
pub struct ManagedDevice {
    pub slot: DeviceSlot,
    pub transport: Arc<Mutex<MmioTransport>>,
    /// One per queue, in queue order: what the event thread waits on.
    pub queue_events: Vec<EventFd>,
    /// The device's own timer, if it keeps one; the event thread waits on it too.
    pub timer: Option<Arc<DeviceTimer>>,
}

impl ManagedDevice {
    pub fn lock(&self) -> MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device as a subscriber of the VM's event manager: it serves a queue when its
    /// notification eventfd fires. A panic in device code is caught and handed to
    /// `on_panic` with its message (the VM crashes; the host goes on).
    pub fn subscriber(
        &self,
        on_panic: Arc<dyn Fn(String) + Send + Sync>,
    ) -> std::io::Result<Arc<QueueSubscriber>> {
        Ok(Arc::new(QueueSubscriber {
            transport: self.transport.clone(),
            queue_events: self
                .queue_events
                .iter()
                .map(|e| e.try_clone())
                .collect::<Result<_, _>>()?,
            timer: self.timer.clone(),
            on_panic,
        }))
    }
}

/// One device's queue notifications, served on the VM's event thread.
pub struct QueueSubscriber {
    transport: Arc<Mutex<MmioTransport>>,
    queue_events: Vec<EventFd>,
    timer: Option<Arc<DeviceTimer>>,
    on_panic: Arc<dyn Fn(String) + Send + Sync>,
}

/// The event data that stands for the device's timer (queues use their index).
const TIMER_EVENT: u32 = u32::MAX;

impl EventSubscriber for QueueSubscriber {
    fn init(&self, ops: &mut EventOps) {
        for (queue, event) in self.queue_events.iter().enumerate() {
            let watched = Events::with_data(event, queue as u32, event_manager::EventSet::IN);
            if let Err(e) = ops.add(watched) {
                tracing::error!(queue, error = ?e, "cannot watch a queue notification eventfd");
            }
        }
        if let Some(timer) = &self.timer {
            let watched =
                Events::with_data(timer.as_ref(), TIMER_EVENT, event_manager::EventSet::IN);
            if let Err(e) = ops.add(watched) {
                tracing::error!(error = ?e, "cannot watch a device timer");
            }
        }
    }

    fn process(&self, events: Events, _ops: &mut EventOps) {
        let work: Box<dyn FnOnce(&mut MmioTransport)> = if events.data() == TIMER_EVENT {
            let Some(timer) = &self.timer else { return };
            timer.clear();
            Box::new(|transport| transport.serve_timer())
        } else {
            let queue = events.data() as usize;
            let Some(event) = self.queue_events.get(queue) else {
                return;
            };
            let _ = event.read();
            Box::new(move |transport| transport.process_queue(queue))
        };
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            work(&mut self.transport.lock().unwrap_or_else(|p| p.into_inner()))
        }));
        if let Err(panic) = served {
            (self.on_panic)(crate::vstate::vcpu::panic_message(panic.as_ref()));
        }
    }
}

/// What building devices needs from the machine.
pub struct DeviceContext<'a> {
    pub vm_fd: &'a VmFd,
    pub mmio: &'a mut Bus,
    pub memory: &'a Arc<GuestRam>,
    pub disks: &'a [Arc<Disk>],
    /// Wakes idle vCPUs when a device completes something.
    pub wake_vcpus: Arc<dyn Fn() + Send + Sync>,
    /// What the VM shares with its balloon, and the memory target a new balloon starts
    /// with.
    pub balloon_status: Arc<BalloonStatus>,
    pub memory_target: u64,
    /// The VM's agent channel, which an agent device serves.
    pub agent: Option<Arc<AgentChannel>>,
}

/// The error for a saved state of another kind of device than the slot's.
fn wrong_kind(saved: &VirtioDeviceState, wanted: DeviceKind) -> DeviceStateError {
    DeviceStateError::WrongKind {
        saved: match saved {
            VirtioDeviceState::Block(_) => DeviceKind::Block { disk: 0 }.name(),
            VirtioDeviceState::Balloon(_) => DeviceKind::Balloon.name(),
            VirtioDeviceState::Agent(_) => DeviceKind::Agent.name(),
        },
        wanted: wanted.name(),
    }
}

/// Every virtio device of one VM, by id, with the layout they were built from.
#[derive(Default)]
pub struct DeviceManager {
    layout: DeviceLayout,
    devices: Vec<ManagedDevice>,
}

impl DeviceManager {
    /// Builds every device of `layout`. With `saved` (from a snapshot, one state per
    /// slot in order) each device and its transport come back in that state.
    pub fn build(
        ctx: DeviceContext<'_>,
        layout: &DeviceLayout,
        saved: Option<&[TransportState]>,
    ) -> Result<DeviceManager, DeviceError> {
        if let Some(saved) = saved {
            if saved.len() != layout.slots.len() {
                return Err(DeviceError::StateCount {
                    saved: saved.len(),
                    layout: layout.slots.len(),
                });
            }
        }
        let mut manager = DeviceManager {
            layout: layout.clone(),
            devices: Vec::with_capacity(layout.slots.len()),
        };
        for (i, slot) in layout.slots.iter().enumerate() {
            let device = manager.build_one(&ctx, slot, saved.map(|s| &s[i]))?;
            ctx.mmio
                .insert(slot.mmio_base, MMIO_WINDOW, device.transport.clone())
                .map_err(|source| DeviceError::Bus {
                    id: slot.id.clone(),
                    source,
                })?;
            manager.devices.push(device);
        }
        Ok(manager)
    }

    fn build_one(
        &self,
        ctx: &DeviceContext<'_>,
        slot: &DeviceSlot,
        saved: Option<&TransportState>,
    ) -> Result<ManagedDevice, DeviceError> {
        let id = || slot.id.clone();
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::EventFd { id: id(), source })
        };
        let state_error = |source| DeviceError::State { id: id(), source };
        let device: Box<dyn VirtioDevice> = match slot.kind {
            DeviceKind::Block { disk: index } => {
                let disk = ctx.disks.get(index).ok_or(DeviceError::NoSuchDisk {
                    id: id(),
                    disk: index,
                })?;
                let backend = disk.attach()?;
                match saved.map(|s| &s.device) {
                    None => Box::new(Block::new(disk, backend)),
                    Some(VirtioDeviceState::Block(state)) => {
                        Box::new(Block::restore_from(disk, backend, state).map_err(state_error)?)
                    }
                    Some(other) => return Err(state_error(wrong_kind(other, slot.kind))),
                }
            }
            DeviceKind::Balloon => {
                let args = BalloonArgs {
                    layout: RamLayout::of(ctx.memory),
                    status: ctx.balloon_status.clone(),
                    target: ctx.memory_target,
                };
                match saved.map(|s| &s.device) {
                    None => Box::new(
                        Balloon::new(args)
                            .map_err(|source| DeviceError::Timer { id: id(), source })?,
                    ),
                    Some(VirtioDeviceState::Balloon(state)) => {
                        Box::new(Balloon::restore(args, state).map_err(state_error)?)
                    }
                    Some(other) => return Err(state_error(wrong_kind(other, slot.kind))),
                }
            }
            DeviceKind::Agent => {
                let channel = ctx
                    .agent
                    .clone()
                    .ok_or(DeviceError::NoAgentChannel { id: id() })?;
                let args = AgentArgs {
                    channel,
                    memory: ctx.memory.clone(),
                };
                match saved.map(|s| &s.device) {
                    None => Box::new(
                        Agent::new(args)
                            .map_err(|source| DeviceError::Timer { id: id(), source })?,
                    ),
                    Some(VirtioDeviceState::Agent(state)) => {
                        Box::new(Agent::restore(args, state).map_err(state_error)?)
                    }
                    Some(other) => return Err(state_error(wrong_kind(other, slot.kind))),
                }
            }
        };
        let timer = device.timer();
        let irqfd = eventfd()?;
        ctx.vm_fd
            .register_irqfd(&irqfd, slot.irq)
            .map_err(|source| DeviceError::Kvm {
                id: id(),
                step: "KVM_IRQFD",
                source,
            })?;
        let mut queue_events = Vec::new();
        for queue in 0..device.queue_max_sizes().len() {
            let notify = eventfd()?;
            ctx.vm_fd
                .register_ioevent(
                    &notify,
                    &IoEventAddress::Mmio(slot.mmio_base + QUEUE_NOTIFY_OFFSET),
                    queue as u32,
                )
                .map_err(|source| DeviceError::Kvm {
                    id: id(),
                    step: "KVM_IOEVENTFD",
                    source,
                })?;
            queue_events.push(notify);
        }
        if slot.kind == DeviceKind::Agent {
            // Control calls signal the receive queue when they have something for the
            // guest; the event thread then writes it.
            let kick = queue_events[RECEIVE_QUEUE]
                .try_clone()
                .map_err(|source| DeviceError::EventFd { id: id(), source })?;
            if let Some(channel) = &ctx.agent {
                channel.set_kick(Some(kick));
            }
        }
        let waker = ctx.wake_vcpus.clone();
        let interrupt = Arc::new(VirtioInterrupt::new(irqfd, Box::new(move || waker())));
        let clones = queue_events
            .iter()
            .map(|e| e.try_clone())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| DeviceError::EventFd { id: id(), source })?;
        let transport = match saved {
            None => MmioTransport::new(device, ctx.memory.clone(), clones, interrupt),
            Some(state) => MmioTransport::restore(
                TransportArgs {
                    device,
                    mem: ctx.memory.clone(),
                    queue_events: clones,
                    interrupt,
                },
                state,
            )
            .map_err(state_error)?,
        };
        Ok(ManagedDevice {
            slot: slot.clone(),
            transport: Arc::new(Mutex::new(transport)),
            queue_events,
            timer,
        })
    }

    pub fn layout(&self) -> &DeviceLayout {
        &self.layout
    }

    pub fn devices(&self) -> &[ManagedDevice] {
        &self.devices
    }

    /// The device with this id (`disk0`, ...).
    pub fn get(&self, id: &str) -> Option<&ManagedDevice> {
        self.devices.iter().find(|d| d.slot.id == id)
    }

    /// Runs `f` on the virtio-blk device serving disk `disk`, if there is one.
    pub fn with_block<R>(&self, disk: usize, f: impl FnOnce(&mut Block) -> R) -> Option<R> {
        let device = self
            .devices
            .iter()
            .find(|d| d.slot.kind == DeviceKind::Block { disk })?;
        let mut transport = device.lock();
        let block = transport
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Block>()?;
        Some(f(block))
    }

    /// Runs `f` on the VM's balloon, if it has one.
    pub fn with_balloon<R>(&self, f: impl FnOnce(&mut Balloon) -> R) -> Option<R> {
        let device = self
            .devices
            .iter()
            .find(|d| d.slot.kind == DeviceKind::Balloon)?;
        let mut transport = device.lock();
        let balloon = transport
            .device_mut()
            .as_any_mut()
            .downcast_mut::<Balloon>()?;
        Some(f(balloon))
    }

    /// Every device's state, in layout order. Call only while the VM is paused.
    pub fn save(&self) -> Result<Vec<TransportState>, DeviceError> {
        self.devices
            .iter()
            .map(|d| {
                d.lock().save().map_err(|source| DeviceError::State {
                    id: d.slot.id.clone(),
                    source,
                })
            })
            .collect()
    }

    /// After a restore: serve whatever the drivers had posted (see
    /// [`MmioTransport::resume_after_restore`]).
    pub fn resume_after_restore(&self) {
        for d in &self.devices {
            d.lock().resume_after_restore();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_hands_out_distinct_windows_and_irqs() {
        let layout = DeviceLayout::for_disks(3).unwrap();
        assert_eq!(
            layout.cmdline_entries(),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        assert_eq!(layout.slots[2].id, "disk2");
        layout.check().unwrap();
        let full = DeviceLayout::for_disks(MAX_VIRTIO_DEVICES).unwrap();
        assert_eq!(full.slots.last().unwrap().irq, VIRTIO_IRQ_LAST);
        full.check().unwrap();
        let err = DeviceLayout::for_disks(MAX_VIRTIO_DEVICES + 1).unwrap_err();
        assert!(err.to_string().contains("room for 19"), "{err}");
    }

    /// Every kind of device saves its state, goes through the snapshot encoding and comes
    /// back to the same state and working. A new kind must add its case here (the match
    /// is exhaustive) and to `DeviceKind::EXAMPLES`.
    #[test]
    fn every_device_kind_round_trips() {
        for kind in DeviceKind::EXAMPLES {
            match kind {
                DeviceKind::Block { .. } => {
                    crate::devices::virtio::block::hostile_tests::block_state_round_trips()
                }
                DeviceKind::Balloon => {
                    crate::devices::virtio::balloon::hostile_tests::balloon_state_round_trips()
                }
                DeviceKind::Agent => {
                    crate::devices::virtio::agent::hostile_tests::agent_state_round_trips()
                }
            }
        }
    }

    #[test]
    fn saved_layouts_are_checked() {
        let mut layout = DeviceLayout::for_disks(2).unwrap();
        layout.slots[1].irq = layout.slots[0].irq;
        assert!(layout.check().unwrap_err().to_string().contains("IRQ 5"));
        let mut layout = DeviceLayout::for_disks(2).unwrap();
        layout.slots[1].mmio_base = layout.slots[0].mmio_base;
        assert!(layout.check().is_err());
        let mut layout = DeviceLayout::for_disks(1).unwrap();
        layout.slots[0].mmio_base = 0x1000;
        assert!(layout.check().is_err());
        let mut layout = DeviceLayout::for_disks(1).unwrap();
        layout.slots[0].mmio_base += 1;
        assert!(layout.check().is_err(), "unaligned window");
    }
}
