//! The virtio-balloon device (virtio 1.2, 5.5): configuration space, the four queues and
//! everything the host keeps about them.
//!
//! The host asks the guest to hold `num_pages` pages (the VM's memory maximum minus its
//! target) and the driver answers by giving page frame numbers on the inflate queue.
//! Each one is checked against guest RAM, runs of consecutive frames are released
//! together with [`discard`] (the host's RSS falls; the pages read zero when touched
//! again), and the frame goes into the set of held pages. Deflating takes frames out of
//! the set. `BalloonStatus::held_bytes` is the size of that set: what the host has
//! really taken back, whatever the driver claims in `actual`.
//!
//! The statistics queue holds one driver buffer at a time: the device parses it, keeps
//! it, and gives it back every statistics period (a [`DeviceTimer`]) so that the driver
//! refills it with fresh values. Free page reporting hands ranges of free guest memory
//! to the host, which discards them without counting them as held.
//!
//! Everything the guest sends is a hint: frame numbers are bounds-checked, the work per
//! call is capped, statistics and reports beyond a rate per second are ignored, and
//! nothing is allocated at the guest's request.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::pages::{HeldPages, PageRun, RamLayout};
use super::stats;
use crate::devices::virtio::timer::DeviceTimer;
use crate::devices::virtio::{
    features, next_chain, DeviceStateError, QueueError, VirtioDevice, VirtioDeviceState,
    VirtioInterrupt,
};
use crate::snapshot::Persist;
use crate::vm::dynamic_memory::BalloonStatus;
use crate::vstate::memory::{discard, GuestRam, PAGE_SIZE};

/// virtio device ID of a memory balloon.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// Descriptors per queue (each queue: the reporting queue must hold Linux's 32-entry
/// reports, and a driver without the statistics queue uses index 2 for reporting).
pub const QUEUE_SIZE: u16 = 256;
/// inflateq, deflateq, statsq, reporting_vq (as a driver that negotiated both optional
/// queues numbers them).
pub const QUEUE_COUNT: usize = 4;

/// Feature bits (virtio 1.2, 5.5.3); `virtio-bindings` has no balloon module.
pub mod feature {
    pub const MUST_TELL_HOST: u64 = 1 << 0;
    pub const STATS_VQ: u64 = 1 << 1;
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_HINT: u64 = 1 << 3;
    pub const PAGE_POISON: u64 = 1 << 4;
    pub const REPORTING: u64 = 1 << 5;
}

/// Offsets in the configuration space (virtio 1.2, 5.5.4).
pub mod config {
    pub const NUM_PAGES: u64 = 0;
    pub const ACTUAL: u64 = 4;
    /// `free_page_hint_cmd_id` and `poison_val` follow; they read as zero here.
    pub const SIZE: u64 = 16;
}

/// Balloon page frames are 4 KiB, whatever the guest's page size (virtio 1.2, 5.5.6).
pub const BALLOON_PAGE: u64 = 4096;
const _: () = assert!(BALLOON_PAGE == PAGE_SIZE);

/// Statistics period of a new device, unless the VM set another.
pub const DEFAULT_STATS_PERIOD: Duration = Duration::from_secs(1);
/// Shortest statistics period (other than 0, which stops asking).
pub const MIN_STATS_PERIOD: Duration = Duration::from_millis(100);
/// Longest statistics period.
pub const MAX_STATS_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// Most frame numbers read from one inflate or deflate buffer chain (1 GiB worth); the
/// rest of a longer chain is ignored.
pub const MAX_PFNS_PER_CHAIN: u64 = 1 << 18;
/// Most frame numbers one call serves; the transport comes back for the rest.
pub const MAX_PFNS_PER_CALL: u64 = 1 << 19;
/// Frame numbers read from guest memory at a time, into a buffer allocated once.
const PFN_CHUNK: usize = 4096;
/// Statistics buffers parsed per second; more are given back unread. A driver that
/// follows the protocol sends one per period, and the period is at least 100 ms.
pub const STATS_PER_SECOND: u32 = 20;
/// Reported free ranges discarded per second; more are given back without discarding.
pub const REPORTS_PER_SECOND: u32 = 16384;

/// What a queue is for, given the features the driver accepted: the optional queues
/// exist only when negotiated, and those that exist are numbered without gaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// The role of queue `index` under `acked_features`.
pub fn queue_role(acked_features: u64, index: usize) -> Option<QueueRole> {
    let mut roles = [QueueRole::Inflate; QUEUE_COUNT];
    let mut count = 0;
    let mut add = |role| {
        roles[count] = role;
        count += 1;
    };
    add(QueueRole::Inflate);
    add(QueueRole::Deflate);
    if acked_features & feature::STATS_VQ != 0 {
        add(QueueRole::Stats);
    }
    if acked_features & feature::REPORTING != 0 {
        add(QueueRole::Reporting);
    }
    roles[..count].get(index).copied()
}

/// What the device has done and refused, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonCounters {
    /// Pages taken into the balloon (each counted once).
    pub inflated_pages: u64,
    /// Pages the driver took back.
    pub deflated_pages: u64,
    /// Inflate frame numbers that are not guest RAM.
    pub refused_pfns: u64,
    /// Inflate frame numbers already held, and deflate frame numbers not held.
    pub ignored_pfns: u64,
    /// Buffers outside guest memory or frame numbers past the per-chain cap.
    pub bad_buffers: u64,
    /// Statistics buffers parsed, and those given back unread (over the rate).
    pub stats_received: u64,
    pub stats_ignored: u64,
    /// Bytes of reported free memory discarded, and reported ranges not discarded
    /// (misaligned to nothing, not RAM, or over the rate).
    pub reported_bytes: u64,
    pub reports_ignored: u64,
    /// `discard` calls that failed (the pages stay the guest's).
    pub discard_failures: u64,
}

/// Counts events in one-second windows and refuses those past `limit`.
#[derive(Debug)]
struct PerSecond {
    limit: u32,
    window: Option<Instant>,
    used: u32,
}

impl PerSecond {
    fn new(limit: u32) -> PerSecond {
        PerSecond {
            limit,
            window: None,
            used: 0,
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used >= self.limit {
            return false;
        }
        self.used += 1;
        true
    }
}

/// Consecutive frames waiting to be discarded together, inside one RAM region.
#[derive(Debug, Clone, Copy)]
struct PendingRun {
    first: u64,
    end: u64,
    region_end: u64,
}

pub struct Balloon {
    layout: RamLayout,
    status: Arc<BalloonStatus>,
    /// Pages the host asks the balloon to hold (config `num_pages`).
    num_pages: u32,
    /// What the driver says it holds (config `actual`).
    actual: u32,
    acked_features: u64,
    /// The driver set DRIVER_OK and has not reset the device since.
    activated: bool,
    held: HeldPages,
    /// The statistics buffer the device keeps until it wants fresh values.
    stats_head: Option<u16>,
    stats_period: Duration,
    /// Set when the timer fired: the next pass over the statistics queue gives the kept
    /// buffer back.
    stats_due: bool,
    timer: Arc<DeviceTimer>,
    interrupt: Option<Arc<VirtioInterrupt>>,
    stats_rate: PerSecond,
    report_rate: PerSecond,
    counters: BalloonCounters,
    /// Frame numbers read from the guest, allocated once.
    pfn_bytes: Vec<u8>,
}

/// What a new or restored balloon is plugged into.
pub struct BalloonArgs {
    /// Guest RAM's layout (the device is checked against it on restore).
    pub layout: RamLayout,
    /// Shared with the VM: the device reports held bytes and statistics there, and reads
    /// the statistics period a new device starts with.
    pub status: Arc<BalloonStatus>,
    /// The VM's memory target in bytes, for a new device.
    pub target: u64,
}

impl Balloon {
    /// A device asking the guest to come down to `args.target` bytes.
    pub fn new(args: BalloonArgs) -> std::io::Result<Balloon> {
        let held = HeldPages::new(&args.layout);
        let period = args.status.stats_period();
        let mut balloon = Balloon {
            num_pages: 0,
            actual: 0,
            acked_features: 0,
            activated: false,
            held,
            stats_head: None,
            stats_period: period,
            stats_due: false,
            timer: Arc::new(DeviceTimer::new()?),
            interrupt: None,
            stats_rate: PerSecond::new(STATS_PER_SECOND),
            report_rate: PerSecond::new(REPORTS_PER_SECOND),
            counters: BalloonCounters::default(),
            pfn_bytes: vec![0; PFN_CHUNK * 4],
            layout: args.layout,
            status: args.status,
        };
        balloon.num_pages = balloon.pages_for_target(args.target);
        balloon.status.set_held_bytes(0);
        Ok(balloon)
    }

    /// RAM the guest sees, in balloon pages.
    fn ram_pages(&self) -> u64 {
        self.layout.pages()
    }

    fn pages_for_target(&self, target: u64) -> u32 {
        let keep = (target / BALLOON_PAGE).min(self.ram_pages());
        (self.ram_pages() - keep).min(u32::MAX as u64) as u32
    }

    /// Asks the guest to have `target` bytes (the balloon then holds the rest of RAM).
    /// A change raises a configuration interrupt.
    pub fn set_target(&mut self, target: u64) {
        let pages = self.pages_for_target(target);
        if pages != self.num_pages {
            self.num_pages = pages;
            if let Some(interrupt) = &self.interrupt {
                interrupt.config_changed();
            }
        }
    }

    /// What the balloon is asked to hold, in bytes.
    pub fn requested_bytes(&self) -> u64 {
        self.num_pages as u64 * BALLOON_PAGE
    }

    /// What the host has taken back, in bytes.
    pub fn held_bytes(&self) -> u64 {
        self.held.count() * BALLOON_PAGE
    }

    /// What the driver last wrote in `actual`, in pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    pub fn counters(&self) -> BalloonCounters {
        self.counters
    }

    pub fn stats_period(&self) -> Duration {
        self.stats_period
    }

    /// How often the driver is asked for statistics; zero stops asking. Periods
    /// between zero and [`MIN_STATS_PERIOD`], or above [`MAX_STATS_PERIOD`], are
    /// refused with a message.
    pub fn set_stats_period(&mut self, period: Duration) -> Result<(), String> {
        check_stats_period(period)?;
        self.stats_period = period;
        self.arm_timer();
        Ok(())
    }

    fn stats_negotiated(&self) -> bool {
        self.acked_features & feature::STATS_VQ != 0
    }

    fn arm_timer(&self) {
        let period = (self.activated && self.stats_negotiated() && !self.stats_period.is_zero())
            .then_some(self.stats_period);
        if let Err(e) = self.timer.set_period(period) {
            tracing::warn!(error = %e, "virtio-balloon: cannot arm the statistics timer");
        }
    }

    fn publish_held(&self) {
        self.status.set_held_bytes(self.held_bytes());
    }

    fn state(&self) -> BalloonState {
        BalloonState {
            acked_features: self.acked_features,
            activated: self.activated,
            ram_pages: self.ram_pages(),
            num_pages: self.num_pages,
            actual: self.actual,
            held: self.held.runs(),
            stats_period_ms: self.stats_period.as_millis() as u64,
            stats_head: self.stats_head,
        }
    }
}

/// Checks a statistics period: zero (off), or from [`MIN_STATS_PERIOD`] to
/// [`MAX_STATS_PERIOD`].
pub fn check_stats_period(period: Duration) -> Result<(), String> {
    if !period.is_zero() && !(MIN_STATS_PERIOD..=MAX_STATS_PERIOD).contains(&period) {
        return Err(format!(
            "statistics period {} ms is out of range: give 0 (off) or {} ms to {} ms",
            period.as_millis(),
            MIN_STATS_PERIOD.as_millis(),
            MAX_STATS_PERIOD.as_millis()
        ));
    }
    Ok(())
}

/// A balloon's saved state. Inflate, deflate and reporting buffers are served
/// synchronously, so a paused device has none in flight; the one statistics buffer it
/// keeps is saved by its head index (it is past the queue's saved `next_avail`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonState {
    pub acked_features: u64,
    pub activated: bool,
    /// Pages of RAM the device was made for, checked against the restored RAM.
    pub ram_pages: u64,
    pub num_pages: u32,
    pub actual: u32,
    /// The pages the balloon holds, as ascending runs of frames. The memory file has
    /// holes there, so a restored VM stays ballooned.
    pub held: Vec<PageRun>,
    pub stats_period_ms: u64,
    pub stats_head: Option<u16>,
}

impl Persist for Balloon {
    type State = BalloonState;
    type Args = BalloonArgs;
    type Error = DeviceStateError;

    fn save(&self) -> Result<BalloonState, DeviceStateError> {
        Ok(self.state())
    }

    fn restore(args: BalloonArgs, state: &BalloonState) -> Result<Balloon, DeviceStateError> {
        let invalid = |reason: String| DeviceStateError::Invalid(format!("balloon: {reason}"));
        let mut balloon = Balloon::new(args)
            .map_err(|e| invalid(format!("cannot create the statistics timer: {e}")))?;
        if state.ram_pages != balloon.ram_pages() {
            return Err(invalid(format!(
                "saved for {} pages of RAM, the VM has {}",
                state.ram_pages,
                balloon.ram_pages()
            )));
        }
        if state.num_pages as u64 > balloon.ram_pages() {
            return Err(invalid(format!(
                "asks to hold {} pages of {}",
                state.num_pages,
                balloon.ram_pages()
            )));
        }
        if state.acked_features & !balloon.features() != 0 {
            return Err(invalid(format!(
                "features {:#x} were agreed but the device does not offer them",
                state.acked_features & !balloon.features()
            )));
        }
        if state.stats_head.is_some_and(|head| head >= QUEUE_SIZE) {
            return Err(invalid(format!(
                "statistics buffer {:?} is beyond the queue",
                state.stats_head
            )));
        }
        let period = Duration::from_millis(state.stats_period_ms);
        check_stats_period(period).map_err(invalid)?;
        balloon.held = HeldPages::from_runs(&balloon.layout, &state.held).map_err(invalid)?;
        balloon.num_pages = state.num_pages;
        balloon.actual = state.actual;
        balloon.acked_features = state.acked_features;
        balloon.activated = state.activated;
        balloon.stats_head = state.stats_head;
        balloon.stats_period = period;
        balloon.status.set_stats_period(period);
        balloon.publish_held();
        balloon.arm_timer();
        Ok(balloon)
    }
}

/// Why a chain's buffers were not used.
struct BadBuffer;

impl Balloon {
    /// Reads the frame numbers of `chain`'s readable buffers and hands each to `each`,
    /// at most `limit` of them. Returns how many were read.
    fn for_each_pfn(
        &mut self,
        chain: DescriptorChain<&GuestRam>,
        mem: &GuestRam,
        limit: u64,
        mut each: impl FnMut(&mut Balloon, u64),
    ) -> Result<u64, BadBuffer> {
        let mut bytes = std::mem::take(&mut self.pfn_bytes);
        let mut read = 0u64;
        let mut outcome = Ok(());
        'chain: for desc in chain {
            if desc.is_write_only() {
                continue;
            }
            let len = desc.len() as usize;
            if !mem.check_range(desc.addr(), len) {
                outcome = Err(BadBuffer);
                break;
            }
            let mut offset = 0;
            while offset + 4 <= len {
                if read >= limit {
                    outcome = Err(BadBuffer);
                    break 'chain;
                }
                let room = ((limit - read) as usize * 4).min(bytes.len());
                let take = ((len - offset) & !3).min(room);
                let chunk = &mut bytes[..take];
                let at = GuestAddress(desc.addr().0 + offset as u64);
                if mem.read_slice(chunk, at).is_err() {
                    outcome = Err(BadBuffer);
                    break 'chain;
                }
                for pfn in chunk.chunks_exact(4) {
                    each(
                        self,
                        u32::from_le_bytes(pfn.try_into().expect("4 bytes")) as u64,
                    );
                }
                read += (take / 4) as u64;
                offset += take;
            }
        }
        self.pfn_bytes = bytes;
        outcome.map(|()| read)
    }

    /// Discards a run of frames and records them as held.
    fn flush_run(&mut self, run: Option<PendingRun>, mem: &GuestRam) {
        let Some(run) = run else { return };
        let pages = run.end - run.first;
        match discard(
            mem,
            GuestAddress(run.first * BALLOON_PAGE),
            pages * BALLOON_PAGE,
        ) {
            Ok(_) => {
                self.held.insert_run(run.first, pages);
                self.counters.inflated_pages += pages;
            }
            Err(e) => {
                self.counters.discard_failures += 1;
                tracing::warn!(error = %e, "virtio-balloon: cannot release inflated pages");
            }
        }
    }

    /// One inflate frame number: joins the pending run, or flushes it and starts anew.
    fn inflate_pfn(&mut self, pfn: u64, run: &mut Option<PendingRun>, mem: &GuestRam) {
        let Some(region_end) = self.layout.region_end(pfn) else {
            self.counters.refused_pfns += 1;
            return;
        };
        if self.held.contains(pfn) {
            self.counters.ignored_pfns += 1;
            return;
        }
        if let Some(pending) = run {
            if pfn == pending.end && pfn < pending.region_end {
                pending.end += 1;
                return;
            }
        }
        self.flush_run(run.take(), mem);
        // The run just flushed may have held this frame.
        if self.held.contains(pfn) {
            self.counters.ignored_pfns += 1;
            return;
        }
        *run = Some(PendingRun {
            first: pfn,
            end: pfn + 1,
            region_end,
        });
    }

    /// Serves the inflate or deflate queue.
    fn serve_pages(
        &mut self,
        index: usize,
        inflate: bool,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError> {
        let served = self.serve_pages_inner(index, inflate, queue, mem);
        // Also after an error: the driver may have broken its queue by giving away its
        // own rings, and the VM must still learn what the host took back.
        self.publish_held();
        served
    }

    fn serve_pages_inner(
        &mut self,
        index: usize,
        inflate: bool,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError> {
        let broken = |source| QueueError {
            queue: index,
            source,
        };
        let mut used_any = false;
        let mut served = 0u64;
        let mut run = None;
        // At most one ring's worth and MAX_PFNS_PER_CALL frames per call, so a driver
        // that keeps posting cannot hold the event thread here.
        for _ in 0..queue.size().max(1) {
            if served >= MAX_PFNS_PER_CALL {
                break;
            }
            let Some(chain) = next_chain(queue, mem, index)? else {
                break;
            };
            let head = chain.head_index();
            let result = if inflate {
                self.for_each_pfn(chain, mem, MAX_PFNS_PER_CHAIN, |balloon, pfn| {
                    balloon.inflate_pfn(pfn, &mut run, mem)
                })
            } else {
                self.for_each_pfn(chain, mem, MAX_PFNS_PER_CHAIN, |balloon, pfn| {
                    if balloon.held.remove(pfn) {
                        balloon.counters.deflated_pages += 1;
                    } else {
                        balloon.counters.ignored_pfns += 1;
                    }
                })
            };
            match result {
                Ok(n) => served += n,
                Err(BadBuffer) => {
                    served += MAX_PFNS_PER_CHAIN;
                    self.counters.bad_buffers += 1;
                }
            }
            // The pages must be gone before the driver hears that they are.
            self.flush_run(run.take(), mem);
            queue.add_used(mem, head, 0).map_err(broken)?;
            used_any = true;
        }
        self.flush_run(run.take(), mem);
        Ok(used_any)
    }

    /// Serves the statistics queue: parses a new buffer and keeps it; gives the kept
    /// buffer back when the timer asked for fresh values.
    fn serve_stats(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError> {
        let broken = |source| QueueError {
            queue: index,
            source,
        };
        let mut used_any = false;
        if std::mem::take(&mut self.stats_due) {
            if let Some(head) = self.stats_head.take() {
                queue.add_used(mem, head, 0).map_err(broken)?;
                used_any = true;
            }
        }
        for _ in 0..queue.size().max(1) {
            let Some(chain) = next_chain(queue, mem, index)? else {
                break;
            };
            let head = chain.head_index();
            if self.stats_rate.allow() {
                let mut bytes = [0u8; stats::MAX_ENTRIES * stats::ENTRY_BYTES];
                let mut filled = 0;
                for desc in chain {
                    if desc.is_write_only() || filled == bytes.len() {
                        continue;
                    }
                    let take = (desc.len() as usize).min(bytes.len() - filled);
                    if mem
                        .read_slice(&mut bytes[filled..filled + take], desc.addr())
                        .is_err()
                    {
                        self.counters.bad_buffers += 1;
                        break;
                    }
                    filled += take;
                }
                self.status.record_stats(stats::parse(&bytes[..filled]));
                self.counters.stats_received += 1;
            } else {
                self.counters.stats_ignored += 1;
            }
            // The driver keeps one buffer here; should it post another, the older one
            // goes back and the newer one is kept.
            if let Some(older) = self.stats_head.replace(head) {
                queue.add_used(mem, older, 0).map_err(broken)?;
                used_any = true;
            }
        }
        Ok(used_any)
    }

    /// Serves the reporting queue: every buffer of a chain is a range of free guest
    /// memory, discarded (not held: the driver takes it back once the chain is used).
    fn serve_reports(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError> {
        let broken = |source| QueueError {
            queue: index,
            source,
        };
        let mut used_any = false;
        for _ in 0..queue.size().max(1) {
            let Some(chain) = next_chain(queue, mem, index)? else {
                break;
            };
            let head = chain.head_index();
            for desc in chain {
                self.discard_reported(desc.addr().0, desc.len() as u64, mem);
            }
            queue.add_used(mem, head, 0).map_err(broken)?;
            used_any = true;
        }
        Ok(used_any)
    }

    fn discard_reported(&mut self, addr: u64, len: u64, mem: &GuestRam) {
        let start_pfn = addr.div_ceil(BALLOON_PAGE);
        let end_pfn = addr.saturating_add(len) / BALLOON_PAGE;
        let in_ram = self
            .layout
            .region_end(start_pfn)
            .is_some_and(|region_end| end_pfn <= region_end);
        if start_pfn >= end_pfn || !in_ram || !self.report_rate.allow() {
            self.counters.reports_ignored += 1;
            return;
        }
        let bytes = (end_pfn - start_pfn) * BALLOON_PAGE;
        match discard(mem, GuestAddress(start_pfn * BALLOON_PAGE), bytes) {
            Ok(_) => self.counters.reported_bytes += bytes,
            Err(e) => {
                self.counters.discard_failures += 1;
                tracing::warn!(error = %e, "virtio-balloon: cannot release reported pages");
            }
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        features::VERSION_1 | feature::STATS_VQ | feature::DEFLATE_ON_OOM | feature::REPORTING
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUE_COUNT]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut space = [0u8; config::SIZE as usize];
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual.to_le_bytes());
        let start = offset as usize;
        if let Some(end) = start.checked_add(data.len()).filter(|&e| e <= space.len()) {
            data.copy_from_slice(&space[start..end]);
        }
    }

    /// Only `actual` is writable; writes elsewhere are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let start = offset as usize;
        let Some(end) = start.checked_add(data.len()) else {
            return;
        };
        if start < config::ACTUAL as usize || end > config::ACTUAL as usize + 4 {
            return;
        }
        let mut actual = self.actual.to_le_bytes();
        let at = start - config::ACTUAL as usize;
        actual[at..at + data.len()].copy_from_slice(data);
        self.actual = u32::from_le_bytes(actual);
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
        self.activated = true;
        self.arm_timer();
    }

    /// A reset driver starts over with all of RAM: whatever the balloon held is the
    /// guest's again (it reads zero), and the kept statistics buffer is forgotten.
    fn reset(&mut self) {
        self.acked_features = 0;
        self.activated = false;
        self.held.clear();
        self.actual = 0;
        self.stats_head = None;
        self.stats_due = false;
        self.arm_timer();
        self.publish_held();
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Balloon(self.state())
    }

    fn attach_interrupt(&mut self, interrupt: Arc<VirtioInterrupt>) {
        self.interrupt = Some(interrupt);
    }

    fn timer(&self) -> Option<Arc<DeviceTimer>> {
        Some(self.timer.clone())
    }

    fn timer_fired(&mut self) -> Option<usize> {
        if !self.activated || !self.stats_negotiated() || self.stats_head.is_none() {
            return None;
        }
        self.stats_due = true;
        (0..QUEUE_COUNT).find(|&i| queue_role(self.acked_features, i) == Some(QueueRole::Stats))
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError> {
        match queue_role(self.acked_features, index) {
            Some(QueueRole::Inflate) => self.serve_pages(index, true, queue, mem),
            Some(QueueRole::Deflate) => self.serve_pages(index, false, queue, mem),
            Some(QueueRole::Stats) => self.serve_stats(index, queue, mem),
            Some(QueueRole::Reporting) => self.serve_reports(index, queue, mem),
            // A queue the negotiated features do not define: nothing is served there.
            None => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_are_numbered_by_the_negotiated_features() {
        use QueueRole::*;
        let roles = |f| {
            (0..QUEUE_COUNT)
                .map(|i| queue_role(f, i))
                .collect::<Vec<_>>()
        };
        assert_eq!(roles(0), [Some(Inflate), Some(Deflate), None, None]);
        assert_eq!(
            roles(feature::STATS_VQ | feature::REPORTING),
            [Some(Inflate), Some(Deflate), Some(Stats), Some(Reporting)]
        );
        assert_eq!(
            roles(feature::REPORTING),
            [Some(Inflate), Some(Deflate), Some(Reporting), None]
        );
        assert_eq!(queue_role(u64::MAX, 99), None);
    }

    #[test]
    fn stats_periods_are_checked() {
        assert!(check_stats_period(Duration::ZERO).is_ok());
        assert!(check_stats_period(MIN_STATS_PERIOD).is_ok());
        assert!(check_stats_period(MAX_STATS_PERIOD).is_ok());
        let err = check_stats_period(Duration::from_millis(5)).unwrap_err();
        assert!(err.contains("0 (off) or 100 ms"), "{err}");
        assert!(check_stats_period(MAX_STATS_PERIOD + Duration::from_secs(1)).is_err());
    }

    #[test]
    fn the_rate_limit_refuses_past_its_count() {
        let mut rate = PerSecond::new(3);
        assert!(rate.allow() && rate.allow() && rate.allow());
        assert!(!rate.allow());
    }
}
