//! Guest RAM: layout, backings (`vm-memory` mappings), KVM memory slots, dirty-page
//! tracking, snapshot memory files and returning pages to the host.
//!
//! RAM starts at 0 and stops below the MMIO hole at 3 GiB; whatever does not fit
//! continues at 4 GiB. Mappings are `MAP_NORESERVE` and untouched pages cost the host
//! nothing, so a VM's resident size grows only with what the guest writes.
//!
//! - [`backing`]: what the RAM is made of: anonymous memory, a memfd, or a snapshot
//!   memory file mapped copy-on-write ([`MemoryBacking`], [`create_ram_with`]).
//! - [`pages`]: [`DirtyPages`], a set of pages per region.
//! - [`dirty_log`]: KVM's dirty log per slot, merged with the VMM's own bitmap
//!   ([`set_dirty_logging`], [`take_dirty`]).
//! - [`snapshot`]: writing RAM to a sparse snapshot memory file and loading a diff on
//!   top ([`save_ram`], [`apply_ram_diff`]).
//! - [`discard`](mod@discard): giving pages back to the host ([`discard()`]).
//! - [`residency`]: which pages are in host memory (`mincore`, `/proc/self/pagemap`,
//!   `SEEK_DATA`), and [`resident_bytes`].
//!
//! # Snapshot memory file layout
//!
//! One file holds every region back to back in region order: region *i* starts at the
//! sum of the lengths of regions 0..*i* (plus the file offset the caller chose, for
//! [`MemoryBacking::FilePrivate`]). A memfd backing uses the same layout, so guest RAM
//! and its snapshot file line up byte for byte. [`region_file_offsets`] gives the offsets.
//!
//! # Page size
//!
//! Everything here counts in 4 KiB pages ([`PAGE_SIZE`]): KVM's dirty log, the VMM's
//! [`AtomicBitmap`] and the snapshot page sets all use the host page size, which is
//! 4 KiB on x86-64, the only architecture luvisor runs on.

pub mod backing;
pub mod bitmap;
pub mod dirty_log;
pub mod discard;
pub mod pages;
pub mod residency;
pub mod snapshot;
#[cfg(test)]
mod test_guest;

use std::path::PathBuf;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use luvisor_guest_abi::layout::{HIGH_RAM_START, LOW_RAM_END, MAX_MAPPED_GIB};
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;

pub use bitmap::RamBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

pub use backing::{create_ram_with, map_file_over, region_backing, MemoryBacking, RegionBacking};
pub use dirty_log::{set_dirty_logging, take_dirty, take_vmm_dirty};
pub use discard::{discard, DiscardEffect};
pub use pages::{DirtyPages, PageRun};
pub use residency::resident_bytes;
pub use snapshot::{
    apply_ram_diff, pages_that_may_hold_data_in, save_ram, PageSelection, SavedRam,
};

/// Guest RAM as the VMM sees it: `vm-memory` mappings whose every region carries a
/// bitmap of the pages the VMM itself wrote (device completions, used rings, boot
/// loading). Together with KVM's dirty log it tells which pages changed, for diff
/// snapshots and live migration.
pub type GuestRam = vm_memory::GuestMemoryMmap<RamBitmap>;

/// One region of [`GuestRam`].
pub type GuestRamRegion = vm_memory::GuestRegionMmap<RamBitmap>;

/// A piece of [`GuestRam`] that devices read and write directly. Writes through its
/// methods mark the VMM's dirty bitmap; code that writes through its raw pointer (a
/// `pread` straight into guest memory) must call `bitmap().mark_dirty` itself.
pub type GuestSlice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, AtomicBitmap>>;

/// Smallest RAM a VM may have: the built-in guest's image, stacks and page tables fit.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest RAM, 63 GiB: everything must sit inside the guest's identity map, which covers
/// the first [`MAX_MAPPED_GIB`] (64) GiB of guest-physical space, 1 GiB of which is the
/// MMIO hole. `docs/lua-api.md` and `lua-api/types/hv.lua` state this value; a VM test
/// checks that they agree with it.
pub const MAX_MEMORY: u64 = (MAX_MAPPED_GIB << 30) - (HIGH_RAM_START - LOW_RAM_END);

/// The page size of every bitmap and page set here (the x86-64 host page size).
pub const PAGE_SIZE: u64 = 4096;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("guest RAM size {size:#x} is not a positive multiple of the {PAGE_SIZE}-byte page")]
    InvalidSize { size: u64 },
    #[error("cannot map guest RAM region {index} at {base:#x} (+{size:#x}) ({backing})")]
    MapRegion {
        index: usize,
        base: u64,
        size: u64,
        backing: &'static str,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("cannot create a memfd of {size} bytes for guest RAM")]
    Memfd {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest RAM file offset {offset:#x} is not a multiple of the {PAGE_SIZE}-byte page")]
    UnalignedFileOffset { offset: u64 },
    #[error("cannot read the length of the guest RAM file")]
    FileMetadata(#[source] std::io::Error),
    #[error(
        "the guest RAM file is too short: {len} bytes, but {needed} bytes of RAM from offset \
         {offset:#x} need {} bytes",
        offset + needed
    )]
    FileTooShort { len: u64, offset: u64, needed: u64 },
    #[error("cannot register guest memory slot {slot} at {base:#x} (+{size:#x}) with KVM")]
    RegisterSlot {
        slot: u32,
        base: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "cannot read KVM's dirty log of slot {slot} ({base:#x} +{size:#x}); is dirty \
         logging on (set_dirty_logging)?"
    )]
    DirtyLog {
        slot: u32,
        base: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the page set does not fit this guest RAM: {0}")]
    PagesMismatch(String),
    #[error("cannot write the snapshot memory file at offset {offset:#x} (+{len:#x})")]
    SnapshotWrite {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the snapshot memory file at offset {offset:#x} (+{len:#x})")]
    SnapshotRead {
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the snapshot memory file is {len} bytes, shorter than the {needed} bytes of guest RAM"
    )]
    SnapshotFileTooShort { len: u64, needed: u64 },
    #[error("cannot write a snapshot into the file that backs guest RAM region {region}")]
    SnapshotIntoBacking { region: usize },
    #[error("cannot discard guest memory {addr:#x} (+{len:#x}): {reason}")]
    DiscardRange { addr: u64, len: u64, reason: String },
    #[error("cannot discard guest memory {addr:#x} (+{len:#x}): {op} failed")]
    Discard {
        addr: u64,
        len: u64,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The guest-physical ranges that hold `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(LOW_RAM_END);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(HIGH_RAM_START), (size - low) as usize));
    }
    ranges
}

/// Maps `size` bytes of anonymous guest RAM (the same as
/// `create_ram_with(size, MemoryBacking::Anonymous)`).
pub fn create_ram(size: u64) -> Result<GuestRam, MemoryError> {
    create_ram_with(size, MemoryBacking::Anonymous)
}

/// Where each region of `mem` starts in a snapshot memory file (and in a memfd
/// backing): region *i* at the sum of the lengths of the regions before it.
pub fn region_file_offsets(mem: &GuestRam) -> Vec<u64> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let start = offset;
            offset += region.len();
            start
        })
        .collect()
}

/// The length of a snapshot memory file for `mem`: all its RAM.
pub fn ram_file_len(mem: &GuestRam) -> u64 {
    mem.iter().map(|region| region.len()).sum()
}

/// The mapping behind `region`: its host pointer and its VMM dirty bitmap.
pub(crate) fn mapping(region: &GuestRamRegion) -> &MmapRegion<RamBitmap> {
    region
}

/// Registers every region of `mem` as a KVM memory slot (slot = region index), without
/// dirty logging.
pub fn register_slots(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    register_slots_with_flags(vm, mem, 0)
}

/// Registers (or re-registers: same slot, address and size, new `flags`) every region
/// of `mem` as KVM memory slot `index`.
pub(crate) fn register_slots_with_flags(
    vm: &VmFd,
    mem: &GuestRam,
    flags: u32,
) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let base = region.start_addr().0;
        let size = region.len();
        let desc = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: mapping(region).as_ptr() as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the VM keeps
        // until after the VM file descriptor (and so every slot) is gone.
        unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::RegisterSlot {
            slot,
            base,
            size,
            source,
        })?;
    }
    Ok(())
}

/// Whether tests that need `/dev/kvm` can run. In CI (`CI=true`) a missing or unusable
/// `/dev/kvm` is a failure; elsewhere the test is skipped with a message.
#[cfg(test)]
pub(crate) fn kvm_usable_for_test() -> bool {
    match crate::vstate::kvm() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("/dev/kvm is not usable ({e}), and VM tests must run in CI");
            }
            eprintln!("skipping: /dev/kvm is not usable: {e}");
            false
        }
    }
}

/// A temporary file, removed when dropped.
#[cfg(test)]
pub(crate) fn scratch_file() -> vmm_sys_util::tempfile::TempFile {
    vmm_sys_util::tempfile::TempFile::new_with_prefix(std::env::temp_dir().join("luvisor-mem-"))
        .expect("create a temporary file")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_matches_the_host() {
        // SAFETY: sysconf has no memory-safety preconditions.
        let host = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        assert_eq!(host as u64, PAGE_SIZE);
    }

    #[test]
    fn largest_ram_ends_where_the_identity_map_ends() {
        assert_eq!(MAX_MEMORY, 63 << 30);
        let ranges = ram_ranges(MAX_MEMORY);
        let (base, len) = ranges[ranges.len() - 1];
        assert_eq!(base.0 + len as u64, MAX_MAPPED_GIB << 30);
    }

    #[test]
    fn splits_around_the_mmio_hole() {
        assert_eq!(ram_ranges(128 << 20), vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), LOW_RAM_END as usize));
        assert_eq!(r[1], (GuestAddress(HIGH_RAM_START), (1 << 30) as usize));
    }

    #[test]
    fn file_offsets_put_regions_back_to_back() {
        let mem = create_ram(4 << 30).unwrap();
        assert_eq!(region_file_offsets(&mem), vec![0, LOW_RAM_END]);
        assert_eq!(ram_file_len(&mem), 4 << 30);
    }
}
