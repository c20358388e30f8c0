//! A minimal virtio-mmio driver (virtio 1.2, modern interface) for the built-in guest.
//!
//! The guest runs with interrupts off, so it polls used rings: after queuing requests it
//! waits on the idle port, which returns when the device signals a completion (the host
//! wakes idle vCPUs) or after a short timeout.

use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

use crate::io;
use crate::mem::PagePool;

/// One `virtio_mmio.device=<size>@<addr>:<irq>` command-line entry.
#[derive(Clone, Copy)]
pub struct DeviceEntry {
    pub base: u64,
}

/// Parses `virtio_mmio.device=4K@0xd0000000:5`.
pub fn parse_entry(word: &str) -> Option<DeviceEntry> {
    let rest = word.strip_prefix(ENTRY_PREFIX)?;
    let (_, rest) = rest.split_once('@')?;
    let addr = rest.split(':').next()?;
    let base = u64::from_str_radix(addr.strip_prefix("0x")?, 16).ok()?;
    Some(DeviceEntry { base })
}

pub const ENTRY_PREFIX: &str = "virtio_mmio.device=";

mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG: u64 = 0x100;
}

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_NEEDS_RESET: u32 = 64;
pub const F_VERSION_1: u64 = 1 << 32;

/// How many times to look at the used ring before idling (about 100 µs at most). Tuned
/// with bench/storage.sh: 500 left throughput on the table, 8000 gained nothing more.
const SPIN_POLLS: u32 = 2000;
/// The device does not need notifications (virtio 1.2, 2.7.10).
const USED_F_NO_NOTIFY: u16 = 1;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;

/// A device's register window.
pub struct Mmio {
    base: u64,
}

impl Mmio {
    fn read(&self, offset: u64) -> u32 {
        // SAFETY: the window is the device's MMIO range, identity-mapped; the access traps
        // to the host, which emulates the register.
        unsafe { read_volatile((self.base + offset) as *const u32) }
    }

    fn write(&self, offset: u64, value: u32) {
        // SAFETY: as for `read`.
        unsafe { write_volatile((self.base + offset) as *mut u32, value) }
    }

    pub fn config_u32(&self, offset: u64) -> u32 {
        self.read(reg::CONFIG + offset)
    }

    pub fn config_u64(&self, offset: u64) -> u64 {
        self.config_u32(offset) as u64 | (self.config_u32(offset + 4) as u64) << 32
    }

    pub fn write_config_u32(&self, offset: u64, value: u32) {
        self.write(reg::CONFIG + offset, value)
    }

    pub fn needs_reset(&self) -> bool {
        self.read(reg::STATUS) & STATUS_NEEDS_RESET != 0
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Descriptor {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// One buffer of a request: guest-physical address, length, device-writable or not.
#[derive(Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A split virtqueue the driver owns.
pub struct Queue {
    size: u16,
    desc: *mut Descriptor,
    avail: *mut u16,
    used: *const u8,
    free: [u16; 256],
    free_count: usize,
    avail_idx: u16,
    last_used: u16,
    mmio_notify: u64,
    /// This queue's index, the value written to QueueNotify.
    index: u16,
}

impl Queue {
    /// Queues a request made of `buffers` (readable ones first); returns its head
    /// descriptor, or None if there are not enough free descriptors. The device hears
    /// of it at the next [`Queue::notify`], so several requests cost one notification.
    pub fn submit(&mut self, buffers: &[Buffer]) -> Option<u16> {
        if buffers.is_empty() || buffers.len() > self.free_count {
            return None;
        }
        let mut ids = [0u16; 8];
        for id in ids.iter_mut().take(buffers.len()) {
            self.free_count -= 1;
            *id = self.free[self.free_count];
        }
        for (i, b) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let d = Descriptor {
                addr: b.addr,
                len: b.len,
                flags: if b.writable { DESC_F_WRITE } else { 0 }
                    | if last { 0 } else { DESC_F_NEXT },
                next: if last { 0 } else { ids[i + 1] },
            };
            // SAFETY: ids come from the free list, all below the queue size.
            unsafe { write_volatile(self.desc.add(ids[i] as usize), d) };
        }
        let slot = self.avail_idx % self.size;
        // SAFETY: avail ring layout: flags, idx, ring[size]; slot < size.
        unsafe { write_volatile(self.avail.add(2 + slot as usize), ids[0]) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        fence(Ordering::SeqCst);
        // SAFETY: avail->idx is the second u16 of the ring.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx) };
        Some(ids[0])
    }

    /// The guest-physical address descriptor `index` points at.
    pub fn descriptor_addr(&self, index: u16) -> u64 {
        if index >= self.size {
            return 0;
        }
        // SAFETY: index < size, inside the descriptor table.
        unsafe { read_volatile(self.desc.add(index as usize)) }.addr
    }

    /// For hostile-driver tests: makes the chain at `head` loop back to its start.
    pub fn loop_chain(&mut self, head: u16) {
        let mut d = head;
        for _ in 0..self.size {
            // SAFETY: d < size (checked below before it is used again).
            let mut desc = unsafe { read_volatile(self.desc.add(d as usize)) };
            if desc.flags & DESC_F_NEXT == 0 {
                desc.flags |= DESC_F_NEXT;
                desc.next = head;
                // SAFETY: as above.
                unsafe { write_volatile(self.desc.add(d as usize), desc) };
                return;
            }
            d = desc.next;
            if d >= self.size {
                return;
            }
        }
    }

    /// For hostile-driver tests: points the descriptor after `head` at `addr`.
    pub fn redirect_next(&mut self, head: u16, addr: u64) {
        // SAFETY: head came from submit, so it and its next are below the queue size.
        unsafe {
            let first = read_volatile(self.desc.add(head as usize));
            let mut second = read_volatile(self.desc.add(first.next as usize));
            second.addr = addr;
            write_volatile(self.desc.add(first.next as usize), second);
        }
    }

    /// For hostile-driver tests: claims far more available buffers than the queue holds.
    pub fn publish_bogus_avail_index(&mut self) {
        fence(Ordering::SeqCst);
        // SAFETY: avail->idx is the second u16 of the ring.
        unsafe { write_volatile(self.avail.add(1), self.avail_idx.wrapping_add(1000)) };
    }

    /// Tells the device there are new requests (one trapped MMIO write), unless the
    /// device is watching the queue already (VIRTQ_USED_F_NO_NOTIFY): it then sees them
    /// without the exit. The fence orders the avail index before the flag read; the
    /// device clears the flag and then re-reads the index, so one side always sees the
    /// other.
    pub fn notify(&self) {
        fence(Ordering::SeqCst);
        // SAFETY: used->flags is the first u16 of the used ring.
        let flags = unsafe { read_volatile(self.used as *const u16) };
        if flags & USED_F_NO_NOTIFY != 0 {
            return;
        }
        // SAFETY: QueueNotify of this device; KVM turns it into an ioeventfd signal.
        unsafe { write_volatile(self.mmio_notify as *mut u32, self.index as u32) };
    }

    /// Takes one completed request off the used ring: (head, used length).
    pub fn take_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used ring layout: flags u16, idx u16, ring[size] of (id u32, len u32).
        let idx = unsafe { read_volatile((self.used as *const u16).add(1)) };
        if idx == self.last_used {
            return None;
        }
        fence(Ordering::SeqCst);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: slot < size, inside the used ring.
        let (id, len) = unsafe {
            let elem = self.used.add(4 + slot * 8) as *const u32;
            (read_volatile(elem), read_volatile(elem.add(1)))
        };
        self.last_used = self.last_used.wrapping_add(1);
        // Return the chain's descriptors to the free list.
        let mut d = id as u16;
        loop {
            if d >= self.size || self.free_count == self.size as usize {
                break;
            }
            self.free[self.free_count] = d;
            self.free_count += 1;
            // SAFETY: d < size.
            let desc = unsafe { read_volatile(self.desc.add(d as usize)) };
            if desc.flags & DESC_F_NEXT == 0 {
                break;
            }
            d = desc.next;
        }
        Some((id as u16, len))
    }

    /// Waits for the next completion. Returns None if the device stopped working.
    pub fn wait_used(&mut self, mmio: &Mmio) -> Option<(u16, u32)> {
        let mut idles_without_progress = 0;
        loop {
            if let Some(done) = self.take_used() {
                return Some(done);
            }
            // A completion wakes the idle vCPU at once, so an idle that ends with nothing
            // done is rare. Only after several in a row is it worth an MMIO read (an
            // exit) to see whether the device broke.
            if self.spin_for_used() {
                continue;
            }
            io::idle(100_000);
            if self.take_used_pending() == 0 {
                idles_without_progress += 1;
                if idles_without_progress >= 10 {
                    if mmio.needs_reset() {
                        return None;
                    }
                    idles_without_progress = 0;
                }
            }
        }
    }

    /// Polls the used ring for a short while before the guest gives up its vCPU: a
    /// completion that lands meanwhile costs no exit at all.
    fn spin_for_used(&self) -> bool {
        for _ in 0..SPIN_POLLS {
            if self.take_used_pending() != 0 {
                return true;
            }
            core::hint::spin_loop();
        }
        false
    }

    /// Completions published but not yet taken.
    fn take_used_pending(&self) -> u16 {
        // SAFETY: used->idx is the second u16 of the used ring.
        let idx = unsafe { read_volatile((self.used as *const u16).add(1)) };
        idx.wrapping_sub(self.last_used)
    }
}

/// A virtio device after feature negotiation, with its first queue set up.
pub struct Device {
    pub mmio: Mmio,
    pub features: u64,
    pub queue: Queue,
}

/// The virtio device type at `entry`, or None when there is no virtio-mmio version 2
/// device there.
pub fn device_type(entry: DeviceEntry) -> Option<u32> {
    let mmio = Mmio { base: entry.base };
    if mmio.read(reg::MAGIC) != 0x7472_6976 || mmio.read(reg::VERSION) != 2 {
        return None;
    }
    Some(mmio.read(reg::DEVICE_ID))
}

/// Resets and initialises the device at `entry`: accepts `wanted` features (plus
/// VERSION_1) and sets up queue 0 with up to `queue_size` descriptors.
pub fn init(
    entry: DeviceEntry,
    device_id: u32,
    wanted: u64,
    queue_size: u16,
    pool: &mut PagePool,
) -> Result<Device, &'static str> {
    let (mmio, features) = negotiate(entry, device_id, wanted)?;
    let queue = setup_queue(&mmio, 0, queue_size, pool)?;
    driver_ok(&mmio)?;
    Ok(Device {
        queue,
        mmio,
        features,
    })
}

/// Resets the device at `entry` and agrees on features: those of `wanted` (plus
/// VERSION_1) that it offers. Queues are set up next ([`setup_queue`]), then
/// [`driver_ok`].
pub fn negotiate(
    entry: DeviceEntry,
    device_id: u32,
    wanted: u64,
) -> Result<(Mmio, u64), &'static str> {
    let mmio = Mmio { base: entry.base };
    if mmio.read(reg::MAGIC) != 0x7472_6976 || mmio.read(reg::VERSION) != 2 {
        return Err("no virtio-mmio version 2 device at this address");
    }
    if mmio.read(reg::DEVICE_ID) != device_id {
        return Err("unexpected virtio device type");
    }
    mmio.write(reg::STATUS, 0);
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE);
    mmio.write(reg::STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    mmio.write(reg::DEVICE_FEATURES_SEL, 0);
    let low = mmio.read(reg::DEVICE_FEATURES) as u64;
    mmio.write(reg::DEVICE_FEATURES_SEL, 1);
    let offered = low | (mmio.read(reg::DEVICE_FEATURES) as u64) << 32;
    let features = offered & (wanted | F_VERSION_1);
    if features & F_VERSION_1 == 0 {
        return Err("device does not offer VERSION_1");
    }
    mmio.write(reg::DRIVER_FEATURES_SEL, 0);
    mmio.write(reg::DRIVER_FEATURES, features as u32);
    mmio.write(reg::DRIVER_FEATURES_SEL, 1);
    mmio.write(reg::DRIVER_FEATURES, (features >> 32) as u32);
    mmio.write(reg::STATUS, STATUS_NEGOTIATED);
    if mmio.read(reg::STATUS) & STATUS_FEATURES_OK == 0 {
        return Err("device refused the features");
    }
    Ok((mmio, features))
}

const STATUS_NEGOTIATED: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

/// Sets up queue `index` with up to `queue_size` descriptors (at most 256), its rings
/// in memory from `pool`.
pub fn setup_queue(
    mmio: &Mmio,
    index: u16,
    queue_size: u16,
    pool: &mut PagePool,
) -> Result<Queue, &'static str> {
    mmio.write(reg::QUEUE_SEL, index as u32);
    let max = mmio.read(reg::QUEUE_NUM_MAX);
    if max == 0 {
        return Err("a queue the driver needs is not available");
    }
    let size = (max as u16).min(queue_size).min(256);
    // Descriptor table, then the available ring, then (page-aligned) the used ring.
    let desc_bytes = 16 * size as u64;
    let avail_bytes = 6 + 2 * size as u64;
    let used_offset = crate::mem::align_up(desc_bytes + avail_bytes, 4096);
    let used_bytes = 6 + 8 * size as u64;
    let total = used_offset + used_bytes;
    let base = pool
        .alloc(total)
        .ok_or("not enough guest memory for a virtqueue")?;
    // SAFETY: freshly allocated, identity-mapped guest memory owned by this queue.
    unsafe { core::ptr::write_bytes(base as *mut u8, 0, total as usize) };
    let (desc, avail, used) = (base, base + desc_bytes, base + used_offset);
    mmio.write(reg::QUEUE_NUM, size as u32);
    mmio.write(reg::QUEUE_DESC_LOW, desc as u32);
    mmio.write(reg::QUEUE_DESC_HIGH, (desc >> 32) as u32);
    mmio.write(reg::QUEUE_DRIVER_LOW, avail as u32);
    mmio.write(reg::QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
    mmio.write(reg::QUEUE_DEVICE_LOW, used as u32);
    mmio.write(reg::QUEUE_DEVICE_HIGH, (used >> 32) as u32);
    mmio.write(reg::QUEUE_READY, 1);
    let mut free = [0u16; 256];
    for (i, slot) in free.iter_mut().enumerate().take(size as usize) {
        *slot = (size as usize - 1 - i) as u16;
    }
    Ok(Queue {
        size,
        desc: desc as *mut Descriptor,
        avail: avail as *mut u16,
        used: used as *const u8,
        free,
        free_count: size as usize,
        avail_idx: 0,
        last_used: 0,
        mmio_notify: mmio.base + reg::QUEUE_NOTIFY,
        index,
    })
}

/// Tells the device the driver is ready (after its queues are set up).
pub fn driver_ok(mmio: &Mmio) -> Result<(), &'static str> {
    mmio.write(reg::STATUS, STATUS_NEGOTIATED | STATUS_DRIVER_OK);
    if mmio.needs_reset() {
        return Err("device rejected the queue setup");
    }
    Ok(())
}
