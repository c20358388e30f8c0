//! The guest's own page pool, and the C memory routines the compiler expects.
//!
//! The pool hands out contiguous, page-aligned ranges of the RAM the host described and
//! takes them back. Returned pages stay resident on the host: only a balloon (a later
//! device) can make the host reclaim them.

use core::arch::asm;
use luvisor_guest_abi::RamRegion;

pub const PAGE: u64 = 4096;
const MAX_RANGES: usize = 32;

#[derive(Clone, Copy, Default)]
struct Range {
    start: u64,
    end: u64,
}

/// First-fit allocator over free ranges, kept sorted and merged.
pub struct PagePool {
    ranges: [Range; MAX_RANGES],
    count: usize,
}

impl PagePool {
    /// A pool of all RAM in `regions` at or above `reserved_end`.
    pub fn new(regions: &[RamRegion], reserved_end: u64) -> Self {
        let mut pool = PagePool {
            ranges: [Range::default(); MAX_RANGES],
            count: 0,
        };
        for r in regions {
            let start = align_up(r.base.max(reserved_end), PAGE);
            let end = (r.base + r.size) & !(PAGE - 1);
            if start < end {
                pool.free(start, end - start);
            }
        }
        pool
    }

    /// Takes `len` bytes (page-rounded) from the first range large enough.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let len = align_up(len, PAGE);
        let i = self.ranges[..self.count]
            .iter()
            .position(|r| r.end - r.start >= len)?;
        let start = self.ranges[i].start;
        self.ranges[i].start += len;
        if self.ranges[i].start == self.ranges[i].end {
            self.remove(i);
        }
        Some(start)
    }

    /// Gives `[start, start + len)` back, merging with its neighbours.
    pub fn free(&mut self, start: u64, len: u64) {
        let end = start + align_up(len, PAGE);
        let i = self.ranges[..self.count]
            .iter()
            .position(|r| r.start > start)
            .unwrap_or(self.count);
        if i > 0 && self.ranges[i - 1].end == start {
            self.ranges[i - 1].end = end;
            if i < self.count && self.ranges[i].start == end {
                self.ranges[i - 1].end = self.ranges[i].end;
                self.remove(i);
            }
            return;
        }
        if i < self.count && self.ranges[i].start == end {
            self.ranges[i].start = start;
            return;
        }
        if self.count == MAX_RANGES {
            return; // Too fragmented to track: the range is leaked, never handed out twice.
        }
        self.ranges.copy_within(i..self.count, i + 1);
        self.ranges[i] = Range { start, end };
        self.count += 1;
    }

    fn remove(&mut self, i: usize) {
        self.ranges.copy_within(i + 1..self.count, i);
        self.count -= 1;
    }
}

pub fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}

// There is no libc: these are the routines rustc's generated code calls. They use the
// string instructions so the optimiser cannot turn them back into calls to themselves.

#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges are valid and do not overlap.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst is below src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: copy backwards (direction flag set, then cleared) for an overlapping tail.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack))
    };
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid for writes.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags))
    };
    dst
}

#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}
