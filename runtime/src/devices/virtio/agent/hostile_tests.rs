//! A hostile agent driver: a host-side harness that sets the device up through its MMIO
//! registers like a guest would, then sends garbage, frames with bad headers, CRCs and
//! payloads, frames over the size limit, keys over theirs, buffers outside guest memory
//! and more buffers than the ring holds. Every case must end with the bad part dropped
//! and counted and the channel still working, or in DEVICE_NEEDS_RESET; never a panic,
//! an access outside guest memory or unbounded memory on the host.

use std::sync::Arc;

use luvisor_guest_abi::agent::{kind, Message, HEADER_LEN, MAX_FRAME, MAX_PAYLOAD, MAX_VALUE};
use vm_memory::{Bytes, GuestAddress};

use super::device::{
    Agent, AgentArgs, AgentState, MAX_CHAIN_BYTES, MAX_SEGMENTS, RECEIVE_QUEUE, TRANSMIT_QUEUE,
};
use crate::agent::stream::FrameReader;
use crate::agent::{AgentChannel, HealthState};
use crate::devices::virtio::mmio::{reg, TransportState};
use crate::devices::virtio::test_driver::{
    deref_to_driver, restore_transport, Desc, TestDriver, F_NEXT, F_WRITE,
};
use crate::devices::virtio::{features, DeviceStateError, VirtioDevice, VirtioDeviceState};
use crate::events::EventBus;
use crate::registry::VmId;
use crate::snapshot::Persist;
use crate::vstate::clock::RunClock;
use crate::vstate::memory::GuestRam;

/// Receive buffers, 0x1000 apart, above the driver's rings.
const RX_BUFFERS: u64 = 0x20_0000;
/// Where transmitted bytes are written before they are posted.
const TX_BUFFERS: u64 = 0x40_0000;
const TEST_QUEUE_SIZE: u16 = 16;
const MIB: u64 = 1 << 20;
const RAM: u64 = 16 * MIB;

/// An agent device driven by a [`TestDriver`] (which the harness derefs to), its channel,
/// and the guest's side of the byte streams.
struct Harness {
    driver: TestDriver,
    channel: Arc<AgentChannel>,
    clock: Arc<RunClock>,
    /// Bytes the guest received so far, and the frames they hold.
    received: FrameReader,
    tx_next: u16,
}

deref_to_driver!(Harness);

fn new_channel(clock: &Arc<RunClock>) -> Arc<AgentChannel> {
    let channel = Arc::new(AgentChannel::new(
        VmId(1),
        "hostile",
        clock.clone(),
        Arc::new(EventBus::new()),
    ));
    channel.machine_started();
    channel
}

impl Harness {
    fn new() -> Harness {
        let clock = Arc::new(RunClock::new());
        let channel = new_channel(&clock);
        let driver = TestDriver::new(RAM, |mem| {
            Box::new(
                Agent::new(AgentArgs {
                    channel: channel.clone(),
                    memory: mem.clone(),
                })
                .unwrap(),
            )
        });
        Harness {
            driver,
            channel,
            clock,
            received: FrameReader::new(),
            tx_next: 0,
        }
    }

    /// Set up, with `buffers` receive buffers of `size` bytes posted, and a HELLO sent.
    fn connected(buffers: u16, size: u32) -> Harness {
        let mut h = Harness::new();
        h.setup();
        for i in 0..buffers {
            h.post_rx(i, RX_BUFFERS + i as u64 * 0x1000, size);
        }
        h.send_message(Message::Hello {
            version: 1,
            agent: "hostile",
        });
        h
    }

    fn setup(&mut self) {
        assert_eq!(
            self.offered_features(),
            features::VERSION_1,
            "only VERSION_1 is offered"
        );
        self.set_up(0, TEST_QUEUE_SIZE);
        assert!(!self.needs_reset());
    }

    /// Posts a writable receive buffer and lets the device take it.
    fn post_rx(&mut self, head: u16, addr: u64, len: u32) {
        self.write_desc(RECEIVE_QUEUE, head, Desc::writable(addr, len));
        self.kick(RECEIVE_QUEUE, head);
    }

    /// Sends `bytes` as one transmit buffer and lets the device serve it.
    fn send_bytes(&mut self, bytes: &[u8]) {
        let head = self.tx_next % TEST_QUEUE_SIZE;
        self.tx_next += 1;
        let addr = TX_BUFFERS + head as u64 * 0x2_0000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.write_desc(
            TRANSMIT_QUEUE,
            head,
            Desc::readable(addr, bytes.len() as u32),
        );
        self.kick(TRANSMIT_QUEUE, head);
        let used = self.take_used(TRANSMIT_QUEUE);
        assert_eq!(
            used,
            [(head as u32, 0)],
            "the transmit buffer is given back"
        );
    }

    fn send_message(&mut self, m: Message) {
        self.send_bytes(&frame(m));
    }

    /// Lets the device deliver what waits (as its kick would), then reads every frame
    /// the guest received since the last call, recycling each used receive buffer.
    fn receive(&mut self) -> Vec<(u8, Vec<u8>)> {
        self.transport.process_queue(RECEIVE_QUEUE);
        let mut frames = Vec::new();
        for (id, len) in self.take_used(RECEIVE_QUEUE) {
            let addr = RX_BUFFERS + id as u64 * 0x1000;
            let mut bytes = vec![0u8; len as usize];
            self.mem.read_slice(&mut bytes, GuestAddress(addr)).unwrap();
            self.received
                .push(&bytes, &mut |k, p| frames.push((k, p.to_vec())));
            if len > 0 {
                let size = self.read_desc(RECEIVE_QUEUE, id as u16).len;
                self.post_rx(id as u16, addr, size);
            }
        }
        frames
    }

    fn kinds(&mut self) -> Vec<u8> {
        self.receive().into_iter().map(|(k, _)| k).collect()
    }

    fn agent<R>(&mut self, f: impl FnOnce(&mut Agent) -> R) -> R {
        f(self.device_mut::<Agent>())
    }
}

fn frame(m: Message) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = m.encode_frame(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// A frame with a valid header and CRC around `payload`, whatever it holds.
fn raw_frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut bytes = vec![0u8; HEADER_LEN];
    luvisor_guest_abi::agent::write_header(&mut bytes, kind, payload);
    bytes.extend_from_slice(payload);
    bytes
}

#[test]
fn a_hello_is_answered_through_small_receive_buffers() {
    // Buffers of 8 bytes: every frame spans several.
    let mut h = Harness::connected(8, 8);
    assert_eq!(h.kinds(), [kind::WELCOME, kind::TIME_SET]);
    assert_eq!(h.channel.health().state, HealthState::Ok);
    h.channel.host_set("role", "web").unwrap();
    let frames = h.receive();
    assert_eq!(frames.len(), 1);
    assert_eq!(
        Message::decode(frames[0].0, &frames[0].1),
        Ok(Message::KvpSet {
            key: "role",
            value: "web"
        })
    );
    // A guest that posts no buffer gets nothing, and nothing is lost.
    let mut h = Harness::connected(0, 0);
    assert!(h.kinds().is_empty());
    assert!(h.channel.outbox_len() > 0);
    h.post_rx(0, RX_BUFFERS, 4096);
    assert_eq!(h.kinds(), [kind::WELCOME, kind::TIME_SET]);
    assert!(!h.needs_reset());
}

#[test]
fn malformed_and_oversized_frames_are_dropped_counted_and_the_channel_goes_on() {
    let mut h = Harness::connected(4, 4096);
    h.receive();
    let mut stream = Vec::new();
    // Plain garbage, and garbage that looks like the start of a magic.
    stream.extend_from_slice(b"garbage LVA LV\0\xff");
    // A header announcing more than a frame may hold.
    let mut oversized = frame(Message::ShutdownAck);
    oversized[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    stream.extend_from_slice(&oversized);
    // A bad CRC, a bad version, reserved flags set.
    let mut bad_crc = frame(Message::KvpSet {
        key: "x",
        value: "1",
    });
    *bad_crc.last_mut().unwrap() ^= 0xff;
    stream.extend_from_slice(&bad_crc);
    let mut bad_version = frame(Message::ShutdownAck);
    bad_version[4] = 2;
    stream.extend_from_slice(&bad_version);
    let mut flags = frame(Message::ShutdownAck);
    flags[6] = 1;
    stream.extend_from_slice(&flags);
    // Well-formed frames whose payload does not decode, of an unknown type, or of a
    // type only the host sends.
    stream.extend_from_slice(&raw_frame(kind::KVP_SET, &[200, 0, b'k']));
    stream.extend_from_slice(&raw_frame(0x7f, b"future"));
    stream.extend_from_slice(&frame(Message::Shutdown));
    // Keys that break the limits.
    let big = "v".repeat(MAX_VALUE + 1);
    stream.extend_from_slice(&frame(Message::KvpSet {
        key: "big",
        value: &big,
    }));
    stream.extend_from_slice(&frame(Message::KvpSet {
        key: "bad key",
        value: "1",
    }));
    // And after all that, a good one.
    stream.extend_from_slice(&frame(Message::KvpSet {
        key: "ready",
        value: "1",
    }));
    // In pieces of every size, so the reader resynchronises across buffer boundaries.
    for piece in stream.chunks(7) {
        h.send_bytes(piece);
    }
    let stats = h.channel.stats();
    assert_eq!(h.channel.guest_get("ready").as_deref(), Some("1"));
    assert_eq!(h.channel.guest_get("x"), None);
    assert_eq!(stats.oversized, 1);
    assert_eq!(stats.malformed, 4, "{stats:?}");
    assert_eq!(stats.unknown, 2, "{stats:?}");
    assert_eq!(stats.kvp_refused, 2, "{stats:?}");
    assert!(stats.discarded_bytes >= 16, "{stats:?}");
    assert!(!h.needs_reset());
    // The channel still answers.
    h.channel.host_set("after", "1").unwrap();
    assert_eq!(h.kinds(), [kind::KVP_SET]);
}

#[test]
fn a_frame_of_the_largest_size_is_taken_and_one_byte_more_is_not() {
    let mut h = Harness::connected(4, 4096);
    let output = vec![b'x'; MAX_PAYLOAD - 13];
    let largest = frame(Message::ExecResult {
        id: 1,
        code: 0,
        truncated: false,
        busy: false,
        output: &output,
    });
    assert_eq!(largest.len(), MAX_FRAME);
    h.send_bytes(&largest);
    assert_eq!(h.channel.stats().stale_replies, 1, "a whole frame arrived");
    let mut over = raw_frame(kind::EXEC_RESULT, &vec![0u8; MAX_PAYLOAD + 1]);
    over.truncate(64 * 1024);
    h.send_bytes(&over);
    assert_eq!(h.channel.stats().oversized, 1);
    h.send_message(Message::KvpSet {
        key: "after",
        value: "1",
    });
    assert_eq!(h.channel.guest_get("after").as_deref(), Some("1"));
}

#[test]
fn malformed_buffers_are_given_back_unused() {
    let mut h = Harness::connected(0, 0);
    // A receive buffer the device cannot write, one outside guest memory, one running off
    // the end of RAM: all given back at once, nothing kept.
    h.desc(RECEIVE_QUEUE, 0, RX_BUFFERS, 64, 0, 0);
    h.publish(RECEIVE_QUEUE, 0);
    h.desc(RECEIVE_QUEUE, 1, 1 << 40, 64, F_WRITE, 0);
    h.publish(RECEIVE_QUEUE, 1);
    h.desc(RECEIVE_QUEUE, 2, RAM - 8, 64, F_WRITE, 0);
    h.publish(RECEIVE_QUEUE, 2);
    h.notify(RECEIVE_QUEUE);
    assert_eq!(h.take_used(RECEIVE_QUEUE), [(0, 0), (1, 0), (2, 0)]);
    assert_eq!(h.agent(|a| a.kept_buffers()), 0);
    // A chain with more writable parts than the device uses: only the first ones fill.
    for i in 0..(MAX_SEGMENTS as u16 + 2).min(TEST_QUEUE_SIZE - 1) {
        h.desc(
            RECEIVE_QUEUE,
            i,
            RX_BUFFERS + i as u64 * 0x1000,
            1,
            F_WRITE | F_NEXT,
            i + 1,
        );
    }
    h.desc(
        RECEIVE_QUEUE,
        TEST_QUEUE_SIZE - 1,
        RX_BUFFERS,
        1,
        F_WRITE,
        0,
    );
    h.publish(RECEIVE_QUEUE, 0);
    h.notify(RECEIVE_QUEUE);
    let used = h.take_used(RECEIVE_QUEUE);
    assert_eq!(used.len(), 1);
    assert!(used[0].1 as usize <= MAX_SEGMENTS, "{used:?}");
    // Transmit buffers outside memory, write-only ones, and one longer than the cap: read
    // no further, given back.
    h.desc(TRANSMIT_QUEUE, 0, 1 << 40, 64, 0, 0);
    h.publish(TRANSMIT_QUEUE, 0);
    h.desc(TRANSMIT_QUEUE, 1, TX_BUFFERS, 64, F_WRITE, 0);
    h.publish(TRANSMIT_QUEUE, 1);
    h.desc(TRANSMIT_QUEUE, 2, 0, (MAX_CHAIN_BYTES * 2) as u32, 0, 0);
    h.publish(TRANSMIT_QUEUE, 2);
    h.notify(TRANSMIT_QUEUE);
    assert_eq!(h.take_used(TRANSMIT_QUEUE).len(), 3);
    assert!(h.channel.stats().bad_buffers >= 5);
    assert!(!h.needs_reset());
    // A head beyond the queue breaks it: the device needs a reset, nothing panics.
    h.publish(TRANSMIT_QUEUE, 200);
    h.notify(TRANSMIT_QUEUE);
    assert!(h.needs_reset());
}

#[test]
fn a_driver_that_reposts_buffers_cannot_make_the_device_keep_more_than_a_ring() {
    let mut h = Harness::connected(0, 0);
    for _ in 0..5 {
        for head in 0..TEST_QUEUE_SIZE {
            h.desc(RECEIVE_QUEUE, head, RX_BUFFERS, 64, F_WRITE, 0);
            h.publish(RECEIVE_QUEUE, head);
        }
        h.notify(RECEIVE_QUEUE);
    }
    assert_eq!(h.agent(|a| a.kept_buffers()), TEST_QUEUE_SIZE as usize);
    assert_eq!(
        h.take_used(RECEIVE_QUEUE).len(),
        4 * TEST_QUEUE_SIZE as usize,
        "the excess went back unused"
    );
}

#[test]
fn the_heartbeat_timer_pings_and_a_reset_ends_the_session() {
    let mut h = Harness::connected(4, 4096);
    h.receive();
    h.transport.serve_timer();
    assert_eq!(h.kinds(), [kind::PING]);
    h.send_message(Message::Pong {
        seq: 1,
        uptime_ms: 5,
        time_generation: 1,
        guest_time_us: 1,
    });
    assert_eq!(h.channel.stats().pongs, 1);
    assert_eq!(h.channel.stats().time_generation_applied, 1);
    h.write_reg(reg::STATUS, 0);
    assert!(h.channel.session().is_none());
    assert_eq!(h.agent(|a| a.kept_buffers()), 0);
    h.transport.serve_timer();
    assert_eq!(h.channel.outbox_len(), 0, "no session, no ping");
}

/// Saves a device with a session, kept buffers, half a frame from the guest and bytes
/// waiting for it; restores it into a new machine (with a new channel) and checks both
/// halves finish.
pub(crate) fn agent_state_round_trips() {
    let mut h = Harness::connected(2, 4096);
    h.receive();
    h.send_message(Message::KvpSet {
        key: "boot_id",
        value: "b1",
    });
    h.channel.host_set("role", "db").unwrap();
    // Half a frame from the guest.
    let pending = frame(Message::KvpSet {
        key: "ready",
        value: "1",
    });
    h.send_bytes(&pending[..10]);
    // The device kept the buffers recycled by `receive`; take what waits only later.
    let saved = h.transport.save().unwrap();
    let VirtioDeviceState::Agent(state) = &saved.device else {
        panic!("not an agent state");
    };
    assert_eq!(state.partial_frame.len(), 10);
    assert!(!state.rx_buffers.is_empty());
    assert!(!state.channel.outbox.is_empty());
    let bytes = postcard::to_stdvec(&saved).unwrap();
    let decoded: TransportState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, saved);

    let Harness {
        driver,
        clock,
        received,
        tx_next,
        ..
    } = h;
    let channel = new_channel(&clock);
    let driver = driver
        .restore(&decoded, |mem| restore_agent(mem, &channel, &decoded))
        .unwrap();
    let mut h = Harness {
        driver,
        channel,
        clock,
        received,
        tx_next,
    };
    assert_eq!(
        h.transport.save().unwrap(),
        saved,
        "a restored device saves the same"
    );
    assert_eq!(h.channel.guest_get("boot_id").as_deref(), Some("b1"));
    assert_eq!(h.channel.host_get("role").as_deref(), Some("db"));
    h.send_bytes(&pending[10..]);
    assert_eq!(h.channel.guest_get("ready").as_deref(), Some("1"));
    assert_eq!(h.kinds(), [kind::KVP_SET], "the waiting bytes arrive");
    assert!(!h.needs_reset());
}

/// An agent device restored from `state` on `mem`, serving `channel`.
fn restore_agent(
    mem: &Arc<GuestRam>,
    channel: &Arc<AgentChannel>,
    state: &TransportState,
) -> Result<Box<dyn VirtioDevice>, DeviceStateError> {
    let VirtioDeviceState::Agent(agent_state) = &state.device else {
        panic!("not an agent state");
    };
    let agent = Agent::restore(
        AgentArgs {
            channel: channel.clone(),
            memory: mem.clone(),
        },
        agent_state,
    )?;
    Ok(Box::new(agent))
}

#[test]
fn restored_state_that_does_not_fit_is_refused() {
    let mut h = Harness::connected(2, 4096);
    h.receive();
    let saved = h.transport.save().unwrap();
    let spoil = |f: &dyn Fn(&mut AgentState)| {
        let mut bad = saved.clone();
        let VirtioDeviceState::Agent(state) = &mut bad.device else {
            unreachable!()
        };
        f(state);
        let channel = new_channel(&h.clock);
        restore_transport(&h.mem, &bad, |mem| restore_agent(mem, &channel, &bad))
            .err()
            .map(|e| e.to_string())
    };
    let outside = spoil(&|s| s.rx_buffers[0].segments[0].0 = 1 << 40).unwrap();
    assert!(outside.contains("outside guest memory"), "{outside}");
    assert!(spoil(&|s| s.rx_buffers[0].head = 999).is_some());
    assert!(spoil(&|s| s.rx_buffers[0].segments = vec![(0, 1); MAX_SEGMENTS + 1]).is_some());
    assert!(spoil(&|s| s.acked_features |= 1 << 1).is_some());
    assert!(spoil(&|s| s.partial_frame = vec![0; MAX_FRAME + 1]).is_some());
    let key = spoil(&|s| s.channel.guest_kvp.push(("bad key".into(), "1".into()))).unwrap();
    assert!(key.contains("guest key"), "{key}");
    assert!(spoil(&|_| ()).is_none(), "the unspoilt state restores");
}
