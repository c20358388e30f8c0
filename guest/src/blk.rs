//! The virtio-blk driver and the `blk-*` commands.
//!
//! Requests are pipelined: up to [`SLOTS`] are in flight, each with its own header,
//! data buffer (up to [`SLOT_BYTES`]) and status byte.

use luvisor_guest_abi::pattern::{self, SECTOR};

use crate::io;
use crate::mem::PagePool;
use crate::virtio::{self, Buffer, Device, DeviceEntry};

const DEVICE_TYPE: u32 = 2;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// Requests in flight at once.
pub const SLOTS: usize = 16;
/// Largest data transfer per request.
pub const SLOT_BYTES: u64 = 128 * 1024;
const SLOT_SECTORS: u64 = SLOT_BYTES / SECTOR as u64;
/// Header (16 bytes) and status (1 byte) of each slot, in a 64-byte cell.
const META_BYTES: u64 = 64;

/// A command's failure, printed as `error: <command>: <this>`.
pub enum Error {
    Msg(&'static str),
    Status { sector: u64, status: u8 },
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Msg(m) => f.write_str(m),
            Error::Status { sector, status } => {
                let name = match status {
                    1 => "IOERR",
                    2 => "UNSUPP",
                    _ => "unknown",
                };
                write!(
                    f,
                    "request at sector {sector} failed with status {status} ({name})"
                )
            }
        }
    }
}

impl From<&'static str> for Error {
    fn from(m: &'static str) -> Error {
        Error::Msg(m)
    }
}

#[derive(Clone, Copy, Default)]
struct Slot {
    busy: bool,
    head: u16,
    sector: u64,
    count: u64,
}

pub struct Blk {
    dev: Device,
    pub capacity: u64,
    meta: u64,
    data: u64,
    slots: [Slot; SLOTS],
}

impl Blk {
    pub fn init(entry: DeviceEntry, pool: &mut PagePool) -> Result<Blk, &'static str> {
        let wanted = F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES;
        let dev = virtio::init(entry, DEVICE_TYPE, wanted, 128, pool)?;
        let capacity = dev.mmio.config_u64(0);
        let meta = pool
            .alloc(META_BYTES * SLOTS as u64)
            .ok_or("not enough guest memory for requests")?;
        let data = pool
            .alloc(SLOT_BYTES * SLOTS as u64)
            .ok_or("not enough guest memory for request buffers")?;
        Ok(Blk {
            dev,
            capacity,
            meta,
            data,
            slots: [Slot::default(); SLOTS],
        })
    }

    pub fn features(&self) -> u64 {
        self.dev.features
    }

    pub fn readonly(&self) -> bool {
        self.dev.features & F_RO != 0
    }

    fn header_addr(&self, slot: usize) -> u64 {
        self.meta + slot as u64 * META_BYTES
    }
    fn status_addr(&self, slot: usize) -> u64 {
        self.header_addr(slot) + 32
    }
    fn segment_addr(&self, slot: usize) -> u64 {
        self.header_addr(slot) + 16
    }
    pub fn data_addr(&self, slot: usize) -> u64 {
        self.data + slot as u64 * SLOT_BYTES
    }
    /// The data buffer of `slot` as bytes.
    pub fn data(&mut self, slot: usize, len: usize) -> &mut [u8] {
        // SAFETY: each slot's buffer is SLOT_BYTES of pool memory owned by this driver;
        // callers pass len <= SLOT_BYTES.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.data_addr(slot) as *mut u8,
                len.min(SLOT_BYTES as usize),
            )
        }
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(|s| !s.busy)
    }

    /// Queues a request in a free slot (the caller filled its data for writes).
    fn submit(&mut self, slot: usize, kind: u32, sector: u64, count: u64) -> Result<(), Error> {
        let header = self.header_addr(slot);
        // SAFETY: the slot's 64-byte metadata cell belongs to this driver.
        unsafe {
            (header as *mut u32).write_volatile(kind);
            ((header + 4) as *mut u32).write_volatile(0);
            ((header + 8) as *mut u64).write_volatile(sector);
            (self.status_addr(slot) as *mut u8).write_volatile(0xff);
        }
        let head = Buffer {
            addr: header,
            len: 16,
            writable: false,
        };
        let status = Buffer {
            addr: self.status_addr(slot),
            len: 1,
            writable: true,
        };
        let bytes = (count * SECTOR as u64) as u32;
        let mut buffers = [head, status, status];
        let n = match kind {
            T_IN => {
                buffers[1] = Buffer {
                    addr: self.data_addr(slot),
                    len: bytes,
                    writable: true,
                };
                3
            }
            T_OUT => {
                buffers[1] = Buffer {
                    addr: self.data_addr(slot),
                    len: bytes,
                    writable: false,
                };
                3
            }
            T_GET_ID => {
                buffers[1] = Buffer {
                    addr: self.data_addr(slot),
                    len: 20,
                    writable: true,
                };
                3
            }
            T_DISCARD | T_WRITE_ZEROES => {
                let seg = self.segment_addr(slot);
                // SAFETY: the 16-byte segment lives inside the slot's metadata cell.
                unsafe {
                    (seg as *mut u64).write_volatile(sector);
                    ((seg + 8) as *mut u32).write_volatile(count as u32);
                    ((seg + 12) as *mut u32).write_volatile(0);
                }
                buffers[1] = Buffer {
                    addr: seg,
                    len: 16,
                    writable: false,
                };
                3
            }
            _ => 2,
        };
        let head = self
            .dev
            .queue
            .submit(&buffers[..n])
            .ok_or("no free descriptors")?;
        self.slots[slot] = Slot {
            busy: true,
            head,
            sector,
            count,
        };
        Ok(())
    }

    /// Waits for one request to finish; returns its slot, or the failure.
    fn complete(&mut self) -> Result<usize, Error> {
        let (head, _) = self
            .dev
            .queue
            .wait_used(&self.dev.mmio)
            .ok_or("the device needs a reset")?;
        self.finish(head)
    }

    /// Like [`Blk::complete`], without waiting: `None` when nothing has finished. Used to
    /// take every finished request before queuing more under one notification.
    fn try_complete(&mut self) -> Option<Result<usize, Error>> {
        let (head, _) = self.dev.queue.take_used()?;
        Some(self.finish(head))
    }

    fn finish(&mut self, head: u16) -> Result<usize, Error> {
        let slot = self
            .slots
            .iter()
            .position(|s| s.busy && s.head == head)
            .ok_or("the device completed a request that was not queued")?;
        self.slots[slot].busy = false;
        // SAFETY: the slot's status byte, written by the device.
        let status = unsafe { (self.status_addr(slot) as *const u8).read_volatile() };
        if status != 0 {
            return Err(Error::Status {
                sector: self.slots[slot].sector,
                status,
            });
        }
        Ok(slot)
    }

    fn in_flight(&self) -> bool {
        self.slots.iter().any(|s| s.busy)
    }

    fn check_range(&self, start: u64, count: u64) -> Result<(), Error> {
        match start.checked_add(count) {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(Error::Msg("sectors beyond the end of the disk")),
        }
    }

    /// Writes `count` sectors of the seeded pattern from `start`.
    pub fn write_pattern(&mut self, start: u64, count: u64, seed: u64) -> Result<(), Error> {
        self.write_with(start, count, |sector, buf| {
            pattern::fill_sector(seed, sector, buf)
        })
    }

    /// Writes `count` sectors of the byte `value` from `start` (cheap to produce, for
    /// measuring the device rather than the guest).
    pub fn fill(&mut self, start: u64, count: u64, value: u8) -> Result<(), Error> {
        self.write_with(start, count, |_, buf| buf.fill(value))
    }

    /// Writes one sector that starts with `bytes` and is zero after them (at most a
    /// sector's worth): lets tests play a guest that plants headers in its disk.
    pub fn poke(&mut self, sector: u64, bytes: &[u8]) -> Result<(), Error> {
        self.write_with(sector, 1, |_, buf| {
            buf.fill(0);
            let n = bytes.len().min(buf.len());
            buf[..n].copy_from_slice(&bytes[..n]);
        })
    }

    /// Writes `count` sectors from `start`, each filled by `fill(sector, buf)`.
    fn write_with(
        &mut self,
        start: u64,
        count: u64,
        mut fill: impl FnMut(u64, &mut [u8]),
    ) -> Result<(), Error> {
        self.transfer(
            T_OUT,
            start,
            count,
            |blk, slot, first, n| {
                let buf = blk.data(slot, n as usize * SECTOR);
                for (i, sector) in buf.chunks_exact_mut(SECTOR).enumerate() {
                    fill(first + i as u64, sector);
                }
            },
            |_, _| {},
        )
    }

    /// Reads `count` sectors from `start` and compares them with the seeded pattern;
    /// calls `mismatch(sector)` for each one that differs.
    pub fn verify_pattern(
        &mut self,
        start: u64,
        count: u64,
        seed: u64,
        mut mismatch: impl FnMut(u64),
    ) -> Result<(), Error> {
        self.transfer(
            T_IN,
            start,
            count,
            |_, _, _, _| {},
            |blk, slot| {
                let Slot { sector, count, .. } = blk.slots[slot];
                let buf = blk.data(slot, count as usize * SECTOR);
                for (i, data) in buf.chunks_exact(SECTOR).enumerate() {
                    if !pattern::check_sector(seed, sector + i as u64, data) {
                        mismatch(sector + i as u64);
                    }
                }
            },
        )
    }

    /// Moves `count` sectors from `start` in requests of `kind` (T_IN or T_OUT), keeping
    /// every slot busy: `prepare(blk, slot, first_sector, sectors)` runs before a request
    /// is queued, `finished(blk, slot)` after it completed. Everything that finished is
    /// taken before more is queued, so a batch costs one notification.
    fn transfer(
        &mut self,
        kind: u32,
        start: u64,
        count: u64,
        mut prepare: impl FnMut(&mut Self, usize, u64, u64),
        mut finished: impl FnMut(&mut Self, usize),
    ) -> Result<(), Error> {
        self.check_range(start, count)?;
        let mut next = start;
        let end = start + count;
        loop {
            let mut queued = false;
            while let (Some(slot), true) = (self.free_slot(), next < end) {
                let n = (end - next).min(SLOT_SECTORS);
                prepare(self, slot, next, n);
                self.submit(slot, kind, next, n)?;
                next += n;
                queued = true;
            }
            if queued {
                self.dev.queue.notify();
            }
            if !self.in_flight() {
                return Ok(());
            }
            let mut done = Some(self.complete()?);
            while let Some(slot) = done {
                finished(self, slot);
                done = self.try_complete().transpose()?;
            }
        }
    }

    /// Sends a malformed request of `kind` (`oob`: a data buffer outside guest memory;
    /// `loop`: a descriptor chain that loops; `avail`: an available index far ahead) and
    /// reports what the device did: `Some((used length, status byte))`, or `None` when
    /// the device asked for a reset. The driver is unusable afterwards; set it up again.
    pub fn evil(&mut self, kind: &str) -> Result<Option<(u32, u8)>, Error> {
        let slot = self.free_slot().ok_or("no free request slot")?;
        match kind {
            "oob" | "loop" => {
                self.submit(slot, T_IN, 0, 1)?;
                let head = self.slots[slot].head;
                if kind == "oob" {
                    // Point the data descriptor (the head's next) far outside guest memory.
                    self.dev.queue.redirect_next(head, 0xFFFF_0000_0000);
                } else {
                    self.dev.queue.loop_chain(head);
                }
            }
            "avail" => self.dev.queue.publish_bogus_avail_index(),
            _ => return Err(Error::Msg("kind must be oob, loop or avail")),
        }
        self.dev.queue.notify();
        match self.dev.queue.wait_used(&self.dev.mmio) {
            // SAFETY: the slot's status byte.
            Some((_, len)) => Ok(Some((len, unsafe {
                (self.status_addr(slot) as *const u8).read_volatile()
            }))),
            None => Ok(None),
        }
    }

    /// Sends one request that carries no data and waits for it.
    fn simple(&mut self, kind: u32, sector: u64, count: u64) -> Result<usize, Error> {
        let slot = self.free_slot().ok_or("no free request slot")?;
        self.submit(slot, kind, sector, count)?;
        self.dev.queue.notify();
        self.complete()
    }

    pub fn flush(&mut self) -> Result<(), Error> {
        self.simple(T_FLUSH, 0, 0).map(|_| ())
    }

    pub fn discard(&mut self, start: u64, count: u64, zeroes: bool) -> Result<(), Error> {
        self.check_range(start, count)?;
        self.simple(
            if zeroes { T_WRITE_ZEROES } else { T_DISCARD },
            start,
            count,
        )
        .map(|_| ())
    }

    /// The device's serial number (GET_ID), up to 20 bytes.
    pub fn id(&mut self, out: &mut [u8; 20]) -> Result<usize, Error> {
        let slot = self.simple(T_GET_ID, 0, 0)?;
        let data = self.data(slot, 20);
        out.copy_from_slice(&data[..20]);
        Ok(out.iter().position(|&b| b == 0).unwrap_or(20))
    }

    /// Runs a benchmark for `seconds`; returns (operations, bytes, milliseconds).
    pub fn bench(
        &mut self,
        random: bool,
        write: bool,
        size: u64,
        seconds: u64,
    ) -> Result<(u64, u64, u64), Error> {
        let sectors = size / SECTOR as u64;
        if sectors == 0 || sectors > SLOT_SECTORS || !size.is_multiple_of(SECTOR as u64) {
            return Err(Error::Msg("size must be 1 to 128 KiB"));
        }
        if self.capacity < sectors {
            return Err(Error::Msg("the disk is smaller than one request"));
        }
        let positions = self.capacity / sectors;
        let mut rng: u64 = 0x2545_F491_4F6C_DD1D;
        let mut seq = 0u64;
        let start = io::clock_ms() as u64;
        let deadline = start + seconds * 1000;
        let mut ops = 0u64;
        // Reading the clock is a port I/O exit, which costs more than a request: look
        // at it only every CLOCK_EVERY completions.
        const CLOCK_EVERY: u64 = 512;
        let mut running = true;
        let mut checked_at = 0u64;
        loop {
            if ops >= checked_at + CLOCK_EVERY || ops == 0 {
                running = (io::clock_ms() as u64) < deadline;
                checked_at = ops;
            }
            let mut queued = false;
            while let (Some(slot), true) = (self.free_slot(), running) {
                let index = if random {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng % positions
                } else {
                    seq = (seq + 1) % positions;
                    seq
                };
                self.submit(
                    slot,
                    if write { T_OUT } else { T_IN },
                    index * sectors,
                    sectors,
                )?;
                queued = true;
            }
            if queued {
                self.dev.queue.notify();
            }
            if !self.in_flight() {
                break;
            }
            self.complete()?;
            ops += 1;
            while let Some(done) = self.try_complete() {
                done?;
                ops += 1;
            }
        }
        let bytes = ops * size;
        Ok((ops, bytes, (io::clock_ms() as u64 - start).max(1)))
    }
}
