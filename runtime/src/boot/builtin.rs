//! The built-in test guest: an embedded `no_std` ELF that runs entirely at CPL3.
//!
//! Boot sequence (all prepared by the host, so the guest executes no supervisor code):
//! 1. load the ELF's segments at 1 MiB;
//! 2. write a GDT with 64-bit user code and data segments and a TSS;
//! 3. write identity-mapped page tables over all guest RAM (2 MiB pages, U bit at every
//!    level);
//! 4. write the boot-info block (RAM map, vCPU count, command line);
//! 5. set each vCPU's segment registers to DPL 3, paging on, `RFLAGS.IOPL = 3` (so port
//!    I/O works at CPL3 on hardware too), and `rip` at the ELF entry with the boot-info
//!    address in `rdi` and the vCPU index in `rsi`.
//!
//! There is no IDT: any exception the guest takes escalates to a triple fault, which the
//! VMM reports as a crash.
//!
//! The image also carries a PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`, see
//! `guest/src/pvh.rs`) so that QEMU can boot the same guest for comparisons; this loader
//! ignores it and enters the ELF entry, `_start`, at CPL3 as above.

use std::io::Cursor;

use crate::vstate::memory::GuestRam;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::{Elf, KernelLoader};
use luvisor_guest_abi::layout::*;
/// The longest command line the built-in guest accepts, in bytes.
pub use luvisor_guest_abi::MAX_CMDLINE;
use luvisor_guest_abi::{BootInfo, RamRegion, BOOT_MAGIC, BOOT_VERSION, MAX_RAM_REGIONS};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The guest binary, built by `build.rs` from `guest/`.
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

#[derive(Debug, Error)]
pub enum BuiltinBootError {
    #[error("the command line is {len} bytes; the built-in guest accepts at most {MAX_CMDLINE}")]
    CmdlineTooLong { len: usize },
    #[error("cannot load the built-in guest image")]
    Load(#[source] linux_loader::loader::Error),
    #[error("cannot write the built-in guest's {what} into guest memory")]
    Write {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("cannot set the registers of vcpu {index}")]
    Registers {
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Selectors of the host-built GDT; RPL 3 on the user segments.
const USER_CODE_SELECTOR: u16 = 0x08 | 3;
const USER_DATA_SELECTOR: u16 = 0x10 | 3;
const TSS_SELECTOR: u16 = 0x18;
const GDT_ENTRIES: usize = 5;

/// 64-bit user code: present, DPL 3, execute/read, long mode, 4 KiB granularity.
const GDT_USER_CODE: u64 = 0x00AF_FB00_0000_FFFF;
/// User data: present, DPL 3, read/write, 32-bit, 4 KiB granularity.
const GDT_USER_DATA: u64 = 0x00CF_F300_0000_FFFF;
/// The TSS limit covers the I/O bitmap and its terminating byte.
const TSS_LIMIT: u64 = TSS_SIZE + IO_BITMAP_SIZE - 1;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// Bit 1 is reserved-one; IOPL = 3 lets CPL3 do port I/O; IF stays clear.
const RFLAGS_IOPL3: u64 = 0x3002;

/// Where the loaded guest will start.
#[derive(Debug, Clone, Copy)]
pub struct BuiltinEntry {
    pub rip: u64,
}

/// Writes the guest image, GDT, page tables and boot-info block into `mem`.
pub fn load(mem: &GuestRam, cmdline: &str, vcpus: u8) -> Result<BuiltinEntry, BuiltinBootError> {
    if cmdline.len() > MAX_CMDLINE {
        return Err(BuiltinBootError::CmdlineTooLong { len: cmdline.len() });
    }
    let loaded =
        Elf::load(mem, None, &mut Cursor::new(GUEST_ELF), None).map_err(BuiltinBootError::Load)?;
    write_gdt(mem)?;
    write_page_tables(mem)?;
    write_boot_info(mem, cmdline, vcpus)?;
    Ok(BuiltinEntry {
        rip: loaded.kernel_load.0,
    })
}

/// Writes `words` little-endian at `addr`.
fn write(
    mem: &GuestRam,
    what: &'static str,
    words: &[u64],
    addr: u64,
) -> Result<(), BuiltinBootError> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| BuiltinBootError::Write { what, source })
}

fn write_gdt(mem: &GuestRam) -> Result<(), BuiltinBootError> {
    let tss = TSS_ADDR;
    // A 64-bit TSS descriptor spans two entries: base bits 0-31 and limit in the first,
    // base bits 32-63 in the second. Type 0xB = busy 64-bit TSS, present, DPL 0.
    let tss_low =
        TSS_LIMIT | ((tss & 0xFF_FFFF) << 16) | (0x8B << 40) | (((tss >> 24) & 0xFF) << 56);
    let tss_high = tss >> 32;
    let gdt: [u64; GDT_ENTRIES] = [0, GDT_USER_CODE, GDT_USER_DATA, tss_low, tss_high];
    write(mem, "GDT", &gdt, GDT_ADDR)?;

    // The TSS: all zero except the I/O map base (offset 102), which points just past it.
    // The bitmap's zero bits allow every port; the byte after it must be all ones.
    let mut tss = vec![0u8; (TSS_SIZE + IO_BITMAP_SIZE) as usize];
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes());
    *tss.last_mut().expect("TSS is not empty") = 0xFF;
    mem.write_slice(&tss, GuestAddress(TSS_ADDR))
        .map_err(|source| BuiltinBootError::Write {
            what: "TSS",
            source,
        })
}

/// How many GiB the identity map covers: all RAM, and at least the first 4 GiB so that
/// the MMIO hole (virtio devices) is reachable.
fn mapped_gib(mem: &GuestRam) -> u64 {
    let top = mem
        .iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0);
    top.div_ceil(1 << 30)
        .clamp(HIGH_RAM_START >> 30, MAX_MAPPED_GIB)
}

fn write_page_tables(mem: &GuestRam) -> Result<(), BuiltinBootError> {
    let gib = mapped_gib(mem);
    let mut pml4 = [0u64; 512];
    pml4[0] = PDPT_ADDR | TABLE_FLAGS;
    write(mem, "PML4", &pml4, PML4_ADDR)?;
    let mut pdpt = [0u64; 512];
    for g in 0..gib {
        pdpt[g as usize] = (PD_ADDR + g * 0x1000) | TABLE_FLAGS;
    }
    write(mem, "PDPT", &pdpt, PDPT_ADDR)?;
    for g in 0..gib {
        let mut pd = [0u64; 512];
        for (i, entry) in pd.iter_mut().enumerate() {
            *entry = ((g << 30) + ((i as u64) << 21)) | TABLE_FLAGS | PTE_HUGE;
        }
        write(mem, "page directory", &pd, PD_ADDR + g * 0x1000)?;
    }
    Ok(())
}

fn write_boot_info(mem: &GuestRam, cmdline: &str, vcpus: u8) -> Result<(), BuiltinBootError> {
    let mut info = BootInfo {
        magic: BOOT_MAGIC,
        version: BOOT_VERSION,
        ram_region_count: 0,
        ram: [RamRegion::default(); MAX_RAM_REGIONS],
        vcpu_count: vcpus as u32,
        cmdline_len: cmdline.len() as u32,
        cmdline: [0; MAX_CMDLINE],
    };
    for (slot, region) in info.ram.iter_mut().zip(mem.iter()) {
        *slot = RamRegion {
            base: region.start_addr().0,
            size: region.len(),
        };
        info.ram_region_count += 1;
    }
    info.cmdline[..cmdline.len()].copy_from_slice(cmdline.as_bytes());
    // SAFETY: BootInfo is repr(C) with only integer fields and no padding (its size is
    // a multiple of 8 and every field is naturally aligned), so every byte is initialised.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            &info as *const BootInfo as *const u8,
            std::mem::size_of::<BootInfo>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(BOOT_INFO_ADDR))
        .map_err(|source| BuiltinBootError::Write {
            what: "boot-info block",
            source,
        })
}

/// A flat 4 GiB user segment (DPL 3) with the given type: code runs in 64-bit mode,
/// data is a 32-bit read/write segment (its base and limit are ignored in long mode).
fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xFFFF_FFFF,
        selector,
        type_: if code { 0xB } else { 0x3 },
        present: 1,
        dpl: 3,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU `index` at the guest's entry point in 64-bit user mode.
pub fn setup_vcpu(fd: &VcpuFd, index: usize, entry: BuiltinEntry) -> Result<(), BuiltinBootError> {
    let err = |source| BuiltinBootError::Registers { index, source };
    let mut sregs: kvm_sregs = fd.get_sregs().map_err(err)?;
    sregs.cs = user_segment(USER_CODE_SELECTOR, true);
    let data = user_segment(USER_DATA_SELECTOR, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT as u32,
        selector: TSS_SELECTOR,
        type_: 0xB, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        unusable: 1,
        type_: 0x2,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    fd.set_sregs(&sregs).map_err(err)?;

    let fpu = kvm_fpu {
        fcw: 0x37F,
        mxcsr: 0x1F80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(err)?;

    let regs = kvm_regs {
        rip: entry.rip,
        rsp: STACK_TOP - index as u64 * STACK_PER_VCPU - 8,
        rdi: BOOT_INFO_ADDR,
        rsi: index as u64,
        rflags: RFLAGS_IOPL3,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_an_elf_linked_at_one_mib() {
        assert_eq!(&GUEST_ELF[..4], b"\x7fELF");
        let mem = crate::vstate::memory::create_ram(16 << 20).unwrap();
        let entry = load(&mem, "hello", 1).unwrap();
        assert_eq!(entry.rip, IMAGE_BASE);
        let magic: u64 = mem.read_obj(GuestAddress(BOOT_INFO_ADDR)).unwrap();
        assert_eq!(magic, BOOT_MAGIC);
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8)).unwrap();
        assert_eq!(pde, (2 << 20) | TABLE_FLAGS | PTE_HUGE);
    }

    /// The image carries a PVH entry note for QEMU (guest/src/pvh.rs); luvisor's loader
    /// accepts it and still enters the image at `_start`, at CPL3.
    #[test]
    fn pvh_note_is_there_and_ignored() {
        use linux_loader::loader::PvhBootCapability;
        let mem = crate::vstate::memory::create_ram(16 << 20).unwrap();
        let loaded = Elf::load(&mem, None, &mut Cursor::new(GUEST_ELF), None).unwrap();
        let PvhBootCapability::PvhEntryPresent(pvh_entry) = loaded.pvh_boot_cap else {
            panic!("no PVH entry note: {:?}", loaded.pvh_boot_cap);
        };
        assert!(pvh_entry.0 > IMAGE_BASE && pvh_entry.0 < loaded.kernel_end);
        assert_eq!(load(&mem, "hello", 1).unwrap().rip, IMAGE_BASE);
    }

    #[test]
    fn rejects_overlong_command_lines() {
        let mem = crate::vstate::memory::create_ram(16 << 20).unwrap();
        let long = "x".repeat(MAX_CMDLINE + 1);
        assert!(matches!(
            load(&mem, &long, 1),
            Err(BuiltinBootError::CmdlineTooLong { .. })
        ));
    }
}
