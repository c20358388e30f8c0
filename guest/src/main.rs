//! The luvisor built-in test guest.
//!
//! A freestanding program that runs entirely at CPL3: the host loads it at 1 MiB, builds
//! identity-mapped page tables and a GDT, and enters it in 64-bit user mode (see
//! `docs/architecture.md`). It talks to the host only through the ports in `luvisor_guest_abi`.
//!
//! It reads a command line from the boot-info block: commands separated by `;`, run in
//! order by vCPU 0 (`listen` reads more from the serial console). When they run out,
//! the guest exits with code 0. Output format is stable because tests and benchmarks
//! parse it; errors start with `error:` and end the VM with exit code 2. See
//! `guest/README.md` for the command reference.
#![no_std]
#![no_main]

mod blk;
mod io;
mod mem;
mod virtio;

use blk::{Blk, Error};
use core::panic::PanicInfo;
use luvisor_guest_abi::{ports, BootInfo, BOOT_MAGIC, BOOT_VERSION};
use mem::PagePool;
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
        listening: false,
    };
    for word in cmdline.split_whitespace() {
        if let Some(entry) = virtio::parse_entry(word) {
            if state.device_count < MAX_DEVICES {
                state.devices[state.device_count] = Some(entry);
                state.device_count += 1;
            }
        }
    }
    for command in cmdline.split(';') {
        let mut words = command
            .split_whitespace()
            .filter(|w| !w.starts_with(ENTRY_PREFIX));
        let Some(name) = words.next() else { continue };
        if let Err(error) = run(name, &mut words, &mut state) {
            println!("error: {}: {}", name, error);
            io::exit(2);
        }
    }
    io::exit(0)
}

/// Most virtio devices the guest keeps track of.
const MAX_DEVICES: usize = 16;

/// What commands share: the page pool and the block devices.
struct State {
    pool: PagePool,
    devices: [Option<DeviceEntry>; MAX_DEVICES],
    device_count: usize,
    /// Index of the disk `blk-*` commands use (`blk-use N`).
    current: usize,
    blk: Option<Blk>,
    /// A `listen` is reading the console (it does not nest).
    listening: bool,
}

impl State {
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
            count(period, limit);
        }
        "compute" => println!("compute {:016x}", compute(arg(args)?)),
        "touch" => {
            let mib = arg(args)?;
            let checksum = touch(&mut state.pool, mib)?;
            println!("touched {} MiB {:016x}", mib, checksum);
        }
        "sleep" => sleep_ms(arg(args)?),
        "idle" => loop {
            io::idle(u32::MAX);
        },
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
        _ => return Err(Error::Msg("unknown command")),
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
    let mut line = [0u8; LISTEN_LINE_MAX];
    let mut len = 0;
    let mut too_long = false;
    loop {
        match io::read_byte() {
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
fn count(period_ms: u64, limit: u64) {
    let mut next = io::clock_ms() as u64 + period_ms;
    let mut n = 0;
    while n < limit {
        let now = io::clock_ms() as u64;
        if now < next {
            io::idle(((next - now) * 1000).min(u32::MAX as u64) as u32);
            continue;
        }
        n += 1;
        println!("count {}", n);
        next += period_ms;
    }
}

fn sleep_ms(ms: u64) {
    let deadline = io::clock_ms() as u64 + ms;
    loop {
        let now = io::clock_ms() as u64;
        if now >= deadline {
            return;
        }
        io::idle(((deadline - now) * 1000).min(u32::MAX as u64) as u32);
    }
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
    println!("error: guest panic: {}", info);
    io::exit(3)
}
