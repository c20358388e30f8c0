//! What source and destination say to each other over a [`SecureChannel`]: the frame
//! kinds, the messages (postcard-encoded), and the encoding of guest pages. The
//! sequence itself (the state machine) is in `source.rs`; `docs/migration.md` has the
//! whole picture.
//!
//! [`SecureChannel`]: super::SecureChannel

use serde::{Deserialize, Serialize};

use crate::snapshot::file::{HostRequirements, SavedConfig};
use crate::snapshot::machine::MachineState;
use crate::vstate::memory::PAGE_SIZE;

/// The destination accepts the offer: pages may come.
pub const KIND_ACCEPT: u8 = 10;
/// Source → destination: guest pages ([`encode`](PageEncoder)).
pub const KIND_PAGES: u8 = 11;
/// Source → destination: the paused machine's state ([`FinalState`]), after the last
/// pages.
pub const KIND_STATE: u8 = 12;
/// Destination → source: the VM is built and waits paused.
pub const KIND_READY: u8 = 13;
/// Source → destination: the source lets the VM go; run it.
pub const KIND_GO: u8 = 14;
/// Destination → source: the VM runs here ([`Started`]).
pub const KIND_RUNNING: u8 = 15;
/// Source → destination: the source gives up (a UTF-8 reason); drop everything.
pub const KIND_ABORT: u8 = 16;
/// Destination → source: the answer to a [`Hello::Query`] ([`Outcome`]).
pub const KIND_OUTCOME: u8 = 17;
/// Source → destination, after each pass: answer [`KIND_SYNCED`] once every page before
/// it is in guest RAM. The source measures the link by it, and pauses the VM only when
/// the destination has caught up (pages waiting in socket buffers would otherwise add
/// to the downtime).
pub const KIND_SYNC: u8 = 18;
/// Destination → source: the answer to [`KIND_SYNC`].
pub const KIND_SYNCED: u8 = 19;
/// Either way: a UTF-8 error message; the sender closes the connection after it.
pub const KIND_ERROR: u8 = 255;

/// The first frame of a migration connection (kind `KIND_MIGRATE_HELLO`).
#[derive(Debug, Serialize, Deserialize)]
pub enum Hello {
    /// A VM is coming.
    Migrate(Box<Offer>),
    /// What became of migration `id`? The source asks this when the connection broke
    /// after it let the VM go ([`KIND_GO`]) and before it heard [`KIND_RUNNING`].
    Query { id: u64 },
}

/// What the source offers: everything the destination checks before any page moves.
#[derive(Debug, Serialize, Deserialize)]
pub struct Offer {
    /// Random, chosen by the source; names this migration in a [`Hello::Query`].
    pub id: u64,
    pub host: HostRequirements,
    pub config: SavedConfig,
    /// Guest-physical start and length of each RAM region.
    pub regions: Vec<(u64, u64)>,
    /// How long the destination waits for the source's next frame, in ms.
    pub idle_timeout_ms: u64,
}

/// The paused machine, after the last pages.
#[derive(Serialize, Deserialize)]
pub struct FinalState {
    pub machine: MachineState,
    /// The balloon target now (a policy may have moved it since the offer).
    pub memory_target: u64,
}

/// The payload of [`KIND_RUNNING`]: what the destination's part took.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Started {
    /// From the state's arrival to a built, paused VM (disks opened, vCPUs created).
    pub build_us: u64,
    /// From GO to running vCPUs.
    pub start_us: u64,
}

/// What a destination knows of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// It never heard of it (or forgot it, or it is another process): nothing of that
    /// migration runs here.
    Unknown,
    /// It ended without the VM ever running here, and never will: the source may
    /// resume it.
    Abandoned,
    /// The VM ran here: it is this host's now.
    Started,
}

/// Encodes `value` for a frame.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| e.to_string())
}

/// Decodes a frame's payload; the error names `what` was expected.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("a malformed {what} message: {e}"))
}

/// Bytes of one run header in a pages frame: guest-physical address (u64), page count
/// (u32), kind (u8).
pub const RUN_HEADER: usize = 8 + 4 + 1;
/// A run of pages whose data follows its header.
pub const RUN_DATA: u8 = 0;
/// A run of pages that read as zero: no data follows.
pub const RUN_ZERO: u8 = 1;
/// Data bytes a pages frame carries at most (the frame stays far below `MAX_FRAME`).
pub const PAGES_FRAME_DATA: usize = 1 << 20;

/// Builds pages frames: runs of consecutive pages, each either data or zero.
pub struct PageEncoder {
    buf: Vec<u8>,
    /// Where the open run's header is, its kind and the address its next page has.
    open: Option<(usize, u8, u64)>,
    data_bytes: usize,
    pages: u64,
    zero_pages: u64,
}

impl Default for PageEncoder {
    fn default() -> Self {
        PageEncoder {
            buf: Vec::with_capacity(PAGES_FRAME_DATA + 64 * RUN_HEADER),
            open: None,
            data_bytes: 0,
            pages: 0,
            zero_pages: 0,
        }
    }
}

impl PageEncoder {
    /// Whether the frame is full and must be sent before the next page.
    pub fn full(&self) -> bool {
        self.data_bytes + PAGE_SIZE as usize > PAGES_FRAME_DATA
            || self.buf.len() + RUN_HEADER + PAGE_SIZE as usize > PAGES_FRAME_DATA * 2
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Adds the page at `gpa` as zero.
    pub fn push_zero(&mut self, gpa: u64) {
        self.extend_run(gpa, RUN_ZERO);
        self.zero_pages += 1;
    }

    /// Adds the page at `gpa` with its `PAGE_SIZE` bytes of data, which `fill` copies
    /// into the slice it is given.
    pub fn push_data(&mut self, gpa: u64, fill: impl FnOnce(&mut [u8])) {
        self.extend_run(gpa, RUN_DATA);
        let at = self.buf.len();
        self.buf.resize(at + PAGE_SIZE as usize, 0);
        fill(&mut self.buf[at..]);
        self.data_bytes += PAGE_SIZE as usize;
    }

    /// [`PageEncoder::push_data`] from `PAGE_SIZE` bytes at `src`, copied without
    /// clearing the room first.
    ///
    /// # Safety
    ///
    /// `src` must point to `PAGE_SIZE` readable bytes that do not overlap the encoder.
    /// Another thread (a guest vCPU) may write them meanwhile: the copy is then torn,
    /// which the caller accepts (the page is dirty again and sent again).
    pub unsafe fn push_data_from(&mut self, gpa: u64, src: *const u8) {
        self.extend_run(gpa, RUN_DATA);
        let at = self.buf.len();
        self.buf.reserve(PAGE_SIZE as usize);
        // SAFETY: `reserve` made room for PAGE_SIZE bytes past `at`; the caller
        // vouches for `src`. Every byte of the new room is written before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(src, self.buf.as_mut_ptr().add(at), PAGE_SIZE as usize);
            self.buf.set_len(at + PAGE_SIZE as usize);
        }
        self.data_bytes += PAGE_SIZE as usize;
    }

    fn extend_run(&mut self, gpa: u64, kind: u8) {
        self.pages += 1;
        if let Some((header, open_kind, next)) = &mut self.open {
            if *open_kind == kind && *next == gpa {
                let count_at = *header + 8;
                let count =
                    u32::from_le_bytes(self.buf[count_at..count_at + 4].try_into().expect("4"));
                self.buf[count_at..count_at + 4].copy_from_slice(&(count + 1).to_le_bytes());
                *next += PAGE_SIZE;
                return;
            }
        }
        let header = self.buf.len();
        self.buf.extend_from_slice(&gpa.to_le_bytes());
        self.buf.extend_from_slice(&1u32.to_le_bytes());
        self.buf.push(kind);
        self.open = Some((header, kind, gpa + PAGE_SIZE));
    }

    /// The frame built so far.
    pub fn payload(&self) -> &[u8] {
        &self.buf
    }

    /// Pages in the frame so far, and how many of them are zero.
    pub fn counts(&self) -> (u64, u64) {
        (self.pages, self.zero_pages)
    }

    /// Clears the frame after it was sent.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.open = None;
        self.data_bytes = 0;
        self.pages = 0;
        self.zero_pages = 0;
    }
}

/// One run of a pages frame.
#[derive(Debug, PartialEq, Eq)]
pub enum PageRun<'a> {
    /// `data.len() / PAGE_SIZE` pages from `gpa`.
    Data { gpa: u64, data: &'a [u8] },
    /// `pages` zero pages from `gpa`.
    Zero { gpa: u64, pages: u64 },
}

/// The runs of a pages frame; an error says how the frame is malformed. Addresses are
/// checked to be page-aligned here; whether they are RAM is the receiver's check.
pub fn decode_pages(mut frame: &[u8]) -> impl Iterator<Item = Result<PageRun<'_>, String>> {
    std::iter::from_fn(move || {
        if frame.is_empty() {
            return None;
        }
        if frame.len() < RUN_HEADER {
            frame = &[];
            return Some(Err("a pages frame ends inside a run header".into()));
        }
        let gpa = u64::from_le_bytes(frame[..8].try_into().expect("8 bytes"));
        let pages = u64::from(u32::from_le_bytes(frame[8..12].try_into().expect("4")));
        let kind = frame[12];
        frame = &frame[RUN_HEADER..];
        if gpa % PAGE_SIZE != 0 || pages == 0 {
            frame = &[];
            return Some(Err(format!(
                "a pages frame has a run of {pages} pages at {gpa:#x} (not a page boundary, or empty)"
            )));
        }
        match kind {
            RUN_ZERO => Some(Ok(PageRun::Zero { gpa, pages })),
            RUN_DATA => {
                let len = (pages * PAGE_SIZE) as usize;
                if frame.len() < len {
                    frame = &[];
                    return Some(Err(format!(
                        "a pages frame's run at {gpa:#x} claims {pages} pages of data but \
                         the frame ends first"
                    )));
                }
                let (data, rest) = frame.split_at(len);
                frame = rest;
                Some(Ok(PageRun::Data { gpa, data }))
            }
            other => {
                frame = &[];
                Some(Err(format!(
                    "a pages frame has a run of unknown kind {other}"
                )))
            }
        }
    })
}

/// A test-only way to make a destination fail at a chosen step, from the environment
/// variable [`FAULT_ENV`]: `POINT:ACTION`, where POINT is `hello`, `pages:N` (after the
/// Nth pages frame), `state`, `built`, `ready`, `go` or `started`, and ACTION is `exit`
/// (the process ends at once, as if killed), `close` (the connection is dropped and
/// the VM with it; the process goes on) or `hang` (the destination stops answering but
/// keeps the connection). It fires once per process: later migrations go through.
/// Not for users: the fault-injection tests and
/// `bench/migration_faults.sh` use it.
pub const FAULT_ENV: &str = "LUVISOR_MIGRATION_FAULT";

/// Where a destination fails on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    Hello,
    Pages(u64),
    State,
    Built,
    Ready,
    Go,
    Started,
}

/// How it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    Exit,
    Close,
    Hang,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub point: FaultPoint,
    pub action: FaultAction,
}

impl Fault {
    /// Parses `POINT:ACTION` (see [`FAULT_ENV`]).
    pub fn parse(text: &str) -> Result<Fault, String> {
        let bad = || {
            format!(
                "{FAULT_ENV}={text:?}: expected POINT:ACTION with POINT hello, pages:N, state, \
                 built, ready, go or started and ACTION exit, close or hang"
            )
        };
        let (point, action) = text.rsplit_once(':').ok_or_else(bad)?;
        let point = match point {
            "hello" => FaultPoint::Hello,
            "state" => FaultPoint::State,
            "built" => FaultPoint::Built,
            "ready" => FaultPoint::Ready,
            "go" => FaultPoint::Go,
            "started" => FaultPoint::Started,
            other => match other.strip_prefix("pages:").map(str::parse) {
                Some(Ok(n)) => FaultPoint::Pages(n),
                _ => return Err(bad()),
            },
        };
        let action = match action {
            "exit" => FaultAction::Exit,
            "close" => FaultAction::Close,
            "hang" => FaultAction::Hang,
            _ => return Err(bad()),
        };
        Ok(Fault { point, action })
    }

    /// The fault the environment asks for, if any; a malformed one is logged and
    /// ignored.
    pub fn from_env() -> Option<Fault> {
        let text = std::env::var(FAULT_ENV).ok()?;
        match Fault::parse(&text) {
            Ok(fault) => {
                tracing::warn!(fault = text, "migration fault injection is on");
                Some(fault)
            }
            Err(e) => {
                tracing::error!("{e}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_in_runs() {
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(1));
        encoder.push_data(0x2000, |b| b.fill(2));
        encoder.push_zero(0x3000);
        encoder.push_zero(0x4000);
        encoder.push_data(0x9000, |b| b.fill(9));
        assert_eq!(encoder.counts(), (5, 2));
        let frame = encoder.payload().to_vec();
        let runs: Vec<_> = decode_pages(&frame).map(Result::unwrap).collect();
        assert_eq!(runs.len(), 3);
        match &runs[0] {
            PageRun::Data { gpa, data } => {
                assert_eq!(*gpa, 0x1000);
                assert_eq!(data.len(), 2 * PAGE_SIZE as usize);
                assert_eq!(data[PAGE_SIZE as usize], 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            runs[1],
            PageRun::Zero {
                gpa: 0x3000,
                pages: 2
            }
        );
        assert!(matches!(runs[2], PageRun::Data { gpa: 0x9000, .. }));
        encoder.clear();
        assert!(encoder.is_empty());
    }

    #[test]
    fn malformed_pages_frames_are_errors() {
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(1));
        let frame = encoder.payload().to_vec();
        // Cut short: the data is missing.
        let cut = &frame[..frame.len() - 1];
        assert!(decode_pages(cut).any(|r| r.is_err()));
        // A header cut short.
        assert!(decode_pages(&frame[..5]).any(|r| r.is_err()));
        // Unaligned address.
        let mut unaligned = frame.clone();
        unaligned[0] = 1;
        assert!(decode_pages(&unaligned).next().unwrap().is_err());
        // Unknown kind.
        let mut kind = frame.clone();
        kind[12] = 7;
        assert!(decode_pages(&kind).next().unwrap().is_err());
        // Zero pages in a run.
        let mut empty = frame;
        empty[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_pages(&empty).next().unwrap().is_err());
    }

    #[test]
    fn encoder_says_when_a_frame_is_full() {
        let mut encoder = PageEncoder::default();
        let mut n = 0;
        while !encoder.full() {
            encoder.push_data(n * PAGE_SIZE, |_| {});
            n += 1;
        }
        assert_eq!(n, PAGES_FRAME_DATA as u64 / PAGE_SIZE);
    }

    #[test]
    fn faults_parse() {
        assert_eq!(
            Fault::parse("pages:3:exit").unwrap(),
            Fault {
                point: FaultPoint::Pages(3),
                action: FaultAction::Exit
            }
        );
        assert_eq!(
            Fault::parse("ready:close").unwrap().point,
            FaultPoint::Ready
        );
        assert!(Fault::parse("ready").is_err());
        assert!(Fault::parse("later:exit").is_err());
        assert!(Fault::parse("pages:x:exit").is_err());
        assert!(Fault::parse("go:explode").is_err());
    }
}
