//! Which pages of guest RAM hold anything: the host's view of the mappings.
//!
//! Three sources, each exact for one question:
//! - `mincore(2)`: is the page in host memory (page cache or a mapped page)? Used for
//!   [`resident_bytes`] of anonymous and memfd RAM.
//! - `/proc/self/pagemap`: does this process map the page, or has it been swapped out?
//!   Unlike `mincore`, it reports a swapped-out anonymous page (bit 62), so a snapshot
//!   never mistakes one for a page the guest never touched.
//! - `lseek(SEEK_DATA/SEEK_HOLE)` on a backing file: where the file has data at all (a
//!   memfd keeps swapped pages as data too).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::backing::{region_backing, RegionBacking};
use super::{mapping, GuestRam, GuestRamRegion, PAGE_SIZE};

/// Pagemap entry bit: the page is mapped in this process.
const PM_PRESENT: u64 = 1 << 63;
/// Pagemap entry bit: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per `pread` (64 KiB).
const PAGEMAP_CHUNK: usize = 8192;

/// Bytes of guest RAM that are resident in host memory.
///
/// - Anonymous and memfd RAM: pages in host memory (`mincore(2)`), that is the pages the
///   guest or the VMM touched.
/// - A private file mapping (a restored snapshot): pages this VM maps, its own copies and
///   the file's pages it has read, from `/proc/self/pagemap`. `mincore` would also count
///   file pages that are only in the page cache (another VM restored from the same file
///   read them, or the snapshot was just written), which this VM does not use.
pub fn resident_bytes(mem: &GuestRam) -> u64 {
    let pagemap = Pagemap::open().ok();
    let mut pages = 0u64;
    for region in mem.iter() {
        let counted = match (region_backing(region), &pagemap) {
            (RegionBacking::FilePrivate, Some(pagemap)) => pagemap
                .region_bits(region, PM_PRESENT)
                .map(|bits| bits.iter().map(|w| u64::from(w.count_ones())).sum())
                .ok(),
            _ => None,
        };
        pages += counted.or_else(|| mincore_count(region).ok()).unwrap_or(0);
    }
    pages * PAGE_SIZE
}

/// Pages of `region` in host memory, from `mincore(2)`.
fn mincore_count(region: &GuestRamRegion) -> io::Result<u64> {
    let len = region.len() as usize;
    let mut vec = vec![0u8; len.div_ceil(PAGE_SIZE as usize)];
    // SAFETY: the region's mapping is live and `len` bytes long, and `vec` has one byte
    // per page of it, as mincore requires.
    let rc = unsafe { libc::mincore(mapping(region).as_ptr().cast(), len, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().filter(|&&b| b & 1 != 0).count() as u64)
}

/// `/proc/self/pagemap`, opened once for a scan.
pub(crate) struct Pagemap {
    file: File,
}

impl Pagemap {
    pub(crate) fn open() -> io::Result<Pagemap> {
        Ok(Pagemap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// A bitmap (KVM's shape) of the pages of `region` whose pagemap entry has any of
    /// the bits in `mask`.
    pub(crate) fn region_bits(&self, region: &GuestRamRegion, mask: u64) -> io::Result<Vec<u64>> {
        let pages = (region.len() / PAGE_SIZE) as usize;
        let first = mapping(region).as_ptr() as u64 / PAGE_SIZE;
        let mut bits = vec![0u64; pages.div_ceil(64)];
        let mut raw = vec![0u8; PAGEMAP_CHUNK * 8];
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(PAGEMAP_CHUNK);
            let buf = &mut raw[..n * 8];
            self.file.read_exact_at(buf, (first + done as u64) * 8)?;
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let entry = u64::from_ne_bytes(entry.try_into().expect("8-byte chunk"));
                if entry & mask != 0 {
                    let page = done + i;
                    bits[page / 64] |= 1 << (page % 64);
                }
            }
            done += n;
        }
        Ok(bits)
    }
}

/// The byte ranges of `file` in `[start, end)` that hold data (everything else is a
/// hole and reads as zero), from `SEEK_DATA`/`SEEK_HOLE`. A file system without them
/// reports the whole file as data, which is still correct.
pub(crate) fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |offset: u64, whence| {
        // SAFETY: lseek on an fd we own has no memory-safety preconditions; it only moves
        // the file position, which nothing here relies on (all I/O is positional).
        let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
        if at < 0 {
            let error = io::Error::last_os_error();
            // ENXIO: no data (or hole) at or after `offset`.
            if error.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(error);
        }
        Ok(Some(at as u64))
    };
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        // Every file has an implicit hole at its end, so SEEK_HOLE finds one.
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        ranges.push((data, hole));
        at = hole;
    }
    Ok(ranges)
}

/// A bitmap (KVM's shape) of the pages of `region` that may hold something other than
/// zeros; every page outside it certainly reads as zero.
///
/// - Anonymous: pages mapped or swapped out (pagemap). A page never touched, or
///   discarded, is not mapped and reads as zero.
/// - Memfd: pages where the memfd has data (`SEEK_DATA`; swapped pages count as data).
/// - Private file mapping: a page this VM has not written reads from the file, so a
///   page not mapped here is *not* zero unless the file has a hole there. Pages that
///   may hold data are therefore those mapped or swapped out (this VM's own copies, and
///   file pages it read) and those where the file has data.
///
/// When the source cannot be read, every page is reported: slower, never wrong.
pub(crate) fn pages_that_may_hold_data(
    region: &GuestRamRegion,
    pagemap: Option<&Pagemap>,
) -> Vec<u64> {
    let pages = region.len() / PAGE_SIZE;
    let all = || {
        let mut bits = vec![u64::MAX; pages.div_ceil(64) as usize];
        if !pages.is_multiple_of(64) {
            *bits.last_mut().expect("a region has pages") = (1 << (pages % 64)) - 1;
        }
        bits
    };
    let mapped = || match pagemap {
        Some(pagemap) => pagemap.region_bits(region, PM_PRESENT | PM_SWAPPED).ok(),
        None => None,
    };
    let file_data = || {
        let file_offset = region.file_offset()?;
        let start = file_offset.start();
        let ranges = data_ranges(file_offset.file(), start, start + region.len()).ok()?;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        for (from, to) in ranges {
            // Whole pages that overlap the data.
            let first = (from - start) / PAGE_SIZE;
            let last = (to - start).div_ceil(PAGE_SIZE);
            for page in first..last.min(pages) {
                bits[(page / 64) as usize] |= 1 << (page % 64);
            }
        }
        Some(bits)
    };
    let found = match region_backing(region) {
        RegionBacking::Anonymous => mapped(),
        RegionBacking::Memfd => file_data(),
        RegionBacking::FilePrivate => mapped().zip(file_data()).map(|(mut a, b)| {
            a.iter_mut().zip(b).for_each(|(a, b)| *a |= b);
            a
        }),
    };
    found.unwrap_or_else(|| {
        tracing::debug!(
            base = region.start_addr().0,
            "cannot tell which guest pages hold data; reading every page"
        );
        all()
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::memory::{create_ram, create_ram_with, scratch_file, MemoryBacking};

    fn page_list(bits: &[u64]) -> Vec<u64> {
        (0..bits.len() as u64 * 64)
            .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    }

    #[test]
    fn counts_resident_pages() {
        let mem = create_ram(8 << 20).unwrap();
        assert_eq!(
            resident_bytes(&mem),
            0,
            "fresh anonymous memory is not resident"
        );
        mem.write_obj(1u64, GuestAddress(0x10_0000)).unwrap();
        mem.write_obj(1u64, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(resident_bytes(&mem), 2 * 4096);
    }

    #[test]
    fn counts_only_what_a_restored_vm_maps() {
        let temp = scratch_file();
        let file = temp.as_file();
        file.set_len(8 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 0x3000).unwrap();
        // The file's pages are in the page cache now, but this VM has not touched them.
        let mem = create_ram_with(
            8 << 20,
            MemoryBacking::file_private(temp.as_path(), 0).unwrap(),
        )
        .unwrap();
        assert_eq!(resident_bytes(&mem), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 1);
        // Far from 0x3000, so the kernel's fault-around (mapping cached neighbours of a
        // page read) cannot have mapped it.
        mem.write_obj(2u8, GuestAddress(0x50_0000)).unwrap();
        assert_eq!(resident_bytes(&mem), 2 * 4096);
    }

    #[test]
    fn anonymous_pages_with_data_are_the_touched_ones() {
        let mem = create_ram(1 << 20).unwrap();
        mem.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        mem.write_obj(1u8, GuestAddress(0x9fff)).unwrap();
        let pagemap = Pagemap::open().unwrap();
        let bits = pages_that_may_hold_data(mem.iter().next().unwrap(), Some(&pagemap));
        assert_eq!(page_list(&bits), vec![2, 9]);
        // Without pagemap every page is a candidate.
        let bits = pages_that_may_hold_data(mem.iter().next().unwrap(), None);
        assert_eq!(page_list(&bits).len(), 256);
    }

    #[test]
    fn memfd_pages_with_data_come_from_the_file() {
        let mem = create_ram_with(1 << 20, MemoryBacking::Memfd).unwrap();
        mem.write_obj(1u8, GuestAddress(0x4000)).unwrap();
        let bits = pages_that_may_hold_data(mem.iter().next().unwrap(), None);
        assert_eq!(page_list(&bits), vec![4]);
    }

    #[test]
    fn private_file_pages_with_data_include_the_file() {
        let temp = scratch_file();
        let file = temp.as_file();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 0x7000).unwrap();
        let mem = create_ram_with(
            1 << 20,
            MemoryBacking::file_private(temp.as_path(), 0).unwrap(),
        )
        .unwrap();
        mem.write_obj(1u8, GuestAddress(0x1000)).unwrap();
        let pagemap = Pagemap::open().unwrap();
        let bits = pages_that_may_hold_data(mem.iter().next().unwrap(), Some(&pagemap));
        // Page 1 is this VM's copy; page 7 is the file's data, never touched here.
        assert_eq!(page_list(&bits), vec![1, 7]);
    }

    #[test]
    fn data_ranges_skip_holes() {
        let temp = scratch_file();
        let file = temp.as_file();
        file.set_len(1 << 20).unwrap();
        file.write_all_at(&[1u8; 4096], 0x8000).unwrap();
        let ranges = data_ranges(file, 0, 1 << 20).unwrap();
        // File systems may round data up to their block size, never down.
        assert!(!ranges.is_empty());
        for (from, to) in &ranges {
            assert!(*from <= 0x8000 && *to >= 0x9000 || *to <= 0x8000 || *from >= 0x9000);
        }
        assert!(ranges
            .iter()
            .any(|&(from, to)| from <= 0x8000 && to >= 0x9000));
        assert!(data_ranges(file, 0x10000, 1 << 20).unwrap().is_empty());
    }
}
