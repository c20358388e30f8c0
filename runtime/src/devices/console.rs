//! A VM's console output: a bounded ring buffer that callers can wait on, optionally
//! teed to a file.
//!
//! Offsets are positions in the whole output stream since boot, so a caller can wait for
//! text "after what I have already seen" even when the ring has wrapped.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use thiserror::Error;

/// Default ring size: enough for every test's output, bounded for long-running guests.
pub const DEFAULT_CONSOLE_CAPACITY: usize = 1 << 20;

/// A tee line longer than this is written out before its newline arrives.
const TEE_LINE_MAX: usize = 4096;

/// Why a console file could not be opened.
#[derive(Debug, Error)]
pub enum ConsoleFileError {
    #[error("console fifo {path} has no reader: open it for reading first (e.g. `cat {path}`), then create the VM")]
    FifoNoReader { path: String },
    #[error("cannot open console file {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The file console output is copied to.
pub struct Tee {
    file: File,
    path: PathBuf,
    /// The line being written: the file gets one write per line, not one per byte.
    pending: Vec<u8>,
    /// Bytes a non-blocking reader (a fifo) had no room for.
    dropped: u64,
}

impl Tee {
    /// Opens `path` for appending, creating it if needed. The file is non-blocking, so
    /// that neither opening nor writing can hang the VM: a fifo must already have a
    /// reader, and output a slow fifo reader has no room for is dropped (the in-memory
    /// console still has it).
    pub fn open(path: &Path) -> Result<Tee, ConsoleFileError> {
        let opened = File::options()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
        let file = match opened {
            Ok(file) => file,
            // open(2) of a fifo for writing with O_NONBLOCK fails with ENXIO when no
            // process has it open for reading.
            Err(e)
                if e.raw_os_error() == Some(libc::ENXIO)
                    && std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) =>
            {
                return Err(ConsoleFileError::FifoNoReader {
                    path: path.display().to_string(),
                })
            }
            Err(source) => {
                return Err(ConsoleFileError::Open {
                    path: path.display().to_string(),
                    source,
                })
            }
        };
        Ok(Tee {
            file,
            path: path.to_path_buf(),
            pending: Vec::new(),
            dropped: 0,
        })
    }

    /// Writes out the pending bytes. `Err` is a write error that ends teeing.
    fn flush_pending(&mut self) -> std::io::Result<()> {
        let mut written = 0;
        let result = loop {
            if written == self.pending.len() {
                break Ok(());
            }
            match self.file.write(&self.pending[written..]) {
                Ok(0) => break Err(std::io::Error::from(ErrorKind::WriteZero)),
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if self.dropped == 0 {
                        tracing::warn!(
                            path = %self.path.display(),
                            "console file is not being read fast enough; dropping console output it has no room for (vm:console() still has it)"
                        );
                    }
                    self.dropped += (self.pending.len() - written) as u64;
                    break Ok(());
                }
                Err(e) => break Err(e),
            }
        };
        self.pending.clear();
        result
    }
}

struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Bytes ever written; the ring holds `[total - bytes.len(), total)`.
    total: u64,
    tee: Option<Tee>,
    /// Why teeing stopped, once a write to the console file failed.
    tee_error: Option<String>,
    /// Set once the producer is gone (the VM stopped), so waiters stop waiting.
    closed: bool,
}

impl Ring {
    /// Writes out the tee's pending bytes; a failure is reported once and ends teeing,
    /// because the guest must not stop over a full disk.
    fn flush_tee(&mut self) {
        let Some(tee) = self.tee.as_mut() else {
            return;
        };
        if let Err(e) = tee.flush_pending() {
            let message = format!(
                "writing console file {} failed: {e}; console output is no longer copied there",
                tee.path.display()
            );
            tracing::warn!(path = %tee.path.display(), error = %e, "writing the console file failed; console output is no longer copied there");
            self.tee_error = Some(message);
            self.tee = None;
        }
    }

    /// The stream offset of the oldest byte still held.
    fn first(&self) -> u64 {
        self.total - self.bytes.len() as u64
    }
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
    pub fn new(capacity: usize, tee: Option<Tee>) -> Arc<Console> {
        Arc::new(Console {
            ring: Mutex::new(Ring {
                bytes: VecDeque::new(),
                capacity: capacity.max(1),
                total: 0,
                tee,
                tee_error: None,
                closed: false,
            }),
            grew: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends guest output. Carriage returns are dropped: the guest writes CRLF for
    /// terminals, callers want lines. The console file gets the bytes unchanged.
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
            tee.pending.extend_from_slice(data);
            if data.contains(&b'\n') || tee.pending.len() >= TEE_LINE_MAX {
                ring.flush_tee();
            }
        }
        drop(ring);
        self.grew.notify_all();
    }

    /// Marks the stream finished and wakes every waiter.
    pub fn close(&self) {
        let mut ring = self.lock();
        ring.closed = true;
        ring.flush_tee();
        drop(ring);
        self.grew.notify_all();
    }

    /// Why output is no longer copied to the console file, once a write to it failed.
    pub fn tee_error(&self) -> Option<String> {
        self.lock().tee_error.clone()
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
    ///
    /// The guest prints a byte at a time, so the match can arrive before the rest of its
    /// line: the wait then goes on until the line's newline arrives. If the stream closes
    /// or the deadline passes first, the line as far as it got is returned (the pattern
    /// was seen). `cancel` is polled every [`CANCEL_POLL`], without the console's lock
    /// held (it may run code that reads this console); when it returns true the wait
    /// ends.
    pub fn wait_for(
        &self,
        pattern: &str,
        from: u64,
        deadline: Instant,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(String, u64), ConsoleWaitEnd> {
        // Each wake-up searches only what is new (plus a pattern's length of overlap).
        let mut search_from = from;
        // The stream offset where the match starts, once found.
        let mut found: Option<u64> = None;
        loop {
            let mut ring = self.lock();
            if found.is_none() {
                found = find_in_ring(&mut ring, pattern.as_bytes(), search_from);
                search_from = search_from.max(ring.total.saturating_sub(pattern.len() as u64));
            }
            let now = Instant::now();
            let end = match found {
                Some(at) => {
                    let (line, complete) = line_at(&mut ring, at);
                    if complete || ring.closed || now >= deadline {
                        return Ok((line, at + pattern.len() as u64));
                    }
                    None
                }
                None if ring.closed => Some(ConsoleWaitEnd::Closed),
                None if now >= deadline => Some(ConsoleWaitEnd::TimedOut),
                None => None,
            };
            if let Some(end) = end {
                return Err(end);
            }
            drop(
                self.grew
                    .wait_timeout(ring, (deadline - now).min(CANCEL_POLL))
                    .unwrap_or_else(|p| p.into_inner())
                    .0,
            );
            if cancel() {
                return Err(ConsoleWaitEnd::Cancelled);
            }
        }
    }
}

/// The stream offset of the first match of `pattern` at or after `from`.
fn find_in_ring(ring: &mut Ring, pattern: &[u8], from: u64) -> Option<u64> {
    let first = ring.first();
    let skip = from.saturating_sub(first).min(ring.bytes.len() as u64) as usize;
    // Contiguous in place: no copy (it only moves bytes after the ring wrapped).
    let hay = &ring.bytes.make_contiguous()[skip..];
    let pos = if pattern.is_empty() {
        Some(0)
    } else {
        hay.windows(pattern.len()).position(|w| w == pattern)
    }?;
    Some(first + (skip + pos) as u64)
}

/// The line holding stream offset `at` (from what the ring still holds), and whether its
/// newline has arrived.
fn line_at(ring: &mut Ring, at: u64) -> (String, bool) {
    let first = ring.first();
    let bytes: &[u8] = ring.bytes.make_contiguous();
    let at = at.saturating_sub(first).min(bytes.len() as u64) as usize;
    let line_start = bytes[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let (line_end, complete) = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or((bytes.len(), false), |i| (at + i, true));
    let line = String::from_utf8_lossy(&bytes[line_start..line_end]).into_owned();
    (line, complete)
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

    /// The waiter finds `count ` before the number arrives; it must wait for the newline.
    /// The cancel check runs only once the waiter has decided to wait, so it tells this
    /// test when to print the rest of the line.
    #[test]
    fn match_waits_for_the_end_of_its_line() {
        let c = Console::new(64, None);
        c.push(b"count 1\ncount ");
        let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            c2.wait_for(
                "count ",
                "count 1\n".len() as u64,
                Instant::now() + Duration::from_secs(60),
                &|| {
                    let _ = waiting_tx.send(());
                    false
                },
            )
        });
        // Err here means the waiter returned without waiting (and the assert says how).
        let _ = waiting_rx.recv();
        c.push(b"12");
        c.push(b"\n");
        let (line, end) = t.join().unwrap().unwrap();
        assert_eq!(line, "count 12");
        assert_eq!(end, "count 1\ncount ".len() as u64);
    }

    #[test]
    fn partial_line_is_returned_when_the_stream_ends_or_time_runs_out() {
        let c = Console::new(64, None);
        c.push(b"abc");
        let (line, end) = c.wait_for("ab", 0, Instant::now(), &|| false).unwrap();
        assert_eq!((line.as_str(), end), ("abc", 2));
        c.close();
        let later = Instant::now() + Duration::from_secs(60);
        assert_eq!(c.wait_for("bc", 0, later, &|| false).unwrap().0, "abc");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("luvisor-console-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tee_appends_output_unchanged() {
        let dir = scratch("tee");
        let path = dir.join("console.log");
        std::fs::write(&path, "before\n").unwrap();
        let c = Console::new(64, Some(Tee::open(&path).unwrap()));
        c.push(b"one\r\ntw");
        assert_eq!(std::fs::read(&path).unwrap(), b"before\none\r\ntw");
        c.push(b"o\r\n");
        c.push(b"three");
        assert_eq!(std::fs::read(&path).unwrap(), b"before\none\r\ntwo\r\n");
        c.close();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            b"before\none\r\ntwo\r\nthree"
        );
        assert_eq!(c.tee_error(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tee_write_error_is_reported_and_ends_teeing() {
        let c = Console::new(64, Some(Tee::open(Path::new("/dev/full")).unwrap()));
        c.push(b"hello\n");
        let error = c.tee_error().expect("the write to /dev/full failed");
        assert!(error.contains("/dev/full"), "{error}");
        assert!(error.contains("No space left on device"), "{error}");
        c.push(b"more\n");
        assert_eq!(c.tee_error(), Some(error), "the first error is kept");
        assert_eq!(c.text(), "hello\nmore\n", "the console itself goes on");
    }

    fn mkfifo(path: &Path) {
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: c_path is a valid NUL-terminated string for the call's duration.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn fifo_without_reader_is_refused() {
        let dir = scratch("fifo-no-reader");
        let fifo = dir.join("console.fifo");
        mkfifo(&fifo);
        let err = Tee::open(&fifo).err().expect("no reader: refused");
        assert!(matches!(err, ConsoleFileError::FifoNoReader { .. }));
        assert!(
            err.to_string()
                .starts_with(&format!("console fifo {} has no reader", fifo.display())),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fifo_reader_that_does_not_read_never_blocks_the_writer() {
        let dir = scratch("fifo-slow");
        let fifo = dir.join("console.fifo");
        mkfifo(&fifo);
        let mut reader = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let c = Console::new(1 << 20, Some(Tee::open(&fifo).unwrap()));
        // Far more than a pipe holds (64 KiB by default).
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        for _ in 0..10_000 {
            c.push(&line);
        }
        c.close();
        assert_eq!(c.tee_error(), None, "a full fifo is not an error");
        let mut got = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut got);
        assert!(!got.is_empty() && got.len() < 10_000 * line.len());
        assert!(
            got.chunks(line.len()).all(|l| l == line),
            "whole lines only"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Rust programs ignore SIGPIPE, so a fifo whose reader left gives EPIPE: reported.
    #[test]
    fn fifo_reader_leaving_is_reported() {
        let dir = scratch("fifo-gone");
        let fifo = dir.join("console.fifo");
        mkfifo(&fifo);
        let reader = File::options()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&fifo)
            .unwrap();
        let c = Console::new(64, Some(Tee::open(&fifo).unwrap()));
        drop(reader);
        c.push(b"hello\n");
        let error = c.tee_error().expect("EPIPE is reported");
        assert!(error.contains("Broken pipe"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
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
