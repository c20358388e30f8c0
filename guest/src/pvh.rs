//! Booting under a PVH loader (QEMU's `-kernel`), so that the same guest can run under
//! QEMU for comparisons (`bench/migration.sh`, `tests/qemu_guest.rs`).
//!
//! luvisor ignores all of this: it loads the image and enters `_start` at CPL3 with the
//! machine already prepared (`runtime/src/boot/builtin.rs`). A PVH loader instead enters
//! the address in the image's `XEN_ELFNOTE_PHYS32_ENTRY` note in 32-bit protected mode,
//! paging off, with `ebx` pointing at an `hvm_start_info`. The entry below builds what
//! luvisor's host builds (the GDT at `GDT_ADDR`, the TSS with an all-ports I/O bitmap at
//! `TSS_ADDR`, identity page tables with 2 MiB pages and the U bit from `PML4_ADDR`),
//! turns on long mode, starts kvmclock when the hypervisor offers it, and drops to CPL3
//! with `IOPL = 3` at [`pvh_main`], which writes the boot-info block from the start info
//! (RAM map, command line, one vCPU) and calls `_start` as luvisor would.
//!
//! Supervisor code is emulated instruction by instruction on PVM hosts, so the entry is
//! kept short: it maps only up to the top of RAM (512 entries per GiB, six instructions
//! each) and leaves everything else to user mode.
//!
//! Differences from luvisor's machine, which the rest of the guest handles through
//! [`booted`]:
//! - the vCPU 0 stack sits at [`STACK_TOP`] (below the EBDA), not at luvisor's
//!   `0xFF000`, which a PC's memory map reserves for the BIOS;
//! - the GDT has two more entries after luvisor's five (64-bit kernel code and data,
//!   used only on the way to CPL3);
//! - luvisor's paravirtual ports are not there: exit (`0x500`) is QEMU's `isa-debug-exit`
//!   device put at that port, ready (`0x504`) goes nowhere, idle (`0x508`) becomes a
//!   `pause` loop of at most [`IDLE_SLICE_US`], and the running-time clock (`0x50c`)
//!   comes from kvmclock (see [`clock_ms`]).

use crate::io;
use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};
use luvisor_guest_abi::layout::{
    BOOT_INFO_ADDR, GDT_ADDR, IO_BITMAP_SIZE, MAX_MAPPED_GIB, PDPT_ADDR, PD_ADDR, PML4_ADDR,
    TSS_ADDR, TSS_SIZE,
};
use luvisor_guest_abi::{
    BootInfo, RamRegion, BOOT_MAGIC, BOOT_VERSION, MAX_CMDLINE, MAX_RAM_REGIONS,
};

/// Initial stack pointer (plus 8, as after a call) of the only vCPU under PVH: the top of
/// conventional memory below the extended BIOS data area (`0x9fc00`), above the page
/// directories (`STACK_BOTTOM`).
pub const STACK_TOP: u64 = 0x9_F000;
const _: () = assert!(STACK_TOP - 0x1_0000 >= luvisor_guest_abi::layout::STACK_BOTTOM);

/// The longest an idle lasts under PVH, in µs: callers look at the console and the clock
/// between idles, and nothing can wake a spinning vCPU early.
pub const IDLE_SLICE_US: u32 = 1000;

/// `hvm_start_info.magic` (Xen's `XEN_HVM_START_MAGIC_VALUE`).
const START_INFO_MAGIC: u32 = 0x336e_c578;
/// `hvm_memmap_table_entry.type` of usable RAM (the e820 type).
const MEMMAP_RAM: u32 = 1;
/// Page directory entries mapped when the start info has no memory map: 1 GiB, enough
/// for [`pvh_main`] to say what is wrong.
const DEFAULT_MAPPED_PAGES: u32 = 512;

/// Selectors of the GDT the entry writes; the first three are luvisor's.
const USER_CODE_SELECTOR: u64 = 0x08 | 3;
const USER_DATA_SELECTOR: u64 = 0x10 | 3;
const TSS_SELECTOR: u64 = 0x18;
const KERNEL_CODE_SELECTOR: u64 = 0x28;
const KERNEL_DATA_SELECTOR: u64 = 0x30;
/// The descriptors, as in `runtime/src/boot/builtin.rs`. The TSS is written available
/// (type 9); `ltr` marks it busy (type 0xB), which is how luvisor writes it.
const GDT_USER_CODE: u64 = 0x00AF_FB00_0000_FFFF;
const GDT_USER_DATA: u64 = 0x00CF_F300_0000_FFFF;
const TSS_LIMIT: u64 = TSS_SIZE + IO_BITMAP_SIZE - 1;
const GDT_TSS_LOW: u64 =
    TSS_LIMIT | ((TSS_ADDR & 0xFF_FFFF) << 16) | (0x89 << 40) | (((TSS_ADDR >> 24) & 0xFF) << 56);
const GDT_TSS_HIGH: u64 = TSS_ADDR >> 32;
/// 64-bit kernel code (DPL 0, long mode) and flat kernel data.
const GDT_KERNEL_CODE: u64 = 0x00AF_9B00_0000_FFFF;
const GDT_KERNEL_DATA: u64 = 0x00CF_9300_0000_FFFF;
const GDT_ENTRIES: u64 = 7;

/// Page table flags: present, writable, user; `PDE_HUGE` for 2 MiB pages.
const TABLE_FLAGS: u64 = 0x7;
const PDE_HUGE: u64 = 0x80;

/// Control register values luvisor gives its vCPUs: CR0 = PE MP ET NE WP PG,
/// CR4 = PAE OSFXSR OSXMMEXCPT, EFER = LME (the CPU adds LMA).
const CR0: u64 = 0x8001_0033;
const CR4: u64 = 0x620;
const EFER_MSR: u64 = 0xC000_0080;
const EFER_LME: u64 = 0x100;
/// Bit 1 is reserved-one; IOPL = 3 lets CPL3 do port I/O; IF stays clear.
const RFLAGS_IOPL3: u64 = 0x3002;

/// KVM's paravirtual clock: CPUID leaf 0x40000000 says "KVMKVMKVM", leaf 0x40000001's
/// EAX bit 3 offers the clock at MSR 0x4b564d01 ("kvmclock2").
const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
const MSR_KVM_SYSTEM_TIME_NEW: u64 = 0x4b56_4d01;

/// KVM's `pvclock_vcpu_time_info`: the hypervisor keeps it up to date once the entry has
/// written its address (with bit 0, enable) into `MSR_KVM_SYSTEM_TIME_NEW`.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    _pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    _pad: [u8; 2],
}

/// Written by the hypervisor behind the compiler's back: read only volatile.
struct SharedPvClock(UnsafeCell<PvClock>);
// SAFETY: only the one vCPU that runs under PVH reads it, and only with volatile reads;
// the hypervisor is the only writer.
unsafe impl Sync for SharedPvClock {}

static PVCLOCK: SharedPvClock = SharedPvClock(UnsafeCell::new(PvClock {
    version: 0,
    _pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    _pad: [0; 2],
}));

/// Set by [`pvh_main`]: the guest came in through the PVH entry, so luvisor's
/// paravirtual ports are not there.
static BOOTED_BY_PVH: AtomicBool = AtomicBool::new(false);

/// Whether the guest was booted through the PVH entry (QEMU) rather than by luvisor.
pub fn booted() -> bool {
    BOOTED_BY_PVH.load(Ordering::Relaxed)
}

// The PVH entry note: name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY (18), and the 32-bit
// entry's address as an 8-byte descriptor (QEMU reads a pointer-sized value from a
// 64-bit image, linux-loader the low 4 bytes). The section must stay 4-byte aligned:
// QEMU aligns the name to the note segment's alignment.
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
"#,
    options(att_syntax)
);

// The 32-bit entry. In: protected mode, paging off, flat segments, ebx = start info.
global_asm!(
    r#"
    .section .text.pvh, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cld
    mov %ebx, %ebp

    /* Pages to map (2 MiB each, in esi): up to the highest end of RAM in the memory
       map, or DEFAULT_MAPPED_PAGES without one; at most MAX_MAPPED_GIB GiB. */
    mov ${default_pages}, %esi
    cmpl ${start_magic}, (%ebp)
    jne 3f
    cmpl $1, 4(%ebp)
    jb 3f
    mov 48(%ebp), %ecx
    jecxz 3f
    mov 40(%ebp), %ebx
    xor %esi, %esi
1:  cmpl ${memmap_ram}, 16(%ebx)
    jne 2f
    mov (%ebx), %eax
    mov 4(%ebx), %edx
    add 8(%ebx), %eax
    adc 12(%ebx), %edx
    add $0x1fffff, %eax
    adc $0, %edx
    shrd $21, %edx, %eax
    cmp %esi, %eax
    jbe 2f
    mov %eax, %esi
2:  add $24, %ebx
    loop 1b
    test %esi, %esi
    jnz 3f
    mov ${default_pages}, %esi
3:  cmp ${max_pages}, %esi
    jbe 4f
    mov ${max_pages}, %esi
4:
    /* Page directories needed (ebx), then zero the PML4, the PDPT and those. */
    lea 511(%esi), %ebx
    shr $9, %ebx
    lea 2(%ebx), %ecx
    shl $10, %ecx
    mov ${pml4}, %edi
    xor %eax, %eax
    rep stosl
    movl ${pdpt} + {table_flags}, {pml4}
    mov ${pdpt}, %edi
    mov ${pd} + {table_flags}, %eax
    mov %ebx, %ecx
5:  mov %eax, (%edi)
    add $8, %edi
    add $0x1000, %eax
    loop 5b
    /* Identity map: entry k of the page directories maps k * 2 MiB. */
    mov ${pd}, %edi
    mov ${huge_flags}, %eax
    xor %edx, %edx
    mov %esi, %ecx
6:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $8, %edi
    add $0x200000, %eax
    adc $0, %edx
    loop 6b

    /* The GDT, and the TSS: zero but for the I/O map base (just past the TSS) and the
       all-ones byte after the bitmap, so that every port is allowed. */
    mov $pvh_gdt_template, %esi
    mov ${gdt}, %edi
    mov ${gdt_dwords}, %ecx
    rep movsl
    mov ${tss}, %edi
    mov ${tss_bytes}, %ecx
    xor %eax, %eax
    rep stosb
    movw ${tss_size}, {tss} + 102
    movb $0xff, {tss} + {tss_bytes} - 1
    lgdt pvh_gdtr

    /* kvmclock, when the hypervisor is KVM and offers it. */
    mov ${kvm_signature}, %eax
    cpuid
    cmp $0x4b4d564b, %ebx
    jne 7f
    cmp $0x564b4d56, %ecx
    jne 7f
    cmp $0x4d, %edx
    jne 7f
    cmp ${kvm_features}, %eax
    jb 7f
    mov ${kvm_features}, %eax
    cpuid
    test ${clocksource2}, %eax
    jz 7f
    mov ${system_time_msr}, %ecx
    mov ${pvclock}, %eax
    or $1, %eax
    xor %edx, %edx
    wrmsr
7:
    /* Long mode: PAE, the tables, EFER.LME, then paging (and luvisor's CR0 bits). */
    fninit
    mov ${cr4}, %eax
    mov %eax, %cr4
    mov ${pml4}, %eax
    mov %eax, %cr3
    mov ${efer_msr}, %ecx
    mov ${efer_lme}, %eax
    xor %edx, %edx
    wrmsr
    mov ${cr0}, %eax
    mov %eax, %cr0
    ljmp ${kernel_code}, $pvh_start64

    .code64
pvh_start64:
    mov ${kernel_data}, %eax
    mov %eax, %ss
    mov ${user_data}, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %fs
    mov %eax, %gs
    mov ${tss_selector}, %eax
    ltr %ax
    /* To CPL3 at pvh_main(start info), IOPL 3, on the vCPU's stack. */
    mov ${stack_top}, %esp
    mov %ebp, %edi
    pushq ${user_data}
    pushq ${stack_top} - 8
    pushq ${rflags}
    pushq ${user_code}
    pushq ${main}
    iretq

    .section .rodata.pvh, "a"
    .balign 8
pvh_gdt_template:
    .quad 0
    .quad {gdt_user_code}
    .quad {gdt_user_data}
    .quad {gdt_tss_low}
    .quad {gdt_tss_high}
    .quad {gdt_kernel_code}
    .quad {gdt_kernel_data}
pvh_gdtr:
    .word {gdt_limit}
    .long {gdt}
"#,
    default_pages = const DEFAULT_MAPPED_PAGES,
    start_magic = const START_INFO_MAGIC,
    memmap_ram = const MEMMAP_RAM,
    max_pages = const MAX_MAPPED_GIB * 512,
    pml4 = const PML4_ADDR,
    pdpt = const PDPT_ADDR,
    pd = const PD_ADDR,
    table_flags = const TABLE_FLAGS,
    huge_flags = const TABLE_FLAGS | PDE_HUGE,
    gdt = const GDT_ADDR,
    gdt_dwords = const GDT_ENTRIES * 2,
    gdt_limit = const GDT_ENTRIES * 8 - 1,
    tss = const TSS_ADDR,
    tss_bytes = const TSS_SIZE + IO_BITMAP_SIZE,
    tss_size = const TSS_SIZE,
    kvm_signature = const KVM_CPUID_SIGNATURE,
    kvm_features = const KVM_CPUID_FEATURES,
    clocksource2 = const KVM_FEATURE_CLOCKSOURCE2,
    system_time_msr = const MSR_KVM_SYSTEM_TIME_NEW,
    pvclock = sym PVCLOCK,
    cr0 = const CR0,
    cr4 = const CR4,
    efer_msr = const EFER_MSR,
    efer_lme = const EFER_LME,
    kernel_code = const KERNEL_CODE_SELECTOR,
    kernel_data = const KERNEL_DATA_SELECTOR,
    user_code = const USER_CODE_SELECTOR,
    user_data = const USER_DATA_SELECTOR,
    tss_selector = const TSS_SELECTOR,
    stack_top = const STACK_TOP,
    rflags = const RFLAGS_IOPL3,
    main = sym pvh_main,
    gdt_user_code = const GDT_USER_CODE,
    gdt_user_data = const GDT_USER_DATA,
    gdt_tss_low = const GDT_TSS_LOW,
    gdt_tss_high = const GDT_TSS_HIGH,
    gdt_kernel_code = const GDT_KERNEL_CODE,
    gdt_kernel_data = const GDT_KERNEL_DATA,
    options(att_syntax)
);

/// `hvm_start_info`, as far as the guest reads it (version 1).
#[repr(C)]
struct StartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// `hvm_memmap_table_entry`.
#[repr(C)]
struct MemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

/// The first user-mode code under PVH: notes how the guest was booted, writes the
/// boot-info block luvisor would have written, and runs the guest as vCPU 0.
///
/// # Safety
/// Only the PVH entry calls it, with the start info's physical address, which the
/// identity map covers.
unsafe extern "C" fn pvh_main(start_info: u64) -> ! {
    BOOTED_BY_PVH.store(true, Ordering::Relaxed);
    let boot = BOOT_INFO_ADDR as *mut BootInfo;
    // SAFETY: the loader put the start info and what it points at in memory below the
    // top of RAM, which the entry mapped; the boot-info page belongs to the guest.
    if let Err(message) = unsafe { write_boot_info(start_info, boot) } {
        crate::println!("error: PVH boot: {}", message);
        io::exit(2);
    }
    if !clock_running() {
        crate::println!("error: PVH boot: no kvmclock (run QEMU with KVM, -enable-kvm)");
        io::exit(2);
    }
    // SAFETY: the boot-info block is written, and this is vCPU 0.
    unsafe { crate::_start(boot, 0) }
}

/// Fills `boot` from the PVH start info at `start_info`: the RAM regions of its memory
/// map (the first `MAX_RAM_REGIONS`), its command line, one vCPU.
///
/// # Safety
/// `start_info` and the memory map and command line it points at must be mapped, and
/// `boot` must be writable memory nothing else uses.
unsafe fn write_boot_info(start_info: u64, boot: *mut BootInfo) -> Result<(), &'static str> {
    // SAFETY: the caller guarantees the start info is mapped.
    let info = unsafe { (start_info as *const StartInfo).read_volatile() };
    if info.magic != START_INFO_MAGIC {
        return Err("the start info has a bad magic number");
    }
    if info.version < 1 || info.memmap_entries == 0 {
        return Err("the start info has no memory map (version 0)");
    }
    let mut ram = [RamRegion::default(); MAX_RAM_REGIONS];
    let mut ram_count = 0;
    for i in 0..info.memmap_entries as u64 {
        let entry_addr = info.memmap_paddr + i * core::mem::size_of::<MemmapEntry>() as u64;
        // SAFETY: the caller guarantees the memory map is mapped.
        let entry = unsafe { (entry_addr as *const MemmapEntry).read_volatile() };
        if entry.kind == MEMMAP_RAM && ram_count < MAX_RAM_REGIONS {
            ram[ram_count] = RamRegion {
                base: entry.addr,
                size: entry.size,
            };
            ram_count += 1;
        }
    }
    let mut cmdline = [0u8; MAX_CMDLINE];
    let mut cmdline_len = 0;
    if info.cmdline_paddr != 0 {
        loop {
            // SAFETY: the caller guarantees the NUL-terminated command line is mapped;
            // the loop stops at its NUL or one byte past the longest one accepted.
            let byte = unsafe { ((info.cmdline_paddr + cmdline_len as u64) as *const u8).read() };
            if byte == 0 {
                break;
            }
            if cmdline_len == MAX_CMDLINE {
                return Err("the command line is longer than 3072 bytes");
            }
            cmdline[cmdline_len] = byte;
            cmdline_len += 1;
        }
    }
    // SAFETY: the caller guarantees `boot` is ours to write.
    unsafe {
        boot.write(BootInfo {
            magic: BOOT_MAGIC,
            version: BOOT_VERSION,
            ram_region_count: ram_count as u32,
            ram,
            vcpu_count: 1,
            cmdline_len: cmdline_len as u32,
            cmdline,
        })
    };
    Ok(())
}

/// Whether kvmclock has been started: the hypervisor has written the structure.
fn clock_running() -> bool {
    let clock = PVCLOCK.0.get();
    // SAFETY: the field lies in a static; the hypervisor writes it, so read it volatile.
    let mul = unsafe { core::ptr::addr_of!((*clock).tsc_to_system_mul).read_volatile() };
    mul != 0
}

fn rdtsc() -> u64 {
    let (low, high): (u32, u32);
    // SAFETY: reads the time-stamp counter (CR4.TSD is clear, so CPL3 may); `lfence`
    // keeps it from running ahead of the loads before it.
    unsafe {
        asm!("lfence", "rdtsc", out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    (high as u64) << 32 | low as u64
}

/// Nanoseconds of kvmclock: the hypervisor's time since the VM was created, which QEMU
/// stops while the VM is stopped and carries over in a migration, so it counts running
/// time as luvisor's clock port does. Read as KVM documents it: retry while the version
/// is odd (an update is under way) or changed under the read.
fn clock_ns() -> u64 {
    let clock = PVCLOCK.0.get();
    loop {
        // SAFETY (all reads below): fields of a static, written by the hypervisor.
        let version = unsafe { core::ptr::addr_of!((*clock).version).read_volatile() };
        if version & 1 != 0 {
            core::hint::spin_loop();
            continue;
        }
        let (timestamp, system_time, mul, shift) = unsafe {
            (
                core::ptr::addr_of!((*clock).tsc_timestamp).read_volatile(),
                core::ptr::addr_of!((*clock).system_time).read_volatile(),
                core::ptr::addr_of!((*clock).tsc_to_system_mul).read_volatile(),
                core::ptr::addr_of!((*clock).tsc_shift).read_volatile(),
            )
        };
        let tsc = rdtsc();
        // SAFETY: as above.
        if unsafe { core::ptr::addr_of!((*clock).version).read_volatile() } != version {
            continue;
        }
        let mut delta = tsc.wrapping_sub(timestamp);
        if shift >= 0 {
            delta <<= shift;
        } else {
            delta >>= shift.unsigned_abs();
        }
        return system_time.wrapping_add(((delta as u128 * mul as u128) >> 32) as u64);
    }
}

/// Milliseconds of running time (the stand-in for luvisor's clock port).
pub fn clock_ms() -> u32 {
    (clock_ns() / 1_000_000) as u32
}

/// Waits `micros`, at most [`IDLE_SLICE_US`], in a `pause` loop (the stand-in for
/// luvisor's idle port: CPL3 cannot `hlt`). Callers look at the console and the clock
/// after each idle, so a shorter wait is always allowed.
pub fn idle(micros: u32) {
    let until = clock_ns() + micros.min(IDLE_SLICE_US) as u64 * 1000;
    while clock_ns() < until {
        for _ in 0..64 {
            core::hint::spin_loop();
        }
    }
}
