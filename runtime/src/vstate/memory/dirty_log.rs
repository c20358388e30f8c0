//! Which pages changed: KVM's dirty log (pages the guest wrote) merged with the VMM's
//! own bitmap (pages the VMM wrote for the guest: device completions, boot loading).
//!
//! KVM logs a slot's writes only while the slot is registered with
//! `KVM_MEM_LOG_DIRTY_PAGES`; [`set_dirty_logging`] re-registers every slot with or
//! without it (same slot numbers, addresses and mappings), at any time, also while
//! vCPUs run. When logging starts, KVM's log is empty: pages written earlier are not in
//! it. So a diff snapshot chain starts with a full snapshot taken after logging is on,
//! and a [`take_dirty`] at that moment, whose result is thrown away, sets the baseline.
//!
//! Turning logging on makes the guest's first write to each page after every
//! [`take_dirty`] fault into KVM (it write-protects the pages again); turn it off when no
//! diff is wanted.

use kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES;
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{mapping, register_slots_with_flags, DirtyPages, GuestRam, MemoryError};

/// Turns KVM's dirty logging on or off for every slot of `mem` (slot = region index,
/// registered by [`register_slots`](super::register_slots)).
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestRam, enabled: bool) -> Result<(), MemoryError> {
    let flags = if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    register_slots_with_flags(vm, mem, flags)
}

/// The pages written since the last call, by the guest (KVM's dirty log) or by the VMM
/// (each region's bitmap), and resets both. Needs dirty logging on
/// ([`set_dirty_logging`]).
///
/// If KVM refuses a slot's log, the pages already taken from the other slots go back
/// into the VMM's bitmap, so nothing is lost: the next call reports them.
pub fn take_dirty(vm: &VmFd, mem: &GuestRam) -> Result<DirtyPages, MemoryError> {
    let mut bitmaps = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        match vm.get_dirty_log(slot as u32, region.len() as usize) {
            Ok(bits) => bitmaps.push(bits),
            Err(source) => {
                for (region, bits) in mem.iter().zip(&bitmaps) {
                    give_back(region, bits);
                }
                return Err(MemoryError::DirtyLog {
                    slot: slot as u32,
                    base: region.start_addr().0,
                    size: region.len(),
                    source,
                });
            }
        }
    }
    for (region, bits) in mem.iter().zip(&mut bitmaps) {
        let vmm = mapping(region).bitmap().get_and_reset();
        for (word, vmm_word) in bits.iter_mut().zip(vmm) {
            *word |= vmm_word;
        }
    }
    Ok(DirtyPages::from_bitmaps(mem, bitmaps))
}

/// The pages the VMM wrote since the last call (only its own bitmap; guest writes are
/// not in it), and resets the bitmap. For RAM without a KVM VM, or without logging.
pub fn take_vmm_dirty(mem: &GuestRam) -> DirtyPages {
    let bitmaps = mem
        .iter()
        .map(|region| mapping(region).bitmap().get_and_reset())
        .collect();
    DirtyPages::from_bitmaps(mem, bitmaps)
}

/// Puts pages taken from KVM's log into the region's VMM bitmap.
fn give_back(region: &super::GuestRamRegion, bits: &[u64]) {
    let bitmap = mapping(region).bitmap();
    for (word_index, &word) in bits.iter().enumerate() {
        let mut word = word;
        while word != 0 {
            let bit = word.trailing_zeros() as usize;
            word &= word - 1;
            bitmap.set_bit(word_index * 64 + bit);
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::boot::builtin;
    use crate::vstate::memory::test_guest::{self, Code};
    use crate::vstate::memory::{create_ram, kvm_usable_for_test, PAGE_SIZE};
    use crate::vstate::prepared;

    #[test]
    fn vmm_writes_are_taken_once() {
        let mem = create_ram(1 << 20).unwrap();
        mem.write_obj(1u32, GuestAddress(0x3000)).unwrap();
        mem.write_slice(&[1u8; 2], GuestAddress(0x4fff)).unwrap();
        let taken = take_vmm_dirty(&mem);
        assert_eq!(
            taken.iter().collect::<Vec<_>>(),
            vec![(0, 3), (0, 4), (0, 5)]
        );
        assert!(take_vmm_dirty(&mem).is_empty());
    }

    #[test]
    fn taking_the_log_needs_logging_on_and_loses_nothing() {
        if !kvm_usable_for_test() {
            return;
        }
        let vm = prepared::prepare(8 << 20).unwrap();
        vm.memory.write_obj(1u8, GuestAddress(0x2000)).unwrap();
        let err = take_dirty(&vm.vm_fd, &vm.memory).unwrap_err();
        assert!(
            matches!(err, MemoryError::DirtyLog { slot: 0, .. }),
            "{err}"
        );
        // The VMM's bitmap was not reset by the failed call.
        assert!(take_vmm_dirty(&vm.memory).contains(0, 2));
    }

    /// What KVM (PVM on our machines) does with the dirty log: a real vCPU writes one
    /// byte of guest memory, and the page must be in the log; the VMM's own write to
    /// another page shows too; a second take is empty.
    #[test]
    fn guest_writes_show_in_the_dirty_log() {
        if !kvm_usable_for_test() {
            return;
        }
        const CODE: u64 = 0x200_0000;
        const TARGET: u64 = 0x300_0000;
        const VMM_WRITE: u64 = 0x380_0000;
        let vm = prepared::prepare(64 << 20).unwrap();
        let mem = &vm.memory;
        // GDT, TSS and page tables of the built-in guest.
        builtin::load(mem, "", 1).unwrap();
        set_dirty_logging(&vm.vm_fd, mem, true).expect("KVM_MEM_LOG_DIRTY_PAGES is supported");
        // The baseline: loading the guest is the VMM's writes.
        let loaded = take_dirty(&vm.vm_fd, mem).expect("KVM_GET_DIRTY_LOG is supported");
        assert!(loaded.contains_addr(GuestAddress(0x9000)), "page tables");

        let code = Code::default().store_byte(TARGET as u32, 1).exit_with(42);
        assert_eq!(test_guest::run(&vm, code, CODE), 42);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(TARGET)).unwrap(), 1);
        mem.write_obj(5u8, GuestAddress(VMM_WRITE)).unwrap();

        let dirty = take_dirty(&vm.vm_fd, mem).unwrap();
        let pages: Vec<_> = dirty.addresses().map(|a| a.0).collect();
        eprintln!("dirty pages after the guest ran: {pages:#x?}");
        assert!(
            dirty.contains_addr(GuestAddress(TARGET)),
            "guest write: {pages:#x?}"
        );
        assert!(
            dirty.contains_addr(GuestAddress(VMM_WRITE)),
            "VMM write: {pages:#x?}"
        );
        assert!(
            dirty.contains_addr(GuestAddress(CODE)),
            "the VMM wrote the code"
        );
        assert!(!dirty.contains_addr(GuestAddress(CODE + PAGE_SIZE)));
        assert!(!dirty.contains_addr(GuestAddress(TARGET + PAGE_SIZE)));
        assert!(take_dirty(&vm.vm_fd, mem).unwrap().is_empty());

        set_dirty_logging(&vm.vm_fd, mem, false).unwrap();
        assert!(matches!(
            take_dirty(&vm.vm_fd, mem),
            Err(MemoryError::DirtyLog { .. })
        ));
    }
}
