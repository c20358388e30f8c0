//! A VM's console output: a bounded ring buffer that callers can wait on, optionally
//! teed to a file.
//!
//! Offsets are positions in the whole output stream since boot, so a caller can wait for
//! text "after what I have already seen" even when the ring has wrapped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

/// Default ring size: enough for every test's output, bounded for long-running guests.
pub const DEFAULT_CONSOLE_CAPACITY: usize = 1 << 20;

struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes ever written; the ring holds `[total - bytes.len(), total)`.
    total: u64,
    tee: Option<LineWriter<File>>,
    /// Set once the producer is gone (the VM stopped), so waiters stop waiting.
    closed: bool,
}

pub struct Console {
    ring: Mutex<Ring>,
    grew: Condvar,
}

/// Why [`Console::wait_for`] returned without a match.
#[derive(Debug, PartialEq, Eq)]
pub enum ConsoleWaitEnd {
    TimedOut,
    Closed,
    /// The caller's cancel check said to stop.
    Cancelled,
}

/// How often a wait polls its cancel check.
pub const CANCEL_POLL: std::time::Duration = std::time::Duration::from_millis(50);

impl Console {
    pub fn new(capacity: usize, tee: Option<File>) -> Arc<Console> {
        Arc::new(Console {
            ring: Mutex::new(Ring {
                bytes: VecDeque::new(),
                capacity: capacity.max(1),
                total: 0,
                tee: tee.map(LineWriter::new),
                closed: false,
            }),
            grew: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends guest output. Carriage returns are dropped: the guest writes CRLF for
    /// terminals, callers want lines.
    pub fn push(&self, data: &[u8]) {
        let mut ring = self.lock();
        for &b in data.iter().filter(|&&b| b != b'\r') {
            if ring.bytes.len() == ring.capacity {
                ring.bytes.pop_front();
            }
            ring.bytes.push_back(b);
            ring.total += 1;
        }
        if let Some(tee) = ring.tee.as_mut() {
            // The tee is best effort: a full disk must not stop the guest.
            let _ = tee.write_all(data);
        }
        drop(ring);
        self.grew.notify_all();
    }

    /// Marks the stream finished and wakes every waiter.
    pub fn close(&self) {
        let mut ring = self.lock();
        ring.closed = true;
        if let Some(tee) = ring.tee.as_mut() {
            let _ = tee.flush();
        }
        drop(ring);
        self.grew.notify_all();
    }

    /// Everything still in the ring, lossily decoded.
    pub fn text(&self) -> String {
        let ring = self.lock();
        let (a, b) = ring.bytes.as_slices();
        let mut all = Vec::with_capacity(a.len() + b.len());
        all.extend_from_slice(a);
        all.extend_from_slice(b);
        String::from_utf8_lossy(&all).into_owned()
    }

    /// Bytes written since boot (the offset just past the newest byte).
    pub fn total(&self) -> u64 {
        self.lock().total
    }

    /// The last complete or partial line, for error messages.
    pub fn last_line(&self) -> String {
        let text = self.text();
        text.trim_end_matches('\n')
            .rsplit('\n')
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until `pattern` appears at or after stream offset `from`. Returns the whole
    /// line holding the match and the stream offset just past the match.
    /// `cancel` is polled every [`CANCEL_POLL`]; when it returns true the wait ends.
    pub fn wait_for(
        &self,
        pattern: &str,
        from: u64,
        deadline: Instant,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(String, u64), ConsoleWaitEnd> {
        let mut ring = self.lock();
        // Each wake-up searches only what is new (plus a pattern's length of overlap).
        let mut search_from = from;
        loop {
            if let Some(found) = find_in_ring(&mut ring, pattern.as_bytes(), search_from) {
                return Ok(found);
            }
            search_from = search_from.max(ring.total.saturating_sub(pattern.len() as u64));
            if ring.closed {
                return Err(ConsoleWaitEnd::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ConsoleWaitEnd::TimedOut);
            }
            if cancel() {
                return Err(ConsoleWaitEnd::Cancelled);
            }
            ring = self
                .grew
                .wait_timeout(ring, (deadline - now).min(CANCEL_POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

fn find_in_ring(ring: &mut Ring, pattern: &[u8], from: u64) -> Option<(String, u64)> {
    let first = ring.total - ring.bytes.len() as u64;
    let skip = from.saturating_sub(first).min(ring.bytes.len() as u64) as usize;
    // Contiguous in place: no copy (it only moves bytes after the ring wrapped).
    let bytes: &[u8] = ring.bytes.make_contiguous();
    let hay = &bytes[skip..];
    let pos = if pattern.is_empty() {
        Some(0)
    } else {
        hay.windows(pattern.len()).position(|w| w == pattern)
    }?;
    let at = skip + pos;
    let line_start = bytes[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line_end = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| at + i);
    let line = String::from_utf8_lossy(&bytes[line_start..line_end]).into_owned();
    Some((line, first + (at + pattern.len()) as u64))
}

/// The `Write` end the serial device prints into.
pub struct ConsoleWriter(pub Arc<Console>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn finds_lines_and_offsets() {
        let c = Console::new(64, None);
        c.push(b"boot\r\nhello from luvisor guest\r\ncount 1\n");
        let soon = Instant::now() + Duration::from_millis(10);
        let (line, end) = c.wait_for("luvisor", 0, soon, &|| false).unwrap();
        assert_eq!(line, "hello from luvisor guest");
        assert_eq!(end, "boot\nhello from luvisor".len() as u64);
        assert_eq!(
            c.wait_for("hello", end, soon, &|| false),
            Err(ConsoleWaitEnd::TimedOut)
        );
        c.close();
        assert_eq!(
            c.wait_for("nope", 0, soon + Duration::from_secs(5), &|| false),
            Err(ConsoleWaitEnd::Closed)
        );
        assert_eq!(c.last_line(), "count 1");
    }

    #[test]
    fn ring_is_bounded_and_offsets_survive_wrap() {
        let c = Console::new(8, None);
        c.push(b"0123456789abcdef");
        assert_eq!(c.text(), "89abcdef");
        assert_eq!(c.total(), 16);
        let (_, end) = c.wait_for("cd", 3, Instant::now(), &|| false).unwrap();
        assert_eq!(end, 14);
    }

    #[test]
    fn waiter_wakes_on_push() {
        let c = Console::new(64, None);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            c2.wait_for(
                "ready",
                0,
                Instant::now() + Duration::from_secs(10),
                &|| false,
            )
        });
        std::thread::sleep(Duration::from_millis(20));
        c.push(b"ready\n");
        assert_eq!(t.join().unwrap().unwrap().0, "ready");
    }
}
