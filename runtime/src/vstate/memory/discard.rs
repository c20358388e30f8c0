//! Giving guest pages back to the host (a balloon's deflated pages, pages the guest
//! reported free).
//!
//! What a discarded page reads as afterwards depends on the backing:
//! - anonymous RAM (`MADV_DONTNEED`): zero;
//! - memfd RAM (`fallocate(PUNCH_HOLE)`, which also unmaps the page everywhere): zero;
//! - a private file mapping (`MADV_DONTNEED`): **the snapshot file's page**, not zero.
//!   `MADV_DONTNEED` drops this VM's private copy, and the page reads from the file
//!   again. Zeroing it instead would need a private zero page, which costs memory.
//!
//! A discarded page changed, so it is marked in the VMM's dirty bitmap: the next diff
//! snapshot holds it (as a hole, when it is zero now).

use std::os::fd::AsRawFd;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::backing::{region_backing, RegionBacking};
use super::{mapping, GuestRam, MemoryError, PAGE_SIZE};

/// What discarded pages read as afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardEffect {
    /// Zeros (anonymous and memfd RAM).
    ReadsZero,
    /// The pages of the file the RAM was restored from (a private file mapping).
    ReadsBackingFile,
}

/// Returns the pages of `[addr, addr + len)` to the host. The range must be page-aligned,
/// non-empty and inside one RAM region; otherwise nothing changes and the error says
/// why.
pub fn discard(mem: &GuestRam, addr: GuestAddress, len: u64) -> Result<DiscardEffect, MemoryError> {
    let refuse = |reason: String| MemoryError::DiscardRange {
        addr: addr.0,
        len,
        reason,
    };
    if len == 0 {
        return Err(refuse("the range is empty".into()));
    }
    if !addr.0.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return Err(refuse(format!(
            "address and length must be multiples of the {PAGE_SIZE}-byte page"
        )));
    }
    let Some(region) = mem.find_region(addr) else {
        return Err(refuse("the address is not guest RAM".into()));
    };
    let offset = addr.0 - region.start_addr().0;
    if len > region.len() - offset {
        return Err(refuse(format!(
            "the range crosses the end of the RAM region at {:#x} (+{:#x})",
            region.start_addr().0,
            region.len()
        )));
    }
    let failed = |op, source| MemoryError::Discard {
        addr: addr.0,
        len,
        op,
        source,
    };
    let effect = match region_backing(region) {
        RegionBacking::Memfd => {
            let file_offset = region.file_offset().expect("a memfd region maps a file");
            // SAFETY: fallocate on the memfd we own; it only frees the file's pages, which
            // the shared mapping then reads as zero.
            let rc = unsafe {
                libc::fallocate(
                    file_offset.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (file_offset.start() + offset) as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(failed(
                    "fallocate(PUNCH_HOLE)",
                    std::io::Error::last_os_error(),
                ));
            }
            DiscardEffect::ReadsZero
        }
        backing @ (RegionBacking::Anonymous | RegionBacking::FilePrivate) => {
            // SAFETY: the range is page-aligned and inside the region's live mapping,
            // checked above. MADV_DONTNEED only replaces its contents (zero for anonymous
            // memory, the file's for a private file mapping); the mapping stays valid.
            let rc = unsafe {
                libc::madvise(
                    mapping(region).as_ptr().add(offset as usize).cast(),
                    len as usize,
                    libc::MADV_DONTNEED,
                )
            };
            if rc != 0 {
                return Err(failed(
                    "madvise(MADV_DONTNEED)",
                    std::io::Error::last_os_error(),
                ));
            }
            if backing == RegionBacking::Anonymous {
                DiscardEffect::ReadsZero
            } else {
                DiscardEffect::ReadsBackingFile
            }
        }
    };
    // Marked after the pages changed: a dirty-page reader that resets the bitmap in
    // between sees the mark on its next round instead of missing the change.
    let bitmap: &AtomicBitmap = mapping(region).bitmap();
    bitmap.set_addr_range(offset as usize, len as usize);
    Ok(effect)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::Bytes;

    use super::*;
    use crate::vstate::memory::{
        create_ram, create_ram_with, resident_bytes, scratch_file, take_vmm_dirty, MemoryBacking,
    };
    use luvisor_guest_abi::layout::{HIGH_RAM_START, LOW_RAM_END};

    fn fill(mem: &GuestRam, addr: u64, pages: u64, byte: u8) {
        mem.write_slice(
            &vec![byte; (pages * PAGE_SIZE) as usize],
            GuestAddress(addr),
        )
        .unwrap();
    }

    #[test]
    fn anonymous_pages_come_back_as_zero() {
        let mem = create_ram(4 << 20).unwrap();
        fill(&mem, 0x10_0000, 4, 0xaa);
        take_vmm_dirty(&mem);
        assert_eq!(resident_bytes(&mem), 4 * PAGE_SIZE);
        let effect = discard(&mem, GuestAddress(0x10_1000), 2 * PAGE_SIZE).unwrap();
        assert_eq!(effect, DiscardEffect::ReadsZero);
        assert_eq!(resident_bytes(&mem), 2 * PAGE_SIZE);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0fff)).unwrap(), 0xaa);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_1000)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x10_2ff8)).unwrap(), 0);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_3000)).unwrap(), 0xaa);
        let dirty: Vec<_> = take_vmm_dirty(&mem).iter().collect();
        assert_eq!(
            dirty,
            vec![(0, 0x101), (0, 0x102)],
            "discarded pages are changes"
        );
    }

    #[test]
    fn memfd_pages_come_back_as_zero_and_leave_the_file() {
        let mem = create_ram_with(4 << 30, MemoryBacking::Memfd).unwrap();
        fill(&mem, HIGH_RAM_START, 3, 0xbb);
        let effect = discard(&mem, GuestAddress(HIGH_RAM_START + PAGE_SIZE), PAGE_SIZE).unwrap();
        assert_eq!(effect, DiscardEffect::ReadsZero);
        assert_eq!(resident_bytes(&mem), 2 * PAGE_SIZE);
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(HIGH_RAM_START + PAGE_SIZE))
                .unwrap(),
            0
        );
        let memfd = mem.iter().nth(1).unwrap().file_offset().unwrap().file();
        let mut byte = [0u8];
        memfd
            .read_exact_at(&mut byte, LOW_RAM_END + PAGE_SIZE)
            .unwrap();
        assert_eq!(byte, [0]);
        memfd
            .read_exact_at(&mut byte, LOW_RAM_END + 2 * PAGE_SIZE)
            .unwrap();
        assert_eq!(byte, [0xbb]);
    }

    #[test]
    fn private_file_pages_come_back_from_the_file() {
        let temp = scratch_file();
        temp.as_file().set_len(1 << 20).unwrap();
        temp.as_file().write_all_at(&[5u8; 4096], 0x2000).unwrap();
        let mem = create_ram_with(
            1 << 20,
            MemoryBacking::file_private(temp.as_path(), 0).unwrap(),
        )
        .unwrap();
        fill(&mem, 0x2000, 2, 0xcc);
        let effect = discard(&mem, GuestAddress(0x2000), 2 * PAGE_SIZE).unwrap();
        assert_eq!(effect, DiscardEffect::ReadsBackingFile);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x2000)).unwrap(),
            5,
            "the file's page"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            0,
            "the file's hole"
        );
    }

    #[test]
    fn bad_ranges_are_refused_and_change_nothing() {
        let mem = create_ram((4 << 30) + (1 << 20)).unwrap();
        fill(&mem, 0, 1, 1);
        fill(&mem, LOW_RAM_END - PAGE_SIZE, 1, 1);
        take_vmm_dirty(&mem);
        let cases: [(u64, u64, &str); 6] = [
            (0x1000, 0, "empty"),
            (0x800, PAGE_SIZE, "multiples"),
            (0, 100, "multiples"),
            (LOW_RAM_END, PAGE_SIZE, "not guest RAM"),
            (LOW_RAM_END - PAGE_SIZE, 2 * PAGE_SIZE, "crosses the end"),
            (HIGH_RAM_START + (1 << 30), 2 << 20, "crosses the end"),
        ];
        for (addr, len, why) in cases {
            let err = discard(&mem, GuestAddress(addr), len).unwrap_err();
            assert!(
                matches!(err, MemoryError::DiscardRange { .. }) && err.to_string().contains(why),
                "{addr:#x} +{len:#x}: {err}"
            );
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(LOW_RAM_END - PAGE_SIZE))
                .unwrap(),
            1
        );
        assert!(take_vmm_dirty(&mem).is_empty());
    }
}
