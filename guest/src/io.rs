//! Port I/O from CPL3 (the host enters us with RFLAGS.IOPL = 3) and the console.
//!
//! Under a PVH loader (QEMU, see `pvh.rs`) luvisor's idle and clock ports are not there:
//! [`idle`] and [`clock_ms`] use `pvh.rs`'s stand-ins, and the console waits for the
//! transmitter as a real 16550 needs. Exit needs no stand-in: QEMU's `isa-debug-exit`
//! device sits at the same port.

use crate::pvh;
use core::arch::asm;
use core::cell::Cell;
use core::fmt;
use luvisor_guest_abi::ports;

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects in this VM; the host handles every port.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Ends the VM cleanly with `code`.
pub fn exit(code: u32) -> ! {
    loop {
        outl(ports::EXIT, code);
    }
}

/// Sleeps up to `micros`, or until the host has an event for this VM.
pub fn idle(micros: u32) {
    if pvh::booted() {
        return pvh::idle(micros);
    }
    outl(ports::IDLE, micros);
}

/// Milliseconds of running time since the VM started (paused time excluded).
pub fn clock_ms() -> u32 {
    if pvh::booted() {
        return pvh::clock_ms();
    }
    inl(ports::CLOCK_MS)
}

/// The 16550 on COM1. luvisor's UART is always ready to transmit, so bytes go straight
/// to the transmit register without polling the line status (one exit per byte, not two).
/// QEMU's can fall behind its backend, so under PVH each byte waits for an empty
/// transmit register. While an exec runs, output goes to its capture buffer instead.
pub struct Console;

/// Where console output goes while an exec runs: a buffer of `len` bytes at `base`,
/// `used` of them written; `base == 0`: no capture.
struct Capture {
    base: Cell<u64>,
    len: Cell<usize>,
    used: Cell<usize>,
    truncated: Cell<bool>,
}

// SAFETY: only vCPU 0 runs commands and prints; the other vCPUs idle and never touch
// the capture.
unsafe impl Sync for Capture {}

static CAPTURE: Capture = Capture {
    base: Cell::new(0),
    len: Cell::new(0),
    used: Cell::new(0),
    truncated: Cell::new(false),
};

/// Sends console output to the `len` bytes at `base` until [`capture_end`]. The caller
/// owns that memory and keeps it for the whole capture.
pub fn capture_start(base: u64, len: usize) {
    CAPTURE.used.set(0);
    CAPTURE.truncated.set(false);
    CAPTURE.len.set(len);
    CAPTURE.base.set(base);
}

/// Ends the capture; returns the bytes written and whether more did not fit.
pub fn capture_end() -> (usize, bool) {
    CAPTURE.base.set(0);
    (CAPTURE.used.get(), CAPTURE.truncated.get())
}

/// Appends to the capture if one runs; returns whether it did.
fn captured(s: &str) -> bool {
    let base = CAPTURE.base.get();
    if base == 0 {
        return false;
    }
    let used = CAPTURE.used.get();
    let n = s.len().min(CAPTURE.len.get() - used);
    // SAFETY: [base, base + len) is the buffer `capture_start` was given, and
    // used + n <= len.
    unsafe { core::ptr::copy_nonoverlapping(s.as_ptr(), (base as *mut u8).add(used), n) };
    CAPTURE.used.set(used + n);
    if n < s.len() {
        CAPTURE.truncated.set(true);
    }
    true
}

impl Console {
    fn put(byte: u8) {
        if pvh::booted() {
            while inb(COM1_LSR) & LSR_THR_EMPTY == 0 {
                core::hint::spin_loop();
            }
        }
        outb(ports::SERIAL_COM1, byte);
    }
}

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if captured(s) {
            return Ok(());
        }
        for b in s.bytes() {
            if b == b'\n' {
                Self::put(b'\r');
            }
            Self::put(b);
        }
        Ok(())
    }
}

/// The 16550's line status register and its "data ready" bit.
const COM1_LSR: u16 = ports::SERIAL_COM1 + 5;
const LSR_DATA_READY: u8 = 0x01;
const LSR_THR_EMPTY: u8 = 0x20;
/// How long to sleep between looks at the receiver when no input is there. The host
/// wakes idle vCPUs when it queues input, so this only bounds a missed wake-up.
const INPUT_POLL_US: u32 = 50_000;

/// Whether a byte received on COM1 is waiting (it stays there).
pub fn input_pending() -> bool {
    inb(COM1_LSR) & LSR_DATA_READY != 0
}

/// The next byte received on COM1, if one is waiting.
pub fn try_read_byte() -> Option<u8> {
    if inb(COM1_LSR) & LSR_DATA_READY != 0 {
        Some(inb(ports::SERIAL_COM1))
    } else {
        None
    }
}

/// The next byte received on COM1. While none is there it calls `wait` with how long
/// to idle (the caller idles on the idle port rather than spinning, and serves the
/// balloon and the agent channel after each idle).
pub fn read_byte(mut wait: impl FnMut(u32)) -> u8 {
    loop {
        if let Some(byte) = try_read_byte() {
            return byte;
        }
        wait(INPUT_POLL_US);
    }
}

#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::io::Console, $($arg)*);
    }};
}
