//! The pages a balloon holds: a bitmap over guest page frame numbers, and the RAM
//! layout that says which frame numbers are RAM at all.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::{GuestRam, PAGE_SIZE};

/// Where guest RAM is, in 4 KiB page frames: each region as (first frame, frames).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamLayout {
    regions: Vec<(u64, u64)>,
}

impl RamLayout {
    pub fn of(mem: &GuestRam) -> RamLayout {
        RamLayout {
            regions: mem
                .iter()
                .map(|r| (r.start_addr().0 / PAGE_SIZE, r.len() / PAGE_SIZE))
                .collect(),
        }
    }

    /// Frames of RAM in all.
    pub fn pages(&self) -> u64 {
        self.regions.iter().map(|&(_, n)| n).sum()
    }

    /// One past the highest RAM frame: the bitmap's length.
    pub fn end_pfn(&self) -> u64 {
        self.regions.iter().map(|&(s, n)| s + n).max().unwrap_or(0)
    }

    /// The end (exclusive) of the RAM region that holds frame `pfn`, or `None` when `pfn`
    /// is not RAM (below RAM, in the MMIO hole, past the end).
    pub fn region_end(&self, pfn: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|&&(start, n)| pfn >= start && pfn - start < n)
            .map(|&(start, n)| start + n)
    }
}

/// A run of consecutive frames: `[first, first + pages)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub first: u64,
    pub pages: u64,
}

/// The frames the balloon holds, one bit each, with their count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldPages {
    bits: Vec<u64>,
    end_pfn: u64,
    count: u64,
}

impl HeldPages {
    /// No frame held, room for every frame below `layout.end_pfn()`.
    pub fn new(layout: &RamLayout) -> HeldPages {
        let end_pfn = layout.end_pfn();
        HeldPages {
            bits: vec![0; end_pfn.div_ceil(64) as usize],
            end_pfn,
            count: 0,
        }
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn contains(&self, pfn: u64) -> bool {
        pfn < self.end_pfn && self.bits[(pfn / 64) as usize] & (1 << (pfn % 64)) != 0
    }

    /// Marks `[first, first + pages)` held. Every frame must be below the end; frames
    /// already held are not counted twice.
    pub fn insert_run(&mut self, first: u64, pages: u64) {
        for pfn in first..(first + pages).min(self.end_pfn) {
            let word = &mut self.bits[(pfn / 64) as usize];
            let bit = 1 << (pfn % 64);
            if *word & bit == 0 {
                *word |= bit;
                self.count += 1;
            }
        }
    }

    /// Releases `pfn`; false if it was not held.
    pub fn remove(&mut self, pfn: u64) -> bool {
        if !self.contains(pfn) {
            return false;
        }
        self.bits[(pfn / 64) as usize] &= !(1 << (pfn % 64));
        self.count -= 1;
        true
    }

    pub fn clear(&mut self) {
        self.bits.fill(0);
        self.count = 0;
    }

    /// The held frames as runs, in ascending order (what a snapshot stores: a ballooned
    /// VM usually holds a few long runs).
    pub fn runs(&self) -> Vec<PageRun> {
        let mut runs: Vec<PageRun> = Vec::new();
        for (index, &word) in self.bits.iter().enumerate() {
            let mut rest = word;
            while rest != 0 {
                let bit = rest.trailing_zeros() as u64;
                rest &= rest - 1;
                let pfn = index as u64 * 64 + bit;
                match runs.last_mut() {
                    Some(run) if run.first + run.pages == pfn => run.pages += 1,
                    _ => runs.push(PageRun {
                        first: pfn,
                        pages: 1,
                    }),
                }
            }
        }
        runs
    }

    /// Rebuilds a set from saved runs, which must be non-empty, ascending, apart (not
    /// touching, as [`HeldPages::runs`] makes them) and all RAM.
    pub fn from_runs(layout: &RamLayout, runs: &[PageRun]) -> Result<HeldPages, String> {
        let mut set = HeldPages::new(layout);
        let mut previous_end = None;
        for run in runs {
            let end = run
                .first
                .checked_add(run.pages)
                .filter(|_| run.pages > 0)
                .ok_or_else(|| format!("held run {run:?} is empty or overflows"))?;
            if previous_end.is_some_and(|p| run.first <= p) {
                return Err(format!("held run {run:?} is out of order or overlaps"));
            }
            match layout.region_end(run.first) {
                Some(region_end) if end <= region_end => {}
                _ => return Err(format!("held run {run:?} is not all guest RAM")),
            }
            set.insert_run(run.first, run.pages);
            previous_end = Some(end);
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RamLayout {
        // 1 MiB at 0, and 1 MiB at 4 GiB: the hole between is not RAM.
        RamLayout {
            regions: vec![(0, 256), (1 << 20, 256)],
        }
    }

    #[test]
    fn only_ram_frames_are_ram() {
        let l = layout();
        assert_eq!(l.pages(), 512);
        assert_eq!(l.region_end(0), Some(256));
        assert_eq!(l.region_end(255), Some(256));
        assert_eq!(l.region_end(256), None, "the hole");
        assert_eq!(l.region_end(1 << 20), Some((1 << 20) + 256));
        assert_eq!(l.region_end((1 << 20) + 256), None);
        assert_eq!(l.region_end(u64::MAX), None);
    }

    #[test]
    fn runs_round_trip_and_count_once() {
        let l = layout();
        let mut held = HeldPages::new(&l);
        held.insert_run(10, 5);
        held.insert_run(12, 5); // overlaps: 10..17
        held.insert_run(63, 2); // crosses a word
        held.insert_run(1 << 20, 256);
        assert_eq!(held.count(), 7 + 2 + 256);
        let runs = held.runs();
        assert_eq!(
            runs,
            vec![
                PageRun {
                    first: 10,
                    pages: 7
                },
                PageRun {
                    first: 63,
                    pages: 2
                },
                PageRun {
                    first: 1 << 20,
                    pages: 256
                },
            ]
        );
        assert_eq!(HeldPages::from_runs(&l, &runs).unwrap(), held);
        assert!(held.remove(11));
        assert!(!held.remove(11));
        assert!(!held.remove(u64::MAX));
        assert_eq!(held.count(), 7 + 2 + 256 - 1);
    }

    #[test]
    fn malformed_runs_are_refused() {
        let l = layout();
        let run = |first, pages| PageRun { first, pages };
        for bad in [
            vec![run(0, 0)],
            vec![run(250, 10)],         // runs into the hole
            vec![run(300, 1)],          // in the hole
            vec![run(5, 5), run(7, 2)], // overlaps
            vec![run(9, 1), run(5, 1)], // out of order
            vec![run(u64::MAX, 2)],
        ] {
            assert!(HeldPages::from_runs(&l, &bad).is_err(), "{bad:?}");
        }
    }
}
