//! The guest's own page pool, and the C memory routines the compiler expects.
//!
//! The pool hands out contiguous, page-aligned ranges of the RAM the host described and
//! takes them back. Returned pages stay resident on the host until the balloon driver
//! reports them free (`src/balloon.rs`): the pool remembers what was freed since the
//! last report.

use core::arch::asm;
use luvisor_guest_abi::RamRegion;

pub const PAGE: u64 = 4096;
const MAX_RANGES: usize = 64;
/// Freed ranges remembered for the next free page report; past this many, the next
/// report covers the whole pool.
const UNREPORTED_RANGES: usize = 16;

#[derive(Clone, Copy, Default)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// A short list of page ranges, merged with the last one when they touch. For memory a
/// driver or command holds (the balloon's pages, `mem-demand`'s).
pub struct RangeList<const N: usize> {
    ranges: [Range; N],
    count: usize,
}

impl<const N: usize> RangeList<N> {
    pub const fn new() -> Self {
        RangeList {
            ranges: [Range { start: 0, end: 0 }; N],
            count: 0,
        }
    }

    /// Adds `[start, start + len)`; false when the list is full (nothing is added).
    pub fn push(&mut self, start: u64, len: u64) -> bool {
        let end = start + len;
        if let Some(last) = self.ranges[..self.count].last_mut() {
            if last.end == start {
                last.end = end;
                return true;
            }
            if end == last.start {
                last.start = start;
                return true;
            }
        }
        if self.count == N {
            return false;
        }
        self.ranges[self.count] = Range { start, end };
        self.count += 1;
        true
    }

    /// Takes up to `max_len` bytes from the end of the last range.
    pub fn take_last(&mut self, max_len: u64) -> Option<(u64, u64)> {
        let last = self.ranges[..self.count].last_mut()?;
        let len = (last.end - last.start).min(max_len);
        last.end -= len;
        let start = last.end;
        if last.start == last.end {
            self.count -= 1;
        }
        Some((start, len))
    }

    pub fn total(&self) -> u64 {
        self.ranges[..self.count]
            .iter()
            .map(|r| r.end - r.start)
            .sum()
    }

    pub fn as_slice(&self) -> &[Range] {
        &self.ranges[..self.count]
    }

    pub fn clear(&mut self) {
        self.count = 0;
    }
}

/// First-fit allocator over free ranges, kept sorted and merged.
pub struct PagePool {
    ranges: [Range; MAX_RANGES],
    count: usize,
    /// Ranges freed since the last free page report (possibly taken again since).
    unreported: RangeList<UNREPORTED_RANGES>,
    /// More was freed than `unreported` could remember: report the whole pool.
    unreported_overflow: bool,
}

impl PagePool {
    /// A pool of all RAM in `regions` at or above `reserved_end`.
    pub fn new(regions: &[RamRegion], reserved_end: u64) -> Self {
        let mut pool = PagePool {
            ranges: [Range::default(); MAX_RANGES],
            count: 0,
            unreported: RangeList::new(),
            unreported_overflow: false,
        };
        for r in regions {
            let start = align_up(r.base.max(reserved_end), PAGE);
            let end = (r.base + r.size) & !(PAGE - 1);
            if start < end {
                // Never touched: nothing to report.
                pool.free_untouched(start, end - start);
            }
        }
        pool
    }

    /// Bytes free in the pool.
    pub fn free_bytes(&self) -> u64 {
        self.ranges[..self.count]
            .iter()
            .map(|r| r.end - r.start)
            .sum()
    }

    /// Takes up to `max_len` bytes (page-rounded) from the top of the highest free
    /// range: as much as is there, if less. For memory held in pieces (balloon pages,
    /// `mem-demand`), which need not be contiguous.
    pub fn take(&mut self, max_len: u64) -> Option<(u64, u64)> {
        let i = self.count.checked_sub(1)?;
        let r = &mut self.ranges[i];
        let len = (r.end - r.start).min(align_up(max_len, PAGE));
        if len == 0 {
            return None;
        }
        r.end -= len;
        let start = r.end;
        if r.start == r.end {
            self.remove(i);
        }
        Some((start, len))
    }

    /// Free ranges freed since the last report, as at most `out.len()` page-aligned
    /// pieces of the pool; forgets them. Pieces that do not fit in `out` are not
    /// reported.
    pub fn take_unreported(&mut self, out: &mut [Range]) -> usize {
        let mut n = 0;
        let mut add = |start: u64, end: u64| {
            if start < end && n < out.len() {
                out[n] = Range { start, end };
                n += 1;
            }
        };
        if self.unreported_overflow {
            for r in &self.ranges[..self.count] {
                add(r.start, r.end);
            }
        } else {
            for u in self.unreported.as_slice() {
                for r in &self.ranges[..self.count] {
                    add(u.start.max(r.start), u.end.min(r.end));
                }
            }
        }
        self.unreported.clear();
        self.unreported_overflow = false;
        n
    }

    /// Whether anything was freed since the last report.
    pub fn has_unreported(&self) -> bool {
        self.unreported_overflow || self.unreported.total() > 0
    }

    /// Gives back pages the host has no copy of (never touched, deflated from the
    /// balloon, just reported): no report is needed for them.
    pub fn free_untouched(&mut self, start: u64, len: u64) {
        self.insert(start, len);
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

    /// Gives `[start, start + len)` back, merging with its neighbours. The pages are
    /// reported free to the host at the next report.
    pub fn free(&mut self, start: u64, len: u64) {
        let len = align_up(len, PAGE);
        if !self.unreported.push(start, len) {
            self.unreported_overflow = true;
        }
        self.insert(start, len);
    }

    fn insert(&mut self, start: u64, len: u64) {
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
