//! A virtio driver for tests: it drives a device through its MMIO transport's registers
//! and through rings in real guest memory, as a guest would, so the hostile-driver tests
//! of each device (`*/hostile_tests.rs`) can set a device up in a few calls and then
//! write whatever descriptors and ring indices they want to throw at it.
//!
//! The driver does exactly what it is told and checks nothing: placing a chain, publishing
//! a head or spoiling a ring index are separate steps, so a test can do any of them wrong.
//! A notification serves the queue at once on the calling thread, as the VM's event
//! thread would when the queue's ioeventfd fires.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{reg, MmioTransport, TransportArgs, TransportState};
use super::{features, status, DeviceStateError, VirtioDevice, VirtioInterrupt};
use crate::devices::bus::BusDevice;
use crate::snapshot::Persist;
use crate::vstate::memory::{create_ram, GuestRam};

/// Descriptor flags (virtio 1.2, 2.7.5).
pub(crate) const F_NEXT: u16 = 1;
pub(crate) const F_WRITE: u16 = 2;
pub(crate) const F_INDIRECT: u16 = 4;

/// Where the driver puts queue `i`'s rings unless told otherwise: the descriptor table at
/// `RINGS + i * RING_STRIDE`, the available ring 0x1000 on, the used ring 0x2000 on. Each
/// part has room for a queue of 256 entries; tests keep their buffers clear of this.
pub(crate) const RINGS: u64 = 0x10_0000;
const RING_STRIDE: u64 = 0x4000;
const DESC_SIZE: u64 = 16;

/// One descriptor as the driver writes it into the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A buffer the device reads.
    pub(crate) fn readable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A buffer the device writes.
    pub(crate) fn writable(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }
}

/// Where one queue's three parts sit in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueLayout {
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueLayout {
    /// The default place of queue `index`'s rings (see [`RINGS`]).
    pub(crate) fn default_for(index: usize) -> QueueLayout {
        let desc_table = RINGS + index as u64 * RING_STRIDE;
        QueueLayout {
            desc_table,
            avail_ring: desc_table + 0x1000,
            used_ring: desc_table + 0x2000,
        }
    }

    /// The available ring's `idx` field: where the driver says how far it published.
    pub(crate) fn avail_idx(&self) -> GuestAddress {
        GuestAddress(self.avail_ring + 2)
    }

    /// The used ring's `flags` field (NO_NOTIFY).
    pub(crate) fn used_flags(&self) -> GuestAddress {
        GuestAddress(self.used_ring)
    }

    /// The used ring's `idx` field: where the device says how far it used.
    pub(crate) fn used_idx(&self) -> GuestAddress {
        GuestAddress(self.used_ring + 2)
    }
}

/// Lets a device's test harness, a struct with a `driver: TestDriver` field and the
/// device's own handles beside it, be used as the driver itself (`h.kick(..)`,
/// `h.transport`, `h.mem`).
macro_rules! deref_to_driver {
    ($harness:ty) => {
        impl std::ops::Deref for $harness {
            type Target = $crate::devices::virtio::test_driver::TestDriver;
            fn deref(&self) -> &Self::Target {
                &self.driver
            }
        }

        impl std::ops::DerefMut for $harness {
            fn deref_mut(&mut self) -> &mut Self::Target {
                &mut self.driver
            }
        }
    };
}
pub(crate) use deref_to_driver;

/// What the driver remembers of one queue.
#[derive(Debug, Clone)]
struct DriverQueue {
    layout: QueueLayout,
    /// The size set up; 0 until then.
    size: u16,
    /// The driver's available index: heads published so far.
    avail_idx: u16,
    /// Used entries already taken by [`TestDriver::take_used`].
    used_seen: u16,
}

impl DriverQueue {
    /// The ring slot a free-running index falls in. A queue of size 0 (never set up, or
    /// set up wrongly on purpose) has only slot 0, so a hostile test cannot divide by 0.
    fn slot(&self, idx: u16) -> u64 {
        idx.checked_rem(self.size).unwrap_or(0) as u64
    }
}

/// A device on its MMIO transport over fresh guest RAM, and the driver's side of it.
pub(crate) struct TestDriver {
    pub transport: MmioTransport,
    pub mem: Arc<GuestRam>,
    /// How many times the device raised its interrupt.
    pub interrupts: Arc<AtomicUsize>,
    queues: Vec<DriverQueue>,
}

/// An interrupt whose irqfd goes nowhere and whose vCPU wake-up counts into `counter`.
pub(crate) fn counting_interrupt(counter: Arc<AtomicUsize>) -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }),
    ))
}

fn transport_args(
    device: Box<dyn VirtioDevice>,
    mem: &Arc<GuestRam>,
    interrupts: Arc<AtomicUsize>,
) -> TransportArgs {
    let queue_events = (0..device.queue_max_sizes().len())
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    TransportArgs {
        device,
        mem: mem.clone(),
        queue_events,
        interrupt: counting_interrupt(interrupts),
    }
}

/// Restores a transport from `state` on `mem`, around the device `restore_device`
/// restores from `state.device`, as the device manager does for a snapshot.
pub(crate) fn restore_transport(
    mem: &Arc<GuestRam>,
    state: &TransportState,
    restore_device: impl FnOnce(&Arc<GuestRam>) -> Result<Box<dyn VirtioDevice>, DeviceStateError>,
) -> Result<MmioTransport, DeviceStateError> {
    let device = restore_device(mem)?;
    MmioTransport::restore(transport_args(device, mem, Arc::default()), state)
}

impl TestDriver {
    /// `mem_size` bytes of guest RAM and the device `make_device` builds over it, on its
    /// transport; the driver has not touched a register yet.
    pub(crate) fn new(
        mem_size: u64,
        make_device: impl FnOnce(&Arc<GuestRam>) -> Box<dyn VirtioDevice>,
    ) -> TestDriver {
        let mem = Arc::new(create_ram(mem_size).unwrap());
        let interrupts = Arc::new(AtomicUsize::new(0));
        let TransportArgs {
            device,
            mem,
            queue_events,
            interrupt,
        } = transport_args(make_device(&mem), &mem, interrupts.clone());
        let queues = (0..queue_events.len())
            .map(|index| DriverQueue {
                layout: QueueLayout::default_for(index),
                size: 0,
                avail_idx: 0,
                used_seen: 0,
            })
            .collect();
        TestDriver {
            transport: MmioTransport::new(device, mem.clone(), queue_events, interrupt),
            mem,
            interrupts,
            queues,
        }
    }

    /// Drops the transport, then plugs in the one `restore` makes on the same memory (for
    /// a snapshot round trip). The driver keeps what it knew of its rings, as a guest
    /// restored from a snapshot does. The old transport goes first, so what its device
    /// held (a disk image's lock) is free for the new one.
    pub(crate) fn restore(
        self,
        state: &TransportState,
        restore_device: impl FnOnce(&Arc<GuestRam>) -> Result<Box<dyn VirtioDevice>, DeviceStateError>,
    ) -> Result<TestDriver, DeviceStateError> {
        let TestDriver {
            transport,
            mem,
            interrupts,
            queues,
        } = self;
        drop(transport);
        let args = transport_args(restore_device(&mem)?, &mem, interrupts.clone());
        Ok(TestDriver {
            transport: MmioTransport::restore(args, state)?,
            mem,
            interrupts,
            queues,
        })
    }

    pub(crate) fn write_reg(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    pub(crate) fn read_reg(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.transport.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub(crate) fn needs_reset(&mut self) -> bool {
        self.read_reg(reg::STATUS) & status::DEVICE_NEEDS_RESET != 0
    }

    /// The driver noticed the device and knows how to drive it.
    pub(crate) fn acknowledge(&mut self) {
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    }

    /// Both words of the features the device offers.
    pub(crate) fn offered_features(&mut self) -> u64 {
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let low = self.read_reg(reg::DEVICE_FEATURES) as u64;
        self.write_reg(reg::DEVICE_FEATURES_SEL, 1);
        low | (self.read_reg(reg::DEVICE_FEATURES) as u64) << 32
    }

    /// Accepts what the device offers of `wanted` and VERSION_1, and sets FEATURES_OK.
    /// Returns the accepted features.
    pub(crate) fn negotiate(&mut self, wanted: u64) -> u64 {
        let acked = self.offered_features() & (wanted | features::VERSION_1);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, acked as u32);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, (acked >> 32) as u32);
        self.write_reg(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        acked
    }

    /// Sets queue `index` up with `size` entries at its default place and enables it.
    pub(crate) fn setup_queue(&mut self, index: usize, size: u16) {
        self.setup_queue_at(index, size, QueueLayout::default_for(index));
    }

    /// Sets queue `index` up with `size` entries at `layout` (which may be anywhere, or
    /// nowhere) and enables it.
    pub(crate) fn setup_queue_at(&mut self, index: usize, size: u16, layout: QueueLayout) {
        self.write_reg(reg::QUEUE_SEL, index as u32);
        self.write_reg(reg::QUEUE_NUM, size as u32);
        let parts = [
            (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, layout.desc_table),
            (
                reg::QUEUE_DRIVER_LOW,
                reg::QUEUE_DRIVER_HIGH,
                layout.avail_ring,
            ),
            (
                reg::QUEUE_DEVICE_LOW,
                reg::QUEUE_DEVICE_HIGH,
                layout.used_ring,
            ),
        ];
        for (low, high, addr) in parts {
            self.write_reg(low, addr as u32);
            self.write_reg(high, (addr >> 32) as u32);
        }
        self.write_reg(reg::QUEUE_READY, 1);
        let queue = &mut self.queues[index];
        queue.layout = layout;
        queue.size = size;
    }

    /// The driver is done setting up: DRIVER_OK.
    pub(crate) fn driver_ok(&mut self) {
        self.write_reg(
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// The whole standard setup: acknowledge, accept `wanted` (see [`Self::negotiate`]),
    /// set every queue up with `queue_size` entries at its default place, DRIVER_OK.
    /// Returns the accepted features.
    pub(crate) fn set_up(&mut self, wanted: u64, queue_size: u16) -> u64 {
        self.acknowledge();
        let acked = self.negotiate(wanted);
        for index in 0..self.queues.len() {
            self.setup_queue(index, queue_size);
        }
        self.driver_ok();
        acked
    }

    /// Where queue `index`'s rings are.
    pub(crate) fn layout(&self, queue: usize) -> QueueLayout {
        self.queues[queue].layout
    }

    /// Zeroes the rings' indices, in guest memory and in the driver's count, as a driver
    /// does before it sets a reset device up again.
    pub(crate) fn forget_rings(&mut self) {
        for queue in &mut self.queues {
            self.mem.write_obj(0u16, queue.layout.avail_idx()).unwrap();
            self.mem.write_obj(0u16, queue.layout.used_idx()).unwrap();
            queue.avail_idx = 0;
            queue.used_seen = 0;
        }
    }

    /// Writes descriptor `index` of `queue`'s table, whatever it holds.
    pub(crate) fn desc(
        &self,
        queue: usize,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        self.write_desc(
            queue,
            index,
            Desc {
                addr,
                len,
                flags,
                next,
            },
        );
    }

    /// Writes `desc` as descriptor `index` of `queue`'s table.
    pub(crate) fn write_desc(&self, queue: usize, index: u16, desc: Desc) {
        let at = GuestAddress(self.queues[queue].layout.desc_table + index as u64 * DESC_SIZE);
        self.mem.write_obj(desc.addr, at).unwrap();
        self.mem.write_obj(desc.len, at.unchecked_add(8)).unwrap();
        self.mem
            .write_obj(desc.flags, at.unchecked_add(12))
            .unwrap();
        self.mem.write_obj(desc.next, at.unchecked_add(14)).unwrap();
    }

    /// Reads descriptor `index` of `queue`'s table back.
    pub(crate) fn read_desc(&self, queue: usize, index: u16) -> Desc {
        let at = GuestAddress(self.queues[queue].layout.desc_table + index as u64 * DESC_SIZE);
        Desc {
            addr: self.mem.read_obj(at).unwrap(),
            len: self.mem.read_obj(at.unchecked_add(8)).unwrap(),
            flags: self.mem.read_obj(at.unchecked_add(12)).unwrap(),
            next: self.mem.read_obj(at.unchecked_add(14)).unwrap(),
        }
    }

    /// Writes `descs` as one chain at descriptors `head`, `head + 1`, ...: each but the
    /// last gets NEXT and points at the one after it; their other flags stay. The chain
    /// is not published.
    pub(crate) fn write_chain(&self, queue: usize, head: u16, descs: &[Desc]) {
        for (i, desc) in descs.iter().enumerate() {
            let index = head.wrapping_add(i as u16);
            let desc = if i + 1 < descs.len() {
                Desc {
                    flags: desc.flags | F_NEXT,
                    next: index.wrapping_add(1),
                    ..*desc
                }
            } else {
                *desc
            };
            self.write_desc(queue, index, desc);
        }
    }

    /// Writes `descs` as one chain from `head` (see [`Self::write_chain`]) and publishes
    /// it, without notifying.
    pub(crate) fn add_chain(&mut self, queue: usize, head: u16, descs: &[Desc]) {
        self.write_chain(queue, head, descs);
        self.publish(queue, head);
    }

    /// Puts `head` in the next slot of `queue`'s available ring and moves the ring's index
    /// on, whether or not `head` is a chain (or a descriptor at all).
    pub(crate) fn publish(&mut self, queue: usize, head: u16) {
        let q = &mut self.queues[queue];
        let slot = q.slot(q.avail_idx);
        self.mem
            .write_obj(head, GuestAddress(q.layout.avail_ring + 4 + slot * 2))
            .unwrap();
        q.avail_idx = q.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(q.avail_idx, q.layout.avail_idx())
            .unwrap();
    }

    /// Notifies `queue`: the device serves it now, on this thread.
    pub(crate) fn notify(&mut self, queue: usize) {
        self.transport.process_queue(queue);
    }

    /// Publishes `head` on `queue` and notifies it.
    pub(crate) fn kick(&mut self, queue: usize, head: u16) {
        self.publish(queue, head);
        self.notify(queue);
    }

    /// The used entries of `queue` not taken yet: (descriptor id, length).
    pub(crate) fn take_used(&mut self, queue: usize) -> Vec<(u32, u32)> {
        let q = &mut self.queues[queue];
        let idx: u16 = self.mem.read_obj(q.layout.used_idx()).unwrap();
        let mut used = Vec::new();
        while q.used_seen != idx {
            let at = GuestAddress(q.layout.used_ring + 4 + q.slot(q.used_seen) * 8);
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            used.push((id, len));
            q.used_seen = q.used_seen.wrapping_add(1);
        }
        used
    }

    /// The descriptor ids of the used entries of `queue` not taken yet.
    pub(crate) fn take_used_ids(&mut self, queue: usize) -> Vec<u32> {
        self.take_used(queue)
            .into_iter()
            .map(|(id, _)| id)
            .collect()
    }

    /// The newest used entry of `queue`, taken or not: (descriptor id, length).
    pub(crate) fn last_used(&self, queue: usize) -> (u32, u32) {
        let q = &self.queues[queue];
        let idx: u16 = self.mem.read_obj(q.layout.used_idx()).unwrap();
        assert!(idx > 0, "no used entry");
        let at = GuestAddress(q.layout.used_ring + 4 + q.slot(idx - 1) * 8);
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    /// The device behind the transport, as the kind `D` it is.
    pub(crate) fn device_mut<D: 'static>(&mut self) -> &mut D {
        self.transport
            .device_mut()
            .as_any_mut()
            .downcast_mut::<D>()
            .expect("the device is of the kind asked for")
    }
}
