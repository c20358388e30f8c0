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

/// The destination accepts the offer: pages may come. Its payload names the instance
/// that accepted ([`Accepted`]).
pub const KIND_ACCEPT: u8 = 10;
/// Source → destination: guest pages (a run table, then the data: [`PageEncoder`]).
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
/// Destination → source: the answer to a [`Hello::Query`] ([`QueryAnswer`]).
pub const KIND_OUTCOME: u8 = 17;
/// Source → destination, after each pass: answer [`KIND_SYNCED`] once every page before
/// it is in guest RAM. The source measures the link by it, and pauses the VM only when
/// the destination has caught up (pages waiting in socket buffers would otherwise add
/// to the downtime).
pub const KIND_SYNC: u8 = 18;
/// Destination → source: the answer to [`KIND_SYNC`].
pub const KIND_SYNCED: u8 = 19;
/// Source → destination, before the full pass: the guest pages that pass is about to
/// send (runs, [`encode_plan`]). A hint only: the destination faults that RAM in on a
/// thread of its own, ahead of the pages, and nothing else depends on it.
pub const KIND_PLAN: u8 = 20;
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

/// The payload of [`KIND_ACCEPT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// The destination's instance id: random for each peer server (each
    /// `luvisor serve --listen`, each `hv.migration.listen`), which keeps the records
    /// queries are answered from. A query after the hand-over must be answered by this
    /// same instance: the handshake proves only that the other end holds the key, and
    /// every host with the key (the source's own listener too) would answer one.
    pub instance: u64,
}

/// The payload of [`KIND_OUTCOME`]: what the instance that answers knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueryAnswer {
    /// The answering server's instance id ([`Accepted::instance`]).
    pub instance: u64,
    pub outcome: Outcome,
}

/// The paused machine, after the last pages.
#[derive(Serialize, Deserialize)]
pub struct FinalState {
    pub machine: MachineState,
    /// The balloon target now (a policy may have moved it since the offer).
    pub memory_target: u64,
    /// The VM was paused at the source: on GO the destination takes it over paused
    /// (state `paused`, its vCPUs and devices not started) instead of running it.
    pub paused: bool,
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

/// Decodes a frame's payload, which it must use whole; the error names `what` was
/// expected. Bytes left over are refused rather than ignored: a message from a peer
/// that adds fields this side does not know would otherwise be silently cut short.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!(
            "a malformed {what} message: {} bytes left over after it",
            rest.len()
        )),
        Err(e) => Err(format!("a malformed {what} message: {e}")),
    }
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
/// Bytes of run headers a pages frame carries at most (scattered zero pages are one run
/// each).
pub const PAGES_FRAME_TABLE: usize = 256 << 10;

/// Builds pages frames. A frame's payload is its run table, then the data of its data
/// runs in table order:
///
/// ```text
/// u32 runs, runs × (u64 guest-physical address, u32 pages, u8 kind), data
/// ```
///
/// The table comes first so that the destination knows where every data byte goes
/// before it reads it, and reads it straight into guest RAM (`destination.rs`).
pub struct PageEncoder {
    /// The run count (patched in place), then the run headers.
    table: Vec<u8>,
    data: Vec<u8>,
    /// Where the open run's header is, its kind and the address its next page has.
    open: Option<(usize, u8, u64)>,
    pages: u64,
    zero_pages: u64,
}

impl Default for PageEncoder {
    fn default() -> Self {
        let mut table = Vec::with_capacity(4 + 64 * RUN_HEADER);
        table.extend_from_slice(&0u32.to_le_bytes());
        PageEncoder {
            table,
            data: Vec::with_capacity(PAGES_FRAME_DATA),
            open: None,
            pages: 0,
            zero_pages: 0,
        }
    }
}

impl PageEncoder {
    /// Whether the frame is full and must be sent before the next page.
    pub fn full(&self) -> bool {
        self.data.len() + PAGE_SIZE as usize > PAGES_FRAME_DATA
            || self.table.len() + RUN_HEADER > PAGES_FRAME_TABLE
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
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
        let at = self.data.len();
        self.data.resize(at + PAGE_SIZE as usize, 0);
        fill(&mut self.data[at..]);
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
        let at = self.data.len();
        self.data.reserve(PAGE_SIZE as usize);
        // SAFETY: `reserve` made room for PAGE_SIZE bytes past `at`; the caller
        // vouches for `src`. Every byte of the new room is written before `set_len`.
        unsafe {
            std::ptr::copy_nonoverlapping(src, self.data.as_mut_ptr().add(at), PAGE_SIZE as usize);
            self.data.set_len(at + PAGE_SIZE as usize);
        }
    }

    fn extend_run(&mut self, gpa: u64, kind: u8) {
        self.pages += 1;
        if let Some((header, open_kind, next)) = &mut self.open {
            if *open_kind == kind && *next == gpa {
                let count_at = *header + 8;
                let count =
                    u32::from_le_bytes(self.table[count_at..count_at + 4].try_into().expect("4"));
                self.table[count_at..count_at + 4].copy_from_slice(&(count + 1).to_le_bytes());
                *next += PAGE_SIZE;
                return;
            }
        }
        let header = self.table.len();
        self.table.extend_from_slice(&gpa.to_le_bytes());
        self.table.extend_from_slice(&1u32.to_le_bytes());
        self.table.push(kind);
        self.open = Some((header, kind, gpa + PAGE_SIZE));
        let runs = u32::from_le_bytes(self.table[..4].try_into().expect("4"));
        self.table[..4].copy_from_slice(&(runs + 1).to_le_bytes());
    }

    /// The frame built so far, as the two parts of its payload: the run table and the
    /// data.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.table, &self.data]
    }

    /// The frame's payload in one piece (tests).
    pub fn payload(&self) -> Vec<u8> {
        [&self.table[..], &self.data[..]].concat()
    }

    /// Pages in the frame so far, and how many of them are zero.
    pub fn counts(&self) -> (u64, u64) {
        (self.pages, self.zero_pages)
    }

    /// Clears the frame after it was sent.
    pub fn clear(&mut self) {
        self.table.truncate(4);
        self.table[..4].copy_from_slice(&0u32.to_le_bytes());
        self.data.clear();
        self.open = None;
        self.pages = 0;
        self.zero_pages = 0;
    }
}

/// Bytes of one run of a plan: guest-physical address (u64), page count (u32).
pub const PLAN_RUN: usize = 8 + 4;
/// Runs a plan frame carries at most (768 KiB).
pub const PLAN_FRAME_RUNS: usize = 64 << 10;

/// A plan frame's payload: `runs` as (guest-physical address, pages), each at most
/// `u32::MAX` pages, at most [`PLAN_FRAME_RUNS`] of them.
pub fn encode_plan(runs: &[(u64, u32)]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(runs.len() * PLAN_RUN);
    for (gpa, pages) in runs {
        payload.extend_from_slice(&gpa.to_le_bytes());
        payload.extend_from_slice(&pages.to_le_bytes());
    }
    payload
}

/// The runs of a plan frame as (guest-physical address, pages); an error says how the
/// frame is malformed. Whether the runs are RAM is the receiver's check.
pub fn decode_plan(payload: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    if !payload.len().is_multiple_of(PLAN_RUN) || payload.len() / PLAN_RUN > PLAN_FRAME_RUNS {
        return Err(format!(
            "a plan frame of {} bytes is not a whole number of runs, or too many",
            payload.len()
        ));
    }
    payload
        .chunks(PLAN_RUN)
        .map(|run| {
            let gpa = u64::from_le_bytes(run[..8].try_into().expect("8 bytes"));
            let pages = u64::from(u32::from_le_bytes(run[8..].try_into().expect("4 bytes")));
            if gpa % PAGE_SIZE != 0 || pages == 0 {
                return Err(format!(
                    "a plan frame has a run of {pages} pages at {gpa:#x} (not a page boundary, or empty)"
                ));
            }
            Ok((gpa, pages))
        })
        .collect()
}

/// One entry of a pages frame's run table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunHeader {
    pub gpa: u64,
    pub pages: u64,
    /// Whether the run's pages have data in the frame ([`RUN_DATA`]) or are zero.
    pub data: bool,
}

impl RunHeader {
    /// Bytes of data this run has in the frame.
    pub fn data_len(&self) -> u64 {
        if self.data {
            self.pages * PAGE_SIZE
        } else {
            0
        }
    }
}

/// The number of runs a pages frame announces in its first 4 bytes, and how many bytes
/// of run headers follow; an error if the frame (of `payload_len` bytes) cannot hold
/// them, or if its run table or its data would be larger than a source sends
/// ([`PAGES_FRAME_TABLE`], with the count; [`PAGES_FRAME_DATA`]). Checked before the
/// table is read, so a frame's size bounds the work it can cause.
pub fn run_table_len(count: [u8; 4], payload_len: usize) -> Result<usize, String> {
    let runs = u32::from_le_bytes(count) as usize;
    let table = runs
        .checked_mul(RUN_HEADER)
        .filter(|table| table + 4 <= payload_len)
        .ok_or_else(|| {
            format!(
                "a pages frame of {payload_len} bytes announces {runs} runs, more than it can hold"
            )
        })?;
    if table + 4 > PAGES_FRAME_TABLE {
        return Err(format!(
            "a pages frame announces {runs} runs ({} bytes of run table); the limit is \
             {PAGES_FRAME_TABLE} bytes",
            table + 4
        ));
    }
    let data = payload_len - 4 - table;
    if data > PAGES_FRAME_DATA {
        return Err(format!(
            "a pages frame carries {data} bytes of page data; the limit is {PAGES_FRAME_DATA}"
        ));
    }
    Ok(table)
}

/// Decodes a pages frame's run headers (`table`, without the count) and checks that
/// their data is exactly `data_len` bytes, and that the runs go up in address order
/// without overlapping (as a source sends them: each page at most once per frame, so
/// the order in which the receiver applies them does not matter). Addresses are
/// checked to be page-aligned here; whether they are RAM is the receiver's check.
pub fn decode_run_table(table: &[u8], data_len: u64) -> Result<Vec<RunHeader>, String> {
    let mut runs = Vec::with_capacity(table.len() / RUN_HEADER);
    let mut data = 0u64;
    // Where the previous run ended: the next one may start there at the earliest.
    let mut free_from = 0u64;
    for header in table.chunks(RUN_HEADER) {
        if header.len() < RUN_HEADER {
            return Err("a pages frame ends inside a run header".into());
        }
        let gpa = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
        let pages = u64::from(u32::from_le_bytes(header[8..12].try_into().expect("4")));
        if gpa % PAGE_SIZE != 0 || pages == 0 {
            return Err(format!(
                "a pages frame has a run of {pages} pages at {gpa:#x} (not a page boundary, or empty)"
            ));
        }
        if gpa < free_from {
            return Err(format!(
                "a pages frame has a run at {gpa:#x} below the end of the run before it \
                 ({free_from:#x}): runs must go up in address order without overlapping"
            ));
        }
        // At most u32::MAX pages: the product fits a u64.
        free_from = gpa.checked_add(pages * PAGE_SIZE).ok_or_else(|| {
            format!("a pages frame has a run of {pages} pages at {gpa:#x}, past the end of the address space")
        })?;
        let run = match header[12] {
            RUN_DATA => RunHeader {
                gpa,
                pages,
                data: true,
            },
            RUN_ZERO => RunHeader {
                gpa,
                pages,
                data: false,
            },
            other => return Err(format!("a pages frame has a run of unknown kind {other}")),
        };
        data = data
            .checked_add(run.data_len())
            .filter(|data| *data <= data_len)
            .ok_or_else(|| {
                format!(
                    "a pages frame's runs claim more than the {data_len} bytes of data it carries"
                )
            })?;
        runs.push(run);
    }
    if data != data_len {
        return Err(format!(
            "a pages frame's runs claim {data} bytes of data but it carries {data_len}"
        ));
    }
    Ok(runs)
}

/// One run of a pages frame held in memory.
#[derive(Debug, PartialEq, Eq)]
pub enum PageRun<'a> {
    /// `data.len() / PAGE_SIZE` pages from `gpa`.
    Data { gpa: u64, data: &'a [u8] },
    /// `pages` zero pages from `gpa`.
    Zero { gpa: u64, pages: u64 },
}

/// The runs of a whole pages frame held in memory; an error says how it is malformed.
pub fn decode_pages(frame: &[u8]) -> Result<Vec<PageRun<'_>>, String> {
    let count: [u8; 4] = frame
        .get(..4)
        .ok_or("a pages frame ends inside its run count")?
        .try_into()
        .expect("4 bytes");
    let table_len = run_table_len(count, frame.len())?;
    let (table, mut data) = frame[4..].split_at(table_len);
    let headers = decode_run_table(table, data.len() as u64)?;
    Ok(headers
        .into_iter()
        .map(|run| {
            if run.data {
                let (pages, rest) = data.split_at(run.data_len() as usize);
                data = rest;
                PageRun::Data {
                    gpa: run.gpa,
                    data: pages,
                }
            } else {
                PageRun::Zero {
                    gpa: run.gpa,
                    pages: run.pages,
                }
            }
        })
        .collect())
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
    fn a_message_with_bytes_left_over_is_refused() {
        let bytes = encode(&Accepted { instance: 7 }).unwrap();
        assert_eq!(decode::<Accepted>(&bytes, "accept").unwrap().instance, 7);
        // A peer that appended a field this side does not know.
        let longer = [&bytes[..], &[1, 2]].concat();
        let err = decode::<Accepted>(&longer, "accept").unwrap_err();
        assert_eq!(
            err,
            "a malformed accept message: 2 bytes left over after it"
        );
        // Cut short is still an error too.
        assert!(decode::<Accepted>(&[], "accept")
            .unwrap_err()
            .starts_with("a malformed accept message: "));
    }

    #[test]
    fn pages_round_trip_in_runs() {
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(1));
        encoder.push_data(0x2000, |b| b.fill(2));
        encoder.push_zero(0x3000);
        encoder.push_zero(0x4000);
        // SAFETY: a whole page of this test's own memory.
        unsafe { encoder.push_data_from(0x9000, [9u8; PAGE_SIZE as usize].as_ptr()) };
        assert_eq!(encoder.counts(), (5, 2));
        let frame = encoder.payload();
        assert_eq!(frame.len(), 4 + 3 * RUN_HEADER + 3 * PAGE_SIZE as usize);
        let runs = decode_pages(&frame).unwrap();
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
        assert!(matches!(runs[2], PageRun::Data { gpa: 0x9000, data } if data[0] == 9));
        encoder.clear();
        assert!(encoder.is_empty());
        assert_eq!(encoder.payload(), 0u32.to_le_bytes());
        assert_eq!(decode_pages(&encoder.payload()).unwrap(), vec![]);
    }

    #[test]
    fn malformed_pages_frames_are_errors() {
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(1));
        let frame = encoder.payload();
        // Cut short: the data is missing.
        assert!(decode_pages(&frame[..frame.len() - 1]).is_err());
        // Too much data for the runs.
        assert!(decode_pages(&[&frame[..], &[0]].concat()).is_err());
        // A count cut short, a header cut short, a count the frame cannot hold.
        assert!(decode_pages(&frame[..3]).is_err());
        assert!(decode_pages(&frame[..4 + 5]).is_err());
        let mut count = frame.clone();
        count[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode_pages(&count).is_err());
        // Unaligned address.
        let mut unaligned = frame.clone();
        unaligned[4] = 1;
        assert!(decode_pages(&unaligned).is_err());
        // Unknown kind.
        let mut kind = frame.clone();
        kind[4 + 12] = 7;
        assert!(decode_pages(&kind).is_err());
        // Zero pages in a run.
        let mut empty = frame;
        empty[4 + 8..4 + 12].copy_from_slice(&0u32.to_le_bytes());
        assert!(decode_pages(&empty).is_err());
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
        // A full frame is within what a receiver accepts.
        assert_eq!(decode_pages(&encoder.payload()).unwrap().len(), 1);
        // Scattered zero pages fill the table instead.
        let mut encoder = PageEncoder::default();
        let mut n = 0;
        while !encoder.full() {
            encoder.push_zero(2 * n * PAGE_SIZE);
            n += 1;
        }
        assert_eq!(n as usize, (PAGES_FRAME_TABLE - 4) / RUN_HEADER);
        assert_eq!(decode_pages(&encoder.payload()).unwrap().len(), n as usize);
    }

    /// A run header as a source writes it.
    fn header(gpa: u64, pages: u32, kind: u8) -> Vec<u8> {
        let mut h = gpa.to_le_bytes().to_vec();
        h.extend_from_slice(&pages.to_le_bytes());
        h.push(kind);
        h
    }

    #[test]
    fn a_frame_larger_than_a_source_sends_is_refused_before_its_table_is_read() {
        // The largest run table and the most data a source puts in one frame pass ...
        let most_runs = (PAGES_FRAME_TABLE - 4) / RUN_HEADER;
        let count = (most_runs as u32).to_le_bytes();
        assert_eq!(
            run_table_len(count, 4 + most_runs * RUN_HEADER),
            Ok(most_runs * RUN_HEADER)
        );
        let data = 4 + RUN_HEADER + PAGES_FRAME_DATA;
        assert_eq!(run_table_len(1u32.to_le_bytes(), data), Ok(RUN_HEADER));
        // ... one run or one page more does not, even where the frame could hold it.
        let too_many = (most_runs as u32 + 1).to_le_bytes();
        let err = run_table_len(too_many, 4 + (most_runs + 1) * RUN_HEADER).unwrap_err();
        assert!(err.contains("the limit is"), "{err}");
        let err = run_table_len(1u32.to_le_bytes(), data + PAGE_SIZE as usize).unwrap_err();
        assert!(err.contains("bytes of page data"), "{err}");
    }

    #[test]
    fn runs_must_go_up_without_overlapping() {
        let table = |runs: &[(u64, u32, u8)]| -> Vec<u8> {
            runs.iter()
                .flat_map(|&(gpa, pages, kind)| header(gpa, pages, kind))
                .collect()
        };
        let page = PAGE_SIZE;
        // Adjacent runs of either kind, with gaps: as a source sends them.
        let ok = table(&[
            (0x1000, 2, RUN_DATA),
            (0x3000, 1, RUN_ZERO),
            (0x8000, 1, RUN_DATA),
        ]);
        assert_eq!(decode_run_table(&ok, 3 * page).unwrap().len(), 3);
        // The same zero run over and over (each one all of RAM: the work of clearing
        // them would grow with every 13 bytes of table), a run that overlaps the one
        // before, one below it, and one past the end of the address space.
        for (what, runs, data) in [
            ("repeated", vec![(0, 256, RUN_ZERO), (0, 256, RUN_ZERO)], 0),
            (
                "overlapping",
                vec![(0x1000, 2, RUN_DATA), (0x2000, 1, RUN_ZERO)],
                2 * page,
            ),
            (
                "descending",
                vec![(0x2000, 1, RUN_ZERO), (0x1000, 1, RUN_DATA)],
                page,
            ),
        ] {
            let err = decode_run_table(&table(&runs), data).unwrap_err();
            assert!(err.contains("address order"), "{what}: {err}");
        }
        let err = decode_run_table(&table(&[(u64::MAX - 0xfff, 2, RUN_ZERO)]), 0).unwrap_err();
        assert!(err.contains("past the end of the address space"), "{err}");
        // A data run claiming more than the frame carries is an error at once.
        let err = decode_run_table(&table(&[(0, u32::MAX, RUN_DATA)]), page).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }

    #[test]
    fn data_runs_whose_lengths_sum_past_u64_are_an_error_not_a_panic() {
        // 2^20 + 1 runs of u32::MAX pages (2^44 bytes each) add up past 2^64. Unchecked,
        // that sum panicked in debug builds ("attempt to add with overflow").
        let run_bytes = u64::from(u32::MAX) * PAGE_SIZE;
        let table: Vec<u8> = (0..(1u64 << 20) + 1)
            .flat_map(|i| header(i.wrapping_mul(run_bytes), u32::MAX, RUN_DATA))
            .collect();
        let err = decode_run_table(&table, u64::MAX).unwrap_err();
        assert!(err.contains("past the end of the address space"), "{err}");
    }

    #[test]
    fn plans_round_trip_and_malformed_ones_are_errors() {
        let runs = [(0x1000, 3), (0x10_0000_0000, u32::MAX)];
        let payload = encode_plan(&runs);
        assert_eq!(
            decode_plan(&payload).unwrap(),
            vec![(0x1000, 3), (0x10_0000_0000, u64::from(u32::MAX))]
        );
        assert_eq!(decode_plan(&[]).unwrap(), vec![]);
        assert!(decode_plan(&payload[..PLAN_RUN + 1]).is_err());
        assert!(decode_plan(&encode_plan(&[(0x1001, 1)])).is_err());
        assert!(decode_plan(&encode_plan(&[(0x1000, 0)])).is_err());
        assert!(decode_plan(&vec![0; (PLAN_FRAME_RUNS + 1) * PLAN_RUN]).is_err());
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
