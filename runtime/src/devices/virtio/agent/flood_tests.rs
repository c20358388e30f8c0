//! A hostile agent driver that floods the transmit queue: 16-byte frame headers back to
//! back, each accepted and each announcing 64 KiB, in chains of the largest size the
//! device reads. The host's work must stay linear in the bytes sent, one call must read
//! a bounded amount before it returns to the event loop (where a stop, pause or
//! snapshot waits), and what it left must still be served afterwards.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use luvisor_guest_abi::agent::{Message, HEADER_LEN, MAX_FRAME, MAX_PAYLOAD};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{
    Agent, AgentArgs, MAX_CHAIN_BYTES, MAX_SERVE_BYTES, QUEUE_COUNT, RECEIVE_QUEUE, TRANSMIT_QUEUE,
};
use crate::agent::AgentChannel;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::{reg, MmioTransport};
use crate::devices::virtio::{status, VirtioDevice, VirtioInterrupt};
use crate::events::EventBus;
use crate::registry::VmId;
use crate::vstate::clock::RunClock;
use crate::vstate::memory::{create_ram, GuestRam};

const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;
/// The transmit queue's rings: descriptors, the available ring 0x1000 on, the used ring
/// 0x2000 on.
const TX_DESC: u64 = 0x10_0000;
const TX_AVAIL: u64 = TX_DESC + 0x1000;
const TX_USED: u64 = TX_DESC + 0x2000;
/// The flood's bytes: one region every chain points at (the device only reads it).
const FLOOD: u64 = 0x40_0000;
const QUEUE_SIZE: u16 = 16;

fn channel() -> Arc<AgentChannel> {
    let channel = Arc::new(AgentChannel::new(
        VmId(1),
        "flood",
        Arc::new(RunClock::new()),
        Arc::new(EventBus::new()),
    ));
    channel.machine_started();
    channel
}

fn frame(m: Message) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = m.encode_frame(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// Writes `MAX_CHAIN_BYTES` of back-to-back headers at [`FLOOD`], each announcing the
/// largest payload (whose CRC, over the headers after it, does not match).
fn write_flood(mem: &GuestRam) {
    let mut header = frame(Message::Shutdown);
    header[8..12].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
    assert_eq!(header.len(), HEADER_LEN);
    let flood: Vec<u8> = header
        .iter()
        .copied()
        .cycle()
        .take(MAX_CHAIN_BYTES as usize)
        .collect();
    mem.write_slice(&flood, GuestAddress(FLOOD)).unwrap();
}

/// Publishes `chains` transmit chains, one descriptor of `MAX_CHAIN_BYTES` each, all
/// over the flood, from available index `from`.
fn post_flood(mem: &GuestRam, from: u16, chains: u16) {
    for i in 0..chains {
        let head = (from + i) % QUEUE_SIZE;
        let at = GuestAddress(TX_DESC + head as u64 * 16);
        mem.write_obj(FLOOD, at).unwrap();
        mem.write_obj(MAX_CHAIN_BYTES as u32, at.unchecked_add(8))
            .unwrap();
        mem.write_obj(0u16, at.unchecked_add(12)).unwrap();
        mem.write_obj(0u16, at.unchecked_add(14)).unwrap();
        let slot = (from + i) % QUEUE_SIZE;
        mem.write_obj(head, GuestAddress(TX_AVAIL + 4 + slot as u64 * 2))
            .unwrap();
    }
    mem.write_obj(from.wrapping_add(chains), GuestAddress(TX_AVAIL + 2))
        .unwrap();
}

fn used_idx(mem: &GuestRam) -> u16 {
    mem.read_obj(GuestAddress(TX_USED + 2)).unwrap()
}

/// A full ring of flood chains (4 MiB): one device call reads at most its byte budget,
/// the rest is served by the calls after it, and the stream costs one CRC per frame
/// announced, not one per header.
#[test]
fn one_call_reads_a_bounded_amount_of_a_transmit_flood() {
    let mem = Arc::new(create_ram(RAM).unwrap());
    write_flood(&mem);
    let channel = channel();
    let mut agent = Agent::new(AgentArgs {
        channel: channel.clone(),
        memory: mem.clone(),
    })
    .unwrap();
    agent.activate(crate::devices::virtio::features::VERSION_1);
    let mut queue = Queue::new(QUEUE_SIZE).unwrap();
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(TX_DESC as u32), Some(0));
    queue.set_avail_ring_address(Some(TX_AVAIL as u32), Some(0));
    queue.set_used_ring_address(Some(TX_USED as u32), Some(0));
    queue.set_ready(true);
    post_flood(&mem, 0, QUEUE_SIZE);

    let per_call = (MAX_SERVE_BYTES / MAX_CHAIN_BYTES) as u16;
    assert!(per_call < QUEUE_SIZE, "the test needs more than one call");
    let mut calls = 0;
    while queue.next_avail() != QUEUE_SIZE {
        let before = queue.next_avail();
        assert!(agent
            .process_queue(TRANSMIT_QUEUE, &mut queue, &mem)
            .unwrap());
        let read = queue.next_avail() - before;
        assert!(read > 0, "every call makes progress");
        assert!(
            read as u64 * MAX_CHAIN_BYTES <= MAX_SERVE_BYTES + MAX_CHAIN_BYTES,
            "one call read {read} chains"
        );
        calls += 1;
    }
    assert_eq!(calls, QUEUE_SIZE.div_ceil(per_call));
    assert_eq!(used_idx(&mem), QUEUE_SIZE, "every chain is given back");
    let stats = channel.stats();
    let sent = QUEUE_SIZE as u64 * MAX_CHAIN_BYTES;
    assert_eq!(stats.malformed, sent / MAX_FRAME as u64);
    assert_eq!(stats.discarded_bytes, sent);
}

/// Through the transport: after each call the flood is either served whole, or the
/// queue's notification eventfd is set, so the event loop comes back for the rest after
/// it had its turn. The channel works afterwards.
#[test]
fn the_transport_comes_back_for_what_a_flood_left_in_the_ring() {
    let mem = Arc::new(create_ram(RAM).unwrap());
    write_flood(&mem);
    let channel = channel();
    let agent = Agent::new(AgentArgs {
        channel: channel.clone(),
        memory: mem.clone(),
    })
    .unwrap();
    let queue_events: Vec<EventFd> = (0..QUEUE_COUNT)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let tx_event = queue_events[TRANSMIT_QUEUE].try_clone().unwrap();
    let counter = Arc::new(AtomicUsize::new(0));
    let interrupt = Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).unwrap(),
        Box::new(move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }),
    ));
    let mut transport = MmioTransport::new(Box::new(agent), mem.clone(), queue_events, interrupt);
    fn write(transport: &mut MmioTransport, offset: u64, value: u32) {
        transport.write(offset, &value.to_le_bytes());
    }
    let driver = status::ACKNOWLEDGE | status::DRIVER;
    write(&mut transport, reg::STATUS, driver);
    write(&mut transport, reg::DRIVER_FEATURES_SEL, 1);
    write(&mut transport, reg::DRIVER_FEATURES, 1);
    write(&mut transport, reg::STATUS, driver | status::FEATURES_OK);
    for (queue, desc) in [(RECEIVE_QUEUE, 0x18_0000u64), (TRANSMIT_QUEUE, TX_DESC)] {
        write(&mut transport, reg::QUEUE_SEL, queue as u32);
        write(&mut transport, reg::QUEUE_NUM, QUEUE_SIZE as u32);
        write(&mut transport, reg::QUEUE_DESC_LOW, desc as u32);
        write(
            &mut transport,
            reg::QUEUE_DRIVER_LOW,
            (desc + 0x1000) as u32,
        );
        write(
            &mut transport,
            reg::QUEUE_DEVICE_LOW,
            (desc + 0x2000) as u32,
        );
        write(&mut transport, reg::QUEUE_READY, 1);
    }
    write(
        &mut transport,
        reg::STATUS,
        driver | status::FEATURES_OK | status::DRIVER_OK,
    );

    post_flood(&mem, 0, QUEUE_SIZE);
    loop {
        transport.process_queue(TRANSMIT_QUEUE);
        if used_idx(&mem) == QUEUE_SIZE {
            break;
        }
        // Chains are left: the transport must have asked to be called again.
        assert!(
            tx_event.read().is_ok(),
            "{} chains left and no self-notification",
            QUEUE_SIZE - used_idx(&mem)
        );
    }
    let sent = QUEUE_SIZE as u64 * MAX_CHAIN_BYTES;
    assert_eq!(channel.stats().malformed, sent / MAX_FRAME as u64);

    // Back in step: a HELLO after the flood starts a session.
    let hello = frame(Message::Hello {
        version: 1,
        agent: "after",
    });
    mem.write_slice(&hello, GuestAddress(FLOOD)).unwrap();
    let at = GuestAddress(TX_DESC);
    mem.write_obj(hello.len() as u32, at.unchecked_add(8))
        .unwrap();
    mem.write_obj(0u16, GuestAddress(TX_AVAIL + 4)).unwrap();
    mem.write_obj(QUEUE_SIZE + 1, GuestAddress(TX_AVAIL + 2))
        .unwrap();
    transport.process_queue(TRANSMIT_QUEUE);
    assert_eq!(used_idx(&mem), QUEUE_SIZE + 1);
    assert_eq!(channel.session().unwrap().agent, "after");
}
