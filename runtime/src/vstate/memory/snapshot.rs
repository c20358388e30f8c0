//! Snapshot memory files: guest RAM written out, and a diff loaded back on top.
//!
//! A snapshot memory file has the layout of the module docs (regions back to back, the
//! file as long as all RAM) and is sparse: a page that reads as zero is a hole and
//! costs no disk space. A full snapshot holds every page (holes are zero pages); a diff
//! holds only the pages of its [`DirtyPages`] set, which the caller stores beside it:
//! a selected page that is zero now is a hole too, and only the set tells it apart from
//! a page the diff does not hold.
//!
//! Restoring maps the full snapshot with [`MemoryBacking::FilePrivate`] and then copies
//! each diff on top, oldest first, with [`apply_ram_diff`].
//!
//! The vCPUs must be paused while RAM is saved: a page that changes during the scan is
//! saved in some state between the old and the new.
//!
//! [`MemoryBacking::FilePrivate`]: super::MemoryBacking::FilePrivate

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::pages::coalesce;
use super::residency::{pages_that_may_hold_data, Pagemap};
use super::{
    mapping, ram_file_len, region_file_offsets, DirtyPages, GuestRam, MemoryError, PAGE_SIZE,
};

/// Largest single `pwrite`/`pread`: 1 MiB keeps each run's pages in cache between the
/// zero check and the write, and amortises the system call.
const MAX_RUN_PAGES: u64 = 256;

/// Which pages [`save_ram`] writes.
#[derive(Debug, Clone, Copy)]
pub enum PageSelection<'a> {
    /// Every page: a full snapshot.
    All,
    /// Only these pages: a diff (from [`take_dirty`](super::take_dirty)).
    Dirty(&'a DirtyPages),
}

/// What [`save_ram`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRam {
    /// Bytes of page data written (zero pages are holes and not counted).
    pub bytes_written: u64,
    /// Pages written (non-zero pages).
    pub pages_written: u64,
    /// The pages the file holds: every page for a full snapshot, the selection for a
    /// diff. Store it with a diff; [`apply_ram_diff`] needs it.
    pub pages: DirtyPages,
}

/// Writes guest RAM into `file` as a sparse snapshot memory file.
///
/// `file` is truncated and set to the length of all RAM, so it starts as one hole; only
/// non-zero pages are then written, adjacent ones together. For [`PageSelection::All`],
/// pages that certainly read as zero are not even read: pages never touched (anonymous
/// RAM, from `/proc/self/pagemap`, which also reports pages swapped out), holes of a
/// memfd, and pages of a restored snapshot that this VM never wrote where its file has
/// a hole (see `residency::pages_that_may_hold_data`). Every other page is read and
/// compared with zero. The file is not synced; the caller decides when it must be
/// durable.
///
/// `file` must not be a file that guest RAM maps (truncating it would pull the pages
/// from under the VM); that is refused.
pub fn save_ram(
    mem: &GuestRam,
    file: &File,
    which: PageSelection<'_>,
) -> Result<SavedRam, MemoryError> {
    if let PageSelection::Dirty(pages) = which {
        pages.fits(mem)?;
    }
    refuse_backing_file(mem, file)?;
    let total = ram_file_len(mem);
    let whole = |source| MemoryError::SnapshotWrite {
        offset: 0,
        len: total,
        source,
    };
    // Truncating first drops whatever the file held; the new length reads as zeros.
    file.set_len(0).map_err(whole)?;
    file.set_len(total).map_err(whole)?;

    let candidates = match which {
        PageSelection::Dirty(pages) => pages.clone(),
        PageSelection::All => pages_that_may_hold_data_in(mem),
    };

    let regions: Vec<_> = mem.iter().collect();
    let file_offsets = region_file_offsets(mem);
    let mut pages_written = 0;
    for run in candidates.runs(MAX_RUN_PAGES) {
        let region = regions[run.region];
        let host = mapping(region).as_ptr();
        // Only called with pages of this run.
        let is_zero = |page: u64| {
            // SAFETY: the run's pages are below the region's page count (the set fits
            // `mem`), so each lies inside the region's live, page-aligned mapping.
            unsafe { page_is_zero(host.add((page * PAGE_SIZE) as usize)) }
        };
        // Split the run into stretches of non-zero pages; zero pages stay holes.
        let mut page = run.first_page;
        let end = run.first_page + run.pages;
        while page < end {
            if is_zero(page) {
                page += 1;
                continue;
            }
            let first = page;
            page += 1;
            while page < end && !is_zero(page) {
                page += 1;
            }
            let len = (page - first) * PAGE_SIZE;
            let offset = file_offsets[run.region] + first * PAGE_SIZE;
            // SAFETY: pages first..page are inside the region's live mapping (as above).
            let src = unsafe { host.add((first * PAGE_SIZE) as usize) };
            write_all_at(file, src, len, offset).map_err(|source| MemoryError::SnapshotWrite {
                offset,
                len,
                source,
            })?;
            pages_written += page - first;
        }
    }
    Ok(SavedRam {
        bytes_written: pages_written * PAGE_SIZE,
        pages_written,
        pages: match which {
            PageSelection::All => DirtyPages::all(mem),
            PageSelection::Dirty(_) => candidates,
        },
    })
}

/// The pages of `mem` that may hold data; every other page certainly reads as zero
/// (see `residency::pages_that_may_hold_data`). A full snapshot and the first pass of a
/// live migration read only these.
pub fn pages_that_may_hold_data_in(mem: &GuestRam) -> DirtyPages {
    let pagemap = Pagemap::open()
        .inspect_err(|e| tracing::debug!(error = %e, "cannot read /proc/self/pagemap"))
        .ok();
    let bitmaps = mem
        .iter()
        .map(|region| pages_that_may_hold_data(region, pagemap.as_ref()))
        .collect();
    DirtyPages::from_bitmaps(mem, bitmaps)
}

/// Copies the pages in `pages` from the diff snapshot memory file `file` (written by
/// [`save_ram`] with that selection) into guest RAM, and returns how many. Holes in the
/// file are zero pages and are copied as zeros.
///
/// Loading is restoring, not a change: the VMM's dirty bitmap is left alone, so the next
/// diff is taken against the restored state. Nothing is written if `pages` does not fit
/// `mem` or the file is shorter than RAM; a read error part way leaves RAM partly loaded
/// (the caller throws the VM away).
pub fn apply_ram_diff(mem: &GuestRam, file: &File, pages: &DirtyPages) -> Result<u64, MemoryError> {
    pages.fits(mem)?;
    let needed = ram_file_len(mem);
    let len = file
        .metadata()
        .map_err(|source| MemoryError::SnapshotRead {
            offset: 0,
            len: needed,
            source,
        })?
        .len();
    if len < needed {
        return Err(MemoryError::SnapshotFileTooShort { len, needed });
    }
    let regions: Vec<_> = mem.iter().collect();
    let file_offsets = region_file_offsets(mem);
    let mut applied = 0;
    for run in coalesce(pages.iter(), MAX_RUN_PAGES) {
        let len = run.pages * PAGE_SIZE;
        let offset = file_offsets[run.region] + run.first_page * PAGE_SIZE;
        // SAFETY: the run lies inside the region's live mapping (the set fits `mem`).
        let dst = unsafe {
            mapping(regions[run.region])
                .as_ptr()
                .add((run.first_page * PAGE_SIZE) as usize)
        };
        read_exact_at(file, dst, len, offset).map_err(|source| MemoryError::SnapshotRead {
            offset,
            len,
            source,
        })?;
        applied += run.pages;
    }
    Ok(applied)
}

/// Refuses `file` if it is the file behind any region of `mem`.
fn refuse_backing_file(mem: &GuestRam, file: &File) -> Result<(), MemoryError> {
    let Ok(target) = file.metadata() else {
        // set_len will report the problem with the file.
        return Ok(());
    };
    for (index, region) in mem.iter().enumerate() {
        let Some(backing) = region.file_offset() else {
            continue;
        };
        let Ok(backing) = backing.file().metadata() else {
            continue;
        };
        if backing.dev() == target.dev() && backing.ino() == target.ino() {
            return Err(MemoryError::SnapshotIntoBacking { region: index });
        }
    }
    Ok(())
}

/// Whether the page at `page` is all zero bytes.
///
/// # Safety
///
/// `page` must point to [`PAGE_SIZE`] readable bytes, aligned to 8. The guest may change
/// them meanwhile (volatile reads, so the compiler assumes nothing about them).
pub(crate) unsafe fn page_is_zero(page: *const u8) -> bool {
    let words = page.cast::<u64>();
    const WORDS: usize = (PAGE_SIZE / 8) as usize;
    // Eight words per step, ORed together: one branch per 64 bytes.
    for chunk in (0..WORDS).step_by(8) {
        let mut any = 0;
        for i in chunk..chunk + 8 {
            // SAFETY: i < WORDS, inside the page the caller vouched for.
            any |= unsafe { words.add(i).read_volatile() };
        }
        if any != 0 {
            return false;
        }
    }
    true
}

/// Writes `len` bytes from guest memory at `src` to `file` at `offset`.
fn write_all_at(file: &File, src: *const u8, len: u64, offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: `src` points to `len` bytes of live guest memory (the callers' runs lie
        // inside a region's mapping); the kernel reads at most `len - done` of them.
        let n = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                src.add(done as usize).cast(),
                (len - done) as usize,
                (offset + done) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as u64,
            0 => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

/// Reads `len` bytes of `file` at `offset` into guest memory at `dst`.
fn read_exact_at(file: &File, dst: *mut u8, len: u64, offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        // SAFETY: `dst` points to `len` bytes of live, writable guest memory (the run
        // lies inside a region's mapping); the kernel writes at most `len - done` of them.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                dst.add(done as usize).cast(),
                (len - done) as usize,
                (offset + done) as libc::off_t,
            )
        };
        match n {
            n if n > 0 => done += n as u64,
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
            _ => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::vstate::memory::residency::data_ranges;
    use crate::vstate::memory::{
        create_ram, create_ram_with, discard, scratch_file, take_vmm_dirty, MemoryBacking,
    };
    use luvisor_guest_abi::layout::HIGH_RAM_START;

    /// Disk blocks `file` uses, in bytes.
    fn allocated(file: &File) -> u64 {
        file.metadata().unwrap().blocks() * 512
    }

    fn page_of(byte: u8) -> Vec<u8> {
        vec![byte; PAGE_SIZE as usize]
    }

    #[test]
    fn full_snapshot_is_sparse_and_restores() {
        let size = (4 << 30) + (4 << 20);
        let mem = create_ram(size).unwrap();
        mem.write_slice(&page_of(1), GuestAddress(0x1000)).unwrap();
        mem.write_slice(&page_of(2), GuestAddress(0x2000)).unwrap();
        mem.write_slice(&page_of(3), GuestAddress(0x8000)).unwrap();
        // Touched but zero: read, found zero, left a hole.
        mem.write_obj(0u64, GuestAddress(0x9000)).unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress(HIGH_RAM_START + 0x5008))
            .unwrap();

        let temp = scratch_file();
        let file = temp.as_file();
        // Whatever the file held before is gone.
        file.write_all_at(&page_of(9), 0x3000).unwrap();
        let saved = save_ram(&mem, file, PageSelection::All).unwrap();
        assert_eq!(saved.pages_written, 4);
        assert_eq!(saved.bytes_written, 4 * PAGE_SIZE);
        assert_eq!(saved.pages, DirtyPages::all(&mem));
        assert_eq!(file.metadata().unwrap().len(), size);
        assert!(
            allocated(file) <= 64 * PAGE_SIZE,
            "{} bytes allocated",
            allocated(file)
        );

        let restored = create_ram_with(
            size,
            MemoryBacking::file_private(temp.as_path(), 0).unwrap(),
        )
        .unwrap();
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 1);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 2);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x8123)).unwrap(), 3);
        assert_eq!(
            restored
                .read_obj::<u64>(GuestAddress(HIGH_RAM_START + 0x5008))
                .unwrap(),
            0xfeed
        );
    }

    #[test]
    fn adjacent_pages_are_written_together() {
        let mem = create_ram(4 << 20).unwrap();
        mem.write_slice(
            &vec![7u8; 300 * PAGE_SIZE as usize],
            GuestAddress(0x10_0000),
        )
        .unwrap();
        let temp = scratch_file();
        let saved = save_ram(&mem, temp.as_file(), PageSelection::All).unwrap();
        assert_eq!(saved.pages_written, 300);
        let ranges = data_ranges(temp.as_file(), 0, 4 << 20).unwrap();
        assert_eq!(ranges, vec![(0x10_0000, 0x10_0000 + 300 * PAGE_SIZE)]);
    }

    #[test]
    fn diff_holds_the_selected_pages_even_when_zero() {
        let size = 8 << 20;
        let mem = create_ram(size).unwrap();
        mem.write_slice(&page_of(1), GuestAddress(0x1000)).unwrap();
        mem.write_slice(&page_of(2), GuestAddress(0x2000)).unwrap();
        mem.write_slice(&page_of(3), GuestAddress(0x3000)).unwrap();
        let base_temp = scratch_file();
        save_ram(&mem, base_temp.as_file(), PageSelection::All).unwrap();
        take_vmm_dirty(&mem);

        // After the base: page 2 changes, page 3 becomes zero, page 5 is new.
        mem.write_slice(&page_of(22), GuestAddress(0x2000)).unwrap();
        mem.write_slice(&page_of(0), GuestAddress(0x3000)).unwrap();
        mem.write_obj(5u8, GuestAddress(0x5000)).unwrap();
        let dirty = take_vmm_dirty(&mem);
        assert_eq!(dirty.count(), 3);

        let diff_temp = scratch_file();
        let saved = save_ram(&mem, diff_temp.as_file(), PageSelection::Dirty(&dirty)).unwrap();
        assert_eq!(saved.pages_written, 2, "the zeroed page is a hole");
        assert_eq!(saved.pages, dirty);

        // Restore: base mapped privately, diff on top.
        let restored = create_ram_with(
            size,
            MemoryBacking::file_private(base_temp.as_path(), 0).unwrap(),
        )
        .unwrap();
        assert_eq!(
            apply_ram_diff(&restored, diff_temp.as_file(), &saved.pages).unwrap(),
            3
        );
        for addr in [0x1000, 0x2000, 0x3000, 0x5000, 0x6000] {
            let mut want = [0u8; 4096];
            let mut got = [0u8; 4096];
            mem.read_slice(&mut want, GuestAddress(addr)).unwrap();
            restored.read_slice(&mut got, GuestAddress(addr)).unwrap();
            assert!(want == got, "page {addr:#x} differs after restore");
        }
        assert!(
            take_vmm_dirty(&restored).is_empty(),
            "loading is not a change"
        );
    }

    #[test]
    fn snapshot_of_a_restored_vm_reads_the_file_below() {
        let size = 2 << 20;
        let base = scratch_file();
        base.as_file().set_len(size).unwrap();
        base.as_file().write_all_at(&page_of(4), 0x4000).unwrap();
        base.as_file().write_all_at(&page_of(6), 0x6000).unwrap();
        let mem = create_ram_with(
            size,
            MemoryBacking::file_private(base.as_path(), 0).unwrap(),
        )
        .unwrap();
        mem.write_slice(&page_of(1), GuestAddress(0x1000)).unwrap();
        // The VM zeroes page 6: its private copy is zero, the file below is not.
        mem.write_slice(&page_of(0), GuestAddress(0x6000)).unwrap();

        let again = scratch_file();
        let saved = save_ram(&mem, again.as_file(), PageSelection::All).unwrap();
        assert_eq!(
            saved.pages_written, 2,
            "page 1 (own) and page 4 (from the file)"
        );
        let mut buf = page_of(0);
        again.as_file().read_exact_at(&mut buf, 0x4000).unwrap();
        assert_eq!(buf, page_of(4));
        again.as_file().read_exact_at(&mut buf, 0x6000).unwrap();
        assert_eq!(buf, page_of(0));
    }

    #[test]
    fn memfd_snapshot_skips_holes_and_discarded_pages() {
        let mem = create_ram_with(4 << 20, MemoryBacking::Memfd).unwrap();
        mem.write_slice(&page_of(1), GuestAddress(0x1000)).unwrap();
        mem.write_slice(&page_of(2), GuestAddress(0x2000)).unwrap();
        discard(&mem, GuestAddress(0x2000), PAGE_SIZE).unwrap();
        let temp = scratch_file();
        let saved = save_ram(&mem, temp.as_file(), PageSelection::All).unwrap();
        assert_eq!(saved.pages_written, 1);
    }

    #[test]
    fn refuses_to_overwrite_its_own_backing_file() {
        let base = scratch_file();
        base.as_file().set_len(1 << 20).unwrap();
        base.as_file().write_all_at(&page_of(4), 0x4000).unwrap();
        let mem = create_ram_with(
            1 << 20,
            MemoryBacking::file_private(base.as_path(), 0).unwrap(),
        )
        .unwrap();
        let err = save_ram(&mem, base.as_file(), PageSelection::All).unwrap_err();
        assert!(
            matches!(err, MemoryError::SnapshotIntoBacking { region: 0 }),
            "{err}"
        );
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x4000)).unwrap(),
            4,
            "file untouched"
        );
    }

    #[test]
    fn refuses_foreign_page_sets_and_short_files() {
        let mem = create_ram(1 << 20).unwrap();
        let other = DirtyPages::all(&create_ram(2 << 20).unwrap());
        let temp = scratch_file();
        temp.as_file().write_all_at(b"keep", 0).unwrap();
        assert!(matches!(
            save_ram(&mem, temp.as_file(), PageSelection::Dirty(&other)),
            Err(MemoryError::PagesMismatch(_))
        ));
        let mut buf = [0u8; 4];
        temp.as_file().read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"keep", "a refused save leaves the file alone");

        assert!(matches!(
            apply_ram_diff(&mem, temp.as_file(), &other),
            Err(MemoryError::PagesMismatch(_))
        ));
        let err = apply_ram_diff(&mem, temp.as_file(), &DirtyPages::all(&mem)).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::SnapshotFileTooShort {
                len: 4,
                needed: 0x10_0000
            }
        ));
        assert!(err.to_string().contains("shorter"), "{err}");
    }

    #[test]
    fn zero_check_sees_a_single_byte() {
        let mut page = vec![0u64; 512];
        // SAFETY: the buffer is one page of u64s.
        assert!(unsafe { page_is_zero(page.as_ptr().cast()) });
        for at in [0, 1, 8, 4095] {
            page.fill(0);
            // SAFETY: `at` < 4096, inside the page.
            unsafe { page.as_mut_ptr().cast::<u8>().add(at).write(1) };
            // SAFETY: as above.
            assert!(!unsafe { page_is_zero(page.as_ptr().cast()) }, "byte {at}");
        }
    }
}

/// Snapshots of a real VM: a vCPU writes guest memory, the RAM is saved, and another VM
/// runs from the saved file (its GDT, page tables and data all come from it).
#[cfg(test)]
mod vm_tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::boot::builtin;
    use crate::vstate::memory::test_guest::{self, Code};
    use crate::vstate::memory::{
        kvm_usable_for_test, scratch_file, set_dirty_logging, take_dirty, MemoryBacking,
    };
    use crate::vstate::prepared::{self, prepare_with};

    const SIZE: u64 = 64 << 20;
    const CODE: u64 = 0x200_0000;
    const TARGET: u64 = 0x300_0000;
    const RESULT: u64 = 0x310_0000;

    /// Reads the byte the first VM stored, adds 41, stores it at RESULT, exits with it.
    fn second_guest() -> Code {
        Code::default()
            .load_al(TARGET as u32)
            .add_al(41)
            .store_al(RESULT as u32)
            .exit_with_al()
    }

    #[test]
    fn a_vm_restored_from_a_snapshot_file_runs() {
        if !kvm_usable_for_test() {
            return;
        }
        let first = prepared::prepare(SIZE).unwrap();
        builtin::load(&first.memory, "", 1).unwrap();
        let code = Code::default().store_byte(TARGET as u32, 1).exit_with(7);
        assert_eq!(test_guest::run(&first, code, CODE), 7);
        let snapshot = scratch_file();
        save_ram(&first.memory, snapshot.as_file(), PageSelection::All).unwrap();
        drop(first);

        let backing = MemoryBacking::file_private(snapshot.as_path(), 0).unwrap();
        let restored = prepare_with(SIZE, backing).unwrap();
        set_dirty_logging(&restored.vm_fd, &restored.memory, true).unwrap();
        assert_eq!(
            test_guest::run(&restored, second_guest(), CODE + 0x1000),
            42
        );
        assert_eq!(
            restored
                .memory
                .read_obj::<u8>(GuestAddress(RESULT))
                .unwrap(),
            42
        );
        let dirty = take_dirty(&restored.vm_fd, &restored.memory).unwrap();
        assert!(
            dirty.contains_addr(GuestAddress(RESULT)),
            "the guest's write is logged"
        );

        // The snapshot file is never written: a second VM from it sees no RESULT.
        let again = MemoryBacking::file_private(snapshot.as_path(), 0).unwrap();
        let again = prepare_with(SIZE, again).unwrap();
        assert_eq!(
            again.memory.read_obj::<u8>(GuestAddress(RESULT)).unwrap(),
            0
        );
        assert_eq!(
            again.memory.read_obj::<u8>(GuestAddress(TARGET)).unwrap(),
            1
        );
    }

    #[test]
    fn a_memfd_vm_runs_and_saves() {
        if !kvm_usable_for_test() {
            return;
        }
        let vm = prepare_with(SIZE, MemoryBacking::Memfd).unwrap();
        builtin::load(&vm.memory, "", 1).unwrap();
        vm.memory.write_obj(1u8, GuestAddress(TARGET)).unwrap();
        assert_eq!(test_guest::run(&vm, second_guest(), CODE), 42);
        let memfd = vm
            .memory
            .iter()
            .next()
            .unwrap()
            .file_offset()
            .unwrap()
            .file();
        let mut byte = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(memfd, &mut byte, RESULT).unwrap();
        assert_eq!(byte, [42], "the guest's write is in the memfd");

        let snapshot = scratch_file();
        save_ram(&vm.memory, snapshot.as_file(), PageSelection::All).unwrap();
        let restored = crate::vstate::memory::create_ram_with(
            SIZE,
            MemoryBacking::file_private(snapshot.as_path(), 0).unwrap(),
        )
        .unwrap();
        assert_eq!(restored.read_obj::<u8>(GuestAddress(RESULT)).unwrap(), 42);
    }
}
