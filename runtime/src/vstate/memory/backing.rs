//! What guest RAM is made of.
//!
//! - **Anonymous** private memory: what a fresh VM gets. Untouched pages cost nothing.
//! - **Memfd**: one `memfd` holding all RAM in the snapshot file layout, mapped
//!   `MAP_SHARED`. Pages can be handed back with `fallocate(PUNCH_HOLE)` (a balloon) and
//!   the fd can be given to another process or written out as it is.
//! - **FilePrivate**: a snapshot memory file mapped `MAP_PRIVATE | MAP_NORESERVE`. Nothing
//!   is read at restore: a page comes from the file (through the page cache, shared by
//!   every VM restored from the same file) when the guest first touches it, and a write
//!   gives this VM its own copy. Restoring therefore costs the same for any RAM size.
//!
//! Every region carries its [`AtomicBitmap`] of pages the VMM wrote, whatever the backing.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::Arc;

use vm_memory::bitmap::NewBitmap;

use super::RamBitmap;
use vm_memory::mmap::FromRangesError;
use vm_memory::{FileOffset, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use super::{mapping, ram_ranges, GuestRam, GuestRamRegion, MemoryError, PAGE_SIZE};

/// What [`create_ram_with`] maps guest RAM from.
#[derive(Debug, Clone)]
pub enum MemoryBacking {
    /// Anonymous private memory (`MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE`).
    Anonymous,
    /// A new memfd as long as all RAM, regions in the snapshot file layout, mapped
    /// `MAP_SHARED | MAP_NORESERVE`.
    Memfd,
    /// A snapshot memory file mapped copy-on-write (`MAP_PRIVATE | MAP_NORESERVE`): region
    /// *i* at `offset` + the lengths of the regions before it. The file may be opened
    /// read-only; it is never written. It must stay unchanged while any VM maps it:
    /// pages the guest has not written yet are read from it at any time.
    FilePrivate {
        file: Arc<File>,
        /// Where region 0 starts in the file; a multiple of [`PAGE_SIZE`].
        offset: u64,
    },
}

impl MemoryBacking {
    /// [`MemoryBacking::FilePrivate`] over the file at `path`, opened read-only.
    pub fn file_private(path: &Path, offset: u64) -> Result<MemoryBacking, MemoryError> {
        let file = File::open(path).map_err(|source| MemoryError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(MemoryBacking::FilePrivate {
            file: Arc::new(file),
            offset,
        })
    }

    fn name(&self) -> &'static str {
        match self {
            MemoryBacking::Anonymous => "anonymous memory",
            MemoryBacking::Memfd => "memfd",
            MemoryBacking::FilePrivate { .. } => "private file mapping",
        }
    }
}

/// What one region of guest RAM is mapped from, read back from its mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionBacking {
    Anonymous,
    Memfd,
    FilePrivate,
}

/// The backing of `region`, from its mapping flags: every region is made by
/// [`create_ram_with`], which maps anonymous memory with no file, memfds shared and
/// snapshot files private.
pub fn region_backing(region: &GuestRamRegion) -> RegionBacking {
    if region.file_offset().is_none() {
        RegionBacking::Anonymous
    } else if mapping(region).flags() & libc::MAP_SHARED != 0 {
        RegionBacking::Memfd
    } else {
        RegionBacking::FilePrivate
    }
}

/// Maps `size` bytes of guest RAM (laid out by [`ram_ranges`]) from `backing`.
pub fn create_ram_with(size: u64, backing: MemoryBacking) -> Result<GuestRam, MemoryError> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::InvalidSize { size });
    }
    // The file every region maps, where region 0 starts in it, and the mmap flags.
    let (file, first_offset, flags) = match &backing {
        MemoryBacking::Anonymous => (
            None,
            0,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
        MemoryBacking::Memfd => (
            Some(new_memfd(size)?),
            0,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        ),
        MemoryBacking::FilePrivate { file, offset } => {
            if !offset.is_multiple_of(PAGE_SIZE) {
                return Err(MemoryError::UnalignedFileOffset { offset: *offset });
            }
            let len = file.metadata().map_err(MemoryError::FileMetadata)?.len();
            // A page past the end of the file would raise SIGBUS when the guest touches it.
            if offset.checked_add(size).is_none_or(|end| end > len) {
                return Err(MemoryError::FileTooShort {
                    len,
                    offset: *offset,
                    needed: size,
                });
            }
            (
                Some(file.clone()),
                *offset,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
    };

    let mut regions = Vec::new();
    let mut file_offset = first_offset;
    for (index, (base, len)) in ram_ranges(size).into_iter().enumerate() {
        let map_error = |source| MemoryError::MapRegion {
            index,
            base: base.0,
            size: len as u64,
            backing: backing.name(),
            source,
        };
        let mut builder =
            vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(len, RamBitmap::with_len(len))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags);
        if let Some(file) = &file {
            builder = builder.with_file_offset(FileOffset::from_arc(file.clone(), file_offset));
        }
        let region: MmapRegion<RamBitmap> = builder.build().map_err(map_error)?;
        regions.push(place(region, base, size)?);
        file_offset += len as u64;
    }
    collect(regions, size)
}

/// `region` as guest RAM at `base` (`size`: all of the RAM, for the message).
fn place(
    region: MmapRegion<RamBitmap>,
    base: vm_memory::GuestAddress,
    size: u64,
) -> Result<GuestRegionMmap<RamBitmap>, MemoryError> {
    GuestRegionMmap::new(region, base).ok_or(MemoryError::Map {
        size,
        source: FromRangesError::InvalidGuestRegion,
    })
}

/// The regions as one [`GuestRam`].
fn collect(regions: Vec<GuestRegionMmap<RamBitmap>>, size: u64) -> Result<GuestRam, MemoryError> {
    GuestRam::from_regions(regions).map_err(|e| MemoryError::Map {
        size,
        source: FromRangesError::Collection(e),
    })
}

/// Maps the snapshot memory file `file` (from `offset`) copy-on-write over the RAM of
/// `owner`, at the same host addresses, and returns RAM that describes the new mappings.
///
/// This lets a restore use a VM prepared ahead of time: KVM's memory slots point at host
/// addresses, so they stay valid and need not be registered again (4–5 ms on PVM).
/// `MAP_FIXED` replaces the anonymous pages at once; the kernel tells KVM through its MMU
/// notifiers. The returned RAM does not unmap anything itself: each of its regions keeps
/// `owner` alive through its bitmap ([`RamBitmap::keeping`]), and `owner` unmaps the
/// ranges when the last region is gone. `owner` must be anonymous RAM made by
/// [`create_ram_with`] for the same size; the file is checked as for
/// [`MemoryBacking::FilePrivate`].
pub fn map_file_over(
    owner: GuestRam,
    file: Arc<File>,
    offset: u64,
) -> Result<GuestRam, MemoryError> {
    let size = super::ram_file_len(&owner);
    if !offset.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::UnalignedFileOffset { offset });
    }
    let len = file.metadata().map_err(MemoryError::FileMetadata)?.len();
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return Err(MemoryError::FileTooShort {
            len,
            offset,
            needed: size,
        });
    }
    let flags = libc::MAP_PRIVATE | libc::MAP_NORESERVE;
    let owner = Arc::new(owner);
    let mut regions = Vec::new();
    let mut file_offset = offset;
    for (index, region) in owner.iter().enumerate() {
        if region_backing(region) != RegionBacking::Anonymous {
            return Err(MemoryError::Map {
                size,
                source: FromRangesError::InvalidGuestRegion,
            });
        }
        let host = mapping(region).as_ptr();
        let len = region.len() as usize;
        let map_error = |source| MemoryError::MapRegion {
            index,
            base: region.start_addr().0,
            size: len as u64,
            backing: "private file mapping over prepared RAM",
            source,
        };
        // SAFETY: [host, host + len) is one live mapping that `owner` made and still
        // owns; MAP_FIXED replaces exactly that range (with the same protection) and
        // nothing else. `owner` stays alive, through the new regions' bitmaps, for as long
        // as anything can reach the range, and unmaps it last.
        let mapped = unsafe {
            libc::mmap(
                host.cast(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED,
                file.as_raw_fd(),
                file_offset as libc::off_t,
            )
        };
        if mapped == libc::MAP_FAILED {
            return Err(map_error(vm_memory::mmap::MmapRegionError::Mmap(
                std::io::Error::last_os_error(),
            )));
        }
        let keep: Arc<dyn std::any::Any + Send + Sync> = owner.clone();
        let builder =
            vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(len, RamBitmap::keeping(len, keep))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags)
                .with_file_offset(FileOffset::from_arc(file.clone(), file_offset));
        // SAFETY: `host` starts a live mapping of `len` bytes (just replaced above) that
        // outlives the region, as explained above.
        let built: MmapRegion<RamBitmap> = unsafe { builder.with_raw_mmap_pointer(host) }
            .build()
            .map_err(map_error)?;
        regions.push(place(built, region.start_addr(), size)?);
        file_offset += len as u64;
    }
    collect(regions, size)
}

/// A new memfd of `size` bytes (all holes: it costs nothing until written).
fn new_memfd(size: u64) -> Result<Arc<File>, MemoryError> {
    let error = |source| MemoryError::Memfd { size, source };
    // SAFETY: the name is a NUL-terminated string literal; memfd_create has no other
    // memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(c"luvisor-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(error)?;
    Ok(Arc::new(file))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    use super::*;
    use crate::vstate::memory::{create_ram, resident_bytes, scratch_file};
    use luvisor_guest_abi::layout::{HIGH_RAM_START, LOW_RAM_END};

    #[test]
    fn a_file_mapped_over_prepared_ram_reads_the_file_and_outlives_its_owner() {
        let size = 8u64 << 20;
        let owner = create_ram(size).unwrap();
        owner.write_obj(0xdeadu64, GuestAddress(0x5000)).unwrap();
        let host = mapping(owner.iter().next().unwrap()).as_ptr() as usize;
        let file = scratch_file();
        file.as_file().set_len(size).unwrap();
        {
            use std::os::unix::fs::FileExt;
            file.as_file()
                .write_all_at(&7u64.to_le_bytes(), 0x5000)
                .unwrap();
        }
        let file = Arc::new(file.into_file());
        let ram = map_file_over(owner, file.clone(), 0).unwrap();
        let region = ram.iter().next().unwrap();
        assert_eq!(mapping(region).as_ptr() as usize, host, "same host address");
        assert_eq!(region_backing(region), RegionBacking::FilePrivate);
        assert_eq!(ram.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 7);
        // Copy-on-write: the file never changes.
        let shared = Arc::new(ram);
        let user = shared.clone();
        drop(shared);
        user.write_obj(9u64, GuestAddress(0x5000)).unwrap();
        assert_eq!(user.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 9);
        let mut on_disk = [0u8; 8];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut on_disk, 0x5000).unwrap();
        assert_eq!(u64::from_le_bytes(on_disk), 7);
        drop(user);
        // A file too short for the RAM is refused before anything is mapped.
        let short = scratch_file();
        short.as_file().set_len(4096).unwrap();
        let err =
            map_file_over(create_ram(size).unwrap(), Arc::new(short.into_file()), 0).unwrap_err();
        assert!(err.to_string().contains("too short"), "{err}");
    }

    #[test]
    fn anonymous_ram_is_private_and_tracks_vmm_writes() {
        let mem = create_ram(8 << 20).unwrap();
        let region = mem.iter().next().unwrap();
        assert_eq!(region_backing(region), RegionBacking::Anonymous);
        mem.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        assert!(mapping(region).bitmap().is_addr_set(0x3000));
        assert!(!mapping(region).bitmap().is_addr_set(0x4000));
    }

    #[test]
    fn memfd_ram_is_shared_in_the_file_layout() {
        let mem = create_ram_with(4 << 30, MemoryBacking::Memfd).unwrap();
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        for region in &regions {
            assert_eq!(region_backing(region), RegionBacking::Memfd);
        }
        let high = regions[1].file_offset().unwrap();
        assert_eq!(high.start(), LOW_RAM_END);
        mem.write_obj(0xabcd_u64, GuestAddress(HIGH_RAM_START + 0x1000))
            .unwrap();
        // The memfd holds the byte at the region's file offset.
        let mut buf = [0u8; 8];
        use std::os::unix::fs::FileExt;
        high.file()
            .read_exact_at(&mut buf, LOW_RAM_END + 0x1000)
            .unwrap();
        assert_eq!(u64::from_le_bytes(buf), 0xabcd);
        assert!(mapping(regions[1]).bitmap().is_addr_set(0x1000));
        assert_eq!(resident_bytes(&mem), PAGE_SIZE);
    }

    #[test]
    fn file_private_ram_reads_the_file_and_never_writes_it() {
        let temp = scratch_file();
        let (path, mut file) = (temp.as_path(), temp.as_file());
        let mut image = vec![0u8; 2 << 20];
        image[0x1000..0x1008].copy_from_slice(&0x1111_u64.to_le_bytes());
        image[(1 << 20) + 0x2000..(1 << 20) + 0x2008].copy_from_slice(&0x2222_u64.to_le_bytes());
        file.write_all(&image).unwrap();

        // RAM of 1 MiB starting 1 MiB into the file.
        let backing = MemoryBacking::file_private(path, 1 << 20).unwrap();
        let mem = create_ram_with(1 << 20, backing.clone()).unwrap();
        assert_eq!(
            region_backing(mem.iter().next().unwrap()),
            RegionBacking::FilePrivate
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0x2222);
        mem.write_obj(0x3333_u64, GuestAddress(0x2000)).unwrap();
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0x3333);
        // Another VM from the same file sees the file, not the first VM's write.
        let other = create_ram_with(1 << 20, backing).unwrap();
        assert_eq!(other.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0x2222);
        assert_eq!(std::fs::read(path).unwrap(), image);
    }

    #[test]
    fn file_shorter_than_ram_is_refused() {
        let temp = scratch_file();
        let (path, file) = (temp.as_path(), temp.as_file());
        file.set_len(1 << 20).unwrap();
        let backing = MemoryBacking::file_private(path, 0).unwrap();
        let err = create_ram_with(2 << 20, backing).unwrap_err();
        assert!(matches!(
            err,
            MemoryError::FileTooShort {
                len: 0x10_0000,
                offset: 0,
                needed: 0x20_0000
            }
        ));
        assert!(err.to_string().contains("too short"), "{err}");

        let backing = MemoryBacking::file_private(path, 0x800).unwrap();
        assert!(matches!(
            create_ram_with(4096, backing),
            Err(MemoryError::UnalignedFileOffset { offset: 0x800 })
        ));
        assert!(matches!(
            MemoryBacking::file_private(&path.with_extension("missing"), 0),
            Err(MemoryError::Open { .. })
        ));
    }

    #[test]
    fn sizes_must_be_whole_pages() {
        assert!(matches!(
            create_ram(0),
            Err(MemoryError::InvalidSize { size: 0 })
        ));
        assert!(matches!(
            create_ram_with(4097, MemoryBacking::Memfd),
            Err(MemoryError::InvalidSize { size: 4097 })
        ));
    }
}
