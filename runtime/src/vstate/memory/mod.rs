//! Guest RAM: layout, anonymous mappings (`vm-memory`) and KVM memory slots.
//!
//! RAM starts at 0 and stops below the MMIO hole at 3 GiB; whatever does not fit
//! continues at 4 GiB. Mappings are `MAP_NORESERVE` and untouched pages cost the host
//! nothing, so a VM's resident size grows only with what the guest writes.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use luvisor_guest_abi::layout::{HIGH_RAM_START, LOW_RAM_END, MAX_MAPPED_GIB};
use thiserror::Error;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest RAM as the VMM sees it: `vm-memory` mappings whose every region carries a
/// bitmap of the pages the VMM itself wrote (device completions, used rings, boot
/// loading). Together with KVM's dirty log it tells which pages changed, for diff
/// snapshots and live migration.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

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

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest memory")]
    Map {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot register guest memory slot {slot} at {base:#x} (+{size:#x}) with KVM")]
    RegisterSlot {
        slot: u32,
        base: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
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

/// Maps `size` bytes of anonymous guest RAM.
pub fn create_ram(size: u64) -> Result<GuestRam, MemoryError> {
    GuestRam::from_ranges(&ram_ranges(size)).map_err(|source| MemoryError::Map { size, source })
}

/// Registers every region of `mem` as a KVM memory slot (slot = region index).
pub fn register_slots(vm: &VmFd, mem: &GuestRam) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let base = region.start_addr().0;
        let size = region.len();
        let host = mem
            .get_host_address(region.start_addr())
            .expect("region start is mapped") as u64;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr: host,
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

/// Bytes of guest RAM that are resident in host memory (pages the guest or the loader
/// touched), from `mincore(2)` over every region.
pub fn resident_bytes(mem: &GuestRam) -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let mut resident = 0u64;
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else {
            continue;
        };
        let len = region.len() as usize;
        let mut vec = vec![0u8; len.div_ceil(page)];
        // SAFETY: [host, host+len) is one live mapping owned by `mem`, and `vec` has one
        // byte per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(host as *mut libc::c_void, len, vec.as_mut_ptr()) };
        if rc == 0 {
            resident += vec.iter().filter(|&&b| b & 1 != 0).count() as u64 * page as u64;
        }
    }
    resident
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_resident_pages() {
        use vm_memory::Bytes;
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
}
