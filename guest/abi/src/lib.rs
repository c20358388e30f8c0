//! The contract between the luvisor host and the built-in test guest.
//!
//! The host prepares page tables, a GDT and this boot-info block, then enters the guest
//! directly in 64-bit mode at CPL3 (see `docs/architecture.md`, "Why the guest runs at CPL3"). Everything the two sides
//! must agree on lives here, so that neither can drift from the other.
#![no_std]

pub mod agent;

/// Guest-physical layout below 1 MiB, prepared by the host before the first instruction.
pub mod layout {
    /// Global descriptor table (null, user code, user data, TSS).
    pub const GDT_ADDR: u64 = 0x1000;
    /// A 64-bit TSS followed by an I/O permission bitmap that allows every port. CPL3
    /// port I/O is allowed either by `RFLAGS.IOPL = 3` (hardware VT-x/AMD-V) or, where
    /// the hypervisor strips IOPL and emulates the instruction (PVM), by this bitmap.
    pub const TSS_ADDR: u64 = 0x4000;
    /// Size of the TSS proper; the I/O bitmap starts right after it.
    pub const TSS_SIZE: u64 = 104;
    /// 65536 ports, one bit each, plus the terminating all-ones byte.
    pub const IO_BITMAP_SIZE: u64 = 8192 + 1;
    /// The [`BootInfo`](super::BootInfo) block.
    pub const BOOT_INFO_ADDR: u64 = 0x3000;
    /// Top-level page table; identity maps all guest memory with 2 MiB pages, U bit set.
    pub const PML4_ADDR: u64 = 0x9000;
    /// Page-directory-pointer table (one page covers 512 GiB).
    pub const PDPT_ADDR: u64 = 0xA000;
    /// First page directory; one page per GiB of guest-physical space follows it.
    pub const PD_ADDR: u64 = 0xB000;
    /// Room for page directories: up to [`MAX_MAPPED_GIB`] of them.
    pub const MAX_MAPPED_GIB: u64 = 64;
    /// Initial stack pointer of vCPU 0 (stacks grow down towards [`STACK_BOTTOM`]).
    pub const STACK_TOP: u64 = 0xF_F000;
    /// Each vCPU `i` starts with `rsp = STACK_TOP - i * STACK_PER_VCPU - 8`.
    pub const STACK_PER_VCPU: u64 = 0x1_0000;
    /// Lowest address the stack may reach.
    pub const STACK_BOTTOM: u64 = PD_ADDR + MAX_MAPPED_GIB * 0x1000;
    /// Where the guest image is linked and loaded.
    pub const IMAGE_BASE: u64 = 0x10_0000;
    /// Guest RAM below the MMIO hole ends here; the rest of RAM starts at 4 GiB.
    pub const LOW_RAM_END: u64 = 0xC000_0000;
    /// Start of RAM above the MMIO hole.
    pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
}

/// Paravirtual I/O ports. All are 32-bit (`outl`/`inl`) unless noted.
pub mod ports {
    /// COM1, a 16550 UART (8 byte-wide registers).
    pub const SERIAL_COM1: u16 = 0x3f8;
    /// Write the exit code: the VM stops cleanly with that code.
    pub const EXIT: u16 = 0x500;
    /// Write anything once booted: the host records the start-to-ready time.
    pub const READY: u16 = 0x504;
    /// Write a timeout in microseconds: the vCPU sleeps until then, or until an event for
    /// the VM (a device notification, pause, stop) arrives, whichever comes first.
    /// `u32::MAX` means "no deadline".
    pub const IDLE: u16 = 0x508;
    /// Read: milliseconds the VM has been running, excluding time spent paused.
    pub const CLOCK_MS: u16 = 0x50c;
}

/// "LUVBOOT1" in little-endian byte order.
pub const BOOT_MAGIC: u64 = u64::from_le_bytes(*b"LUVBOOT1");
/// Bumped whenever [`BootInfo`] changes incompatibly.
pub const BOOT_VERSION: u32 = 1;
/// The most RAM regions a boot-info block can describe.
pub const MAX_RAM_REGIONS: usize = 4;
/// The longest command line the boot-info block can carry, in bytes.
pub const MAX_CMDLINE: usize = 3072;

/// One contiguous range of guest RAM.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RamRegion {
    pub base: u64,
    pub size: u64,
}

/// The block the host writes at [`layout::BOOT_INFO_ADDR`]. Every vCPU enters the image's
/// entry point with this block's address in `rdi` and its own vCPU index in `rsi`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    pub magic: u64,
    pub version: u32,
    /// Number of valid entries in `ram`.
    pub ram_region_count: u32,
    pub ram: [RamRegion; MAX_RAM_REGIONS],
    /// Number of vCPUs the VM has; only vCPU 0 runs the command line, the others idle.
    pub vcpu_count: u32,
    /// Length of the UTF-8 command line in `cmdline`.
    pub cmdline_len: u32,
    pub cmdline: [u8; MAX_CMDLINE],
}

impl BootInfo {
    /// The command line, or `None` when the length is out of range or not UTF-8.
    pub fn cmdline(&self) -> Option<&str> {
        let len = self.cmdline_len as usize;
        if len > MAX_CMDLINE {
            return None;
        }
        core::str::from_utf8(&self.cmdline[..len]).ok()
    }

    /// The RAM regions the host described, clipped to the array size.
    pub fn ram_regions(&self) -> &[RamRegion] {
        let n = (self.ram_region_count as usize).min(MAX_RAM_REGIONS);
        &self.ram[..n]
    }
}

// The TSS with its bitmap must end before the page tables.
const _: () =
    assert!(layout::TSS_ADDR + layout::TSS_SIZE + layout::IO_BITMAP_SIZE <= layout::PML4_ADDR);
// The block must fit in the page the layout reserves for it.
const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);

// Stacks of the largest VM (8 vCPUs) must sit above the page directories.
const _: () = assert!(layout::STACK_TOP - 8 * layout::STACK_PER_VCPU >= layout::STACK_BOTTOM);

/// The data `blk-write SEED` puts in each disk sector, shared by the guest and the host
/// tests that check images from outside.
pub mod pattern {
    /// Bytes per virtio-blk sector.
    pub const SECTOR: usize = 512;

    /// Word `word` (0..64) of sector `sector` written with `seed`.
    pub fn sector_word(seed: u64, sector: u64, word: u64) -> u64 {
        let mut x = seed
            ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ word.wrapping_mul(0xD1B5_4A32_D192_ED03);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    /// Fills `buf` (one sector) with the pattern of `sector`.
    pub fn fill_sector(seed: u64, sector: u64, buf: &mut [u8]) {
        for (w, chunk) in buf.chunks_exact_mut(8).enumerate() {
            chunk.copy_from_slice(&sector_word(seed, sector, w as u64).to_le_bytes());
        }
    }

    /// True when `buf` (one sector) holds the pattern of `sector`.
    pub fn check_sector(seed: u64, sector: u64, buf: &[u8]) -> bool {
        buf.chunks_exact(8)
            .enumerate()
            .all(|(w, chunk)| chunk == sector_word(seed, sector, w as u64).to_le_bytes())
    }
}
