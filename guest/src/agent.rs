//! The agent: the guest's end of the agent channel (a virtio-console, device type 3,
//! one port), speaking the protocol in `luvisor_guest_abi::agent` (see `docs/agent.md`).
//!
//! The guest has no interrupts, so the channel is served where the guest waits
//! (`service`, called from `idle`, `sleep`, `count`, `listen`, `mem-demand`, `dirty`
//! and the `serve` loop): each call takes what the host sent, answers it, and runs a
//! pending exec. It is set up at boot, says HELLO, and publishes `boot_id`,
//! `uptime_ms` (again with every heartbeat) and, once the guest takes commands from
//! outside (`serve`, `listen`), `ready = 1`.
//!
//! - **Heartbeat:** a PING gets a PONG at once, with the guest's uptime and clock.
//! - **Time:** TIME_SET sets the guest's wall clock: the host's time plus the running
//!   time since (the clock port, in ms). A PONG reports it right after.
//! - **Key-value pairs:** the host's pairs are kept in a table (`kvp-get`, `kvp-list`);
//!   the guest publishes its own with `kvp-set`.
//! - **Exec:** the command runs like a line of `listen`, its console output captured
//!   into the reply instead of going to COM1; exit code 0, or 2 after an error.
//! - **Shutdown:** SHUTDOWN_ACK, then the guest exits with code 0.

use luvisor_guest_abi::agent::{
    self as proto, kind, parse_header, Message, HEADER_LEN, MAGIC, MAX_COMMAND, MAX_FRAME, MAX_KEY,
    MAX_KEYS, MAX_OUTPUT, MAX_VALUE,
};

use crate::io;
use crate::mem::PagePool;
use crate::virtio::{self, Buffer, DeviceEntry, Mmio, Queue};

pub const DEVICE_TYPE: u32 = 3;
/// Receive buffers kept posted, of [`RX_SIZE`] bytes each.
const RX_BUFFERS: usize = 8;
const RX_SIZE: u64 = 4096;
const AGENT_NAME: &str = "luvisor-guest";
/// How long `init` waits for the host's first TIME_SET: rounds of an idle each.
const TIME_WAIT_ROUNDS: u32 = 100;
const TIME_WAIT_US: u32 = 1000;
/// How long one look at the transmit queue idles (the host wakes the vCPU as soon as
/// it has the frames, so this only bounds a missed wake-up).
const TX_WAIT_US: u32 = 100_000;
/// One key-value slot: key length, value length, then the bytes.
const SLOT: u64 = 4 + MAX_KEY as u64 + MAX_VALUE as u64;

/// A guest buffer from the page pool, used as a byte slice.
struct Area {
    base: u64,
    len: usize,
}

impl Area {
    fn new(pool: &mut PagePool, len: usize) -> Result<Area, &'static str> {
        let base = pool
            .alloc(len as u64)
            .ok_or("not enough guest memory for the agent's buffers")?;
        Ok(Area { base, len })
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: [base, base + len) is identity-mapped RAM the pool gave to this area
        // alone, for the guest's whole life; `&mut self` keeps the borrow unique.
        unsafe { core::slice::from_raw_parts_mut(self.base as *mut u8, self.len) }
    }
}

/// An exec the host asked for, waiting to run.
struct PendingExec {
    id: u32,
    len: usize,
}

pub struct Agent {
    mmio: Mmio,
    rx: Queue,
    tx: Queue,
    /// The receive buffers, RX_BUFFERS of RX_SIZE.
    rx_area: Area,
    /// Bytes received and not yet parsed: `parse.bytes()[..parse_len]`.
    parse: Area,
    parse_len: usize,
    /// Frames waiting to be sent: `tx_area.bytes()[..tx_len]`.
    tx_area: Area,
    tx_len: usize,
    /// The host's key-value pairs: `kvp_count` slots of SLOT bytes.
    kvp: Area,
    kvp_count: usize,
    /// The host's Unix time (µs) at the last TIME_SET, and the clock port's ms then.
    time: Option<(u64, u32)>,
    time_generation: u32,
    boot_id_sent: bool,
    /// The command of `exec` (MAX_COMMAND bytes), and the exec waiting to run.
    command: Area,
    exec: Option<PendingExec>,
    /// An exec runs now (a wait point inside it must not start another).
    executing: bool,
    /// Where an exec's console output goes.
    capture: Area,
    shutdown: bool,
    /// `agent-hang` is on: nothing is served until this clock-port time.
    hang_until: Option<u32>,
}

impl Agent {
    /// Sets up the device at `entry` (both queues, every receive buffer posted) and
    /// says HELLO.
    pub fn init(entry: DeviceEntry, pool: &mut PagePool) -> Result<Agent, &'static str> {
        let (mmio, _) = virtio::negotiate(entry, DEVICE_TYPE, 0)?;
        let rx = virtio::setup_queue(&mmio, 0, RX_BUFFERS as u16, pool)?;
        let tx = virtio::setup_queue(&mmio, 1, 2, pool)?;
        virtio::driver_ok(&mmio)?;
        let mut agent = Agent {
            mmio,
            rx,
            tx,
            rx_area: Area::new(pool, RX_BUFFERS * RX_SIZE as usize)?,
            parse: Area::new(pool, MAX_FRAME)?,
            parse_len: 0,
            tx_area: Area::new(pool, MAX_FRAME)?,
            tx_len: 0,
            kvp: Area::new(pool, MAX_KEYS * SLOT as usize)?,
            kvp_count: 0,
            time: None,
            time_generation: 0,
            boot_id_sent: false,
            command: Area::new(pool, MAX_COMMAND)?,
            exec: None,
            executing: false,
            capture: Area::new(pool, MAX_OUTPUT)?,
            shutdown: false,
            hang_until: None,
        };
        for i in 0..RX_BUFFERS {
            agent.post_rx(i);
        }
        agent.rx.notify();
        agent.send(&Message::Hello {
            version: proto::VERSION as u32,
            agent: AGENT_NAME,
        });
        agent.publish_uptime();
        agent.flush();
        // The host answers at once with the time, from which `boot_id` comes: wait a
        // little for it, so the guest's keys are complete before any command runs. A
        // host that does not answer only delays the boot by this bound.
        for _ in 0..TIME_WAIT_ROUNDS {
            agent.receive();
            if agent.time.is_some() {
                break;
            }
            io::idle(TIME_WAIT_US);
        }
        agent.flush();
        Ok(agent)
    }

    fn post_rx(&mut self, index: usize) {
        let buffer = Buffer {
            addr: self.rx_area.base + index as u64 * RX_SIZE,
            len: RX_SIZE as u32,
            writable: true,
        };
        let _ = self.rx.submit(&[buffer]);
    }

    /// Queues a frame; sends what is queued first when it does not fit.
    fn send(&mut self, message: &Message) {
        let need = HEADER_LEN + message.payload_len();
        if self.tx_len + need > MAX_FRAME {
            self.flush();
        }
        let at = self.tx_len;
        if let Some(n) = message.encode_frame(&mut self.tx_area.bytes()[at..]) {
            self.tx_len += n;
        }
    }

    /// Queues bytes as they are, for the hostile-guest commands.
    fn send_raw(&mut self, bytes: &[u8]) {
        if self.tx_len + bytes.len() > MAX_FRAME {
            self.flush();
        }
        let n = bytes.len().min(MAX_FRAME);
        let at = self.tx_len;
        self.tx_area.bytes()[at..at + n].copy_from_slice(&bytes[..n]);
        self.tx_len += n;
    }

    /// Hands what is queued to the host and waits until it has it.
    fn flush(&mut self) {
        if self.tx_len == 0 {
            return;
        }
        let buffer = Buffer {
            addr: self.tx_area.base,
            len: self.tx_len as u32,
            writable: false,
        };
        if self.tx.submit(&[buffer]).is_some() {
            self.tx.notify();
            let mut idles = 0;
            while self.tx.take_used().is_none() {
                io::idle(TX_WAIT_US);
                idles += 1;
                if idles % 10 == 0 && self.mmio.needs_reset() {
                    break;
                }
            }
        }
        self.tx_len = 0;
    }

    fn publish(&mut self, key: &str, value: &str) {
        self.send(&Message::KvpSet { key, value });
    }

    fn publish_uptime(&mut self) {
        let mut digits = [0u8; 20];
        let uptime = format_u64(io::clock_ms() as u64, &mut digits);
        self.publish("uptime_ms", uptime);
    }

    /// The guest's Unix time in µs, once the host set it.
    pub fn unix_time_us(&self) -> Option<u64> {
        let (at_us, at_ms) = self.time?;
        let since = io::clock_ms().wrapping_sub(at_ms) as u64;
        Some(at_us + since * 1000)
    }

    fn pong(&mut self, seq: u64) {
        let pong = Message::Pong {
            seq,
            uptime_ms: io::clock_ms() as u64,
            time_generation: self.time_generation,
            guest_time_us: self.unix_time_us().unwrap_or(0),
        };
        self.send(&pong);
    }

    /// Takes every used receive buffer into the parse buffer, handling each complete
    /// frame, and posts the buffers again. The device looks for posted buffers itself
    /// whenever it has bytes to send, so a repost is notified (an exit) only when a
    /// buffer came back full: the host may then have more waiting for room.
    fn receive(&mut self) {
        let mut filled = false;
        while let Some((head, len)) = self.rx.take_used() {
            // The buffer's index follows from its address; heads are not addresses.
            let index = self.rx_index(head);
            let len = (len as usize).min(RX_SIZE as usize);
            let mut at = 0;
            while at < len {
                let room = MAX_FRAME - self.parse_len;
                let n = room.min(len - at);
                let src = self.rx_area.base + index as u64 * RX_SIZE + at as u64;
                // SAFETY: the receive buffer is the agent's memory; the host finished
                // writing it before it put it in the used ring.
                let chunk = unsafe { core::slice::from_raw_parts(src as *const u8, n) };
                let start = self.parse_len;
                self.parse.bytes()[start..start + n].copy_from_slice(chunk);
                self.parse_len += n;
                at += n;
                self.parse_frames();
            }
            self.post_rx(index);
            filled |= len == RX_SIZE as usize;
        }
        if filled {
            self.rx.notify();
        }
    }

    /// The receive buffer a used head belongs to: heads are handed out per submit, so
    /// the agent reads the address back from the descriptor.
    fn rx_index(&self, head: u16) -> usize {
        let addr = self.rx.descriptor_addr(head);
        (addr.saturating_sub(self.rx_area.base) / RX_SIZE) as usize % RX_BUFFERS
    }

    /// Handles every complete frame in the parse buffer; drops bytes that are not one.
    fn parse_frames(&mut self) {
        let mut start = 0;
        loop {
            let data_len = self.parse_len - start;
            if data_len == 0 {
                break;
            }
            let n = data_len.min(MAGIC.len());
            let head_ok = self.parse.bytes()[start..start + n] == MAGIC[..n];
            if !head_ok {
                start += 1;
                continue;
            }
            if data_len < HEADER_LEN {
                break;
            }
            let mut header = [0u8; HEADER_LEN];
            header.copy_from_slice(&self.parse.bytes()[start..start + HEADER_LEN]);
            let Ok(h) = parse_header(&header) else {
                start += 1;
                continue;
            };
            let total = HEADER_LEN + h.length as usize;
            if data_len < total {
                break;
            }
            let payload_at = start + HEADER_LEN;
            if proto::crc32(&self.parse.bytes()[payload_at..start + total]) != h.crc {
                start += 1;
                continue;
            }
            self.handle(h.kind, payload_at, h.length as usize);
            start += total;
        }
        if start > 0 {
            let len = self.parse_len;
            self.parse.bytes().copy_within(start..len, 0);
            self.parse_len -= start;
        }
    }

    /// One frame from the host, its payload at `parse[at..at + len]`.
    fn handle(&mut self, frame_kind: u8, at: usize, len: usize) {
        // The payload is copied out of the parse buffer only where a message's strings
        // must outlive it; the area is never moved while this runs.
        // SAFETY: the parse area is the agent's own memory; nothing writes it until
        // `handle` returns, and the slice does not outlive this call.
        let payload =
            unsafe { core::slice::from_raw_parts((self.parse.base as *const u8).add(at), len) };
        let Ok(message) = Message::decode(frame_kind, payload) else {
            return;
        };
        match message {
            Message::Welcome { .. } => {}
            Message::Ping { seq, .. } => {
                self.pong(seq);
                self.publish_uptime();
            }
            Message::TimeSet {
                generation,
                unix_time_us,
            } => {
                self.time = Some((unix_time_us, io::clock_ms()));
                self.time_generation = generation;
                if !self.boot_id_sent {
                    // Unique per boot: the host's clock when this boot first learned it,
                    // mixed with how long the guest had run.
                    let id = mix(unix_time_us ^ (io::clock_ms() as u64) << 48);
                    let mut hex = [0u8; 16];
                    self.publish("boot_id", format_hex(id, &mut hex));
                    self.boot_id_sent = true;
                }
                self.pong(0);
            }
            Message::KvpSet { key, value } => self.kvp_store(key, value),
            Message::KvpDelete { key } => self.kvp_remove(key),
            Message::Exec { id, command } => {
                if command.len() > MAX_COMMAND {
                    self.send(&Message::ExecResult {
                        id,
                        code: 2,
                        truncated: false,
                        busy: false,
                        output: b"error: exec: the command is longer than 1024 bytes\n",
                    });
                } else if self.exec.is_some() {
                    // One exec waits here at most: the host sends this one again once
                    // the one held has run (a host waits for each answer, so this
                    // happens only after it gave up on one, e.g. across a restore).
                    self.send(&Message::ExecResult {
                        id,
                        code: 2,
                        truncated: false,
                        busy: true,
                        output: b"",
                    });
                } else {
                    self.command.bytes()[..command.len()].copy_from_slice(command.as_bytes());
                    self.exec = Some(PendingExec {
                        id,
                        len: command.len(),
                    });
                }
            }
            Message::Shutdown => self.shutdown = true,
            // Only the guest sends the others.
            _ => {}
        }
    }

    fn slot(&mut self, index: usize) -> &mut [u8] {
        let at = index * SLOT as usize;
        &mut self.kvp.bytes()[at..at + SLOT as usize]
    }

    fn slot_key(&mut self, index: usize) -> &[u8] {
        let slot = self.slot(index);
        let n = (slot[0] as usize).min(MAX_KEY);
        &slot[4..4 + n]
    }

    fn find(&mut self, key: &str) -> Option<usize> {
        (0..self.kvp_count).find(|&i| self.slot_key(i) == key.as_bytes())
    }

    fn kvp_store(&mut self, key: &str, value: &str) {
        if key.len() > MAX_KEY || value.len() > MAX_VALUE {
            return;
        }
        let index = match self.find(key) {
            Some(i) => i,
            None if self.kvp_count < MAX_KEYS => {
                self.kvp_count += 1;
                self.kvp_count - 1
            }
            None => return,
        };
        let slot = self.slot(index);
        slot[0] = key.len() as u8;
        slot[2..4].copy_from_slice(&(value.len() as u16).to_le_bytes());
        slot[4..4 + key.len()].copy_from_slice(key.as_bytes());
        let v = 4 + MAX_KEY;
        slot[v..v + value.len()].copy_from_slice(value.as_bytes());
    }

    fn kvp_remove(&mut self, key: &str) {
        if let Some(i) = self.find(key) {
            let last = self.kvp_count - 1;
            if i != last {
                let (a, b) = (i * SLOT as usize, last * SLOT as usize);
                self.kvp.bytes().copy_within(b..b + SLOT as usize, a);
            }
            self.kvp_count -= 1;
        }
    }

    /// The host's value for `key`, handed to `f`.
    fn kvp_with<R>(&mut self, key: &str, f: impl FnOnce(&str) -> R) -> Option<R> {
        let i = self.find(key)?;
        let slot = self.slot(i);
        let n = (u16::from_le_bytes([slot[2], slot[3]]) as usize).min(MAX_VALUE);
        let v = 4 + MAX_KEY;
        core::str::from_utf8(&slot[v..v + n]).ok().map(f)
    }
}

/// Whether the agent holds work that a wait point must do before it idles: an exec
/// taken off the ring and not run yet (none runs now), or a shutdown request. Such work
/// arrives while the guest is busy elsewhere (its agent's setup, or an exec: frames are
/// read at the exec's wait points); nothing would wake an idle guest for it, since the
/// host already delivered it.
pub fn has_work(state: &crate::State) -> bool {
    state.agent.as_ref().is_some_and(|a| {
        a.hang_until.is_none() && (a.shutdown || (a.exec.is_some() && !a.executing))
    })
}

/// Serves the channel: called wherever the guest waits. Runs the pending exec (unless
/// one runs already: a wait point inside it lands here too), and any exec that arrived
/// while it ran, and obeys a shutdown.
pub fn service(state: &mut crate::State) {
    loop {
        let Some(agent) = state.agent.as_mut() else {
            return;
        };
        if let Some(until) = agent.hang_until {
            if (io::clock_ms().wrapping_sub(until) as i32) < 0 {
                return;
            }
            agent.hang_until = None;
        }
        agent.receive();
        agent.flush();
        if agent.shutdown {
            agent.send(&Message::ShutdownAck);
            agent.flush();
            io::exit(0);
        }
        if agent.executing {
            return;
        }
        let Some(exec) = agent.exec.take() else {
            return;
        };
        run_exec(state, exec);
    }
}

/// Runs one exec and sends its result.
fn run_exec(state: &mut crate::State, exec: PendingExec) {
    let Some(agent) = state.agent.as_mut() else {
        return;
    };
    agent.executing = true;
    // The command is copied out so that running it may borrow the state (and the agent)
    // again at its wait points.
    let mut command = [0u8; MAX_COMMAND];
    command[..exec.len].copy_from_slice(&agent.command.bytes()[..exec.len]);
    // The capture area is the agent's for the guest's life; nothing else touches it
    // while the capture runs.
    io::capture_start(agent.capture.base, agent.capture.len);
    let code = match core::str::from_utf8(&command[..exec.len]) {
        Ok(line) => crate::run_exec_line(line, state),
        Err(_) => {
            crate::println!("error: exec: the command is not valid UTF-8");
            2
        }
    };
    let (len, truncated) = io::capture_end();
    let Some(agent) = state.agent.as_mut() else {
        return;
    };
    agent.executing = false;
    // SAFETY: as above; the capture ended, nothing writes the area now.
    let output = unsafe { core::slice::from_raw_parts(agent.capture.base as *const u8, len) };
    agent.send(&Message::ExecResult {
        id: exec.id,
        code,
        truncated,
        busy: false,
        output,
    });
    agent.flush();
}

/// Publishes `ready = 1`: the guest takes commands from outside now.
pub fn publish_ready(state: &mut crate::State) {
    if let Some(agent) = state.agent.as_mut() {
        agent.publish("ready", "1");
        agent.flush();
    }
}

/// `serve`: serves the channel until the host asks for a shutdown.
pub fn serve(state: &mut crate::State) -> ! {
    publish_ready(state);
    loop {
        // Serves before it idles: what arrived during the agent's setup (an exec sent
        // right after the VM started, say) is run now, not at the next heartbeat.
        state.service();
        io::idle(idle_micros(state));
    }
}

/// How long a wait point that waits for events alone may idle: without a deadline,
/// unless `agent-hang` ends earlier (then the guest must wake to serve again; a host
/// with full receive buffers would not wake it).
pub fn idle_micros(state: &crate::State) -> u32 {
    match state.agent.as_ref().and_then(|a| a.hang_until) {
        Some(until) => {
            let left = until.wrapping_sub(io::clock_ms()) as i32;
            (left.max(1) as u64 * 1000).min(u32::MAX as u64 - 1) as u32
        }
        None => u32::MAX,
    }
}

/// Whether the guest has an agent channel to serve.
pub fn present(state: &crate::State) -> bool {
    state.agent.is_some()
}

/// The agent's commands; `None` for a name that is not one of them.
pub fn run_command<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
    state: &mut crate::State,
) -> Option<Result<(), crate::blk::Error>> {
    use crate::blk::Error;
    if name == "serve" {
        if args.next().is_some() {
            return Some(Err(Error::Msg("too many arguments")));
        }
        return Some(match state.agent.as_ref() {
            None => Err(Error::Msg("the VM has no agent channel")),
            Some(agent) if agent.executing => Err(Error::Msg(
                "the guest serves its agent channel already (serve ends a command line)",
            )),
            Some(_) => serve(state),
        });
    }
    let result = match name {
        "kvp-get" | "kvp-set" | "kvp-del" | "kvp-list" | "time" | "agent-hang" | "agent-evil" => {
            let Some(agent) = state.agent.as_mut() else {
                return Some(Err(Error::Msg("the VM has no agent channel")));
            };
            match name {
                "kvp-get" => {
                    let key = args.next().ok_or(Error::Msg("missing argument"));
                    key.and_then(|key| {
                        agent
                            .kvp_with(key, |value| crate::println!("{}={}", key, value))
                            .ok_or(Error::Msg("the host has not set this key"))
                    })
                }
                "kvp-list" => {
                    for i in 0..agent.kvp_count {
                        let slot = agent.slot(i);
                        let k = (slot[0] as usize).min(MAX_KEY);
                        let n = (u16::from_le_bytes([slot[2], slot[3]]) as usize).min(MAX_VALUE);
                        let v = 4 + MAX_KEY;
                        let key = core::str::from_utf8(&slot[4..4 + k]).unwrap_or("?");
                        let value = core::str::from_utf8(&slot[v..v + n]).unwrap_or("?");
                        crate::println!("{}={}", key, value);
                    }
                    Ok(())
                }
                "kvp-set" => match (args.next(), args.next()) {
                    (Some(key), Some(value)) if proto::valid_key(key) && value.len() <= MAX_VALUE => {
                        agent.publish(key, value);
                        agent.flush();
                        crate::println!("kvp-set {}", key);
                        Ok(())
                    }
                    (Some(_), Some(_)) => Err(Error::Msg(
                        "a key is 1 to 64 bytes of letters, digits, _-.: and a value at most 1024 bytes",
                    )),
                    _ => Err(Error::Msg("give KEY VALUE")),
                },
                "kvp-del" => match args.next() {
                    Some(key) => {
                        agent.send(&Message::KvpDelete { key });
                        agent.flush();
                        Ok(())
                    }
                    None => Err(Error::Msg("missing argument")),
                },
                "time" => {
                    match agent.unix_time_us() {
                        Some(us) => {
                            let mut digits = [0u8; 20];
                            crate::println!("time {}", format_u64(us / 1000, &mut digits));
                        }
                        None => crate::println!("time unknown"),
                    }
                    Ok(())
                }
                "agent-hang" => crate::arg(args).map_err(Error::Msg).map(|ms| {
                    agent.hang_until = Some(io::clock_ms().wrapping_add(ms as u32));
                    crate::println!("agent-hang {}", ms);
                }),
                "agent-evil" => match args.next() {
                    Some(what) => evil(agent, what).map(|()| crate::println!("agent-evil {} sent", what)),
                    None => Err(Error::Msg("missing argument")),
                },
                _ => unreachable!("the names matched above"),
            }
        }
        _ => return None,
    };
    Some(result)
}

/// Sends what a broken or hostile agent would: the host must drop and count it.
fn evil(agent: &mut Agent, what: &str) -> Result<(), crate::blk::Error> {
    use crate::blk::Error;
    let all = what == "all";
    let mut sent = false;
    let mut frame = [0u8; 2048 + 64];
    if all || what == "garbage" {
        agent.send_raw(b"this is not a frame LV LVA \xff\xfe");
        sent = true;
    }
    if all || what == "crc" {
        let n = Message::KvpSet {
            key: "evil",
            value: "crc",
        }
        .encode_frame(&mut frame)
        .unwrap_or(0);
        frame[n - 1] ^= 0xff;
        agent.send_raw(&frame[..n]);
        sent = true;
    }
    if all || what == "version" {
        let n = Message::ShutdownAck.encode_frame(&mut frame).unwrap_or(0);
        frame[4] = 99;
        agent.send_raw(&frame[..n]);
        sent = true;
    }
    if all || what == "oversized" {
        // A header announcing a 1 MiB payload, then some of it.
        let n = Message::ShutdownAck.encode_frame(&mut frame).unwrap_or(0);
        frame[8..12].copy_from_slice(&(1u32 << 20).to_le_bytes());
        agent.send_raw(&frame[..n]);
        agent.send_raw(&[0u8; 1024]);
        sent = true;
    }
    if all || what == "unknown" {
        let payload = b"from the future";
        proto::write_header(&mut frame, 0x7f, payload);
        frame[HEADER_LEN..HEADER_LEN + payload.len()].copy_from_slice(payload);
        agent.send_raw(&frame[..HEADER_LEN + payload.len()]);
        sent = true;
    }
    if all || what == "kvp-big" {
        let value = [b'v'; 2048];
        let value = core::str::from_utf8(&value).unwrap_or("");
        agent.send(&Message::KvpSet { key: "evil", value });
        sent = true;
    }
    if all || what == "truncated" {
        // A valid header and CRC around a payload too short for its type.
        let payload = [200u8, 0, b'k'];
        proto::write_header(&mut frame, kind::KVP_SET, &payload);
        frame[HEADER_LEN..HEADER_LEN + 3].copy_from_slice(&payload);
        agent.send_raw(&frame[..HEADER_LEN + 3]);
        sent = true;
    }
    if !sent {
        return Err(Error::Msg(
            "give garbage, crc, version, oversized, unknown, kvp-big, truncated or all",
        ));
    }
    agent.flush();
    Ok(())
}

/// A 64-bit mixer (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `v` in decimal.
fn format_u64(mut v: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    core::str::from_utf8(&buf[i..]).unwrap_or("?")
}

/// `v` as 16 lowercase hex digits.
fn format_hex(v: u64, buf: &mut [u8; 16]) -> &str {
    for (i, b) in buf.iter_mut().enumerate() {
        let nibble = (v >> (60 - 4 * i)) & 0xf;
        *b = b"0123456789abcdef"[nibble as usize];
    }
    core::str::from_utf8(buf).unwrap_or("?")
}
