//! A hostile driver: a host-side harness that sets the device up through its MMIO
//! registers like a guest would, then writes malformed descriptor chains and rings
//! straight into guest memory. Every case must end in an error status, a zero-length
//! used entry or DEVICE_NEEDS_RESET, never a panic or an access outside guest memory.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::device::{feature, Block};
use super::request::{S_IOERR, S_OK, S_UNSUPP, T_GET_ID, T_IN, T_OUT};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::reg;
use crate::devices::virtio::mmio::TransportState;
use crate::devices::virtio::test_driver::restore_transport;
use crate::devices::virtio::test_driver::{
    deref_to_driver, Desc, QueueLayout, TestDriver, F_INDIRECT, F_NEXT, F_WRITE, RINGS,
};
use crate::devices::virtio::{status, DeviceStateError, VirtioDevice, VirtioDeviceState};
use crate::snapshot::Persist;
use crate::storage::{Disk, DiskStats};

/// virtio-blk's only queue.
const REQUESTS: usize = 0;
/// Where the driver puts the request queue's descriptor table.
const DESC: u64 = RINGS;
const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const QUEUE_SIZE: u16 = 16;
/// Every feature a driver could want.
const WANTED: u64 = feature::FLUSH | feature::RO | feature::DISCARD | feature::WRITE_ZEROES;

/// A disk device driven by a [`TestDriver`] (which the harness derefs to), with its image
/// on the host and its I/O counters.
struct Harness {
    driver: TestDriver,
    stats: Arc<DiskStats>,
    disk_path: PathBuf,
}

deref_to_driver!(Harness);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("luvisor-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_file(&path);
    path
}

impl Harness {
    fn new(name: &str, readonly: bool, memory: u64) -> Harness {
        let disk_path = scratch(name);
        std::fs::write(&disk_path, vec![0x5Au8; 1 << 20]).unwrap();
        let disk = Disk::open(&disk_path, readonly).unwrap();
        let backend = disk.attach().unwrap();
        let driver = TestDriver::new(memory, |_| Box::new(Block::new(&disk, backend)));
        Harness {
            driver,
            stats: disk.stats().clone(),
            disk_path,
        }
    }

    /// The standard driver setup, with queue parameters the test may spoil.
    fn setup(&mut self, size: u16, desc_table: u64) {
        self.acknowledge();
        self.negotiate(WANTED);
        let layout = QueueLayout {
            desc_table,
            ..QueueLayout::default_for(REQUESTS)
        };
        self.setup_queue_at(REQUESTS, size, layout);
        self.driver_ok();
    }

    fn ready(name: &str) -> Harness {
        let mut h = Harness::new(name, false, 16 << 20);
        h.setup(QUEUE_SIZE, DESC);
        assert!(!h.needs_reset());
        h
    }

    /// Writes descriptor `index` of the request queue, whatever it holds.
    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        self.driver.desc(REQUESTS, index, addr, len, flags, next);
    }

    /// Publishes `head` on the request queue and lets the device run.
    fn kick(&mut self, head: u16) {
        self.driver.kick(REQUESTS, head);
    }

    /// The request queue's newest used entry: (descriptor id, length).
    fn last_used(&self) -> (u32, u32) {
        self.driver.last_used(REQUESTS)
    }

    /// Writes `descs` as a chain from descriptor 0, publishes it and lets the device run.
    fn request(&mut self, descs: &[Desc]) {
        self.write_chain(REQUESTS, 0, descs);
        self.kick(0);
    }

    fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
        self.mem
            .write_obj(sector, GuestAddress(HEADER + 8))
            .unwrap();
        self.mem.write_obj(0xEEu8, GuestAddress(STATUS)).unwrap();
    }

    fn status_byte(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A well-formed 1-sector read; proves the device still works.
    fn good_read(&mut self) {
        self.header(T_IN, 1);
        self.request(&[
            Desc::readable(HEADER, 16),
            Desc::writable(DATA, 512),
            Desc::writable(STATUS, 1),
        ]);
        assert_eq!(self.last_used(), (0, 513));
        assert_eq!(self.status_byte(), S_OK);
        let data: [u8; 4] = self.mem.read_obj(GuestAddress(DATA)).unwrap();
        assert_eq!(data, [0x5A; 4]);
    }
}

#[test]
fn well_formed_requests_work() {
    let mut h = Harness::ready("good.img");
    h.good_read();
    assert!(
        h.interrupts.load(Ordering::SeqCst) > 0,
        "completion raised the interrupt"
    );
    h.header(T_GET_ID, 0);
    h.request(&[
        Desc::readable(HEADER, 16),
        Desc::writable(DATA, 4), // shorter than the 20-byte id: truncated
        Desc::writable(STATUS, 1),
    ]);
    assert_eq!(h.status_byte(), S_OK);
    let id: [u8; 4] = h.mem.read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"good");
}

#[test]
fn any_descriptor_layout_works() {
    let mut h = Harness::ready("layout.img");
    // The header split in two, the data in two pieces, the status byte sharing the second
    // data descriptor (virtio 1.2 2.7.4.2: the device must not assume a layout).
    h.header(T_IN, 1);
    h.desc(0, HEADER, 10, F_NEXT, 1);
    h.desc(1, HEADER + 10, 6, F_NEXT, 2);
    h.desc(2, DATA, 300, F_WRITE | F_NEXT, 3);
    h.desc(3, DATA + 300, 213, F_WRITE, 0);
    h.mem.write_obj(0xEEu8, GuestAddress(DATA + 512)).unwrap();
    h.kick(0);
    assert_eq!(h.last_used(), (0, 513));
    let status: u8 = h.mem.read_obj(GuestAddress(DATA + 512)).unwrap();
    assert_eq!(status, S_OK);
    let mut data = [0u8; 512];
    h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0x5A; 512], "both data pieces filled from the disk");

    // A write whose data shares the header's descriptor, then read back.
    h.mem
        .write_slice(&[0xC3; 512], GuestAddress(HEADER + 16))
        .unwrap();
    h.header(T_OUT, 2);
    h.desc(0, HEADER, 16 + 512, F_NEXT, 1);
    h.desc(1, STATUS, 1, F_WRITE, 0);
    h.kick(0);
    assert_eq!((h.last_used(), h.status_byte()), ((0, 1), S_OK));
    h.header(T_IN, 2);
    h.desc(0, HEADER, 16, F_NEXT, 1);
    h.desc(1, DATA, 513, F_WRITE, 0);
    h.kick(0);
    h.mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert_eq!(data, [0xC3; 512]);
    assert_eq!(h.stats.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn buffers_outside_guest_memory() {
    let mut h = Harness::ready("outside.img");
    h.header(T_IN, 0);
    h.desc(0, HEADER, 16, F_NEXT, 1);
    h.desc(1, 0xFFFF_0000_0000, 512, F_WRITE | F_NEXT, 2);
    h.desc(2, STATUS, 1, F_WRITE, 0);
    h.kick(0);
    assert_eq!(
        h.last_used(),
        (0, 0),
        "no status can be trusted: used length 0"
    );
    // A buffer that starts inside and runs past the end of memory.
    h.desc(1, (16 << 20) - 256, 512, F_WRITE | F_NEXT, 2);
    h.kick(0);
    assert_eq!(h.last_used(), (0, 0));
    // The status byte itself outside memory.
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    h.desc(2, u64::MAX - 1, 1, F_WRITE, 0);
    h.kick(0);
    assert_eq!(h.last_used(), (0, 0));
    assert_eq!(h.stats.snapshot().errors, 3);
    assert!(!h.needs_reset());
    h.good_read();
}

#[test]
fn descriptor_loops_end() {
    let mut h = Harness::ready("loop.img");
    h.header(T_IN, 0);
    h.desc(0, HEADER, 16, F_NEXT, 1);
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, 0); // back to the head, forever
    h.kick(0);
    let (id, _) = h.last_used();
    assert_eq!(id, 0, "the looping chain was consumed");
    // A self-loop of readable descriptors has no status byte at all.
    h.desc(0, HEADER, 16, F_NEXT, 0);
    h.kick(0);
    assert_eq!(h.last_used(), (0, 0));
    h.good_read();
}

#[test]
fn oversized_and_misaligned_transfers() {
    let mut h = Harness::new("big.img", false, 64 << 20);
    h.setup(QUEUE_SIZE, DESC);
    // 40 MiB read: inside guest memory (above the rings), but beyond the device's
    // transfer limit.
    h.header(T_IN, 0);
    h.desc(0, HEADER, 16, F_NEXT, 1);
    h.desc(1, 0x20_0000, 40 << 20, F_WRITE | F_NEXT, 2);
    h.desc(2, STATUS, 1, F_WRITE, 0);
    h.kick(0);
    assert_eq!(h.status_byte(), S_IOERR);
    // Half a sector.
    h.desc(1, DATA, 100, F_WRITE | F_NEXT, 2);
    h.kick(0);
    assert_eq!(h.status_byte(), S_IOERR);
    // Past the end of the 1 MiB disk, and a sector number that overflows.
    h.desc(1, DATA, 512, F_WRITE | F_NEXT, 2);
    h.header(T_IN, 2048);
    h.kick(0);
    assert_eq!(h.status_byte(), S_IOERR);
    h.header(T_IN, u64::MAX / 2);
    h.kick(0);
    assert_eq!(h.status_byte(), S_IOERR);
    // A header shorter than 16 bytes.
    h.desc(0, HEADER, 8, F_NEXT, 1);
    h.kick(0);
    assert_eq!(h.status_byte(), S_IOERR);
    assert_eq!(h.stats.snapshot().errors, 5);
    h.desc(0, HEADER, 16, F_NEXT, 1);
    h.good_read();
}

#[test]
fn more_segments_than_seg_max() {
    let mut h = Harness::new("segments.img", false, 16 << 20);
    h.setup(256, DESC);
    h.header(T_IN, 0);
    h.desc(0, HEADER, 16, F_NEXT, 1);
    for i in 1..=140u16 {
        h.desc(i, DATA + (i as u64 - 1) * 512, 512, F_WRITE | F_NEXT, i + 1);
    }
    h.desc(141, STATUS, 1, F_WRITE, 0);
    h.kick(0);
    assert_eq!(h.status_byte(), S_IOERR);
    assert_eq!(h.stats.snapshot().errors, 1);
}

#[test]
fn unknown_requests_are_unsupported() {
    let mut h = Harness::ready("unsupp.img");
    h.header(99, 0);
    h.request(&[Desc::readable(HEADER, 16), Desc::writable(STATUS, 1)]);
    assert_eq!(h.status_byte(), S_UNSUPP);
}

#[test]
fn indirect_tables_outside_memory() {
    let mut h = Harness::ready("indirect.img");
    h.desc(0, 0xFFFF_FFFF_0000, 64, F_INDIRECT, 0);
    h.kick(0);
    h.desc(0, DATA, 17, F_INDIRECT, 0); // not a multiple of the descriptor size
    h.kick(0);
    h.good_read();
}

#[test]
fn read_only_disks_reject_writes() {
    let mut h = Harness::new("ro.img", true, 16 << 20);
    h.setup(QUEUE_SIZE, DESC);
    h.mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    h.header(T_OUT, 0);
    h.request(&[
        Desc::readable(HEADER, 16),
        Desc::readable(DATA, 512),
        Desc::writable(STATUS, 1),
    ]);
    assert_eq!(h.status_byte(), S_IOERR);
    assert_eq!(h.stats.snapshot().errors, 1);
    assert_eq!(
        std::fs::read(&h.disk_path).unwrap(),
        vec![0x5A; 1 << 20],
        "the image is unchanged"
    );
}

#[test]
fn bogus_available_index_needs_reset() {
    let mut h = Harness::ready("avail.img");
    let avail_idx = h.layout(REQUESTS).avail_idx();
    h.mem.write_obj(1000u16, avail_idx).unwrap();
    h.notify(REQUESTS);
    assert!(h.needs_reset());
    // Further notifications are ignored until the driver resets the device (and return
    // at once: a broken queue is never polled).
    h.notify(REQUESTS);
    h.write_reg(reg::STATUS, 0);
    assert_eq!(h.read_reg(reg::STATUS), 0);
    h.forget_rings();
    h.setup(QUEUE_SIZE, DESC);
    assert!(!h.needs_reset());
    h.good_read();
}

#[test]
fn head_index_out_of_range() {
    for head in [500, QUEUE_SIZE] {
        let mut h = Harness::ready("head.img");
        h.kick(head);
        assert!(h.needs_reset(), "head {head} would block the queue forever");
    }
}

#[test]
fn bad_queue_setup_needs_reset() {
    for size in [0u16, 3, 1024] {
        let mut h = Harness::new("size.img", false, 16 << 20);
        h.setup(size, DESC);
        assert!(h.needs_reset(), "queue size {size}");
    }
    let mut h = Harness::new("desc.img", false, 16 << 20);
    h.setup(QUEUE_SIZE, 1 << 40); // descriptor table outside guest memory
    assert!(h.needs_reset());
    h.notify(REQUESTS);
}

#[test]
fn features_must_be_a_subset_with_version_1() {
    let mut h = Harness::new("features.img", false, 16 << 20);
    h.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    h.write_reg(reg::DRIVER_FEATURES_SEL, 0);
    h.write_reg(reg::DRIVER_FEATURES, 1 << 28); // a feature the device never offered
    h.write_reg(
        reg::STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(h.read_reg(reg::STATUS) & status::FEATURES_OK, 0);
    // Registers read back sanely even with odd access sizes.
    let mut b = [0u8; 2];
    h.transport.read(reg::MAGIC, &mut b);
    assert_eq!(b, [0, 0]);
    let mut cap = [0u8; 8];
    h.transport.read(reg::CONFIG, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    let mut beyond = [0xFFu8; 8];
    h.transport.read(reg::CONFIG + 4000, &mut beyond);
    assert_eq!(beyond, [0; 8]);
}

#[test]
fn a_reset_leaves_no_no_notify_behind() {
    let mut h = Harness::ready("no-notify.img");
    let used_flags = h.layout(REQUESTS).used_flags();
    h.mem.write_obj(1u16, used_flags).unwrap();
    h.write_reg(reg::STATUS, 0);
    assert_eq!(h.mem.read_obj::<u16>(used_flags).unwrap(), 0);
}

/// A block device restored from `state` over the image at `disk_path`.
fn restore_block(
    disk_path: &Path,
    state: &TransportState,
) -> Result<Box<dyn VirtioDevice>, DeviceStateError> {
    let disk = Disk::open(disk_path, false).unwrap();
    let VirtioDeviceState::Block(block_state) = &state.device else {
        panic!("not a block state");
    };
    let device = Block::restore_from(&disk, disk.attach().unwrap(), block_state)?;
    Ok(Box::new(device))
}

/// Saves a block device and its transport in the middle of use, sends the state through
/// the snapshot encoding, restores it into a new device on the same memory, and checks
/// that the state is unchanged and that the device goes on serving the same queue.
pub(crate) fn block_state_round_trips() {
    let mut h = Harness::ready("round-trip.img");
    h.good_read();
    h.good_read();
    let saved = h.transport.save().unwrap();
    assert_eq!(saved.queues[0].next_avail, 2);
    assert_ne!(saved.interrupt_status, 0, "the interrupt was left pending");
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let decoded: TransportState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, saved);

    let Harness {
        driver,
        stats,
        disk_path,
    } = h;
    // The image's lock goes with the old device, which the driver drops first.
    let driver = driver
        .restore(&decoded, |_| restore_block(&disk_path, &decoded))
        .unwrap();
    let mut h = Harness {
        driver,
        stats,
        disk_path,
    };
    assert_eq!(
        h.transport.save().unwrap(),
        saved,
        "a restored device saves the same state"
    );
    assert!(!h.needs_reset());
    h.good_read();
    assert_eq!(h.last_used(), (0, 513));
}

#[test]
fn restored_state_that_does_not_fit_the_device_is_refused() {
    let mut h = Harness::ready("refused.img");
    h.good_read();
    let saved = h.transport.save().unwrap();
    let mem = h.mem.clone();
    let disk_path = h.disk_path.clone();
    // The image's lock goes with the old device.
    drop(h);
    let restore = |state: &TransportState| {
        restore_transport(&mem, state, |_| restore_block(&disk_path, state)).map(|_| ())
    };
    let mut bad = saved.clone();
    bad.queues[0].used_ring = 1 << 40;
    assert!(restore(&bad)
        .unwrap_err()
        .to_string()
        .contains("not inside guest memory"));
    let mut bad = saved.clone();
    bad.queues[0].size = 3;
    assert!(
        restore(&bad).is_err(),
        "a queue size that is not a power of two"
    );
    let mut bad = saved.clone();
    bad.queues.push(bad.queues[0].clone());
    assert!(restore(&bad)
        .unwrap_err()
        .to_string()
        .contains("2 queues saved"));
    let mut bad = saved.clone();
    let VirtioDeviceState::Block(block) = &mut bad.device else {
        panic!("not a block state");
    };
    block.capacity_sectors += 1;
    assert!(restore(&bad).unwrap_err().to_string().contains("sectors"));
    restore(&saved).unwrap();
}
