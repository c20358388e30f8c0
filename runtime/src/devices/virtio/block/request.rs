//! One virtio-blk request: a 16-byte header the driver wrote, data buffers, and a
//! status byte the device writes last.
//!
//! The descriptor layout is not assumed (virtio 1.2, 2.7.4.2): the request is read
//! through `virtio-queue`'s `Reader` (device-readable bytes) and `Writer`
//! (device-writable bytes), which check every descriptor address against guest memory.

use std::io::Write;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{Address, ByteValued, GuestMemoryBackend, GuestMemoryMmap};

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
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    target: &mut Target,
) -> Option<u32> {
    // Header and status come on top of the data segments.
    let descriptors = chain.clone().count();
    let reader = Reader::new(mem, chain.clone());
    let writer = Writer::new(mem, chain.clone());
    let (mut reader, mut writer): (Reader<'_>, Writer<'_>) = match (reader, writer) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            tracing::debug!(error = %e, "virtio-blk: descriptor chain outside guest memory");
            DiskStats::add(&target.stats.errors, 1);
            return None;
        }
    };
    if writer.available_bytes() == 0 {
        DiskStats::add(&target.stats.errors, 1);
        return None;
    }
    // The status byte is the last device-writable byte; everything before it is data.
    let mut status_writer = match writer.split_at(writer.available_bytes() - 1) {
        Ok(s) => s,
        Err(_) => return None,
    };
    let result = if descriptors > MAX_SEGMENTS as usize + 2 {
        Err(Failure::Io(format!(
            "{descriptors} descriptors exceed SEG_MAX ({MAX_SEGMENTS}) plus header and status"
        )))
    } else {
        run(&mut reader, &mut writer, &chain, mem, target)
    };
    let mut direct = 0;
    let status = match result {
        Ok(n) => {
            direct = n;
            S_OK
        }
        Err(Failure::Unsupported(kind)) => {
            tracing::debug!(kind, "virtio-blk: unsupported request type");
            S_UNSUPP
        }
        Err(Failure::Io(message)) => {
            tracing::debug!(message, "virtio-blk: request failed");
            DiskStats::add(&target.stats.errors, 1);
            S_IOERR
        }
    };
    if status_writer.write_all(&[status]).is_err() {
        return None;
    }
    Some((writer.bytes_written() + direct + 1) as u32)
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
/// copy through the bounce buffer, one backend call per descriptor (per guest memory
/// region it touches). Reads fill the first `len` device-writable bytes (the status
/// byte comes after them); writes take the `len` device-readable bytes after the
/// 16-byte header.
fn transfer_chain(
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    direction: Direction,
    len: usize,
    offset: u64,
    target: &mut Target,
) -> Result<(), Failure> {
    let writable = direction == Direction::Read;
    let mut skip = if writable {
        0
    } else {
        std::mem::size_of::<RequestHeader>()
    };
    let mut done = 0;
    for desc in chain.clone().filter(|d| d.is_write_only() == writable) {
        if done == len {
            break;
        }
        let skipped = skip.min(desc.len() as usize);
        skip -= skipped;
        let take = (desc.len() as usize - skipped).min(len - done);
        if take == 0 {
            continue;
        }
        let addr = desc
            .addr()
            .checked_add(skipped as u64)
            .ok_or_else(|| Failure::Io("guest buffer address overflows".into()))?;
        // A buffer may straddle guest memory regions: one slice per region.
        for slice in mem.get_slices(addr, take) {
            let slice =
                slice.map_err(|e| Failure::Io(format!("cannot reach guest buffer: {e}")))?;
            let at = offset + done as u64;
            match direction {
                Direction::Read => target
                    .backend
                    .read_to_guest(&slice, at, target.buffer)
                    .map_err(|e| Failure::Io(format!("host read failed: {e}")))?,
                Direction::Write => target
                    .backend
                    .write_from_guest(&slice, at, target.buffer)
                    .map_err(|e| Failure::Io(format!("host write failed: {e}")))?,
            }
            done += slice.len();
        }
    }
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

/// Executes the request; returns how many bytes went into guest buffers directly rather
/// than through `writer`.
fn run(
    reader: &mut Reader<'_>,
    writer: &mut Writer<'_>,
    chain: &DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    target: &mut Target,
) -> Result<usize, Failure> {
    let header: RequestHeader = reader
        .read_obj()
        .map_err(|_| Failure::Io("request header shorter than 16 bytes".into()))?;
    let size = target.backend.size();
    match header.kind {
        T_IN => {
            let len = transfer_len("read", writer.available_bytes())?;
            let offset = disk_range(header.sector, len as u64, size)?;
            transfer_chain(chain, mem, Direction::Read, len, offset, target)?;
            DiskStats::add(&target.stats.reads, 1);
            DiskStats::add(&target.stats.bytes_read, len as u64);
            Ok(len)
        }
        T_OUT => {
            if target.readonly {
                return Err(Failure::Io("write to a read-only disk".into()));
            }
            let len = transfer_len("write", reader.available_bytes())?;
            let offset = disk_range(header.sector, len as u64, size)?;
            transfer_chain(chain, mem, Direction::Write, len, offset, target)?;
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
            let room = writer.available_bytes().min(ID_BYTES);
            writer
                .write_all(&id[..room])
                .map_err(|e| Failure::Io(format!("cannot write the id: {e}")))?;
            Ok(0)
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
            let segments = reader.available_bytes() / std::mem::size_of::<RangeSegment>();
            if segments == 0 || segments > MAX_RANGE_SEGMENTS {
                return Err(Failure::Io(format!(
                    "{segments} range segments (1 to {MAX_RANGE_SEGMENTS} allowed)"
                )));
            }
            for _ in 0..segments {
                let seg: RangeSegment = reader
                    .read_obj()
                    .map_err(|_| Failure::Io("short range segment".into()))?;
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
