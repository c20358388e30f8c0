//! A hostile balloon driver: a host-side harness that sets the device up through its
//! MMIO registers like a guest would, then sends frame numbers that are not RAM, more
//! pages than exist, oversized and misplaced buffers, floods of statistics and reports.
//! Every case must end in a used buffer with nothing wrongly released, or in
//! DEVICE_NEEDS_RESET; never a panic, an access outside guest memory or a wrong count.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::device::{
    config, feature, Balloon, BalloonState, MAX_PFNS_PER_CHAIN, QUEUE_SIZE, REPORTS_PER_SECOND,
    STATS_PER_SECOND,
};
use super::pages::RamLayout;
use super::stats::{encode, tag};
use super::BalloonArgs;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{reg, TransportState};
use crate::devices::virtio::test_driver::{
    deref_to_driver, restore_transport, Desc, TestDriver, F_WRITE,
};
use crate::devices::virtio::{
    DeviceStateError, VirtioDevice, VirtioDeviceState, INTERRUPT_CONFIG_CHANGE,
};
use crate::snapshot::Persist;
use crate::vm::dynamic_memory::BalloonStatus;
use crate::vstate::memory::GuestRam;

/// Buffers the tests fill (PFN arrays, statistics), above the driver's rings.
const BUFFERS: u64 = 0x20_0000;
const TEST_QUEUE_SIZE: u16 = 16;
const MIB: u64 = 1 << 20;
const ALL_FEATURES: u64 = feature::STATS_VQ | feature::REPORTING | feature::DEFLATE_ON_OOM;

/// A balloon driven by a [`TestDriver`] (which the harness derefs to), and the VM's view
/// of what it holds.
struct Harness {
    driver: TestDriver,
    status: Arc<BalloonStatus>,
}

deref_to_driver!(Harness);

impl Harness {
    /// A balloon over `memory` bytes of RAM asking the guest to come down to `target`.
    fn new(memory: u64, target: u64) -> Harness {
        let status = Arc::new(BalloonStatus::default());
        let driver = TestDriver::new(memory, |mem| {
            Box::new(
                Balloon::new(BalloonArgs {
                    layout: RamLayout::of(mem),
                    status: status.clone(),
                    target,
                })
                .unwrap(),
            )
        });
        Harness { driver, status }
    }

    /// 64 MiB of RAM, asked down to 32 MiB, with `wanted` features and every queue
    /// they define set up.
    fn ready(wanted: u64) -> Harness {
        let mut h = Harness::new(64 * MIB, 32 * MIB);
        h.setup(wanted);
        h
    }

    fn config_u32(&mut self, offset: u64) -> u32 {
        self.read_reg(reg::CONFIG + offset)
    }

    /// Sets every queue up, whether or not `wanted` gives it a meaning.
    fn setup(&mut self, wanted: u64) {
        self.set_up(wanted, TEST_QUEUE_SIZE);
        assert!(!self.needs_reset());
    }

    /// Writes `pfns` at `addr` as the little-endian u32 array a driver sends.
    fn write_pfns(&self, addr: u64, pfns: impl IntoIterator<Item = u64>) -> u32 {
        let bytes: Vec<u8> = pfns
            .into_iter()
            .flat_map(|p| (p as u32).to_le_bytes())
            .collect();
        self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        bytes.len() as u32
    }

    /// Sends `pfns` on the inflate (queue 0) or deflate (queue 1) queue, in one buffer.
    fn send_pfns(&mut self, queue: usize, pfns: impl IntoIterator<Item = u64>) {
        let len = self.write_pfns(BUFFERS, pfns);
        self.desc(queue, 0, BUFFERS, len, 0, 0);
        self.kick(queue, 0);
        assert_eq!(self.take_used_ids(queue), [0], "the buffer comes back");
    }

    fn balloon<R>(&mut self, f: impl FnOnce(&mut Balloon) -> R) -> R {
        f(self.device_mut::<Balloon>())
    }

    fn held_pages(&mut self) -> u64 {
        let held = self.balloon(|b| b.held_bytes());
        assert_eq!(
            held,
            self.status.held_bytes(),
            "the VM sees what the device holds"
        );
        held / 4096
    }

    fn fill(&self, addr: u64, len: u64, byte: u8) {
        self.mem
            .write_slice(&vec![byte; len as usize], GuestAddress(addr))
            .unwrap();
    }

    fn all_equal(&self, addr: u64, len: u64, byte: u8) -> bool {
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().all(|&b| b == byte)
    }

    fn post_stats(&mut self, head: u16, entries: &[(u16, u64)]) {
        let bytes = encode(entries);
        let at = BUFFERS + 0x1000 * head as u64;
        self.mem.write_slice(&bytes, GuestAddress(at)).unwrap();
        self.desc(2, head, at, bytes.len() as u32, 0, 0);
        self.kick(2, head);
    }
}

#[test]
fn config_space_holds_the_target_and_the_drivers_actual() {
    let mut h = Harness::ready(ALL_FEATURES);
    // 64 MiB of RAM asked down to 32 MiB: 8192 pages in the balloon.
    assert_eq!(h.config_u32(config::NUM_PAGES), 8192);
    h.write_reg(reg::CONFIG + config::ACTUAL, 100);
    assert_eq!(h.config_u32(config::ACTUAL), 100);
    // num_pages is the host's: a driver cannot change it.
    h.write_reg(reg::CONFIG + config::NUM_PAGES, 5);
    assert_eq!(h.config_u32(config::NUM_PAGES), 8192);
    // Odd offsets and sizes neither panic nor spill.
    h.transport.write(reg::CONFIG + 6, &[1, 0, 0, 0]);
    assert_eq!(h.config_u32(config::ACTUAL), 100);
    h.transport.write(reg::CONFIG + 5, &[1]);
    assert_eq!(h.config_u32(config::ACTUAL), 100 + 256);
    h.transport.write(reg::CONFIG + 4000, &[1, 2, 3, 4]);
    let mut beyond = [0xffu8; 8];
    h.transport.read(reg::CONFIG + 12, &mut beyond);
    assert_eq!(beyond, [0; 8], "past the space reads zero");

    // A new target changes num_pages and raises a configuration interrupt.
    let generation = h.read_reg(reg::CONFIG_GENERATION);
    h.balloon(|b| b.set_target(48 * MIB));
    assert_eq!(h.config_u32(config::NUM_PAGES), 4096);
    assert_eq!(h.read_reg(reg::CONFIG_GENERATION), generation + 1);
    assert_ne!(
        h.read_reg(reg::INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE,
        0
    );
    // The same target again is no change; one above RAM holds nothing.
    h.balloon(|b| b.set_target(48 * MIB));
    assert_eq!(h.read_reg(reg::CONFIG_GENERATION), generation + 1);
    h.balloon(|b| b.set_target(u64::MAX));
    assert_eq!(h.config_u32(config::NUM_PAGES), 0);
}

#[test]
fn inflated_pages_are_released_and_deflated_pages_come_back() {
    let mut h = Harness::ready(ALL_FEATURES);
    // Pages 0x400..0x500 (4 MiB at 4 MiB) hold data, and go into the balloon.
    h.fill(0x40_0000, MIB, 0xab);
    h.send_pfns(0, 0x400..0x500);
    assert_eq!(h.held_pages(), 0x100);
    assert!(h.all_equal(0x40_0000, MIB, 0), "released pages read zero");
    assert_eq!(h.balloon(|b| b.counters().inflated_pages), 0x100);
    // Out of order and scattered frames are fine too.
    h.send_pfns(0, [0x900, 0x700, 0x701, 0x800]);
    assert_eq!(h.held_pages(), 0x104);
    // Deflating gives pages back; frames the balloon does not hold are ignored.
    h.send_pfns(1, (0x400..0x480).chain([0x700, 0x12345, 0x400]));
    assert_eq!(h.held_pages(), 0x104 - 0x81);
    let counters = h.balloon(|b| b.counters());
    assert_eq!(counters.deflated_pages, 0x81);
    assert_eq!(counters.ignored_pfns, 2);
    // The pages come back zeroed and usable.
    h.fill(0x40_0000, 4096, 0x11);
    assert!(h.all_equal(0x40_0000, 4096, 0x11));
    assert!(!h.needs_reset());
}

#[test]
fn frame_numbers_outside_ram_are_refused() {
    // 3 GiB + 16 MiB: RAM below the MMIO hole and 16 MiB from 4 GiB.
    let mut h = Harness::new((3 << 30) + 16 * MIB, 1 << 30);
    h.setup(ALL_FEATURES);
    let hole = (3u64 << 30) / 4096; // first frame of the hole
    let high = (4u64 << 30) / 4096; // first frame above it
    h.fill(4 << 30, 4096, 0x77);
    h.send_pfns(
        0,
        [
            hole,
            hole + 1000,
            high - 1,
            high + 4096, // one past the end of RAM
            u32::MAX as u64,
            high,     // RAM above the hole: accepted
            hole - 1, // the last page below it: accepted
        ],
    );
    assert_eq!(h.held_pages(), 2);
    assert_eq!(h.balloon(|b| b.counters().refused_pfns), 5);
    assert!(h.all_equal(4 << 30, 4096, 0));
    // A run of frames that crosses into the hole is cut at the hole's edge.
    h.send_pfns(0, hole - 3..hole + 3);
    assert_eq!(h.held_pages(), 2 + 2);
    assert!(!h.needs_reset());
}

#[test]
fn inflating_more_than_exists_holds_each_page_once() {
    let mut h = Harness::new(16 * MIB, 4 * MIB);
    h.setup(ALL_FEATURES);
    // Every frame from 4 MiB to the end of RAM (the rings and buffers are below), twice
    // over, and then some that are not RAM.
    let (first, end) = (4 * MIB / 4096, 16 * MIB / 4096);
    let pages = end - first;
    h.send_pfns(0, (first..end).chain(first..end).chain(end..end + 100));
    assert_eq!(h.held_pages(), pages, "never more than there is");
    let counters = h.balloon(|b| b.counters());
    assert_eq!(counters.inflated_pages, pages);
    assert_eq!(counters.ignored_pfns, pages);
    assert_eq!(counters.refused_pfns, 100);
    // Deflating everything brings the count back to zero, never below.
    h.send_pfns(1, (first..end).chain(first..end));
    assert_eq!(h.held_pages(), 0);
}

#[test]
fn a_driver_that_inflates_its_own_rings_only_hurts_itself() {
    let mut h = Harness::new(16 * MIB, 4 * MIB);
    h.setup(ALL_FEATURES);
    let pages = 16 * MIB / 4096;
    // Every page of RAM, the rings and this very buffer included: they read zero from
    // then on, so the driver's queue breaks.
    let len = h.write_pfns(8 * MIB, 0..pages);
    h.desc(0, 0, 8 * MIB, len, 0, 0);
    h.kick(0, 0);
    // Whatever the driver broke, the VM is told exactly what the host took back.
    let held = h.held_pages();
    assert!(held <= pages);
    h.write_reg(reg::STATUS, 0);
    assert_eq!(h.held_pages(), 0);
}

#[test]
fn malformed_buffers_are_given_back_unused() {
    let mut h = Harness::ready(ALL_FEATURES);
    // A buffer outside guest memory.
    h.desc(0, 0, 1 << 40, 4096, 0, 0);
    h.kick(0, 0);
    assert_eq!(h.take_used_ids(0), [0]);
    // A buffer that runs off the end of RAM.
    h.desc(0, 1, 64 * MIB - 8, 16, 0, 0);
    h.kick(0, 1);
    assert_eq!(h.take_used_ids(0), [1]);
    // A device-writable buffer carries nothing to inflate.
    h.write_pfns(BUFFERS, [0x600]);
    h.desc(0, 2, BUFFERS, 4, F_WRITE, 0);
    h.kick(0, 2);
    assert_eq!(h.take_used_ids(0), [2]);
    // A ragged length: the partial frame number at the end is ignored.
    h.write_pfns(BUFFERS, [0x600, 0x601]);
    h.desc(0, 3, BUFFERS, 7, 0, 0);
    h.kick(0, 3);
    assert_eq!(h.take_used_ids(0), [3]);
    assert_eq!(h.held_pages(), 1);
    // A buffer as long as RAM is read up to the per-chain cap, no further.
    h.desc(0, 4, 0, (MAX_PFNS_PER_CHAIN as u32 + 1) * 4, 0, 0);
    h.kick(0, 4);
    assert_eq!(h.take_used_ids(0), [4]);
    assert_eq!(h.balloon(|b| b.counters().bad_buffers), 3);
    assert!(!h.needs_reset());
    // A head beyond the queue breaks it: the device needs a reset, nothing panics.
    h.kick(0, 200);
    assert!(h.needs_reset());
}

#[test]
fn statistics_are_parsed_kept_and_asked_for_each_period() {
    let mut h = Harness::ready(ALL_FEATURES);
    assert!(h.status.stats().is_none());
    h.post_stats(
        0,
        &[
            (tag::FREE_MEMORY, 10 * MIB),
            (tag::TOTAL_MEMORY, 32 * MIB),
            (tag::AVAILABLE_MEMORY, 12 * MIB),
            (tag::MAJOR_FAULTS, 3),
        ],
    );
    let stats = h.status.stats().unwrap();
    assert_eq!(stats.free, Some(10 * MIB));
    assert_eq!(stats.total, Some(32 * MIB));
    assert_eq!(stats.available, Some(12 * MIB));
    assert_eq!(stats.major_faults, Some(3));
    assert_eq!(stats.swap_in, None);
    assert!(h.take_used_ids(2).is_empty(), "the device keeps the buffer");
    // The period passes: the buffer goes back, so the driver refills it.
    h.transport.serve_timer();
    assert_eq!(h.take_used_ids(2), [0]);
    // Nothing kept: the timer has nothing to give back.
    h.transport.serve_timer();
    assert!(h.take_used_ids(2).is_empty());
    h.post_stats(1, &[(tag::FREE_MEMORY, 9 * MIB)]);
    assert_eq!(h.status.stats().unwrap().free, Some(9 * MIB));
    assert_eq!(
        h.status.stats().unwrap().total,
        None,
        "a report replaces the last"
    );
    // A second buffer while one is kept: the older one goes back.
    h.post_stats(2, &[(tag::FREE_MEMORY, 8 * MIB)]);
    assert_eq!(h.take_used_ids(2), [1]);
    assert!(!h.needs_reset());
}

#[test]
fn a_flood_of_statistics_is_mostly_ignored() {
    let mut h = Harness::ready(ALL_FEATURES);
    let posted = 200;
    for i in 0..posted {
        h.post_stats(
            (i % TEST_QUEUE_SIZE as u32) as u16,
            &[(tag::FREE_MEMORY, i as u64)],
        );
    }
    let counters = h.balloon(|b| b.counters());
    assert_eq!(
        counters.stats_received + counters.stats_ignored,
        posted as u64
    );
    // Every window of a second parses at most STATS_PER_SECOND; the loop above may
    // straddle two windows.
    assert!(
        counters.stats_received <= 2 * STATS_PER_SECOND as u64,
        "{counters:?}"
    );
    assert_eq!(
        h.take_used_ids(2).len(),
        posted as usize - 1,
        "all but one kept buffer back"
    );
}

#[test]
fn reported_free_ranges_are_discarded_but_not_held() {
    let mut h = Harness::ready(ALL_FEATURES);
    h.fill(0x80_0000, 4 * MIB, 0xcd);
    // A chain of two ranges (device-writable, as Linux sends them), one misaligned: it
    // is cut to the whole pages inside it.
    h.write_chain(
        3,
        0,
        &[
            Desc::writable(0x80_0000, 2 * MIB as u32),
            Desc::writable(0xa0_0000 + 100, (MIB + 4096) as u32),
        ],
    );
    h.kick(3, 0);
    assert_eq!(h.take_used_ids(3), [0]);
    assert!(h.all_equal(0x80_0000, 2 * MIB, 0));
    assert!(
        h.all_equal(0xa0_0000, 4096, 0xcd),
        "the partial first page stays"
    );
    assert!(h.all_equal(0xa0_1000, MIB, 0));
    assert_eq!(h.held_pages(), 0, "reported pages are not the balloon's");
    assert_eq!(h.balloon(|b| b.counters().reported_bytes), 2 * MIB + MIB);
    // Ranges that are not RAM, cross its end, or hold no whole page are ignored.
    h.write_chain(
        3,
        2,
        &[
            Desc::writable(1 << 40, 4096),
            Desc::writable(64 * MIB - 4096, 8192),
            Desc::writable(0x80_0010, 100),
        ],
    );
    h.kick(3, 2);
    assert_eq!(h.take_used_ids(3), [2]);
    assert_eq!(h.balloon(|b| b.counters().reports_ignored), 3);
    assert!(!h.needs_reset());
}

#[test]
fn a_flood_of_reports_is_capped_per_second() {
    let mut h = Harness::ready(ALL_FEATURES);
    // Chains of 16 one-page ranges, until well past the rate.
    let chains = REPORTS_PER_SECOND / 16 + 64;
    let ranges: Vec<Desc> = (0..TEST_QUEUE_SIZE as u64)
        .map(|d| Desc::writable((0x800 + d) * 4096, 4096))
        .collect();
    for i in 0..chains {
        h.add_chain(3, 0, &ranges);
        h.notify(3);
        assert_eq!(h.take_used_ids(3), [0], "chain {i}");
    }
    let counters = h.balloon(|b| b.counters());
    let sent = chains as u64 * TEST_QUEUE_SIZE as u64;
    assert_eq!(
        counters.reported_bytes / 4096 + counters.reports_ignored,
        sent
    );
    assert!(counters.reports_ignored > 0, "{counters:?}");
    assert!(counters.reported_bytes / 4096 <= 2 * REPORTS_PER_SECOND as u64);
}

#[test]
fn queues_follow_the_negotiated_features() {
    // Without the statistics queue, queue 2 is the reporting queue.
    let mut h = Harness::ready(feature::REPORTING);
    h.fill(0x80_0000, 4096, 0xcd);
    h.desc(2, 0, 0x80_0000, 4096, F_WRITE, 0);
    h.kick(2, 0);
    assert_eq!(h.take_used_ids(2), [0]);
    assert!(h.all_equal(0x80_0000, 4096, 0));
    // Queue 3 means nothing now: what is posted there is left alone.
    h.desc(3, 0, 0x90_0000, 4096, F_WRITE, 0);
    h.kick(3, 0);
    assert!(h.take_used_ids(3).is_empty());
    // Nor does the timer ask for statistics the driver did not agree to send.
    h.transport.serve_timer();
    assert!(!h.needs_reset());
}

#[test]
fn a_reset_gives_every_page_back() {
    let mut h = Harness::ready(ALL_FEATURES);
    h.send_pfns(0, 0x400..0x600);
    h.post_stats(0, &[(tag::FREE_MEMORY, 1)]);
    assert_eq!(h.held_pages(), 0x200);
    h.write_reg(reg::STATUS, 0);
    assert_eq!(h.held_pages(), 0);
    assert_eq!(h.config_u32(config::ACTUAL), 0);
    assert_eq!(
        h.config_u32(config::NUM_PAGES),
        8192,
        "the host's target stays"
    );
    h.balloon(|b| assert!(b.counters().inflated_pages == 0x200));
}

/// A balloon restored from `state` on `mem`, telling `status` what it holds.
fn restore_balloon(
    mem: &Arc<GuestRam>,
    status: &Arc<BalloonStatus>,
    state: &TransportState,
) -> Result<Box<dyn VirtioDevice>, DeviceStateError> {
    let VirtioDeviceState::Balloon(balloon_state) = &state.device else {
        panic!("not a balloon state");
    };
    let device = Balloon::restore(
        BalloonArgs {
            layout: RamLayout::of(mem),
            status: status.clone(),
            target: 0,
        },
        balloon_state,
    )?;
    Ok(Box::new(device))
}

/// Saves a balloon in the middle of use (pages held, a statistics buffer kept, a
/// period set), sends the state through the snapshot encoding, restores it into a new
/// device on the same memory, and checks that the state is unchanged and the device
/// goes on: the kept buffer comes back at the next period, pages deflate.
pub(crate) fn balloon_state_round_trips() {
    let mut h = Harness::ready(ALL_FEATURES);
    h.send_pfns(0, (0x400..0x500).chain(0x900..0x910));
    h.post_stats(3, &[(tag::FREE_MEMORY, 1)]);
    h.write_reg(reg::CONFIG + config::ACTUAL, 0x110);
    h.balloon(|b| b.set_stats_period(std::time::Duration::from_millis(250)))
        .unwrap();
    let saved = h.transport.save().unwrap();
    let VirtioDeviceState::Balloon(state) = &saved.device else {
        panic!("not a balloon state");
    };
    assert_eq!(state.held.len(), 2);
    assert_eq!(state.stats_head, Some(3));
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let decoded: TransportState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, saved);

    // A new VM: its status starts empty and learns everything from the device.
    let status = Arc::new(BalloonStatus::default());
    let driver = h
        .driver
        .restore(&decoded, |mem| restore_balloon(mem, &status, &decoded))
        .unwrap();
    let mut h = Harness { driver, status };
    assert_eq!(
        h.transport.save().unwrap(),
        saved,
        "a restored device saves the same state"
    );
    assert_eq!(h.status.held_bytes(), 0x110 * 4096);
    assert_eq!(
        h.status.stats_period(),
        std::time::Duration::from_millis(250)
    );
    assert_eq!(h.config_u32(config::ACTUAL), 0x110);
    h.transport.serve_timer();
    assert_eq!(
        h.take_used_ids(2),
        [3],
        "the kept statistics buffer comes back"
    );
    h.send_pfns(1, 0x400..0x500);
    assert_eq!(h.held_pages(), 0x10);
    assert!(!h.needs_reset());
}

#[test]
fn restored_state_that_does_not_fit_is_refused() {
    let mut h = Harness::ready(ALL_FEATURES);
    h.send_pfns(0, 0x400..0x500);
    let saved = h.transport.save().unwrap();
    let mem = h.mem.clone();
    let status = Arc::new(BalloonStatus::default());
    let spoil = |f: &dyn Fn(&mut BalloonState)| {
        let mut bad = saved.clone();
        let VirtioDeviceState::Balloon(state) = &mut bad.device else {
            unreachable!()
        };
        f(state);
        restore_transport(&mem, &bad, |mem| restore_balloon(mem, &status, &bad))
            .err()
            .map(|e| e.to_string())
    };
    type Spoiler<'a> = &'a dyn Fn(&mut BalloonState);
    let cases: [(Spoiler, &str); 6] = [
        (&|s| s.ram_pages += 1, "pages of RAM"),
        (
            &|s| s.held[0].first = 64 * MIB / 4096 - 1,
            "not all guest RAM",
        ),
        (&|s| s.held.push(s.held[0]), "out of order"),
        (&|s| s.stats_head = Some(QUEUE_SIZE), "beyond the queue"),
        (&|s| s.stats_period_ms = 1, "statistics period"),
        (
            &|s| s.acked_features |= feature::FREE_PAGE_HINT,
            "does not offer",
        ),
    ];
    for (spoiler, message) in cases {
        let err = spoil(spoiler).expect("refused");
        assert!(err.contains(message), "{err}");
    }
    let too_many = spoil(&|s| s.num_pages = u32::MAX).expect("refused");
    assert!(too_many.contains("asks to hold"), "{too_many}");
    assert!(restore_transport(&mem, &saved, |mem| restore_balloon(mem, &status, &saved)).is_ok());
}
