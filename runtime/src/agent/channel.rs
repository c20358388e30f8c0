//! [`AgentChannel`]: what a VM and its agent device share.
//!
//! Two sides use it:
//! - the VM's event thread (the device): [`AgentChannel::handle_frame`] with every frame
//!   the guest sent, [`AgentChannel::take_outbox`] to fill the guest's receive buffers,
//!   [`AgentChannel::tick`] every heartbeat interval;
//! - control threads (the `Vm` methods in `vm/agent.rs`): set keys, exec, ask for a
//!   shutdown, read health and figures, wait for an answer.
//!
//! Control threads never touch guest memory: they queue frames in the outbox and signal
//! the device's receive-queue eventfd (the *kick*), so the event thread writes them into
//! the guest, and a paused VM gets them once it runs again. Lock order: a control
//! thread takes only this channel's lock; the event thread takes the device's transport
//! lock, then this one.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use luvisor_guest_abi::agent::{self, Message, MAX_AGENT_NAME, MAX_FRAME, MAX_KEYS};
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::stream::StreamCounters;
use super::{
    check_command, check_pair, AgentError, AgentStats, Awaited, ExecResult, Health, HealthState,
    LATE_AFTER, LOST_AFTER, MAX_OUTBOX,
};
use crate::devices::console::CANCEL_POLL;
use crate::events::{EventBus, VmEvent, VmEventKind};
use crate::registry::VmId;
use crate::vstate::clock::RunClock;
use crate::vstate::vcpu::deadline_after;

/// The agent that said HELLO.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub agent: String,
    pub version: u32,
}

/// An exec sent to the guest and not answered yet.
struct PendingExec {
    id: u32,
    reply: Option<ExecResult>,
    /// The guest answered "busy" ([`agent::EXEC_BUSY`]): it holds another exec; this
    /// one is sent again once that one's result comes, or after [`BUSY_RETRY`].
    busy: Option<Busy>,
}

/// When the guest answered "busy".
struct Busy {
    at: Instant,
    /// [`ChannelState::exec_results`] with that answer counted.
    results: u64,
}

/// An exec whose caller gave up (timed out or cancelled) before the guest answered. The
/// guest still runs it, so the next exec waits for its result first: the guest then
/// never holds two execs at once, and a caller never gets another's answer.
struct AbandonedExec {
    id: u32,
    /// The session it was sent in: a new session (or a restore) forgets it.
    epoch: u64,
    command: String,
}

/// How the VM ended, for waiters that were cut short.
#[derive(Clone)]
struct Ending {
    outcome: String,
    /// The guest exited without ever publishing `ready` (see [`AgentError::Ended`]).
    never_served: bool,
}

#[derive(Default)]
struct ChannelState {
    /// Encoded frames the guest has not taken yet.
    outbox: VecDeque<u8>,
    host_kvp: BTreeMap<String, String>,
    /// Bytes of the KVP_SET frames that carry every host key: a new session's answer
    /// needs this much room in the outbox (kept up to date so a HELLO need not count).
    host_kvp_frame_bytes: usize,
    guest_kvp: BTreeMap<String, String>,
    /// Set by HELLO; cleared when the driver resets the device.
    session: Option<Session>,
    /// Changes whenever a session starts or ends, so a waiter can tell its request
    /// went to a session that is gone.
    epoch: u64,
    /// Running time when the guest last sent a valid frame.
    last_seen: Option<Duration>,
    /// `heartbeat_lost` was raised and the guest has not been heard since.
    lost_reported: bool,
    /// Guest clock minus host clock, from the last PONG that carried a sensible time;
    /// `None` once the guest's clock stood still (a pause, a snapshot) until it reports
    /// again.
    drift_us: Option<i64>,
    /// Clock settings the host may still send on its own to correct a guest that
    /// applied the last one late (see [`TIME_TOLERANCE_US`]).
    time_retries: u32,
    /// The PING waiting for its PONG: sequence number and running time it was sent.
    ping: Option<(u64, Duration)>,
    next_ping: u64,
    /// An exec in flight; only one at a time (`exec_busy` queues the others).
    exec: Option<PendingExec>,
    exec_busy: bool,
    /// The last exec nobody waits for any more, until the guest answers it.
    abandoned: Option<AbandonedExec>,
    /// EXEC_RESULTs received: a busy exec is sent again when this moves on.
    exec_results: u64,
    next_exec_id: u32,
    shutdown_acked: bool,
    /// The VM has a machine (started and not ended).
    running: bool,
    /// How the VM ended, once it did.
    ended: Option<Ending>,
    stats: AgentStats,
    /// The device's frame reader's counters, and payloads that did not decode.
    stream: StreamCounters,
    decode_failures: u64,
}

/// The channel's state that a snapshot or a migration carries (with the device's).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelSnapshot {
    pub outbox: Vec<u8>,
    pub host_kvp: Vec<(String, String)>,
    pub guest_kvp: Vec<(String, String)>,
    pub session: Option<Session>,
    pub last_seen_ms: Option<u64>,
    pub lost_reported: bool,
    /// Saved, but not restored: the guest's clock stands still while the VM is saved, so
    /// the figure is stale once it runs again (it reports a fresh one soon).
    pub drift_us: Option<i64>,
    pub next_ping: u64,
    pub next_exec_id: u32,
    pub stats: AgentStats,
    pub stream: StreamCounters,
    pub decode_failures: u64,
}

/// The host side of one VM's agent channel.
pub struct AgentChannel {
    vm: VmId,
    name: String,
    clock: Arc<RunClock>,
    events: Arc<EventBus>,
    state: Mutex<ChannelState>,
    changed: Condvar,
    /// The device's receive-queue notification eventfd while a machine runs.
    kick: Mutex<Option<EventFd>>,
}

/// A guest clock off by more than this after a setting gets the time again.
pub const TIME_TOLERANCE_US: u64 = 2000;
/// Corrections sent after one setting at most.
pub const TIME_RETRIES: u32 = 3;
/// How long an exec the guest answered "busy" waits before it is sent again, unless the
/// guest's exec result that frees it comes first.
pub const BUSY_RETRY: Duration = Duration::from_millis(50);

/// Bytes of the frame that carries `message`.
fn frame_len(message: &Message) -> usize {
    agent::HEADER_LEN + message.payload_len()
}

/// Bytes of the KVP_SET frame that publishes `key = value`.
fn kvp_frame_len(key: &str, value: &str) -> usize {
    frame_len(&Message::KvpSet { key, value })
}

/// The guest's clock minus the host's, from a time the guest reported; `None` for a
/// figure that cannot be a clock's: a time past `i64::MAX` microseconds (some 292,000
/// years after 1970), which only a broken or hostile guest sends. Computed in `i128`, so
/// no figure overflows.
fn drift_from(guest_time_us: u64, host_time_us: u64) -> Option<i64> {
    let guest = i64::try_from(guest_time_us).ok()?;
    i64::try_from(i128::from(guest) - i128::from(host_time_us)).ok()
}

/// The host's wall clock, in microseconds since the Unix epoch.
pub fn unix_time_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

impl AgentChannel {
    pub fn new(vm: VmId, name: &str, clock: Arc<RunClock>, events: Arc<EventBus>) -> AgentChannel {
        AgentChannel {
            vm,
            name: name.to_string(),
            clock,
            events,
            state: Mutex::new(ChannelState {
                next_ping: 1,
                next_exec_id: 1,
                ..ChannelState::default()
            }),
            changed: Condvar::new(),
            kick: Mutex::new(None),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ChannelState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The device's receive-queue eventfd: signalling it makes the event thread write
    /// the outbox into the guest. Set when the device is built.
    pub fn set_kick(&self, kick: Option<EventFd>) {
        *self.kick.lock().unwrap_or_else(|p| p.into_inner()) = kick;
    }

    /// Asks the device to deliver the outbox.
    pub fn kick(&self) {
        if let Some(kick) = self.kick.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = kick.write(1);
        }
    }

    /// Encodes `message` into the outbox. `Err` carries the bytes already waiting when
    /// it does not fit under [`MAX_OUTBOX`].
    fn queue(st: &mut ChannelState, message: &Message) -> Result<(), usize> {
        Self::queue_into(&mut st.outbox, &mut st.stats, message)
    }

    /// [`AgentChannel::queue`] on the parts of the state it needs, so a caller can queue
    /// while it borrows another part (the host keys).
    fn queue_into(
        outbox: &mut VecDeque<u8>,
        stats: &mut AgentStats,
        message: &Message,
    ) -> Result<(), usize> {
        let mut frame = vec![0u8; frame_len(message)];
        let Some(len) = message.encode_frame(&mut frame) else {
            // Only the host's own messages come here, and they are checked to fit.
            tracing::error!(
                kind = message.kind(),
                "agent: a host message does not encode"
            );
            return Ok(());
        };
        if outbox.len() + len > MAX_OUTBOX {
            return Err(outbox.len());
        }
        outbox.extend(&frame[..len]);
        stats.frames_sent += 1;
        Ok(())
    }

    /// Queues a new session's answer: WELCOME, the time and every host key, all of it
    /// or nothing. A guest that has not read what already waits for it (so the answer
    /// does not fit under [`MAX_OUTBOX`]) gets nothing: otherwise a flood of 22-byte
    /// HELLOs would each cost the host up to ~280 KiB of encoding and copying. It also
    /// never gets half an answer (some keys and not others). Returns whether it was
    /// queued.
    fn answer_hello(st: &mut ChannelState) -> bool {
        let welcome = Message::Welcome {
            version: agent::VERSION as u32,
        };
        let time_len = frame_len(&Message::TimeSet {
            generation: 0,
            unix_time_us: 0,
        });
        let answer_len = frame_len(&welcome) + time_len + st.host_kvp_frame_bytes;
        if st.outbox.len() + answer_len > MAX_OUTBOX {
            return false;
        }
        let _ = Self::queue(st, &welcome);
        Self::queue_time(st);
        let ChannelState {
            outbox,
            host_kvp,
            stats,
            ..
        } = st;
        for (key, value) in host_kvp.iter() {
            let _ = Self::queue_into(outbox, stats, &Message::KvpSet { key, value });
        }
        true
    }

    fn backlog(&self, bytes: usize) -> AgentError {
        AgentError::Backlog {
            name: self.name.clone(),
            bytes,
        }
    }

    // ---- the device's side (the VM's event thread) ----

    /// Moves up to `max` bytes of the outbox to the caller (to write into the guest).
    pub fn take_outbox(&self, max: usize) -> Vec<u8> {
        let mut st = self.lock();
        let n = max.min(st.outbox.len());
        st.outbox.drain(..n).collect()
    }

    /// Puts bytes the device could not deliver back at the front of the outbox.
    pub fn untake_outbox(&self, bytes: &[u8]) {
        let mut st = self.lock();
        for &b in bytes.iter().rev() {
            st.outbox.push_front(b);
        }
    }

    pub fn outbox_len(&self) -> usize {
        self.lock().outbox.len()
    }

    /// The driver reset the device: the session is over. With `was_active` (a driver
    /// had set the device up before) what waited for that driver is dropped; the reset
    /// that starts the first driver's setup keeps what was queued before it came (a
    /// shutdown request, say).
    pub fn device_reset(&self, was_active: bool) {
        let mut st = self.lock();
        st.session = None;
        st.epoch += 1;
        if was_active {
            st.outbox.clear();
        }
        st.ping = None;
        drop(st);
        self.changed.notify_all();
    }

    /// The device's frame reader's latest counters.
    pub fn set_stream_counters(&self, counters: StreamCounters) {
        self.lock().stream = counters;
    }

    /// Buffers the guest posted that the device could not use.
    pub fn count_bad_buffer(&self) {
        self.lock().stats.bad_buffers += 1;
    }

    /// One frame from the guest. Returns whether the outbox has something for it now.
    pub fn handle_frame(&self, kind: u8, payload: &[u8]) -> bool {
        let message = match Message::decode(kind, payload) {
            Ok(m) => m,
            Err(agent::DecodeError::UnknownKind(_)) => {
                let mut st = self.lock();
                st.stats.unknown += 1;
                return !st.outbox.is_empty();
            }
            Err(e) => {
                tracing::debug!(vm = self.name, kind, error = ?e, "agent: a frame does not decode");
                let mut st = self.lock();
                st.decode_failures += 1;
                return !st.outbox.is_empty();
            }
        };
        let mut st = self.lock();
        st.stats.frames_received += 1;
        st.last_seen = Some(self.clock.elapsed());
        if std::mem::take(&mut st.lost_reported) {
            self.raise(VmEventKind::HeartbeatRestored);
        }
        match message {
            Message::Hello { version, agent } => {
                let agent: String = agent.chars().take(MAX_AGENT_NAME).collect();
                tracing::debug!(vm = self.name, agent, version, "agent: hello");
                st.session = Some(Session { agent, version });
                st.epoch += 1;
                st.stats.sessions += 1;
                st.guest_kvp.clear();
                st.ping = None;
                if !Self::answer_hello(&mut st) {
                    tracing::trace!(
                        vm = self.name,
                        waiting = st.outbox.len(),
                        "agent: a hello is not answered: the guest does not read its channel"
                    );
                }
            }
            Message::Pong {
                seq,
                time_generation,
                guest_time_us,
                ..
            } => {
                st.stats.pongs += 1;
                if st.ping.is_some_and(|(s, _)| s == seq) {
                    st.ping = None;
                }
                st.stats.time_generation_applied = time_generation;
                if guest_time_us != 0 {
                    // The PONG left the guest a moment ago; what it took to get here is
                    // the error of this figure (tens of microseconds).
                    let drift = drift_from(guest_time_us, unix_time_us());
                    st.drift_us = drift;
                    // A guest busy elsewhere applies a setting late, and its clock is
                    // behind by that delay: send the time again (a few times at most).
                    let latest = time_generation == st.stats.time_generation;
                    let off = drift.is_some_and(|d| d.unsigned_abs() > TIME_TOLERANCE_US);
                    if latest && off && st.time_retries > 0 {
                        st.time_retries -= 1;
                        Self::queue_time_once(&mut st);
                    }
                }
            }
            Message::KvpSet { key, value } => {
                let fresh = !st.guest_kvp.contains_key(key);
                if check_pair(key, value).is_err() || (fresh && st.guest_kvp.len() >= MAX_KEYS) {
                    st.stats.kvp_refused += 1;
                } else {
                    st.guest_kvp.insert(key.to_string(), value.to_string());
                }
            }
            Message::KvpDelete { key } => {
                st.guest_kvp.remove(key);
            }
            Message::ExecResult {
                id,
                code,
                truncated,
                busy,
                output,
            } => {
                st.exec_results += 1;
                let results = st.exec_results;
                if st.abandoned.as_ref().is_some_and(|a| a.id == id) {
                    st.abandoned = None;
                }
                match st.exec.as_mut() {
                    Some(pending)
                        if pending.id == id
                            && pending.reply.is_none()
                            && pending.busy.is_none() =>
                    {
                        if busy {
                            pending.busy = Some(Busy {
                                at: Instant::now(),
                                results,
                            });
                        } else {
                            let cut = output.len().min(agent::MAX_OUTPUT);
                            pending.reply = Some(ExecResult {
                                code,
                                stdout: String::from_utf8_lossy(&output[..cut]).into_owned(),
                                truncated: truncated || cut < output.len(),
                            });
                        }
                    }
                    _ => st.stats.stale_replies += 1,
                }
            }
            Message::ShutdownAck => st.shutdown_acked = true,
            // Only the host sends these.
            Message::Welcome { .. }
            | Message::Ping { .. }
            | Message::TimeSet { .. }
            | Message::Exec { .. }
            | Message::Shutdown => st.stats.unknown += 1,
        }
        let pending = !st.outbox.is_empty();
        drop(st);
        self.changed.notify_all();
        pending
    }

    fn raise(&self, kind: VmEventKind) {
        self.events.publish(VmEvent {
            kind,
            vm: self.vm,
            name: self.name.clone(),
        });
    }

    /// The heartbeat timer fired (every [`HEARTBEAT_INTERVAL`] of the event thread's
    /// time; it does not fire while the VM is paused). Sends a PING when none is
    /// waiting for its answer (or the one waiting is old), and raises `heartbeat_lost`
    /// when a guest that answered before has been silent for [`LOST_AFTER`]. Returns
    /// whether the outbox has something for the guest.
    pub fn tick(&self) -> bool {
        let now = self.clock.elapsed();
        let mut st = self.lock();
        let due = st
            .ping
            .is_none_or(|(_, sent)| now.saturating_sub(sent) >= LATE_AFTER);
        if st.session.is_some() && due {
            let seq = st.next_ping;
            st.next_ping += 1;
            let ping = Message::Ping {
                seq,
                host_time_us: unix_time_us(),
            };
            if Self::queue(&mut st, &ping).is_ok() {
                st.ping = Some((seq, now));
                st.stats.pings += 1;
            }
        }
        if let Some(seen) = st.last_seen {
            if now.saturating_sub(seen) >= LOST_AFTER && !st.lost_reported {
                st.lost_reported = true;
                tracing::info!(vm = self.name, "agent: heartbeat lost");
                self.raise(VmEventKind::HeartbeatLost);
            }
        }
        !st.outbox.is_empty()
    }

    /// Queues a clock setting, with [`TIME_RETRIES`] corrections allowed after it.
    fn queue_time(st: &mut ChannelState) {
        st.time_retries = TIME_RETRIES;
        Self::queue_time_once(st);
    }

    fn queue_time_once(st: &mut ChannelState) {
        st.stats.time_generation = st.stats.time_generation.wrapping_add(1).max(1);
        let set = Message::TimeSet {
            generation: st.stats.time_generation,
            unix_time_us: unix_time_us(),
        };
        let _ = Self::queue(st, &set);
    }

    // ---- the VM's lifecycle ----

    /// The VM has a machine now (a start, a restore, an arrival).
    pub fn machine_started(&self) {
        let mut st = self.lock();
        st.running = true;
        st.ended = None;
        st.abandoned = None;
    }

    /// The VM ended (`outcome` says how; `guest_exited`: the guest exited by itself):
    /// every waiter gives up.
    pub fn machine_ended(&self, outcome: String, guest_exited: bool) {
        let mut st = self.lock();
        st.running = false;
        let never_served = guest_exited && st.guest_kvp.get("ready").is_none_or(|v| v != "1");
        st.ended = Some(Ending {
            outcome,
            never_served,
        });
        drop(st);
        self.set_kick(None);
        self.changed.notify_all();
    }

    /// Pushes the host's wall-clock time to the guest (after a resume or a restore; a
    /// new session gets it with the WELCOME).
    pub fn push_time(&self) {
        let mut st = self.lock();
        // The guest's clock stood still meanwhile: the last figure no longer holds, and
        // the guest reports a fresh one once it has the new time.
        st.drift_us = None;
        if st.session.is_none() {
            return;
        }
        Self::queue_time(&mut st);
        drop(st);
        self.kick();
    }

    // ---- the control side ----

    pub fn health(&self) -> Health {
        let st = self.lock();
        if !st.running {
            return Health {
                state: HealthState::None,
                last_seen_ms: None,
            };
        }
        let Some(seen) = st.last_seen else {
            return Health {
                state: HealthState::Waiting,
                last_seen_ms: None,
            };
        };
        let age = self.clock.elapsed().saturating_sub(seen);
        let state = if age >= LOST_AFTER {
            HealthState::Lost
        } else if age >= LATE_AFTER {
            HealthState::Late
        } else {
            HealthState::Ok
        };
        Health {
            state,
            last_seen_ms: Some(age.as_millis() as u64),
        }
    }

    pub fn drift_ms(&self) -> Option<f64> {
        self.lock().drift_us.map(|us| us as f64 / 1000.0)
    }

    pub fn session(&self) -> Option<Session> {
        self.lock().session.clone()
    }

    pub fn stats(&self) -> AgentStats {
        let st = self.lock();
        let mut stats = st.stats;
        stats.malformed = st.stream.malformed + st.decode_failures;
        stats.oversized = st.stream.oversized;
        stats.discarded_bytes = st.stream.discarded_bytes;
        stats
    }

    /// Publishes `key = value` to the guest (now, or when its agent says HELLO).
    pub fn host_set(&self, key: &str, value: &str) -> Result<(), AgentError> {
        check_pair(key, value)?;
        let mut st = self.lock();
        if !st.host_kvp.contains_key(key) && st.host_kvp.len() >= MAX_KEYS {
            return Err(AgentError::TooManyKeys {
                name: self.name.clone(),
                key: key.to_string(),
            });
        }
        if st.session.is_some() {
            Self::queue(&mut st, &Message::KvpSet { key, value }).map_err(|b| self.backlog(b))?;
        }
        if let Some(old) = st.host_kvp.insert(key.to_string(), value.to_string()) {
            st.host_kvp_frame_bytes -= kvp_frame_len(key, &old);
        }
        st.host_kvp_frame_bytes += kvp_frame_len(key, value);
        drop(st);
        self.kick();
        Ok(())
    }

    /// Withdraws a host key; returns whether it was set.
    pub fn host_delete(&self, key: &str) -> Result<bool, AgentError> {
        check_pair(key, "")?;
        let mut st = self.lock();
        if !st.host_kvp.contains_key(key) {
            return Ok(false);
        }
        if st.session.is_some() {
            Self::queue(&mut st, &Message::KvpDelete { key }).map_err(|b| self.backlog(b))?;
        }
        if let Some(old) = st.host_kvp.remove(key) {
            st.host_kvp_frame_bytes -= kvp_frame_len(key, &old);
        }
        drop(st);
        self.kick();
        Ok(true)
    }

    pub fn host_get(&self, key: &str) -> Option<String> {
        self.lock().host_kvp.get(key).cloned()
    }

    pub fn host_list(&self) -> Vec<(String, String)> {
        let st = self.lock();
        st.host_kvp
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn guest_get(&self, key: &str) -> Option<String> {
        self.lock().guest_kvp.get(key).cloned()
    }

    pub fn guest_list(&self) -> Vec<(String, String)> {
        let st = self.lock();
        st.guest_kvp
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Waits on the channel until `done` returns `Some` or the deadline, cancel or the
    /// VM's end. `cancel` is called without the channel's lock held (it may run Lua
    /// code that calls back into this VM).
    ///
    /// `deadline` ends the wait; `timeout` is what the caller asked for (for the error),
    /// and `held_up` says what held the request up when the deadline passed.
    fn wait_for<R>(
        &self,
        what: &Awaited,
        deadline: Instant,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
        held_up: impl Fn(&ChannelState) -> String,
        mut done: impl FnMut(&mut ChannelState) -> Result<Option<R>, AgentError>,
    ) -> Result<R, AgentError> {
        loop {
            let mut st = self.lock();
            if let Some(r) = done(&mut st)? {
                return Ok(r);
            }
            if let Some(ending) = &st.ended {
                return Err(AgentError::Ended {
                    name: self.name.clone(),
                    what: what.clone(),
                    outcome: ending.outcome.clone(),
                    never_served: ending.never_served,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(AgentError::TimedOut {
                    name: self.name.clone(),
                    what: what.clone(),
                    timeout,
                    detail: held_up(&st),
                });
            }
            let (st, _) = self
                .changed
                .wait_timeout(st, (deadline - now).min(CANCEL_POLL))
                .unwrap_or_else(|p| p.into_inner());
            drop(st);
            if cancel() {
                return Err(AgentError::Cancelled {
                    name: self.name.clone(),
                    what: what.clone(),
                });
            }
        }
    }

    /// Waits until the guest publishes `key` (with `value`, when given); returns the
    /// value.
    pub fn wait_guest_kvp(
        &self,
        key: &str,
        value: Option<&str>,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<String, AgentError> {
        let what = Awaited::GuestKey {
            key: key.to_string(),
            value: value.map(str::to_string),
        };
        let held_up = |st: &ChannelState| {
            if st.session.is_none() {
                " (its agent has not connected)".to_string()
            } else {
                String::new()
            }
        };
        self.wait_for(
            &what,
            deadline_after(timeout),
            timeout,
            cancel,
            held_up,
            |st| {
                Ok(st
                    .guest_kvp
                    .get(key)
                    .filter(|got| value.is_none_or(|want| want == got.as_str()))
                    .cloned())
            },
        )
    }

    /// Runs `command` in the guest and waits for its result. One exec at a time per VM:
    /// a second waits for the first (within its own timeout). Before the guest's agent
    /// has said HELLO, it waits for that too; after an exec whose caller gave up, it
    /// waits for the guest to finish that one. A "busy" answer from the guest (it holds
    /// an exec the host no longer knows of, e.g. from before a restore) is not a result:
    /// the exec is sent again once the guest is free, within the same timeout.
    pub fn exec(
        &self,
        command: &str,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<ExecResult, AgentError> {
        check_command(command)?;
        let what = Awaited::Exec {
            command: command.to_string(),
        };
        let deadline = deadline_after(timeout);
        let held_up = |st: &ChannelState| {
            if st.session.is_none() {
                return " (its agent has not connected)".to_string();
            }
            if let Some(a) = st.abandoned.as_ref().filter(|a| a.epoch == st.epoch) {
                return format!(
                    " (the guest still runs an earlier exec, {:?}, whose caller gave up)",
                    a.command
                );
            }
            if st.exec.as_ref().is_some_and(|p| p.busy.is_some()) {
                return " (the guest holds another exec)".to_string();
            }
            String::new()
        };
        // Takes the VM's one exec slot.
        let slot_taken =
            |_: &ChannelState| " (another exec on this VM still waits for its answer)".to_string();
        self.wait_for(&what, deadline, timeout, cancel, slot_taken, |st| {
            if st.exec_busy {
                return Ok(None);
            }
            st.exec_busy = true;
            Ok(Some(()))
        })?;
        let result = self.exec_in_slot(command, &what, deadline, timeout, cancel, &held_up);
        let mut st = self.lock();
        if let (Err(AgentError::TimedOut { .. } | AgentError::Cancelled { .. }), Some(p)) =
            (&result, st.exec.as_ref())
        {
            // Sent, and the guest may run it still (unless it answered already, or
            // answered "busy": then it did not take it).
            if p.busy.is_none() && p.reply.is_none() {
                st.abandoned = Some(AbandonedExec {
                    id: p.id,
                    epoch: st.epoch,
                    command: command.to_string(),
                });
            }
        }
        st.exec_busy = false;
        st.exec = None;
        drop(st);
        self.changed.notify_all();
        result
    }

    /// [`AgentChannel::exec`] once it holds the exec slot: sends the command when the
    /// guest can take it, and again after each "busy" answer, until the result.
    fn exec_in_slot(
        &self,
        command: &str,
        what: &Awaited,
        deadline: Instant,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
        held_up: &dyn Fn(&ChannelState) -> String,
    ) -> Result<ExecResult, AgentError> {
        loop {
            let epoch = self.wait_for(what, deadline, timeout, cancel, held_up, |st| {
                let abandoned = st.abandoned.as_ref().is_some_and(|a| a.epoch == st.epoch);
                if st.session.is_none() || abandoned {
                    return Ok(None);
                }
                let id = st.next_exec_id;
                st.next_exec_id = st.next_exec_id.wrapping_add(1).max(1);
                Self::queue(st, &Message::Exec { id, command }).map_err(|b| self.backlog(b))?;
                st.exec = Some(PendingExec {
                    id,
                    reply: None,
                    busy: None,
                });
                Ok(Some(st.epoch))
            })?;
            self.kick();
            let answer = self.wait_for(what, deadline, timeout, cancel, held_up, |st| {
                if st.epoch != epoch {
                    return Err(AgentError::Reset {
                        name: self.name.clone(),
                        what: what.clone(),
                    });
                }
                let Some(pending) = st.exec.as_mut() else {
                    return Ok(None);
                };
                if let Some(reply) = pending.reply.take() {
                    return Ok(Some(Some(reply)));
                }
                // Busy: sent again once another result shows the guest is free, or
                // after a while (the result that frees it may never come: a restore
                // can leave the guest holding an exec whose answer went nowhere).
                let retry = pending.busy.as_ref().is_some_and(|busy| {
                    st.exec_results > busy.results || busy.at.elapsed() >= BUSY_RETRY
                });
                Ok(retry.then_some(None))
            })?;
            if let Some(reply) = answer {
                return Ok(reply);
            }
        }
    }

    /// Asks the guest to shut down (now, or as soon as it reads its channel).
    pub fn request_shutdown(&self) -> Result<(), AgentError> {
        let mut st = self.lock();
        st.shutdown_acked = false;
        Self::queue(&mut st, &Message::Shutdown).map_err(|b| self.backlog(b))?;
        drop(st);
        self.kick();
        Ok(())
    }

    /// The guest answered the last shutdown request.
    pub fn shutdown_acked(&self) -> bool {
        self.lock().shutdown_acked
    }

    // ---- snapshots ----

    pub fn save(&self) -> ChannelSnapshot {
        let st = self.lock();
        ChannelSnapshot {
            outbox: st.outbox.iter().copied().collect(),
            host_kvp: st
                .host_kvp
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            guest_kvp: st
                .guest_kvp
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            session: st.session.clone(),
            last_seen_ms: st.last_seen.map(|d| d.as_millis() as u64),
            lost_reported: st.lost_reported,
            drift_us: st.drift_us,
            next_ping: st.next_ping,
            next_exec_id: st.next_exec_id,
            stats: st.stats,
            stream: st.stream,
            decode_failures: st.decode_failures,
        }
    }

    /// Checks a saved channel state against the protocol's limits.
    pub fn check_saved(saved: &ChannelSnapshot) -> Result<(), String> {
        if saved.outbox.len() > MAX_OUTBOX + MAX_FRAME {
            return Err(format!(
                "{} bytes wait for the guest; at most {MAX_OUTBOX} can",
                saved.outbox.len()
            ));
        }
        for (side, pairs) in [("host", &saved.host_kvp), ("guest", &saved.guest_kvp)] {
            if pairs.len() > MAX_KEYS {
                return Err(format!("{} {side} keys; at most {MAX_KEYS}", pairs.len()));
            }
            for (k, v) in pairs {
                check_pair(k, v).map_err(|e| format!("{side} key: {e}"))?;
            }
        }
        if saved
            .session
            .as_ref()
            .is_some_and(|s| s.agent.chars().count() > MAX_AGENT_NAME)
        {
            return Err("the agent's name is too long".into());
        }
        Ok(())
    }

    /// Puts a saved state back (a restored or arriving VM; its channel is new).
    pub fn restore(&self, saved: &ChannelSnapshot) -> Result<(), String> {
        Self::check_saved(saved)?;
        let mut st = self.lock();
        st.outbox = saved.outbox.iter().copied().collect();
        st.host_kvp = saved.host_kvp.iter().cloned().collect();
        st.host_kvp_frame_bytes = st.host_kvp.iter().map(|(k, v)| kvp_frame_len(k, v)).sum();
        st.guest_kvp = saved.guest_kvp.iter().cloned().collect();
        st.session = saved.session.clone();
        st.last_seen = saved.last_seen_ms.map(Duration::from_millis);
        st.lost_reported = saved.lost_reported;
        // Stale: the guest's clock stood still while the VM was saved (see
        // `ChannelSnapshot::drift_us`).
        st.drift_us = None;
        st.next_ping = saved.next_ping.max(1);
        st.next_exec_id = saved.next_exec_id.max(1);
        st.stats = saved.stats;
        st.stream = saved.stream;
        st.decode_failures = saved.decode_failures;
        st.ping = None;
        st.epoch += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel() -> (
        AgentChannel,
        Arc<RunClock>,
        Arc<crate::events::Subscription>,
    ) {
        let clock = Arc::new(RunClock::new());
        let bus = Arc::new(EventBus::new());
        let sub = bus.subscribe();
        let channel = AgentChannel::new(VmId(1), "t", clock.clone(), bus);
        channel.machine_started();
        (channel, clock, sub)
    }

    fn frame(m: Message) -> (u8, Vec<u8>) {
        let mut payload = vec![0u8; m.payload_len()];
        m.encode_payload(&mut payload).unwrap();
        (m.kind(), payload)
    }

    fn send(channel: &AgentChannel, m: Message) -> bool {
        let (kind, payload) = frame(m);
        channel.handle_frame(kind, &payload)
    }

    /// Decodes every frame of the outbox.
    fn outbox_kinds(channel: &AgentChannel) -> Vec<u8> {
        let bytes = channel.take_outbox(usize::MAX);
        let mut reader = super::super::stream::FrameReader::new();
        let mut kinds = Vec::new();
        reader.push(&bytes, &mut |kind, _| kinds.push(kind));
        kinds
    }

    #[test]
    fn a_hello_gets_the_welcome_the_time_and_every_host_key() {
        let (channel, _, _) = channel();
        channel.host_set("a", "1").unwrap();
        channel.host_set("b", "2").unwrap();
        assert_eq!(channel.outbox_len(), 0, "nothing is sent before a session");
        assert_eq!(channel.health().state, HealthState::Waiting);
        assert!(send(
            &channel,
            Message::Hello {
                version: 1,
                agent: "test"
            }
        ));
        use agent::kind::*;
        assert_eq!(
            outbox_kinds(&channel),
            [WELCOME, TIME_SET, KVP_SET, KVP_SET]
        );
        assert_eq!(channel.health().state, HealthState::Ok);
        assert_eq!(channel.stats().time_generation, 1);
    }

    #[test]
    fn guest_keys_are_bounded_and_bad_ones_counted() {
        let (channel, _, _) = channel();
        send(
            &channel,
            Message::KvpSet {
                key: "ready",
                value: "1",
            },
        );
        send(
            &channel,
            Message::KvpSet {
                key: "big",
                value: &"x".repeat(agent::MAX_VALUE + 1),
            },
        );
        send(
            &channel,
            Message::KvpSet {
                key: "bad key",
                value: "1",
            },
        );
        for i in 0..MAX_KEYS + 5 {
            send(
                &channel,
                Message::KvpSet {
                    key: &format!("k{i}"),
                    value: "v",
                },
            );
        }
        assert_eq!(channel.guest_get("ready").as_deref(), Some("1"));
        assert_eq!(channel.guest_list().len(), MAX_KEYS);
        assert_eq!(channel.stats().kvp_refused, 2 + 6);
        send(&channel, Message::KvpDelete { key: "ready" });
        assert_eq!(channel.guest_get("ready"), None);
    }

    #[test]
    fn host_keys_are_checked() {
        let (channel, _, _) = channel();
        for i in 0..MAX_KEYS {
            channel.host_set(&format!("k{i}"), "v").unwrap();
        }
        let e = channel.host_set("one-more", "v").unwrap_err();
        assert!(e.to_string().contains("already has 256 host keys"), "{e}");
        channel.host_set("k0", "replaced").unwrap();
        assert!(channel.host_delete("k0").unwrap());
        assert!(!channel.host_delete("k0").unwrap());
        channel.host_set("one-more", "v").unwrap();
        assert!(channel.host_set("x", &"v".repeat(1025)).is_err());
    }

    #[test]
    fn a_silent_guest_goes_late_then_lost_once_and_comes_back() {
        let (channel, clock, events) = channel();
        send(
            &channel,
            Message::Hello {
                version: 1,
                agent: "test",
            },
        );
        clock.set_elapsed(LATE_AFTER);
        assert_eq!(channel.health().state, HealthState::Late);
        assert!(channel.tick(), "a ping is due");
        clock.set_elapsed(LOST_AFTER);
        assert_eq!(channel.health().state, HealthState::Lost);
        channel.tick();
        channel.tick();
        let got: Vec<_> = events.take_all().into_iter().map(|e| e.kind).collect();
        assert_eq!(got, [VmEventKind::HeartbeatLost]);
        send(
            &channel,
            Message::Pong {
                seq: 1,
                uptime_ms: 1,
                time_generation: 1,
                guest_time_us: unix_time_us() + 2_000_000,
            },
        );
        assert_eq!(channel.health().state, HealthState::Ok);
        let got: Vec<_> = events.take_all().into_iter().map(|e| e.kind).collect();
        assert_eq!(got, [VmEventKind::HeartbeatRestored]);
        let drift = channel.drift_ms().unwrap();
        assert!(drift > 1000.0, "{drift}");
    }

    #[test]
    fn exec_waits_for_its_result_and_stale_results_are_counted() {
        let (channel, _, _) = channel();
        let channel = Arc::new(channel);
        send(
            &channel,
            Message::Hello {
                version: 1,
                agent: "test",
            },
        );
        channel.take_outbox(usize::MAX);
        let answering = channel.clone();
        let guest = std::thread::spawn(move || {
            // Plays the guest: waits for the EXEC, answers it.
            loop {
                let bytes = answering.take_outbox(usize::MAX);
                let mut reader = super::super::stream::FrameReader::new();
                let mut id = None;
                reader.push(&bytes, &mut |kind, payload| {
                    if let Ok(Message::Exec { id: i, .. }) = Message::decode(kind, payload) {
                        id = Some(i);
                    }
                });
                if let Some(id) = id {
                    send(
                        &answering,
                        Message::ExecResult {
                            id: id + 100,
                            code: 0,
                            truncated: false,
                            busy: false,
                            output: b"",
                        },
                    );
                    send(
                        &answering,
                        Message::ExecResult {
                            id,
                            code: 2,
                            truncated: false,
                            busy: false,
                            output: b"error: x\n",
                        },
                    );
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let r = channel
            .exec("x", Duration::from_secs(10), &|| false)
            .unwrap();
        guest.join().unwrap();
        assert_eq!((r.code, r.stdout.as_str()), (2, "error: x\n"));
        assert_eq!(channel.stats().stale_replies, 1);
        let e = channel
            .exec("y", Duration::from_millis(1), &|| false)
            .unwrap_err();
        assert!(matches!(e, AgentError::TimedOut { .. }), "{e}");
        channel.machine_ended("exit code 0".into(), true);
        let e = channel
            .exec("y", Duration::from_secs(10), &|| false)
            .unwrap_err();
        assert!(e.to_string().contains("ended (exit code 0)"), "{e}");
    }

    /// The EXEC frames in the outbox: (id, command).
    fn execs_in_outbox(channel: &AgentChannel) -> Vec<(u32, String)> {
        let bytes = channel.take_outbox(usize::MAX);
        let mut reader = super::super::stream::FrameReader::new();
        let mut execs = Vec::new();
        reader.push(&bytes, &mut |kind, payload| {
            if let Ok(Message::Exec { id, command }) = Message::decode(kind, payload) {
                execs.push((id, command.to_string()));
            }
        });
        execs
    }

    /// Plays the guest: waits until the host sends an EXEC, returns (id, command).
    fn next_exec(channel: &AgentChannel) -> (u32, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(exec) = execs_in_outbox(channel).pop() {
                return exec;
            }
            assert!(Instant::now() < deadline, "the host sent no EXEC");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn exec_result(channel: &AgentChannel, id: u32, busy: bool, output: &[u8]) {
        send(
            channel,
            Message::ExecResult {
                id,
                code: 0,
                truncated: false,
                busy,
                output,
            },
        );
    }

    #[test]
    fn a_busy_answer_is_not_a_result_the_exec_is_sent_again() {
        let (channel, _, _) = channel();
        let channel = Arc::new(channel);
        hello(&channel);
        channel.take_outbox(usize::MAX);
        // Freed by the result of the exec the guest held, and freed by the wait alone
        // (that result may never come).
        for freed_by_result in [true, false] {
            let guest = {
                let channel = channel.clone();
                std::thread::spawn(move || {
                    let (first, command) = next_exec(&channel);
                    exec_result(&channel, first, true, b"");
                    if freed_by_result {
                        exec_result(&channel, 999, false, b"the held exec's output");
                    }
                    let (again, command_again) = next_exec(&channel);
                    assert_ne!(again, first, "a new id for the new attempt");
                    assert_eq!(command_again, command);
                    exec_result(&channel, again, false, b"ran\n");
                })
            };
            let r = channel
                .exec("x", Duration::from_secs(60), &|| false)
                .unwrap();
            guest.join().unwrap();
            assert_eq!((r.code, r.stdout.as_str()), (0, "ran\n"));
        }
        assert_eq!(channel.stats().stale_replies, 1, "the held exec's result");
        // Nothing is left waiting: the next exec is sent at once.
        let e = channel
            .exec("y", Duration::from_millis(1), &|| false)
            .unwrap_err();
        assert!(matches!(e, AgentError::TimedOut { .. }), "{e}");
        assert_eq!(execs_in_outbox(&channel).len(), 1);
    }

    #[test]
    fn an_exec_after_an_abandoned_one_waits_for_its_result() {
        let (channel, _, _) = channel();
        let channel = Arc::new(channel);
        hello(&channel);
        channel.take_outbox(usize::MAX);
        let e = channel
            .exec("slow", Duration::from_millis(1), &|| false)
            .unwrap_err();
        assert!(matches!(e, AgentError::TimedOut { .. }), "{e}");
        let (slow, _) = execs_in_outbox(&channel).pop().expect("sent");
        // The guest still runs "slow": the next exec is not sent meanwhile.
        let e = channel
            .exec("next", Duration::from_millis(1), &|| false)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "timed out after 1ms waiting for vm 't' to answer exec \"next\" (the guest still \
             runs an earlier exec, \"slow\", whose caller gave up)"
        );
        assert!(execs_in_outbox(&channel).is_empty());
        // Its result frees the guest (and goes nowhere).
        let guest = {
            let channel = channel.clone();
            std::thread::spawn(move || {
                exec_result(&channel, slow, false, b"slow's output");
                let (id, command) = next_exec(&channel);
                assert_eq!(command, "next");
                exec_result(&channel, id, false, b"next's output");
            })
        };
        let r = channel
            .exec("next", Duration::from_secs(60), &|| false)
            .unwrap();
        guest.join().unwrap();
        assert_eq!(r.stdout, "next's output");
        assert_eq!(channel.stats().stale_replies, 1);
        // A new session forgets what the old one ran.
        channel
            .exec("lost", Duration::from_millis(1), &|| false)
            .unwrap_err();
        hello(&channel);
        channel.take_outbox(usize::MAX);
        channel
            .exec("after", Duration::from_millis(1), &|| false)
            .unwrap_err();
        assert_eq!(execs_in_outbox(&channel).len(), 1, "sent at once");
    }

    #[test]
    fn a_guest_that_exited_without_serving_gets_a_hint() {
        let (channel, _, _) = channel();
        hello(&channel);
        channel.machine_ended("exit code 0".into(), true);
        let e = channel
            .exec("compute 1000", Duration::from_secs(60), &|| false)
            .unwrap_err();
        let hint = " (the built-in guest serves its agent channel only when its command \
                    line is empty or ends with `serve`)";
        assert_eq!(
            e.to_string(),
            format!("vm 't' ended (exit code 0) before it answered exec \"compute 1000\"{hint}")
        );
        let e = channel
            .wait_guest_kvp("ready", None, Duration::from_secs(60), &|| false)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("vm 't' ended (exit code 0) before it published guest key \"ready\"{hint}")
        );
        // One that served its channel (published `ready`), or did not exit, gets none.
        for (ready, exited) in [(true, true), (false, false)] {
            let (channel, _, _) = self::channel();
            hello(&channel);
            if ready {
                send(
                    &channel,
                    Message::KvpSet {
                        key: "ready",
                        value: "1",
                    },
                );
            }
            channel.machine_ended("stopped by the host".into(), exited);
            let e = channel
                .wait_guest_kvp("color", Some("blue"), Duration::from_secs(60), &|| false)
                .unwrap_err();
            assert_eq!(
                e.to_string(),
                "vm 't' ended (stopped by the host) before it published guest key \"color\" = \
                 \"blue\""
            );
        }
    }

    #[test]
    fn the_outbox_is_bounded() {
        let (channel, _, _) = channel();
        send(
            &channel,
            Message::Hello {
                version: 1,
                agent: "test",
            },
        );
        let value = "v".repeat(agent::MAX_VALUE);
        let mut refused = None;
        for i in 0..10_000 {
            if let Err(e) = channel.host_set("k", &format!("{i}{value}")[..agent::MAX_VALUE]) {
                refused = Some(e);
                break;
            }
        }
        let e = refused.expect("the outbox fills up");
        assert!(
            e.to_string().contains("does not read its agent channel"),
            "{e}"
        );
        assert!(channel.outbox_len() <= MAX_OUTBOX);
    }

    fn hello(channel: &AgentChannel) {
        send(
            channel,
            Message::Hello {
                version: 1,
                agent: "test",
            },
        );
    }

    fn pong(channel: &AgentChannel, guest_time_us: u64) {
        send(
            channel,
            Message::Pong {
                seq: 0,
                uptime_ms: 1,
                time_generation: channel.stats().time_generation,
                guest_time_us,
            },
        );
    }

    #[test]
    fn a_pong_with_a_nonsense_time_leaves_the_drift_unknown_and_nothing_overflows() {
        let (channel, _, _) = channel();
        hello(&channel);
        let now = unix_time_us();
        // Past i64::MAX microseconds: the largest, the first, and the one that made an
        // `i64` drift exactly i64::MIN (whose `abs` overflows). None is a clock.
        for nonsense in [u64::MAX, 1 << 63, (1 << 63) + now] {
            pong(&channel, now);
            assert!(channel.drift_ms().is_some());
            pong(&channel, nonsense);
            assert_eq!(channel.drift_ms(), None, "guest time {nonsense}");
        }
        // A guest that believes it is 1970 is far off, but that is a drift, and it gets
        // the time again (three times at most).
        let generation = channel.stats().time_generation;
        for _ in 0..5 {
            pong(&channel, 1);
        }
        let drift = channel.drift_ms().unwrap();
        assert!(drift < -1e12, "{drift}");
        assert_eq!(channel.stats().time_generation, generation + TIME_RETRIES);
        assert_eq!(channel.health().state, HealthState::Ok);
    }

    #[test]
    fn a_hello_flood_is_answered_only_while_the_outbox_has_room_for_whole_answers() {
        let (channel, _, _) = channel();
        let value = "v".repeat(agent::MAX_VALUE);
        for i in 0..MAX_KEYS {
            channel.host_set(&format!("key-{i:03}"), &value).unwrap();
        }
        // One answer: WELCOME, TIME_SET and 256 keys of 1 KiB; a few fit in the outbox.
        hello(&channel);
        let answer = channel.outbox_len();
        assert!(answer > MAX_KEYS * agent::MAX_VALUE, "{answer}");
        let fit = MAX_OUTBOX / answer;
        for _ in 1..10_000 {
            hello(&channel);
        }
        assert_eq!(channel.outbox_len(), fit * answer, "whole answers only");
        assert_eq!(channel.stats().sessions, 10_000);
        let sent = channel.stats().frames_sent;
        let kinds = outbox_kinds(&channel);
        use agent::kind::*;
        assert_eq!(kinds.iter().filter(|&&k| k == WELCOME).count(), fit);
        assert_eq!(
            kinds.iter().filter(|&&k| k == KVP_SET).count(),
            fit * MAX_KEYS
        );
        // A guest that has read its channel gets its next HELLO answered in full, with
        // the keys as they are now.
        channel.host_delete("key-000").unwrap();
        channel.host_set("key-001", "short").unwrap();
        channel.take_outbox(usize::MAX);
        hello(&channel);
        let kinds = outbox_kinds(&channel);
        assert_eq!(kinds[..2], [WELCOME, TIME_SET]);
        assert_eq!(kinds.len(), 2 + MAX_KEYS - 1);
        assert!(channel.stats().frames_sent > sent);
    }

    #[test]
    fn the_drift_is_unknown_after_a_new_clock_setting_or_a_restore() {
        let (channel, _, _) = channel();
        hello(&channel);
        pong(&channel, unix_time_us());
        assert!(channel.drift_ms().is_some());
        channel.push_time();
        assert_eq!(channel.drift_ms(), None, "stale after a resume");
        pong(&channel, unix_time_us());
        assert!(channel.drift_ms().is_some());
        let saved = channel.save();
        assert!(saved.drift_us.is_some());
        let (restored, _, _) = self::channel();
        restored.restore(&saved).unwrap();
        assert_eq!(restored.drift_ms(), None, "stale after a restore");
    }

    #[test]
    fn saved_state_round_trips_and_is_checked() {
        let (channel, clock, _) = channel();
        send(
            &channel,
            Message::Hello {
                version: 1,
                agent: "test",
            },
        );
        send(
            &channel,
            Message::KvpSet {
                key: "boot_id",
                value: "abc",
            },
        );
        channel.host_set("role", "web").unwrap();
        let saved = channel.save();
        let (other, other_clock, _) = self::channel();
        other_clock.set_elapsed(clock.elapsed());
        other.restore(&saved).unwrap();
        assert_eq!(other.save(), saved);
        assert_eq!(other.guest_get("boot_id").as_deref(), Some("abc"));
        let mut bad = saved.clone();
        bad.host_kvp.push(("bad key".into(), "v".into()));
        assert!(other.restore(&bad).is_err());
        let mut bad = saved;
        bad.outbox = vec![0; MAX_OUTBOX + MAX_FRAME + 1];
        assert!(other.restore(&bad).is_err());
    }
}
