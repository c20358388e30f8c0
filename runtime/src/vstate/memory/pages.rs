//! [`DirtyPages`]: a set of guest pages, one bitmap per RAM region.
//!
//! The bitmaps have the shape of KVM's dirty log and of the VMM's `AtomicBitmap`
//! (`vm_memory::bitmap::AtomicBitmap`): bit *p* of word *p / 64* is page *p* of the
//! region. A page set is stored beside a diff snapshot (it says which pages the diff
//! holds), so it is serde-serialisable, and everything that takes one from outside
//! checks it with [`DirtyPages::fits`] first.

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{GuestRam, MemoryError, PAGE_SIZE};

/// Pages of guest RAM, per region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyPages {
    regions: Vec<RegionPages>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RegionPages {
    /// Guest-physical address of the region's first page.
    base: u64,
    /// Pages in the region.
    pages: u64,
    /// One bit per page; `pages.div_ceil(64)` words.
    bits: Vec<u64>,
}

/// A run of consecutive pages in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    pub region: usize,
    pub first_page: u64,
    pub pages: u64,
}

impl DirtyPages {
    /// No page of `mem`.
    pub fn none(mem: &GuestRam) -> DirtyPages {
        DirtyPages {
            regions: mem
                .iter()
                .map(|region| {
                    let pages = region.len() / PAGE_SIZE;
                    RegionPages {
                        base: region.start_addr().0,
                        pages,
                        bits: vec![0; pages.div_ceil(64) as usize],
                    }
                })
                .collect(),
        }
    }

    /// Every page of `mem`.
    pub fn all(mem: &GuestRam) -> DirtyPages {
        let mut set = DirtyPages::none(mem);
        for region in &mut set.regions {
            region.bits.fill(u64::MAX);
            region.clear_stray_bits();
        }
        set
    }

    /// The pages of `mem` whose bits are set in `bitmaps`, one bitmap per region in
    /// KVM's shape. Words past a region's end and bits past its last page are ignored.
    pub(crate) fn from_bitmaps(mem: &GuestRam, bitmaps: Vec<Vec<u64>>) -> DirtyPages {
        let mut set = DirtyPages::none(mem);
        for (region, bitmap) in set.regions.iter_mut().zip(bitmaps) {
            for (word, bits) in region.bits.iter_mut().zip(bitmap) {
                *word = bits;
            }
            region.clear_stray_bits();
        }
        set
    }

    /// Checks that this set was made for RAM shaped like `mem` (same regions, same
    /// sizes) and is well formed. A set read from a file may be anything.
    pub fn fits(&self, mem: &GuestRam) -> Result<(), MemoryError> {
        let mismatch = |what: String| Err(MemoryError::PagesMismatch(what));
        if self.regions.len() != mem.num_regions() {
            return mismatch(format!(
                "{} regions, guest RAM has {}",
                self.regions.len(),
                mem.num_regions()
            ));
        }
        for (index, (set, region)) in self.regions.iter().zip(mem.iter()).enumerate() {
            let pages = region.len() / PAGE_SIZE;
            if set.base != region.start_addr().0 || set.pages != pages {
                return mismatch(format!(
                    "region {index} is {} pages at {:#x}, guest RAM's is {pages} pages at {:#x}",
                    set.pages,
                    set.base,
                    region.start_addr().0
                ));
            }
            if set.bits.len() as u64 != pages.div_ceil(64) {
                return mismatch(format!(
                    "region {index} has a bitmap of {} words for {pages} pages",
                    set.bits.len()
                ));
            }
            if set.has_stray_bits() {
                return mismatch(format!("region {index} names pages past its end"));
            }
        }
        Ok(())
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Region `region`'s bitmap, in KVM's shape.
    pub fn region_bitmap(&self, region: usize) -> Option<&[u64]> {
        self.regions.get(region).map(|r| r.bits.as_slice())
    }

    /// Whether page `page` of region `region` is in the set.
    pub fn contains(&self, region: usize, page: u64) -> bool {
        self.regions.get(region).is_some_and(|r| r.get(page))
    }

    /// Adds page `page` of region `region`; false if there is no such page.
    pub fn insert(&mut self, region: usize, page: u64) -> bool {
        let Some(r) = self.regions.get_mut(region).filter(|r| page < r.pages) else {
            return false;
        };
        // A malformed set (read from a file) may have a short bitmap: no panic then.
        match r.bits.get_mut((page / 64) as usize) {
            Some(word) => {
                *word |= 1 << (page % 64);
                true
            }
            None => false,
        }
    }

    /// The region and page index of guest-physical `addr`, if it is in a region.
    pub fn locate(&self, addr: GuestAddress) -> Option<(usize, u64)> {
        self.regions.iter().enumerate().find_map(|(index, r)| {
            let offset = addr.0.checked_sub(r.base)?;
            (offset / PAGE_SIZE < r.pages).then_some((index, offset / PAGE_SIZE))
        })
    }

    /// Whether the page that holds guest-physical `addr` is in the set.
    pub fn contains_addr(&self, addr: GuestAddress) -> bool {
        self.locate(addr)
            .is_some_and(|(region, page)| self.contains(region, page))
    }

    /// Adds the page that holds guest-physical `addr`; false if it is not RAM.
    pub fn insert_addr(&mut self, addr: GuestAddress) -> bool {
        self.locate(addr)
            .is_some_and(|(region, page)| self.insert(region, page))
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.iter().flat_map(|r| &r.bits).all(|&w| w == 0)
    }

    /// Every page in the set as (region, page index), in address order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.regions.iter().enumerate().flat_map(|(index, r)| {
            r.bits
                .iter()
                .enumerate()
                .flat_map(move |(word_index, &word)| {
                    SetBits(word).map(move |bit| (index, word_index as u64 * 64 + bit))
                })
        })
    }

    /// Every page in the set as its guest-physical address, in address order.
    pub fn addresses(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.iter()
            .map(|(region, page)| GuestAddress(self.regions[region].base + page * PAGE_SIZE))
    }

    /// The set as runs of consecutive pages in one region, each at most `max_pages`
    /// long, in address order.
    pub fn runs(&self, max_pages: u64) -> impl Iterator<Item = PageRun> + '_ {
        coalesce(self.iter(), max_pages)
    }

    /// Adds every page of `other`, which must have the same shape.
    pub fn union_with(&mut self, other: &DirtyPages) -> Result<(), MemoryError> {
        let same_shape = self.regions.len() == other.regions.len()
            && self.regions.iter().zip(&other.regions).all(|(a, b)| {
                a.base == b.base && a.pages == b.pages && a.bits.len() == b.bits.len()
            });
        if !same_shape {
            return Err(MemoryError::PagesMismatch(
                "cannot merge page sets of differently shaped guest RAM".into(),
            ));
        }
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.bits.iter_mut().zip(&theirs.bits) {
                *a |= b;
            }
            mine.clear_stray_bits();
        }
        Ok(())
    }
}

impl RegionPages {
    fn get(&self, page: u64) -> bool {
        page < self.pages
            && self
                .bits
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// The mask of valid bits in the last word (all ones when the region fills it).
    fn last_word_mask(&self) -> u64 {
        match self.pages % 64 {
            0 => u64::MAX,
            used => (1 << used) - 1,
        }
    }

    fn has_stray_bits(&self) -> bool {
        self.bits
            .last()
            .is_some_and(|&last| last & !self.last_word_mask() != 0)
    }

    fn clear_stray_bits(&mut self) {
        let mask = self.last_word_mask();
        if let Some(last) = self.bits.last_mut() {
            *last &= mask;
        }
    }
}

/// The set bits of one word, lowest first.
struct SetBits(u64);

impl Iterator for SetBits {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(u64::from(bit))
    }
}

/// Groups (region, page) pairs in address order into runs of at most `max_pages`.
pub(crate) fn coalesce(
    pages: impl Iterator<Item = (usize, u64)>,
    max_pages: u64,
) -> impl Iterator<Item = PageRun> {
    let max_pages = max_pages.max(1);
    let mut pages = pages.peekable();
    std::iter::from_fn(move || {
        let (region, first_page) = pages.next()?;
        let mut run = PageRun {
            region,
            first_page,
            pages: 1,
        };
        while run.pages < max_pages
            && pages
                .next_if(|&(r, p)| r == region && p == run.first_page + run.pages)
                .is_some()
        {
            run.pages += 1;
        }
        Some(run)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_ram;
    use luvisor_guest_abi::layout::{HIGH_RAM_START, LOW_RAM_END};

    #[test]
    fn counts_iterates_and_locates_pages() {
        let mem = create_ram((4 << 30) + (100 << 12)).unwrap();
        let mut set = DirtyPages::none(&mem);
        assert!(set.is_empty());
        assert!(set.insert_addr(GuestAddress(0x5123)));
        assert!(set.insert(0, 6));
        assert!(set.insert_addr(GuestAddress(HIGH_RAM_START + (1 << 30) + 99 * 4096)));
        assert!(!set.insert_addr(GuestAddress(LOW_RAM_END)), "MMIO hole");
        assert!(!set.insert(1, (1 << 18) + 100), "past the region");
        assert!(!set.insert(2, 0), "no region 2");
        assert_eq!(set.count(), 3);
        assert!(set.contains_addr(GuestAddress(0x5fff)));
        assert!(!set.contains_addr(GuestAddress(0x7000)));
        let pages: Vec<_> = set.iter().collect();
        assert_eq!(pages, vec![(0, 5), (0, 6), (1, (1 << 18) + 99)]);
        let addrs: Vec<_> = set.addresses().collect();
        assert_eq!(addrs[0], GuestAddress(0x5000));
        assert_eq!(
            addrs[2],
            GuestAddress(HIGH_RAM_START + (1 << 30) + 99 * 4096)
        );
        set.fits(&mem).unwrap();
    }

    #[test]
    fn all_covers_exactly_the_pages() {
        let mem = create_ram(100 << 12).unwrap();
        let all = DirtyPages::all(&mem);
        assert_eq!(all.count(), 100);
        assert_eq!(all.region_bitmap(0).unwrap()[1], (1 << 36) - 1);
        all.fits(&mem).unwrap();
    }

    #[test]
    fn runs_split_at_gaps_regions_and_the_limit() {
        let mem = create_ram((4 << 30) + (1 << 20)).unwrap();
        let mut set = DirtyPages::none(&mem);
        for page in [1, 2, 3, 4, 5, 9] {
            set.insert(0, page);
        }
        // The last page of region 0 and the first of region 1 are not one run.
        set.insert(0, (LOW_RAM_END / PAGE_SIZE) - 1);
        set.insert(1, 0);
        let runs: Vec<_> = set
            .runs(3)
            .map(|r| (r.region, r.first_page, r.pages))
            .collect();
        assert_eq!(
            runs,
            vec![
                (0, 1, 3),
                (0, 4, 2),
                (0, 9, 1),
                (0, (LOW_RAM_END / PAGE_SIZE) - 1, 1),
                (1, 0, 1)
            ]
        );
    }

    #[test]
    fn union_adds_and_refuses_other_shapes() {
        let mem = create_ram(1 << 20).unwrap();
        let mut a = DirtyPages::none(&mem);
        let mut b = DirtyPages::none(&mem);
        a.insert(0, 1);
        b.insert(0, 200);
        a.union_with(&b).unwrap();
        assert_eq!(a.iter().collect::<Vec<_>>(), vec![(0, 1), (0, 200)]);
        let other = DirtyPages::none(&create_ram(2 << 20).unwrap());
        assert!(matches!(
            a.union_with(&other),
            Err(MemoryError::PagesMismatch(_))
        ));
        assert_eq!(a.count(), 2, "a refused union changes nothing");
    }

    #[test]
    fn bitmaps_are_trimmed_to_the_region() {
        let mem = create_ram(100 << 12).unwrap();
        let set = DirtyPages::from_bitmaps(&mem, vec![vec![1, u64::MAX, 7]]);
        assert_eq!(set.count(), 1 + 36);
        set.fits(&mem).unwrap();
    }

    #[test]
    fn fits_rejects_foreign_and_malformed_sets() {
        let mem = create_ram(100 << 12).unwrap();
        let bigger = DirtyPages::none(&create_ram(200 << 12).unwrap());
        assert!(bigger.fits(&mem).is_err());
        let two = DirtyPages::none(&create_ram((4 << 30) + 4096).unwrap());
        let err = two.fits(&mem).unwrap_err();
        assert!(err.to_string().contains("2 regions"), "{err}");
        // Crafted as if read from a hostile file.
        let stray = DirtyPages {
            regions: vec![RegionPages {
                base: 0,
                pages: 100,
                bits: vec![0, 1 << 40],
            }],
        };
        assert!(stray
            .fits(&mem)
            .unwrap_err()
            .to_string()
            .contains("past its end"));
        let short = DirtyPages {
            regions: vec![RegionPages {
                base: 0,
                pages: 100,
                bits: vec![0],
            }],
        };
        assert!(short.fits(&mem).is_err());
        assert!(
            !short.contains(0, 99),
            "lookups never panic on a malformed set"
        );
    }

    #[test]
    fn round_trips_through_postcard() {
        let mem = create_ram(1 << 20).unwrap();
        let mut set = DirtyPages::none(&mem);
        set.insert(0, 17);
        let bytes = postcard::to_allocvec(&set).unwrap();
        let back: DirtyPages = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, set);
    }
}
