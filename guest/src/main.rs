//! The luvisor built-in test guest.
//!
//! A freestanding program that runs entirely at CPL3: the host loads it at 1 MiB, builds
//! identity-mapped page tables and a GDT, and enters it in 64-bit user mode (see
//! `docs/architecture.md`). It talks to the host only through the ports in `luvisor_guest_abi`.
//!
//! It reads a command line from the boot-info block: commands separated by `;`, run in
//! order by vCPU 0 (`listen` reads more from the serial console). When they run out,
//! the guest exits with code 0; but a command line that is empty or ends with `serve`
//! serves the agent channel (`agent.rs`) until the host shuts it down. Output format
//! is stable because tests and benchmarks
//! parse it; errors start with `error:` and end the VM with exit code 2. See
//! `guest/README.md` for the command reference.
#![no_std]
#![no_main]

mod agent;
mod balloon;
mod blk;
mod dirty;
mod io;
mod mem;
mod pvh;
mod virtio;

use balloon::Balloon;
use blk::{Blk, Error};
use core::panic::PanicInfo;
use luvisor_guest_abi::{ports, BootInfo, BOOT_MAGIC, BOOT_VERSION};
use mem::{PagePool, RangeList, PAGE};
use virtio::{DeviceEntry, ENTRY_PREFIX};

extern "C" {
    /// End of the loaded image (from linker.ld); free RAM starts above it.
    static __guest_image_end: u8;
}

/// Entry point of every vCPU.
///
/// # Safety
/// Only the host calls it, with `boot` pointing at the boot-info block it wrote.
#[no_mangle]
#[link_section = ".text._start"]
pub unsafe extern "C" fn _start(boot: *const BootInfo, vcpu_index: u64) -> ! {
    if vcpu_index != 0 {
        // Secondary vCPUs have nothing to do yet; they sleep without a deadline.
        loop {
            io::idle(u32::MAX);
        }
    }
    // SAFETY: the host wrote a BootInfo at this address before starting any vCPU, and
    // nothing writes it afterwards.
    let boot = unsafe { &*boot };
    if boot.magic != BOOT_MAGIC || boot.version != BOOT_VERSION {
        println!(
            "error: boot-info block has bad magic or version {}",
            boot.version
        );
        io::exit(2);
    }
    // SAFETY: taking the address of a linker-defined symbol; it is never read.
    let image_end = unsafe { &__guest_image_end as *const u8 as u64 };
    let pool = PagePool::new(boot.ram_regions(), image_end);
    io::outl(ports::READY, 1);

    let Some(cmdline) = boot.cmdline() else {
        println!("error: command line is not valid UTF-8");
        io::exit(2);
    };
    let mut state = State {
        pool,
        devices: [None; MAX_DEVICES],
        device_count: 0,
        current: 0,
        blk: None,
        balloon: None,
        agent: None,
        listening: false,
        dirty: None,
    };
    let ram_total: u64 = boot.ram_regions().iter().map(|r| r.size).sum();
    for word in cmdline.split_whitespace() {
        let Some(entry) = virtio::parse_entry(word) else {
            continue;
        };
        // The balloon is set up now, and holds the guest down to its target before any
        // command runs; other devices (disks) on first use.
        if virtio::device_type(entry) == Some(balloon::DEVICE_TYPE) {
            if state.balloon.is_none() {
                match Balloon::init(entry, &mut state.pool, ram_total) {
                    Ok(b) => state.balloon = Some(b),
                    Err(e) => {
                        println!("error: balloon: {}", e);
                        io::exit(2);
                    }
                }
            }
        } else if virtio::device_type(entry) == Some(agent::DEVICE_TYPE) {
            if state.agent.is_none() {
                match agent::Agent::init(entry, &mut state.pool) {
                    Ok(a) => state.agent = Some(a),
                    Err(e) => {
                        println!("error: agent: {}", e);
                        io::exit(2);
                    }
                }
            }
        } else if state.device_count < MAX_DEVICES {
            state.devices[state.device_count] = Some(entry);
            state.device_count += 1;
        }
    }
    let mut ran = false;
    for command in cmdline.split(';') {
        let mut words = command
            .split_whitespace()
            .filter(|w| !w.starts_with(ENTRY_PREFIX));
        let Some(name) = words.next() else { continue };
        ran = true;
        if let Err(error) = run(name, &mut words, &mut state) {
            println!("error: {}: {}", name, error);
            io::exit(2);
        }
    }
    if !ran && agent::present(&state) {
        agent::serve(&mut state);
    }
    io::exit(0)
}

/// Most virtio devices the guest keeps track of.
const MAX_DEVICES: usize = 16;

/// What commands share: the page pool, the block devices, the balloon and the agent.
struct State {
    pool: PagePool,
    /// The disks, in order (every virtio device but the balloon and the agent).
    devices: [Option<DeviceEntry>; MAX_DEVICES],
    device_count: usize,
    /// Index of the disk `blk-*` commands use (`blk-use N`).
    current: usize,
    blk: Option<Blk>,
    balloon: Option<Balloon>,
    agent: Option<agent::Agent>,
    /// A `listen` is reading the console (it does not nest).
    listening: bool,
    /// The region `dirty` rewrites, kept between runs so that `dirty-verify` can check
    /// it and a later `dirty` goes on counting.
    dirty: Option<dirty::DirtyRegion>,
}

impl State {
    /// Serves the balloon and the agent channel, if the VM has them. Called wherever
    /// the guest waits.
    fn service(&mut self) {
        if let Some(balloon) = &mut self.balloon {
            balloon.service(&mut self.pool);
        }
        agent::service(self);
    }

    /// A wait point: idles up to `micros` (or until an event), then serves the devices.
    /// It does not idle when the agent already holds work (an exec or a shutdown that
    /// arrived while the guest was busy elsewhere, e.g. during its agent's setup):
    /// nothing would wake the guest for work it has already taken off its ring.
    fn wait(&mut self, micros: u32) {
        if !agent::has_work(self) {
            io::idle(micros);
        }
        self.service();
    }

    /// The driver for the current disk, set up on first use.
    fn blk(&mut self) -> Result<&mut Blk, Error> {
        if self.blk.is_none() {
            let entry = self.devices[..self.device_count]
                .get(self.current)
                .copied()
                .flatten()
                .ok_or(Error::Msg("no such disk (the VM has fewer disks)"))?;
            self.blk = Some(Blk::init(entry, &mut self.pool)?);
        }
        Ok(self.blk.as_mut().expect("set above"))
    }
}

fn run<'a>(
    name: &str,
    args: &mut impl Iterator<Item = &'a str>,
    state: &mut State,
) -> Result<(), Error> {
    match name {
        "hello" => println!("hello from luvisor guest"),
        "count" => {
            let period = arg(args)?;
            let limit = optional_arg(args)?.unwrap_or(u64::MAX);
            count(state, period, limit);
        }
        "compute" => println!("compute {:016x}", compute(arg(args)?)),
        "touch" => {
            let mib = arg(args)?;
            let checksum = touch(&mut state.pool, mib)?;
            println!("touched {} MiB {:016x}", mib, checksum);
        }
        "sleep" => sleep_ms(state, arg(args)?),
        "idle" => loop {
            let micros = agent::idle_micros(state);
            state.wait(micros);
        },
        "balloon-report" => {
            let on = match args.next() {
                Some("on") => true,
                Some("off") => false,
                _ => return Err(Error::Msg("give on or off")),
            };
            let balloon = state.balloon.as_mut().ok_or(Error::Msg(
                "the VM has no balloon (its memory is not dynamic)",
            ))?;
            balloon.reporting = on;
            println!("balloon-report {}", if on { "on" } else { "off" });
        }
        "mem-demand" => {
            let profile = args.next().ok_or(Error::Msg("missing argument"))?;
            if args.next().is_some() {
                return Err(Error::Msg("too many arguments"));
            }
            mem_demand(state, profile)?;
        }
        "dirty" => {
            let (mib, rate) = (arg(args)?, arg(args)?);
            dirty::run(state, mib, rate)?;
        }
        "dirty-verify" => dirty::verify(state)?,
        "exit" => io::exit(arg(args)? as u32),
        "listen" => listen(state)?,
        "fault" => fault(),
        "blk-use" => {
            let index = arg(args)? as usize;
            if index >= state.device_count {
                return Err(Error::Msg("no such disk (the VM has fewer disks)"));
            }
            state.current = index;
            state.blk = None;
        }
        "blk-info" => {
            let blk = state.blk()?;
            println!(
                "blk-info capacity={} ro={} features={:#x}",
                blk.capacity,
                blk.readonly() as u8,
                blk.features()
            );
        }
        "blk-id" => {
            let mut id = [0u8; 20];
            let n = state.blk()?.id(&mut id)?;
            println!("blk-id {}", core::str::from_utf8(&id[..n]).unwrap_or("?"));
        }
        "blk-write" => {
            let (start, count, seed) = (arg(args)?, arg(args)?, arg(args)?);
            state.blk()?.write_pattern(start, count, seed)?;
            println!("blk-write {} {} done", start, count);
        }
        "blk-fill" => {
            let (start, count, value) = (arg(args)?, arg(args)?, arg(args)?);
            state.blk()?.fill(start, count, value as u8)?;
            println!("blk-fill {} {} done", start, count);
        }
        "blk-verify" => {
            let (start, count, seed) = (arg(args)?, arg(args)?, arg(args)?);
            let mut mismatches = 0u64;
            state.blk()?.verify_pattern(start, count, seed, |sector| {
                mismatches += 1;
                if mismatches <= 5 {
                    println!("mismatch at sector {}", sector);
                }
            })?;
            println!("blk-verify {} {}: {} mismatches", start, count, mismatches);
        }
        "blk-evil" => {
            let kind = args.next().ok_or(Error::Msg("missing argument"))?;
            let outcome = state.blk()?.evil(kind)?;
            // The driver's view of the queue is now wrong: the next blk-* command resets
            // the device and sets it up again.
            state.blk = None;
            match outcome {
                Some((len, status)) => println!(
                    "blk-evil {}: used length {} status {:#x}",
                    kind, len, status
                ),
                None => println!("blk-evil {}: device needs reset", kind),
            }
        }
        "blk-poke" => {
            let sector = arg(args)?;
            let mut bytes = [0u8; 512];
            let n = parse_hex(
                args.next().ok_or(Error::Msg("missing argument"))?,
                &mut bytes,
            )?;
            // The outcome is printed rather than ending the guest: refusals are what tests
            // of a hostile guest expect to see.
            match state.blk()?.poke(sector, &bytes[..n]) {
                Ok(()) => println!("blk-poke {}: ok", sector),
                Err(Error::Status { status, .. }) => {
                    println!("blk-poke {}: status {:#x}", sector, status)
                }
                Err(e) => return Err(e),
            }
        }
        "blk-flush" => {
            state.blk()?.flush()?;
            println!("blk-flush done");
        }
        "blk-discard" | "blk-zero" => {
            let (start, count) = (arg(args)?, arg(args)?);
            state.blk()?.discard(start, count, name == "blk-zero")?;
            println!("{} {} {} done", name, start, count);
        }
        "blk-bench" => {
            let random = match args.next() {
                Some("seq") => false,
                Some("rand") => true,
                _ => return Err(Error::Msg("mode must be seq or rand")),
            };
            let write = match args.next() {
                Some("read") => false,
                Some("write") => true,
                _ => return Err(Error::Msg("operation must be read or write")),
            };
            let (size_kb, seconds) = (arg(args)?, arg(args)?);
            let (ops, bytes, ms) = state.blk()?.bench(random, write, size_kb * 1024, seconds)?;
            let tenths_mib = bytes * 10_000 / ms / (1 << 20);
            println!(
                "blk-bench {} {} {}K: {}.{} MiB/s, {} IOPS",
                if random { "rand" } else { "seq" },
                if write { "write" } else { "read" },
                size_kb,
                tenths_mib / 10,
                tenths_mib % 10,
                ops * 1000 / ms
            );
        }
        _ => match agent::run_command(name, args, state) {
            Some(result) => result?,
            None => return Err(Error::Msg("unknown command")),
        },
    }
    if args.next().is_some() {
        return Err(Error::Msg("too many arguments"));
    }
    Ok(())
}

/// Longest line `listen` accepts.
const LISTEN_LINE_MAX: usize = 1024;

/// Runs commands read from the console (COM1 input), a line at a time, until a line
/// runs a bare `exit`. Prints `listening` once, so that the host knows when to send;
/// echoes nothing. A line ends at `\r` or `\n`; backspace (0x08) and DEL (0x7f) drop
/// the last byte of the line. An error prints `error: ...` and skips the rest of its
/// line; the guest goes on listening.
fn listen(state: &mut State) -> Result<(), Error> {
    if state.listening {
        return Err(Error::Msg("already listening"));
    }
    state.listening = true;
    println!("listening");
    agent::publish_ready(state);
    let mut line = [0u8; LISTEN_LINE_MAX];
    let mut len = 0;
    let mut too_long = false;
    loop {
        match io::read_byte(|micros| state.wait(micros)) {
            b'\r' | b'\n' => {
                let keep_listening = if too_long {
                    println!("error: listen: line longer than {} bytes", LISTEN_LINE_MAX);
                    true
                } else {
                    run_line(&line[..len], state)
                };
                len = 0;
                too_long = false;
                if !keep_listening {
                    break;
                }
            }
            0x08 | 0x7f => len = len.saturating_sub(1),
            byte if len < LISTEN_LINE_MAX => {
                line[len] = byte;
                len += 1;
            }
            _ => too_long = true,
        }
    }
    state.listening = false;
    Ok(())
}

/// Runs one line `listen` read, its commands separated by `;`. Returns false when it
/// reached a bare `exit`, which ends `listen` (commands after it on the line do not run).
fn run_line(line: &[u8], state: &mut State) -> bool {
    let Ok(text) = core::str::from_utf8(line) else {
        println!("error: listen: line is not valid UTF-8");
        return true;
    };
    for command in text.split(';') {
        let mut words = command.split_whitespace();
        let Some(name) = words.next() else { continue };
        if name == "exit" && words.clone().next().is_none() {
            return false;
        }
        if let Err(error) = run(name, &mut words, state) {
            println!("error: {}: {}", name, error);
            break;
        }
    }
    true
}

/// Runs one exec's line (commands separated by `;`, as `listen` takes them); returns
/// the exit code: 0, or 2 after the first command that failed.
fn run_exec_line(line: &str, state: &mut State) -> u32 {
    for command in line.split(';') {
        let mut words = command.split_whitespace();
        let Some(name) = words.next() else { continue };
        if let Err(error) = run(name, &mut words, state) {
            println!("error: {}: {}", name, error);
            return 2;
        }
    }
    0
}

/// Parses hex digits (two per byte, no prefix) into `out`; returns the byte count.
fn parse_hex(text: &str, out: &mut [u8]) -> Result<usize, &'static str> {
    let digits = text.as_bytes();
    if digits.is_empty() || !digits.len().is_multiple_of(2) {
        return Err("hex bytes must be an even, non-zero number of digits");
    }
    if digits.len() / 2 > out.len() {
        return Err("more hex bytes than a sector holds");
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Ok(c - b'0'),
        b'a'..=b'f' => Ok(c - b'a' + 10),
        b'A'..=b'F' => Ok(c - b'A' + 10),
        _ => Err("not a hex digit"),
    };
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Ok(digits.len() / 2)
}

fn arg<'a>(args: &mut impl Iterator<Item = &'a str>) -> Result<u64, &'static str> {
    optional_arg(args)?.ok_or("missing argument")
}

fn optional_arg<'a>(args: &mut impl Iterator<Item = &'a str>) -> Result<Option<u64>, &'static str> {
    match args.next() {
        None => Ok(None),
        Some(word) => word
            .parse()
            .map(Some)
            .map_err(|_| "argument is not a decimal number"),
    }
}

/// Prints `count 1`, `count 2`, ... every `period_ms` of running time, `limit` times.
fn count(state: &mut State, period_ms: u64, limit: u64) {
    let mut next = io::clock_ms() as u64 + period_ms;
    let mut n = 0;
    while n < limit {
        let now = io::clock_ms() as u64;
        if now < next {
            state.wait(((next - now) * 1000).min(u32::MAX as u64) as u32);
            continue;
        }
        n += 1;
        println!("count {}", n);
        next += period_ms;
    }
}

fn sleep_ms(state: &mut State, ms: u64) {
    let deadline = io::clock_ms() as u64 + ms;
    loop {
        let now = io::clock_ms() as u64;
        if now >= deadline {
            return;
        }
        state.wait(((deadline - now) * 1000).min(u32::MAX as u64) as u32);
    }
}

/// Most steps in a `mem-demand` profile.
const DEMAND_STEPS: usize = 32;
/// Most separate pieces of memory `mem-demand` holds.
const DEMAND_RANGES: usize = 256;

/// `mem-demand SIZE@MS,...`: at each step's time (ms of running time after the command
/// starts) it allocates and touches, or frees, memory until it holds the step's size,
/// and prints `mem-demand SIZE` (or `mem-demand SIZE short BYTES` when the guest has
/// too little memory, after taking back what the balloon would give). It then holds the
/// last size, serving the balloon, until the VM is stopped: it never returns.
fn mem_demand(state: &mut State, profile: &str) -> Result<(), Error> {
    let mut steps = [(0u64, 0u64); DEMAND_STEPS];
    let n = parse_profile(profile, &mut steps)?;
    let mut held: RangeList<DEMAND_RANGES> = RangeList::new();
    let start = io::clock_ms();
    for &(bytes, at) in &steps[..n] {
        loop {
            let elapsed = io::clock_ms().wrapping_sub(start) as u64;
            if elapsed >= at {
                break;
            }
            state.wait(((at - elapsed) * 1000).min(u32::MAX as u64) as u32);
        }
        let short = demand_to(state, &mut held, bytes);
        let mut size = [0u8; 24];
        let size = format_size(bytes, &mut size);
        if short == 0 {
            println!("mem-demand {}", size);
        } else {
            println!("mem-demand {} short {}", size, short);
        }
        state.service();
    }
    loop {
        let micros = agent::idle_micros(state);
        state.wait(micros);
    }
}

/// Allocates and touches, or frees, until `held` holds `bytes`; returns how many bytes
/// short it stayed.
fn demand_to(state: &mut State, held: &mut RangeList<DEMAND_RANGES>, bytes: u64) -> u64 {
    while held.total() > bytes {
        let Some((start, len)) = held.take_last(held.total() - bytes) else {
            break;
        };
        state.pool.free(start, len);
    }
    while held.total() < bytes {
        let need = bytes - held.total();
        let Some((start, len)) = state.pool.take(need) else {
            // Out of memory: take pages back from the balloon, if the host allows it.
            let back = match &mut state.balloon {
                Some(balloon) => balloon.deflate_for(&mut state.pool, need),
                None => 0,
            };
            if back == 0 {
                break;
            }
            continue;
        };
        if !held.push(start, len) {
            state.pool.free_untouched(start, len);
            break;
        }
        let mut page = start;
        while page < start + len {
            // SAFETY: [start, start + len) is identity-mapped RAM the pool handed to us
            // alone; one write per page makes the host back it.
            unsafe { (page as *mut u64).write_volatile(page | 1) };
            page += PAGE;
        }
    }
    bytes.saturating_sub(held.total())
}

/// Parses `SIZE@MS,SIZE@MS,...` into `out`: sizes in bytes (suffix K, M or G allowed),
/// times in ms, ascending. Returns the number of steps.
fn parse_profile(profile: &str, out: &mut [(u64, u64)]) -> Result<usize, &'static str> {
    let mut n = 0;
    for step in profile.split(',') {
        let (size, at) = step
            .split_once('@')
            .ok_or("each step is SIZE@MS, e.g. 64M@0")?;
        let size = parse_size(size)?;
        let at: u64 = at
            .parse()
            .map_err(|_| "a step's time is not a number of ms")?;
        if n == out.len() {
            return Err("too many steps (at most 32)");
        }
        if n > 0 && at < out[n - 1].1 {
            return Err("step times must not go backwards");
        }
        out[n] = (size, at);
        n += 1;
    }
    Ok(n)
}

/// `123`, `64K`, `300M`, `2G` in bytes.
fn parse_size(text: &str) -> Result<u64, &'static str> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().map_err(|_| "a step's size is not a size")?;
    value
        .checked_mul(1 << shift)
        .filter(|v| *v < 1 << 48)
        .ok_or("a step's size is too large")
}

/// `bytes` as the largest whole unit: `2G`, `300M`, `64K` or plain bytes.
fn format_size(bytes: u64, buf: &mut [u8; 24]) -> &str {
    let (value, unit) = match bytes {
        0 => (0, ""),
        b if b % (1 << 30) == 0 => (b >> 30, "G"),
        b if b % (1 << 20) == 0 => (b >> 20, "M"),
        b if b % (1 << 10) == 0 => (b >> 10, "K"),
        b => (b, ""),
    };
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut v = value;
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    let len = digits.len() - i;
    buf[..len].copy_from_slice(&digits[i..]);
    buf[len..len + unit.len()].copy_from_slice(unit.as_bytes());
    core::str::from_utf8(&buf[..len + unit.len()]).unwrap_or("?")
}

/// A CPU-bound xorshift loop; the host's tests compute the same value.
pub fn compute(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

/// Writes every word of `mib` MiB from the page pool, reads it back into a checksum, and
/// returns the pages to the pool (they stay resident on the host).
fn touch(pool: &mut PagePool, mib: u64) -> Result<u64, &'static str> {
    let len = mib.checked_mul(1 << 20).ok_or("size too large")?;
    if len == 0 {
        return Ok(0);
    }
    let start = pool.alloc(len).ok_or("not enough free guest memory")?;
    let words = (len / 8) as usize;
    let base = start as *mut u64;
    for i in 0..words {
        // SAFETY: [start, start+len) is identity-mapped RAM that the pool handed to us alone.
        unsafe { base.add(i).write_volatile(touch_pattern(i as u64)) };
    }
    let mut checksum: u64 = 0;
    for i in 0..words {
        // SAFETY: as above.
        let v = unsafe { base.add(i).read_volatile() };
        checksum = checksum.rotate_left(5) ^ v;
    }
    pool.free(start, len);
    Ok(checksum)
}

fn touch_pattern(word: u64) -> u64 {
    word.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xA5A5_A5A5_A5A5_A5A5
}

/// Executes an undefined instruction. The host installs no IDT, so the exception cannot
/// be delivered and the CPU shuts down (a triple fault).
fn fault() -> ! {
    // SAFETY: deliberately faults; nothing after it runs.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    // A panic inside an exec goes to the console, not to a reply that is never sent.
    io::capture_end();
    println!("error: guest panic: {}", info);
    io::exit(3)
}
