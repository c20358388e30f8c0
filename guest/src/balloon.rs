//! The virtio-balloon driver (virtio 1.2, 5.5).
//!
//! The guest has no interrupts, so the balloon is served from the places where the
//! guest waits (`service`, called by `idle`, `sleep`, `count`, `listen`,
//! `mem-demand`): each call reads the target from the configuration space, inflates or
//! deflates towards it, answers a statistics request, and reports pages freed since the
//! last call. It is set up once at boot, and the first inflation happens before the
//! boot command line runs.
//!
//! - **Inflate:** takes pages from the top of the page pool, in as large pieces as it
//!   can, and sends their frame numbers, up to [`PFNS_PER_BUFFER`] per descriptor and
//!   [`BUFFERS`] descriptors per notification. It leaves [`RESERVE`] bytes in the pool
//!   for the guest itself.
//! - **Deflate:** sends frame numbers of held pages back; once the host has them, the
//!   pages go back to the pool (the host has no copy: they read zero).
//! - **Statistics:** free and available memory (the pool), total memory (RAM less the
//!   balloon), and zero for swap, faults and caches (the guest has none).
//! - **Free page reporting:** the pool remembers what was freed since the last report;
//!   those ranges, where still free, go to the host as one descriptor each, and come
//!   back to the pool when the host has released them.
//! - **Deflate on OOM:** `deflate_for` gives pages back to the pool without waiting for
//!   the host to ask, when a command needs memory the balloon holds.

use crate::mem::{PagePool, Range, RangeList, PAGE};
use crate::virtio::{self, Buffer, DeviceEntry, Mmio, Queue};

pub const DEVICE_TYPE: u32 = 5;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_REPORTING: u64 = 1 << 5;

/// Configuration space offsets: what the host asks for, what the driver holds (pages).
const CONFIG_NUM_PAGES: u64 = 0;
const CONFIG_ACTUAL: u64 = 4;

/// Frame numbers per descriptor (16 KiB of u32: 16 MiB of memory).
pub const PFNS_PER_BUFFER: usize = 4096;
/// Descriptors per notification.
pub const BUFFERS: usize = 8;
/// What inflating leaves in the pool, so the guest's own allocations still work.
pub const RESERVE: u64 = 2 << 20;
/// Most ranges of held pages the driver tracks; inflating stops when they are full.
const HELD_RANGES: usize = 64;
/// Most ranges in one free page report.
const REPORT_RANGES: usize = 32;
/// Longest range one reporting descriptor describes.
const REPORT_MAX_LEN: u64 = 1 << 30;
/// Statistics entries the driver sends.
const STATS_ENTRIES: usize = 8;

mod tag {
    pub const SWAP_IN: u16 = 0;
    pub const SWAP_OUT: u16 = 1;
    pub const MAJOR_FAULTS: u16 = 2;
    pub const MINOR_FAULTS: u16 = 3;
    pub const FREE: u16 = 4;
    pub const TOTAL: u16 = 5;
    pub const AVAILABLE: u16 = 6;
    pub const CACHES: u16 = 7;
}

pub struct Balloon {
    mmio: Mmio,
    features: u64,
    inflate: Queue,
    deflate: Queue,
    stats: Option<Queue>,
    report: Option<Queue>,
    held: RangeList<HELD_RANGES>,
    /// BUFFERS frame-number buffers of PFNS_PER_BUFFER each.
    pfns: u64,
    stats_buffer: u64,
    ram_total: u64,
    /// Frame numbers the driver last wrote to `actual`.
    actual: u32,
    /// Whether freed pages are reported (`balloon-report on|off`; on by default).
    pub reporting: bool,
}

impl Balloon {
    /// Sets up the device at `entry` (all four queues it offers), sends the first
    /// statistics, and follows the target once.
    pub fn init(
        entry: DeviceEntry,
        pool: &mut PagePool,
        ram_total: u64,
    ) -> Result<Balloon, &'static str> {
        let wanted = F_STATS_VQ | F_DEFLATE_ON_OOM | F_REPORTING;
        let (mmio, features) = virtio::negotiate(entry, DEVICE_TYPE, wanted)?;
        // Queues are numbered without gaps: the optional ones only exist if agreed.
        let inflate = virtio::setup_queue(&mmio, 0, 16, pool)?;
        let deflate = virtio::setup_queue(&mmio, 1, 16, pool)?;
        let mut next = 2;
        let stats = if features & F_STATS_VQ != 0 {
            next += 1;
            Some(virtio::setup_queue(&mmio, next - 1, 2, pool)?)
        } else {
            None
        };
        let report = if features & F_REPORTING != 0 {
            Some(virtio::setup_queue(&mmio, next, 16, pool)?)
        } else {
            None
        };
        let pfns = pool
            .alloc(4 * (PFNS_PER_BUFFER * BUFFERS) as u64)
            .ok_or("not enough guest memory for balloon buffers")?;
        let stats_buffer = pool
            .alloc(PAGE)
            .ok_or("not enough guest memory for balloon buffers")?;
        virtio::driver_ok(&mmio)?;
        let mut balloon = Balloon {
            mmio,
            features,
            inflate,
            deflate,
            stats,
            report,
            held: RangeList::new(),
            pfns,
            stats_buffer,
            ram_total,
            actual: 0,
            reporting: true,
        };
        // The device keeps the first statistics buffer and gives it back whenever it
        // wants fresh values.
        balloon.send_stats(pool);
        balloon.service(pool);
        Ok(balloon)
    }

    /// Bytes the balloon holds.
    pub fn held_bytes(&self) -> u64 {
        self.held.total()
    }

    /// Does what the host asks: statistics, the target, free page reports.
    pub fn service(&mut self, pool: &mut PagePool) {
        if self.stats.as_mut().is_some_and(|q| q.take_used().is_some()) {
            self.send_stats(pool);
        }
        let target = self.mmio.config_u32(CONFIG_NUM_PAGES) as u64 * PAGE;
        let held = self.held_bytes();
        if held < target {
            let room = pool.free_bytes().saturating_sub(RESERVE);
            self.inflate(pool, (target - held).min(room));
        } else if held > target {
            self.deflate(pool, held - target);
        }
        if self.reporting && self.report.is_some() && pool.has_unreported() {
            self.report_free(pool);
        }
    }

    /// Gives back up to `bytes` of the balloon's pages to the pool at once, for a
    /// command that is out of memory (only if the host agreed to DEFLATE_ON_OOM).
    /// Returns what came back.
    pub fn deflate_for(&mut self, pool: &mut PagePool, bytes: u64) -> u64 {
        if self.features & F_DEFLATE_ON_OOM == 0 {
            return 0;
        }
        self.deflate(pool, bytes)
    }

    fn buffer(&self, index: usize) -> *mut u32 {
        (self.pfns + (index * PFNS_PER_BUFFER * 4) as u64) as *mut u32
    }

    /// Writes frame numbers of `[start, start + len)` into buffer `index` from slot
    /// `at`; `len` fits the room left.
    fn write_pfns(&self, index: usize, at: usize, start: u64, len: u64) {
        let buffer = self.buffer(index);
        for (i, pfn) in (start / PAGE..(start + len) / PAGE).enumerate() {
            // SAFETY: the buffer is PFNS_PER_BUFFER u32s of driver memory and the caller
            // keeps at + i below that.
            unsafe { buffer.add(at + i).write_volatile(pfn as u32) };
        }
    }

    /// Sends `counts[i]` frame numbers of each filled buffer on `queue` and waits until
    /// the host has them all.
    fn send_buffers(pfns: u64, queue: &mut Queue, mmio: &Mmio, counts: &[usize]) {
        let mut sent = 0;
        for (i, &count) in counts.iter().enumerate() {
            let buffer = Buffer {
                addr: pfns + (i * PFNS_PER_BUFFER * 4) as u64,
                len: (count * 4) as u32,
                writable: false,
            };
            if count > 0 && queue.submit(&[buffer]).is_some() {
                sent += 1;
            }
        }
        queue.notify();
        for _ in 0..sent {
            if queue.wait_used(mmio).is_none() {
                return;
            }
        }
    }

    /// Moves up to `bytes` from the pool into the balloon. Returns what it moved.
    fn inflate(&mut self, pool: &mut PagePool, bytes: u64) -> u64 {
        let mut remaining = bytes & !(PAGE - 1);
        let mut moved = 0;
        'rounds: while remaining > 0 {
            let mut counts = [0usize; BUFFERS];
            let mut out_of_pages = false;
            for (index, count) in counts.iter_mut().enumerate() {
                while *count < PFNS_PER_BUFFER && remaining > 0 {
                    let room = (PFNS_PER_BUFFER - *count) as u64 * PAGE;
                    let Some((start, len)) = pool.take(room.min(remaining)) else {
                        out_of_pages = true;
                        break;
                    };
                    if !self.held.push(start, len) {
                        // Too fragmented to track more: keep what we have.
                        pool.free_untouched(start, len);
                        out_of_pages = true;
                        break;
                    }
                    self.write_pfns(index, *count, start, len);
                    *count += (len / PAGE) as usize;
                    remaining -= len;
                    moved += len;
                }
                if out_of_pages {
                    break;
                }
            }
            if counts[0] == 0 {
                break 'rounds;
            }
            Self::send_buffers(self.pfns, &mut self.inflate, &self.mmio, &counts);
            if out_of_pages {
                break;
            }
        }
        self.tell_actual();
        moved
    }

    /// Takes up to `bytes` out of the balloon into the pool. Returns what came back.
    fn deflate(&mut self, pool: &mut PagePool, bytes: u64) -> u64 {
        let mut remaining = bytes & !(PAGE - 1);
        let mut moved = 0;
        while remaining > 0 && self.held_bytes() > 0 {
            let mut counts = [0usize; BUFFERS];
            // The pages go back to the pool once the host has the frame numbers.
            let mut returning: RangeList<{ BUFFERS * 4 }> = RangeList::new();
            'fill: for (index, count) in counts.iter_mut().enumerate() {
                while *count < PFNS_PER_BUFFER && remaining > 0 {
                    let room = (PFNS_PER_BUFFER - *count) as u64 * PAGE;
                    let Some((start, len)) = self.held.take_last(room.min(remaining)) else {
                        break 'fill;
                    };
                    if !returning.push(start, len) {
                        self.held.push(start, len);
                        break 'fill;
                    }
                    self.write_pfns(index, *count, start, len);
                    *count += (len / PAGE) as usize;
                    remaining -= len;
                }
            }
            if counts[0] == 0 {
                break;
            }
            Self::send_buffers(self.pfns, &mut self.deflate, &self.mmio, &counts);
            for r in returning.as_slice() {
                pool.free_untouched(r.start, r.end - r.start);
                moved += r.end - r.start;
            }
        }
        self.tell_actual();
        moved
    }

    fn tell_actual(&mut self) {
        let pages = (self.held_bytes() / PAGE) as u32;
        if pages != self.actual {
            self.actual = pages;
            self.mmio.write_config_u32(CONFIG_ACTUAL, pages);
        }
    }

    /// Fills the statistics buffer and hands it to the device.
    fn send_stats(&mut self, pool: &PagePool) {
        let Some(queue) = self.stats.as_mut() else {
            return;
        };
        let free = pool.free_bytes();
        let entries: [(u16, u64); STATS_ENTRIES] = [
            (tag::SWAP_IN, 0),
            (tag::SWAP_OUT, 0),
            (tag::MAJOR_FAULTS, 0),
            (tag::MINOR_FAULTS, 0),
            (tag::FREE, free),
            (tag::TOTAL, self.ram_total - self.held.total()),
            (tag::AVAILABLE, free),
            (tag::CACHES, 0),
        ];
        let base = self.stats_buffer as *mut u8;
        for (i, (t, v)) in entries.iter().enumerate() {
            let bytes = t.to_le_bytes().into_iter().chain(v.to_le_bytes());
            for (j, b) in bytes.enumerate() {
                // SAFETY: the statistics buffer is a page of driver memory; 8 entries of
                // 10 bytes fit.
                unsafe { base.add(i * 10 + j).write_volatile(b) };
            }
        }
        let buffer = Buffer {
            addr: self.stats_buffer,
            len: (STATS_ENTRIES * 10) as u32,
            writable: false,
        };
        if queue.submit(&[buffer]).is_some() {
            queue.notify();
        }
    }

    /// Reports the ranges freed since the last report (where still free) to the host,
    /// and waits until it has released them.
    fn report_free(&mut self, pool: &mut PagePool) {
        let Some(queue) = self.report.as_mut() else {
            return;
        };
        let mut pieces = [Range::default(); REPORT_RANGES];
        let n = pool.take_unreported(&mut pieces);
        // Chains of up to 8 ranges (what one submit takes), each range cut to
        // REPORT_MAX_LEN; when the queue is full, wait for the host to catch up.
        let mut chain = [Buffer {
            addr: 0,
            len: 0,
            writable: true,
        }; 8];
        let mut in_chain = 0;
        let mut in_flight = 0;
        for piece in &pieces[..n] {
            let mut start = piece.start;
            while start < piece.end {
                let len = (piece.end - start).min(REPORT_MAX_LEN);
                chain[in_chain] = Buffer {
                    addr: start,
                    len: len as u32,
                    writable: true,
                };
                in_chain += 1;
                start += len;
                if in_chain == chain.len() {
                    if !submit_or_drain(queue, &self.mmio, &chain, &mut in_flight) {
                        return;
                    }
                    in_chain = 0;
                }
            }
        }
        if in_chain > 0 && !submit_or_drain(queue, &self.mmio, &chain[..in_chain], &mut in_flight) {
            return;
        }
        queue.notify();
        drain(queue, &self.mmio, &mut in_flight);
    }
}

/// Waits for every chain in flight on `queue`; false if the device stopped working.
fn drain(queue: &mut Queue, mmio: &Mmio, in_flight: &mut usize) -> bool {
    while *in_flight > 0 {
        if queue.wait_used(mmio).is_none() {
            return false;
        }
        *in_flight -= 1;
    }
    true
}

/// Submits `chain`, first waiting for the chains in flight if the queue is full; false
/// if the device stopped working.
fn submit_or_drain(
    queue: &mut Queue,
    mmio: &Mmio,
    chain: &[Buffer],
    in_flight: &mut usize,
) -> bool {
    if queue.submit(chain).is_none() {
        queue.notify();
        if !drain(queue, mmio, in_flight) || queue.submit(chain).is_none() {
            return false;
        }
    }
    *in_flight += 1;
    true
}
