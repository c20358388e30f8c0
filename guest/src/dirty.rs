//! `dirty MiB RATE` and `dirty-verify`: a guest that keeps changing its memory at a
//! known rate, and checks afterwards that every byte of it is what it wrote. Live
//! migration tests run `dirty` while the VM moves and `dirty-verify` once it arrived:
//! a page the migration lost or sent stale shows as a bad page.
//!
//! The region is rewritten page by page in a ring. Each rewrite of a page stores a
//! pattern of the page's index and its generation, and the generation of every page
//! follows from two numbers kept in guest memory beside it: how many full passes over
//! the region are done, and where the current pass is. A page before the cursor holds
//! generation `passes + 1`, a page at or after it generation `passes`. So the check
//! needs no table, and a lost write to the data, to the cursor or to the pass count
//! shows as a mismatch.

use crate::blk::Error;
use crate::io;
use crate::mem::PAGE;
use crate::println;
use crate::State;

/// Words per page.
const WORDS: u64 = PAGE / 8;
/// Most pages written between two looks at the clock and the console.
const BATCH_PAGES: u64 = 64;
/// How often a progress line is printed, in ms of running time.
const PROGRESS_EVERY_MS: u64 = 1000;
/// How long to idle when ahead of the rate, in µs.
const IDLE_US: u32 = 1000;

/// The region `dirty` rewrites and where it is in its ring.
pub struct DirtyRegion {
    start: u64,
    pages: u64,
    /// Full passes over the region since it was set up.
    passes: u64,
    /// The next page to rewrite in the current pass.
    cursor: u64,
    /// Pages written since the region was set up (its first fill included).
    written: u64,
}

impl DirtyRegion {
    /// The generation page `page` holds now.
    fn generation(&self, page: u64) -> u64 {
        if page < self.cursor {
            self.passes + 1
        } else {
            self.passes
        }
    }

    fn page_address(&self, page: u64) -> *mut u64 {
        (self.start + page * PAGE) as *mut u64
    }

    fn write_page(&mut self, page: u64, generation: u64) {
        let base = self.page_address(page);
        for i in 0..WORDS {
            // SAFETY: the page lies in [start, start + pages * PAGE), identity-mapped RAM
            // that the pool handed to this region alone.
            unsafe {
                base.add(i as usize)
                    .write_volatile(word(page, generation, i))
            };
        }
    }

    /// Whether page `page` holds its generation's pattern.
    fn page_ok(&self, page: u64) -> bool {
        let base = self.page_address(page);
        let generation = self.generation(page);
        (0..WORDS).all(|i| {
            // SAFETY: as in `write_page`.
            let value = unsafe { base.add(i as usize).read_volatile() };
            value == word(page, generation, i)
        })
    }

    /// Rewrites the next page of the ring.
    fn step(&mut self) {
        let generation = self.passes + 1;
        self.write_page(self.cursor, generation);
        self.cursor += 1;
        self.written += 1;
        if self.cursor == self.pages {
            self.cursor = 0;
            self.passes += 1;
        }
    }
}

/// Word `i` of page `page` at generation `generation`.
fn word(page: u64, generation: u64, i: u64) -> u64 {
    ((page << 32) ^ generation)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i.wrapping_mul(0xD6E8_FEB8_6659_FD93))
        ^ 0x5A5A_5A5A_5A5A_5A5A
}

/// `dirty MiB RATE`: sets up a region of MiB mebibytes on first use (and fills it), then
/// rewrites it at RATE MiB/s of running time (0: as fast as it can), printing
/// `dirty: pass P, N MiB written, R MiB/s` every second, until input arrives on the
/// console, which it leaves for `listen`. It then prints `dirty: stopped at pass P`.
pub fn run(state: &mut State, mib: u64, rate: u64) -> Result<(), Error> {
    if mib == 0 {
        return Err(Error::Msg("the region must be at least 1 MiB"));
    }
    let pages = mib
        .checked_mul((1 << 20) / PAGE)
        .ok_or(Error::Msg("size too large"))?;
    match &state.dirty {
        Some(region) if region.pages != pages => {
            return Err(Error::Msg(
                "the dirty region already has another size; give the same MiB",
            ))
        }
        Some(_) => {}
        None => {
            let start = state
                .pool
                .alloc(pages * PAGE)
                .ok_or(Error::Msg("not enough free guest memory"))?;
            let mut region = DirtyRegion {
                start,
                pages,
                passes: 0,
                cursor: 0,
                written: 0,
            };
            for page in 0..pages {
                region.write_page(page, 0);
            }
            region.written = pages;
            state.dirty = Some(region);
        }
    }
    // Pages per second; 0 means no limit.
    let pages_per_second = rate.saturating_mul((1 << 20) / PAGE);
    let started = io::clock_ms() as u64;
    let mut done: u64 = 0;
    let mut last_report = started;
    let mut done_at_report = 0u64;
    loop {
        if io::input_pending() {
            break;
        }
        let now = io::clock_ms() as u64;
        let due = if pages_per_second == 0 {
            done + BATCH_PAGES
        } else {
            (now - started).saturating_mul(pages_per_second) / 1000
        };
        let batch = due.saturating_sub(done).min(BATCH_PAGES);
        let region = state.dirty.as_mut().expect("set up above");
        for _ in 0..batch {
            region.step();
        }
        done += batch;
        if now >= last_report + PROGRESS_EVERY_MS {
            let mib_written = (region.written * PAGE) >> 20;
            let mib_rate = ((done - done_at_report) * PAGE * 1000 / (now - last_report)) >> 20;
            println!(
                "dirty: pass {}, {} MiB written, {} MiB/s",
                region.passes, mib_written, mib_rate
            );
            done_at_report = done;
            last_report = now;
        }
        if batch == 0 {
            state.wait(IDLE_US);
        }
    }
    let passes = state.dirty.as_ref().map_or(0, |r| r.passes);
    println!("dirty: stopped at pass {}", passes);
    Ok(())
}

/// `dirty-verify`: checks every page of the region; prints
/// `dirty-verify: ok, N pages, pass P` or `dirty-verify: B bad pages of N, first at page F`.
pub fn verify(state: &mut State) -> Result<(), Error> {
    let region = state
        .dirty
        .as_ref()
        .ok_or(Error::Msg("nothing to verify: run dirty first"))?;
    let mut bad = 0u64;
    let mut first_bad = None;
    for page in 0..region.pages {
        if !region.page_ok(page) {
            bad += 1;
            first_bad.get_or_insert(page);
        }
    }
    match first_bad {
        None => println!(
            "dirty-verify: ok, {} pages, pass {}",
            region.pages, region.passes
        ),
        Some(first) => println!(
            "dirty-verify: {} bad pages of {}, first at page {}",
            bad, region.pages, first
        ),
    }
    Ok(())
}
