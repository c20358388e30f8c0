//! One virtio-blk request: a 16-byte header the driver wrote, data buffers, and a
//! status byte the device writes last.
//!
//! The descriptor layout is not assumed (virtio 1.2, 2.7.4.2): the header, the data and
//! the status byte may each be split across descriptors or share one. The chain is walked
//! once into two lists kept across requests ([`ChainBuffers`]), device-readable and
//! device-writable, every buffer checked against guest memory on the way; the request is
//! then read and written through those lists. Nothing on this path allocates once the
//! lists have grown to the longest chain seen, which matters at a million 4 KiB requests
//! a second.

use crate::vstate::memory::GuestRam;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::storage::{DiskBackend, DiskStats, SECTOR_SIZE};

use virtio_bindings::virtio_blk as b;

/// Request types, from `virtio-bindings`.
pub const T_IN: u32 = b::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = b::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = b::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = b::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = b::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = b::VIRTIO_BLK_T_WRITE_ZEROES;

/// Status values.
pub const S_OK: u8 = b::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = b::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = b::VIRTIO_BLK_S_UNSUPP as u8;

/// Length of the serial number GET_ID returns.
pub const ID_BYTES: usize = b::VIRTIO_BLK_ID_BYTES as usize;

/// The largest data transfer one request may ask for; larger ones fail with IOERR
/// rather than making the host allocate whatever a guest claims.
pub const MAX_TRANSFER: usize = 32 << 20;
/// Most data descriptors in one request (advertised as SEG_MAX).
pub const MAX_SEGMENTS: u32 = 128;
/// Most discard/write-zeroes segments in one request.
pub const MAX_RANGE_SEGMENTS: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RequestHeader {
    kind: u32,
    _reserved: u32,
    sector: u64,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RequestHeader {}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RangeSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: plain integers, no padding, any bit pattern is valid.
unsafe impl ByteValued for RangeSegment {}

/// What the device needs to execute requests.
pub struct Target<'a> {
    pub backend: &'a mut dyn DiskBackend,
    pub readonly: bool,
    pub serial: &'a [u8],
    pub stats: &'a DiskStats,
    /// Request types the driver may use (from negotiated features).
    pub discard: bool,
    pub write_zeroes: bool,
    pub flush: bool,
    /// Bounce buffer between guest memory and the backend, kept across requests.
    pub buffer: &'a mut Vec<u8>,
    /// The current request's buffers, kept across requests.
    pub chain: &'a mut ChainBuffers,
}

/// One guest buffer of a descriptor chain, already checked to lie inside guest memory.
#[derive(Clone, Copy)]
struct GuestBuffer {
    addr: GuestAddress,
    len: usize,
}

/// A request's guest buffers in chain order, split by direction. Owned by the device and
/// refilled for every request, so their capacity is allocated once.
#[derive(Default)]
pub struct ChainBuffers {
    readable: Vec<GuestBuffer>,
    writable: Vec<GuestBuffer>,
    readable_bytes: usize,
    writable_bytes: usize,
}

impl ChainBuffers {
    /// Walks `chain` once. `Err` when a buffer lies outside guest memory or the lengths
    /// overflow; the chain then cannot even carry a status byte.
    fn fill(&mut self, chain: DescriptorChain<&GuestRam>, mem: &GuestRam) -> Result<usize, String> {
        self.readable.clear();
        self.writable.clear();
        self.readable_bytes = 0;
        self.writable_bytes = 0;
        let mut descriptors = 0;
        for desc in chain {
            descriptors += 1;
            let buffer = GuestBuffer {
                addr: desc.addr(),
                len: desc.len() as usize,
            };
            if !mem.check_range(buffer.addr, buffer.len) {
                return Err(format!(
                    "buffer {:#x}+{} is outside guest memory",
                    buffer.addr.raw_value(),
                    buffer.len
                ));
            }
            let (list, total) = if desc.is_write_only() {
                (&mut self.writable, &mut self.writable_bytes)
            } else {
                (&mut self.readable, &mut self.readable_bytes)
            };
            // Cannot overflow a usize on 64-bit hosts (a chain holds at most 2^16 buffers
            // of under 4 GiB), but a checked sum costs nothing.
            *total = total
                .checked_add(buffer.len)
                .ok_or("buffer lengths overflow")?;
            list.push(buffer);
        }
        Ok(descriptors)
    }

    /// The guest address of the last device-writable byte, where the status goes.
    fn status_addr(&self) -> Option<GuestAddress> {
        let last = self.writable.iter().rev().find(|b| b.len > 0)?;
        last.addr.checked_add(last.len as u64 - 1)
    }
}

/// Walks `len` bytes of `buffers` starting `skip` bytes in, calling `each` with every
/// piece (guest address, length, offset into the walk). Stops early on the first error.
fn walk(
    buffers: &[GuestBuffer],
    mut skip: usize,
    len: usize,
    mut each: impl FnMut(GuestAddress, usize, usize) -> Result<(), Failure>,
) -> Result<usize, Failure> {
    let mut done = 0;
    for buffer in buffers {
        if done == len {
            break;
        }
        let skipped = skip.min(buffer.len);
        skip -= skipped;
        let take = (buffer.len - skipped).min(len - done);
        if take == 0 {
            continue;
        }
        // In range: `fill` checked the whole buffer.
        each(buffer.addr.unchecked_add(skipped as u64), take, done)?;
        done += take;
    }
    Ok(done)
}

/// Copies device-readable bytes `[skip, skip + out.len())` of the chain into `out`.
fn gather(
    buffers: &[GuestBuffer],
    skip: usize,
    out: &mut [u8],
    mem: &GuestRam,
) -> Result<(), Failure> {
    let want = out.len();
    let got = walk(buffers, skip, want, |addr, n, at| {
        mem.read_slice(&mut out[at..at + n], addr)
            .map_err(|e| Failure::Io(format!("cannot read guest buffer: {e}")))
    })?;
    if got == want {
        Ok(())
    } else {
        Err(Failure::Io(format!(
            "guest buffers hold {got} of {want} bytes"
        )))
    }
}

/// Copies `data` into the first device-writable bytes of the chain, as far as they go;
/// returns how many bytes it wrote.
fn scatter(buffers: &[GuestBuffer], data: &[u8], mem: &GuestRam) -> Result<usize, Failure> {
    walk(buffers, 0, data.len(), |addr, n, at| {
        mem.write_slice(&data[at..at + n], addr)
            .map_err(|e| Failure::Io(format!("cannot write guest buffer: {e}")))
    })
}

/// Why a request failed; becomes a status byte.
enum Failure {
    /// The request is malformed or the host file failed: IOERR, counted as an error.
    Io(String),
    /// A request type this device does not offer.
    Unsupported(u32),
}

/// Executes the request in `chain`. Returns the number of bytes written into
/// device-writable buffers (the used length), or `None` when the chain is too broken to
/// even carry a status byte (the used length is then 0).
pub fn execute(
    chain: DescriptorChain<&GuestRam>,
    mem: &GuestRam,
    target: &mut Target,
) -> Option<u32> {
    let descriptors = match target.chain.fill(chain, mem) {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-blk: unusable descriptor chain");
            DiskStats::add(&target.stats.errors, 1);
            return None;
        }
    };
    // The status byte is the last device-writable byte; everything before it is data.
    let Some(status_addr) = target.chain.status_addr() else {
        DiskStats::add(&target.stats.errors, 1);
        return None;
    };
    let result = if descriptors > MAX_SEGMENTS as usize + 2 {
        Err(Failure::Io(format!(
            "{descriptors} descriptors exceed SEG_MAX ({MAX_SEGMENTS}) plus header and status"
        )))
    } else {
        run(mem, target)
    };
    let (status, written) = match result {
        Ok(written) => (S_OK, written),
        Err(Failure::Unsupported(kind)) => {
            tracing::debug!(kind, "virtio-blk: unsupported request type");
            (S_UNSUPP, 0)
        }
        Err(Failure::Io(message)) => {
            tracing::debug!(message, "virtio-blk: request failed");
            DiskStats::add(&target.stats.errors, 1);
            (S_IOERR, 0)
        }
    };
    mem.write_obj(status, status_addr).ok()?;
    Some((written + 1) as u32)
}

/// Which way data moves between the chain's buffers and the disk.
#[derive(Clone, Copy, PartialEq)]
enum Direction {
    /// Disk to the device-writable buffers.
    Read,
    /// The device-readable buffers (after the header) to disk.
    Write,
}

/// Moves `len` bytes between disk `offset` and the chain's data buffers without a
/// copy through the bounce buffer, one backend call per buffer (per guest memory region
/// it touches). Reads fill the first `len` device-writable bytes (the status byte comes
/// after them); writes take the `len` device-readable bytes after the 16-byte header.
fn transfer_chain(
    mem: &GuestRam,
    direction: Direction,
    len: usize,
    offset: u64,
    target: &mut Target,
) -> Result<(), Failure> {
    let (buffers, skip) = match direction {
        Direction::Read => (&target.chain.writable, 0),
        Direction::Write => (&target.chain.readable, std::mem::size_of::<RequestHeader>()),
    };
    let backend = &mut *target.backend;
    let bounce = &mut *target.buffer;
    let done = walk(buffers, skip, len, |addr, n, at| {
        // A buffer may straddle guest memory regions: one slice per region.
        let mut moved = 0;
        for slice in mem.get_slices(addr, n) {
            let slice =
                slice.map_err(|e| Failure::Io(format!("cannot reach guest buffer: {e}")))?;
            let disk_at = offset + (at + moved) as u64;
            match direction {
                Direction::Read => backend
                    .read_to_guest(&slice, disk_at, bounce)
                    .map_err(|e| Failure::Io(format!("host read failed: {e}")))?,
                Direction::Write => backend
                    .write_from_guest(&slice, disk_at, bounce)
                    .map_err(|e| Failure::Io(format!("host write failed: {e}")))?,
            }
            moved += slice.len();
        }
        Ok(())
    })?;
    if done != len {
        return Err(Failure::Io(format!(
            "guest buffers hold {done} of {len} bytes"
        )));
    }
    Ok(())
}

/// Checks a data transfer's length: whole sectors, at most [`MAX_TRANSFER`].
fn transfer_len(what: &str, len: usize) -> Result<usize, Failure> {
    if len.is_multiple_of(SECTOR_SIZE as usize) && len <= MAX_TRANSFER {
        Ok(len)
    } else {
        Err(Failure::Io(format!(
            "{what} of {len} bytes is not whole sectors within {MAX_TRANSFER}"
        )))
    }
}

/// Checks `[sector, sector + bytes)` against the disk and returns its byte offset.
fn disk_range(sector: u64, bytes: u64, size: u64) -> Result<u64, Failure> {
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| Failure::Io(format!("sector {sector} overflows")))?;
    match offset.checked_add(bytes) {
        Some(end) if end <= size => Ok(offset),
        _ => Err(Failure::Io(format!(
            "sectors {sector}+{} are beyond the disk",
            bytes / SECTOR_SIZE
        ))),
    }
}

/// Executes the request; returns how many data bytes went into device-writable buffers.
fn run(mem: &GuestRam, target: &mut Target) -> Result<usize, Failure> {
    let header_len = std::mem::size_of::<RequestHeader>();
    let mut header = RequestHeader::default();
    if target.chain.readable_bytes < header_len {
        return Err(Failure::Io("request header shorter than 16 bytes".into()));
    }
    gather(&target.chain.readable, 0, header.as_mut_slice(), mem)?;
    // Device-writable bytes before the status byte, and device-readable ones after the
    // header.
    let data_in = target.chain.writable_bytes - 1;
    let data_out = target.chain.readable_bytes - header_len;
    let size = target.backend.size();
    match header.kind {
        T_IN => {
            let len = transfer_len("read", data_in)?;
            let offset = disk_range(header.sector, len as u64, size)?;
            transfer_chain(mem, Direction::Read, len, offset, target)?;
            DiskStats::add(&target.stats.reads, 1);
            DiskStats::add(&target.stats.bytes_read, len as u64);
            Ok(len)
        }
        T_OUT => {
            if target.readonly {
                return Err(Failure::Io("write to a read-only disk".into()));
            }
            let len = transfer_len("write", data_out)?;
            let offset = disk_range(header.sector, len as u64, size)?;
            transfer_chain(mem, Direction::Write, len, offset, target)?;
            DiskStats::add(&target.stats.writes, 1);
            DiskStats::add(&target.stats.bytes_written, len as u64);
            Ok(0)
        }
        T_FLUSH if target.flush => {
            target
                .backend
                .flush()
                .map_err(|e| Failure::Io(format!("fdatasync failed: {e}")))?;
            DiskStats::add(&target.stats.flushes, 1);
            Ok(0)
        }
        T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = target.serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&target.serial[..n]);
            let room = data_in.min(ID_BYTES);
            scatter(&target.chain.writable, &id[..room], mem)
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let zeroes = header.kind == T_WRITE_ZEROES;
            if (zeroes && !target.write_zeroes) || (!zeroes && !target.discard) {
                return Err(Failure::Unsupported(header.kind));
            }
            if target.readonly {
                return Err(Failure::Io(
                    "discard or write-zeroes on a read-only disk".into(),
                ));
            }
            let segment_len = std::mem::size_of::<RangeSegment>();
            let segments = data_out / segment_len;
            if segments == 0 || segments > MAX_RANGE_SEGMENTS {
                return Err(Failure::Io(format!(
                    "{segments} range segments (1 to {MAX_RANGE_SEGMENTS} allowed)"
                )));
            }
            for i in 0..segments {
                let mut seg = RangeSegment::default();
                let at = header_len + i * segment_len;
                gather(&target.chain.readable, at, seg.as_mut_slice(), mem)?;
                let bytes = seg.num_sectors as u64 * SECTOR_SIZE;
                let offset = disk_range(seg.sector, bytes, size)?;
                let result = if zeroes {
                    target.backend.write_zeroes(offset, bytes)
                } else {
                    target.backend.discard(offset, bytes)
                };
                result.map_err(|e| Failure::Io(format!("host hole punch failed: {e}")))?;
            }
            DiskStats::add(&target.stats.discards, 1);
            Ok(0)
        }
        other => Err(Failure::Unsupported(other)),
    }
}
