//! The agent device: a virtio-console (virtio 1.2, 5.3) with one port and no optional
//! features, whose byte streams carry the agent protocol.
//!
//! - **receiveq (0)**, host → guest: the driver posts writable buffers. The device takes
//!   each one off the ring at once and keeps it (at most one ring's worth), then fills
//!   kept buffers from the channel's outbox whenever it has bytes: after a control call
//!   kicks the queue's eventfd, after the guest sent something that got an answer, and
//!   on the heartbeat timer.
//! - **transmitq (1)**, guest → host: every readable byte goes through the
//!   [`FrameReader`], and each frame to the [`AgentChannel`]; the buffer is given back at
//!   once.
//!
//! The guest is not trusted: kept buffers are checked against guest memory when taken,
//! at most [`MAX_SEGMENTS`] parts of each are used, at most [`MAX_CHAIN_BYTES`] are read
//! from one transmit chain, and at most one ring's worth of chains, and of transmit
//! chains at most [`MAX_SERVE_BYTES`], is served per call: the event thread must get back
//! to its loop often, since a stop, pause or snapshot waits for it there. What is left
//! stays in the ring, and the transport serves it next (at once, or after a
//! self-notification that gives the event loop its turn first).

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::agent::channel::ChannelSnapshot;
use crate::agent::stream::FrameReader;
use crate::agent::{AgentChannel, HEARTBEAT_INTERVAL};
use crate::devices::virtio::timer::DeviceTimer;
use crate::devices::virtio::{
    features, next_chain, DeviceStateError, QueueError, VirtioDevice, VirtioDeviceState,
};
use crate::snapshot::Persist;
use crate::vstate::memory::GuestRam;

/// virtio device ID of a console.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;
/// Port 0's receive queue (host → guest) and transmit queue (guest → host).
pub const RECEIVE_QUEUE: usize = 0;
pub const TRANSMIT_QUEUE: usize = 1;
pub const QUEUE_COUNT: usize = 2;
/// Writable parts of one receive buffer the device uses; the rest are left unwritten.
pub const MAX_SEGMENTS: usize = 16;
/// Bytes read from one transmit chain; the rest is dropped and counted.
pub const MAX_CHAIN_BYTES: u64 = 256 * 1024;
/// Bytes read from transmit chains in one `process_queue` call; a chain begun is read
/// to its end, so one call reads at most this plus [`MAX_CHAIN_BYTES`]. The frame reader's
/// work is linear in these bytes (a CRC and a copy each, at most), so this bounds how long
/// one call holds the event thread.
pub const MAX_SERVE_BYTES: u64 = 1024 * 1024;
/// Bytes read from guest memory at a time, into a buffer allocated once.
const READ_CHUNK: usize = 16 * 1024;
/// Bytes written into one receive buffer at most (it may be larger).
const MAX_FILL: usize = 64 * 1024;
/// Size of the configuration space (`cols`, `rows`, `max_nr_ports`, `emerg_wr`); it
/// reads as zeros, since no feature that gives it a meaning is offered.
const CONFIG_SIZE: u64 = 12;

/// A receive buffer the driver posted and the device keeps until it has bytes for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxBuffer {
    pub head: u16,
    /// Guest-physical address and length of each writable part.
    pub segments: Vec<(u64, u32)>,
}

/// The agent device's saved state. Transmit chains are served synchronously, so none is
/// in flight; the receive buffers it keeps are saved (they are past the queue's saved
/// `next_avail`), with the bytes of a frame the guest had only begun to send, and the
/// channel's own state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub acked_features: u64,
    pub activated: bool,
    pub rx_buffers: Vec<RxBuffer>,
    pub partial_frame: Vec<u8>,
    pub channel: ChannelSnapshot,
}

/// What a new or restored agent device is plugged into.
pub struct AgentArgs {
    /// The VM's channel (shared with its control calls).
    pub channel: Arc<AgentChannel>,
    /// Guest RAM, which restored receive buffers are checked against.
    pub memory: Arc<GuestRam>,
}

pub struct Agent {
    channel: Arc<AgentChannel>,
    acked_features: u64,
    activated: bool,
    rx: VecDeque<RxBuffer>,
    reader: FrameReader,
    timer: Arc<DeviceTimer>,
    /// Guest bytes read at a time, allocated once.
    scratch: Vec<u8>,
}

impl Agent {
    pub fn new(args: AgentArgs) -> std::io::Result<Agent> {
        Ok(Agent {
            channel: args.channel,
            acked_features: 0,
            activated: false,
            rx: VecDeque::new(),
            reader: FrameReader::new(),
            timer: Arc::new(DeviceTimer::new()?),
            scratch: vec![0; READ_CHUNK],
        })
    }

    pub fn channel(&self) -> &Arc<AgentChannel> {
        &self.channel
    }

    /// Receive buffers kept, for tests.
    pub fn kept_buffers(&self) -> usize {
        self.rx.len()
    }

    fn arm_timer(&self) {
        let period = self.activated.then_some(HEARTBEAT_INTERVAL);
        if let Err(e) = self.timer.set_period(period) {
            tracing::warn!(error = %e, "agent: cannot arm the heartbeat timer");
        }
    }

    fn state(&self) -> AgentState {
        AgentState {
            acked_features: self.acked_features,
            activated: self.activated,
            rx_buffers: self.rx.iter().cloned().collect(),
            partial_frame: self.reader.pending().to_vec(),
            channel: self.channel.save(),
        }
    }

    /// Takes the receive buffers the driver posted, then fills kept buffers from the
    /// outbox.
    fn serve_receive(&mut self, queue: &mut Queue, mem: &GuestRam) -> Result<bool, QueueError> {
        let broken = |source| QueueError {
            queue: RECEIVE_QUEUE,
            source,
        };
        let mut used_any = false;
        for _ in 0..queue.size().max(1) {
            let Some(chain) = next_chain(queue, mem, RECEIVE_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            let mut segments = Vec::new();
            let mut usable = true;
            for desc in chain {
                if !desc.is_write_only() || segments.len() == MAX_SEGMENTS {
                    continue;
                }
                if desc.len() == 0 {
                    continue;
                }
                if !mem.check_range(desc.addr(), desc.len() as usize) {
                    usable = false;
                    break;
                }
                segments.push((desc.addr().0, desc.len()));
            }
            // At most one ring's worth is kept: a driver that posts heads it did not get
            // back cannot make the device hold more.
            if !usable || segments.is_empty() || self.rx.len() >= queue.size() as usize {
                self.channel.count_bad_buffer();
                queue.add_used(mem, head, 0).map_err(broken)?;
                used_any = true;
                continue;
            }
            self.rx.push_back(RxBuffer { head, segments });
        }
        for _ in 0..queue.size().max(1) {
            if self.rx.is_empty() || self.channel.outbox_len() == 0 {
                break;
            }
            let buffer = self.rx.pop_front().expect("checked above");
            let room = buffer
                .segments
                .iter()
                .map(|&(_, len)| len as usize)
                .sum::<usize>()
                .min(MAX_FILL);
            let bytes = self.channel.take_outbox(room);
            let mut written = 0usize;
            for &(addr, len) in &buffer.segments {
                if written == bytes.len() {
                    break;
                }
                let n = (len as usize).min(bytes.len() - written);
                if mem
                    .write_slice(&bytes[written..written + n], GuestAddress(addr))
                    .is_err()
                {
                    self.channel.count_bad_buffer();
                    break;
                }
                written += n;
            }
            if written < bytes.len() {
                self.channel.untake_outbox(&bytes[written..]);
            }
            queue
                .add_used(mem, buffer.head, written as u32)
                .map_err(broken)?;
            used_any = true;
        }
        Ok(used_any)
    }

    /// Reads transmit chains into the frame reader, until the ring is empty or
    /// [`MAX_SERVE_BYTES`] were read; frames go to the channel.
    fn serve_transmit(&mut self, queue: &mut Queue, mem: &GuestRam) -> Result<bool, QueueError> {
        let broken = |source| QueueError {
            queue: TRANSMIT_QUEUE,
            source,
        };
        let mut used_any = false;
        let mut answer = false;
        let mut served = 0u64;
        for _ in 0..queue.size().max(1) {
            if served >= MAX_SERVE_BYTES {
                // The rest stays in the ring: the transport sees it pending and comes
                // back for it.
                break;
            }
            let Some(chain) = next_chain(queue, mem, TRANSMIT_QUEUE)? else {
                break;
            };
            let head = chain.head_index();
            let mut budget = MAX_CHAIN_BYTES;
            'chain: for desc in chain {
                if desc.is_write_only() {
                    continue;
                }
                let len = (desc.len() as u64).min(budget);
                if len < desc.len() as u64 {
                    self.channel.count_bad_buffer();
                }
                let mut offset = 0u64;
                while offset < len {
                    let n = ((len - offset) as usize).min(self.scratch.len());
                    let at = GuestAddress(desc.addr().0.wrapping_add(offset));
                    if mem.read_slice(&mut self.scratch[..n], at).is_err() {
                        self.channel.count_bad_buffer();
                        break 'chain;
                    }
                    let channel = &self.channel;
                    self.reader.push(&self.scratch[..n], &mut |kind, payload| {
                        answer |= channel.handle_frame(kind, payload);
                    });
                    offset += n as u64;
                }
                served += len;
                budget -= len;
                if budget == 0 {
                    break;
                }
            }
            queue.add_used(mem, head, 0).map_err(broken)?;
            used_any = true;
        }
        self.channel.set_stream_counters(self.reader.counters());
        if answer {
            self.channel.kick();
        }
        Ok(used_any)
    }
}

impl Persist for Agent {
    type State = AgentState;
    type Args = AgentArgs;
    type Error = DeviceStateError;

    fn save(&self) -> Result<AgentState, DeviceStateError> {
        Ok(self.state())
    }

    fn restore(args: AgentArgs, state: &AgentState) -> Result<Agent, DeviceStateError> {
        let invalid = |reason: String| DeviceStateError::Invalid(format!("agent: {reason}"));
        let memory = args.memory.clone();
        let mut agent =
            Agent::new(args).map_err(|e| invalid(format!("cannot create its timer: {e}")))?;
        if state.acked_features & !agent.features() != 0 {
            return Err(invalid(format!(
                "features {:#x} were agreed but the device does not offer them",
                state.acked_features & !agent.features()
            )));
        }
        if state.rx_buffers.len() > QUEUE_SIZE as usize {
            return Err(invalid(format!(
                "{} receive buffers kept; a queue holds {QUEUE_SIZE}",
                state.rx_buffers.len()
            )));
        }
        for b in &state.rx_buffers {
            if b.head >= QUEUE_SIZE || b.segments.is_empty() || b.segments.len() > MAX_SEGMENTS {
                return Err(invalid(format!("receive buffer {} is malformed", b.head)));
            }
            for &(addr, len) in &b.segments {
                if !memory.check_range(GuestAddress(addr), len as usize) {
                    return Err(invalid(format!(
                        "receive buffer {} has a part at {addr:#x} outside guest memory",
                        b.head
                    )));
                }
            }
        }
        agent.reader = FrameReader::with_pending(&state.partial_frame, state.channel.stream)
            .map_err(invalid)?;
        agent.channel.restore(&state.channel).map_err(invalid)?;
        agent.acked_features = state.acked_features;
        agent.activated = state.activated;
        agent.rx = state.rx_buffers.iter().cloned().collect();
        agent.arm_timer();
        Ok(agent)
    }
}

impl VirtioDevice for Agent {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    /// No optional feature: one port, no console size, no emergency write.
    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUE_COUNT]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Zeros (the transport filled `data` with them) wherever it falls.
        let _ = (offset, CONFIG_SIZE, data);
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
        self.activated = true;
        self.arm_timer();
    }

    /// A reset driver starts a new session: kept buffers and half-read frames are
    /// forgotten, and so is what waited to be sent to a driver that was active.
    fn reset(&mut self) {
        let was_active = self.activated;
        self.acked_features = 0;
        self.activated = false;
        self.rx.clear();
        self.reader.clear();
        self.arm_timer();
        self.channel.device_reset(was_active);
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Agent(Box::new(self.state()))
    }

    fn timer(&self) -> Option<Arc<DeviceTimer>> {
        Some(self.timer.clone())
    }

    fn timer_fired(&mut self) -> Option<usize> {
        if !self.activated {
            return None;
        }
        self.channel.tick().then_some(RECEIVE_QUEUE)
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
        match index {
            RECEIVE_QUEUE => self.serve_receive(queue, mem),
            TRANSMIT_QUEUE => self.serve_transmit(queue, mem),
            _ => Ok(false),
        }
    }
}
