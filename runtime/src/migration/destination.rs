//! The destination side of a live migration: it checks the offer, fills fresh guest
//! RAM with the pages that arrive (read from the socket straight into place, with a
//! second thread faulting the RAM in ahead of them), builds the VM from the final state
//! with its vCPUs and devices waiting paused (state `incoming`), says READY, and runs
//! the VM only when the source says GO (or, for a VM that was paused at the source,
//! takes it over paused). Anything that goes wrong before GO throws the VM away here;
//! the source still has it. See `source.rs` for the whole state machine.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::channel::IncomingFrame;
use super::protocol::{
    decode, decode_plan, decode_run_table, encode, run_table_len, Accepted, FaultAction,
    FaultPoint, FinalState, Hello, Offer, Outcome, QueryAnswer, Started, KIND_ABORT, KIND_ACCEPT,
    KIND_ERROR, KIND_GO, KIND_OUTCOME, KIND_PAGES, KIND_PLAN, KIND_READY, KIND_RUNNING, KIND_STATE,
    KIND_SYNC, KIND_SYNCED,
};
use super::{Fault, SecureChannel};
use crate::builder::RestoreParts;
use crate::registry::Registry;
use crate::snapshot::file::HostRequirements;
use crate::vm::{config_from_saved, region_layout};
use crate::vm::{GuestSpec, Vm, VmConfig};
use crate::vstate::memory::snapshot::page_is_zero;
use crate::vstate::memory::{mapping, ram_ranges, GuestRam, PAGE_SIZE};
use crate::vstate::prepared;

/// How many finished migrations a destination remembers for queries.
const REMEMBERED: usize = 1024;
/// Longest wait between two frames the destination accepts from an offer.
const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long an offer waits for an `incoming` VM of the same name to go away.
const NAME_BUSY_WAIT: Duration = Duration::from_secs(5);
/// How long a query waits for a migration that is starting its VM right now.
const QUERY_WAIT: Duration = Duration::from_secs(15);

/// A VM that arrived and runs here.
#[derive(Clone)]
pub struct Arrival {
    pub vm: Arc<Vm>,
    /// The source's address.
    pub peer: String,
    /// Bytes of frames received (pages and state).
    pub bytes_received: u64,
    /// From the offer to running vCPUs.
    pub total: Duration,
    /// From the final state to a built, paused VM.
    pub build: Duration,
}

/// Where each migration this destination heard of stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Record {
    /// Pages are coming, or the VM waits for GO.
    Pending,
    /// GO arrived; the vCPUs are being started.
    Starting,
    Started,
    /// It ended without the VM running here.
    Abandoned,
}

/// The records, for [`Hello::Query`]. A query about a pending migration abandons it:
/// the source asks only when it no longer uses that connection, so a GO can no longer
/// come on it, and the answer must stay true.
#[derive(Default)]
pub(crate) struct Outcomes {
    records: Mutex<VecDeque<(u64, Record)>>,
    changed: Condvar,
}

impl Outcomes {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, Record)>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a new migration; false if the id is known already.
    fn begin(&self, id: u64) -> bool {
        let mut records = self.lock();
        if records.iter().any(|(known, _)| *known == id) {
            return false;
        }
        if records.len() == REMEMBERED {
            // Forget the oldest finished one (a pending one is never forgotten).
            if let Some(i) = records
                .iter()
                .position(|(_, r)| matches!(r, Record::Started | Record::Abandoned))
            {
                records.remove(i);
            }
        }
        records.push_back((id, Record::Pending));
        true
    }

    fn set(&self, id: u64, record: Record) {
        let mut records = self.lock();
        if let Some(entry) = records.iter_mut().find(|(known, _)| *known == id) {
            entry.1 = record;
        }
        drop(records);
        self.changed.notify_all();
    }

    /// Pending → Starting; false if a query abandoned it meanwhile.
    fn try_start(&self, id: u64) -> bool {
        let mut records = self.lock();
        match records.iter_mut().find(|(known, _)| *known == id) {
            Some(entry) if entry.1 == Record::Pending => {
                entry.1 = Record::Starting;
                true
            }
            _ => false,
        }
    }

    /// Abandons a migration unless its VM started.
    fn abandon(&self, id: u64) {
        let mut records = self.lock();
        if let Some(entry) = records.iter_mut().find(|(known, _)| *known == id) {
            if entry.1 == Record::Pending {
                entry.1 = Record::Abandoned;
            }
        }
        drop(records);
        self.changed.notify_all();
    }

    /// The answer to a query; abandons a pending migration (see the type's docs).
    pub(crate) fn query(&self, id: u64) -> Outcome {
        let deadline = Instant::now() + QUERY_WAIT;
        let mut records = self.lock();
        loop {
            let Some(entry) = records.iter_mut().find(|(known, _)| *known == id) else {
                return Outcome::Unknown;
            };
            match entry.1 {
                Record::Pending => {
                    entry.1 = Record::Abandoned;
                    return Outcome::Abandoned;
                }
                Record::Abandoned => return Outcome::Abandoned,
                Record::Started => return Outcome::Started,
                Record::Starting => {
                    let now = Instant::now();
                    if now >= deadline {
                        // Starting vCPUs takes milliseconds; this one is stuck. The VM
                        // may run: say so, the source must not resume its copy.
                        return Outcome::Started;
                    }
                    records = self
                        .changed
                        .wait_timeout(records, deadline - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }
}

/// What the server gives each incoming migration.
pub(crate) struct Context {
    pub registry: Arc<Registry>,
    /// This server's instance id, random ([`Accepted::instance`]): a query is answered
    /// with it, so a source can tell whether it reached the instance that took its VM.
    pub instance: u64,
    pub outcomes: Arc<Outcomes>,
    pub fault: Option<Fault>,
    /// The fault fires once per process: the next migration goes through.
    pub fault_fired: std::sync::atomic::AtomicBool,
    pub arrivals: Mutex<Option<Sender<Arrival>>>,
}

/// Why an incoming migration ended without a running VM (for the log).
#[derive(Debug)]
struct Failed(String);

impl<E: std::error::Error> From<E> for Failed {
    fn from(e: E) -> Failed {
        Failed(error_chain(&e))
    }
}

pub(crate) use crate::error_chain;

/// Serves a connection whose first frame was a migration hello (`payload`).
pub(crate) fn serve(mut channel: SecureChannel, payload: &[u8], context: &Context) {
    let peer = channel.peer().to_string();
    let hello: Hello = match decode(payload, "migration hello") {
        Ok(hello) => hello,
        Err(e) => {
            tracing::warn!(peer, error = e, "refused a migration");
            let _ = channel.send(KIND_ERROR, e.as_bytes());
            return;
        }
    };
    match hello {
        Hello::Query { id } => {
            let outcome = context.outcomes.query(id);
            tracing::info!(peer, id, ?outcome, "answered a migration query");
            let answer = QueryAnswer {
                instance: context.instance,
                outcome,
            };
            if let Ok(bytes) = encode(&answer) {
                let _ = channel.send(KIND_OUTCOME, &bytes);
            }
        }
        Hello::Migrate(offer) => {
            let mut incoming = Incoming {
                channel,
                peer,
                offer: *offer,
                context,
                vm: None,
                started_at: Instant::now(),
                frames: 0,
                bytes: 0,
            };
            incoming.run();
        }
    }
}

/// One migration arriving.
struct Incoming<'a> {
    channel: SecureChannel,
    peer: String,
    offer: Offer,
    context: &'a Context,
    /// The VM once it is built (state `incoming`, then running).
    vm: Option<Arc<Vm>>,
    started_at: Instant,
    frames: u64,
    bytes: u64,
}

/// What happened at a fault point.
enum Flow {
    Go,
    /// The fault dropped the connection: end quietly.
    Dropped,
}

impl Incoming<'_> {
    fn run(&mut self) {
        let id = self.offer.id;
        let name = self.offer.config.name.clone();
        if !self.context.outcomes.begin(id) {
            let _ = self.channel.send(
                KIND_ERROR,
                b"a migration with this id is already known here (a replayed offer?)",
            );
            return;
        }
        tracing::info!(peer = self.peer, vm = name, id, "incoming migration");
        let result = self.receive();
        match result {
            Ok(true) => {}
            Ok(false) => self.discard(),
            Err(Failed(reason)) => {
                tracing::warn!(
                    peer = self.peer,
                    vm = name,
                    reason,
                    "incoming migration failed"
                );
                let _ = self.channel.send(KIND_ERROR, reason.as_bytes());
                self.discard();
            }
        }
        self.channel.shutdown();
    }

    /// Throws away what arrived: the VM (if built) goes, its disks with it.
    fn discard(&mut self) {
        self.context.outcomes.abandon(self.offer.id);
        if let Some(vm) = self.vm.take() {
            // A VM that was handed over (running, or paused as it was at the source)
            // stays; one still `incoming`, or stopped because it could not start, goes.
            if !matches!(
                vm.state(),
                crate::vm::VmState::Running | crate::vm::VmState::Paused
            ) {
                self.context.registry.destroy(vm.id());
            }
        }
    }

    /// Acts on the injected fault at `point`, if it is the one.
    fn fault(&mut self, point: FaultPoint) -> Flow {
        let Some(fault) = self.context.fault else {
            return Flow::Go;
        };
        if fault.point != point
            || self
                .context
                .fault_fired
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Flow::Go;
        }
        tracing::warn!(?point, action = ?fault.action, "injected migration fault");
        match fault.action {
            FaultAction::Exit => {
                // SAFETY: _exit ends the process at once, as a kill would; nothing runs
                // after it.
                unsafe { libc::_exit(101) }
            }
            FaultAction::Close => Flow::Dropped,
            FaultAction::Hang => loop {
                std::thread::park();
            },
        }
    }

    /// The whole exchange; Ok(true) once the VM runs here, Ok(false) when it ended
    /// quietly (the source gave up, or an injected fault dropped the connection).
    fn receive(&mut self) -> Result<bool, Failed> {
        if let Flow::Dropped = self.fault(FaultPoint::Hello) {
            return Ok(false);
        }
        let offer = &self.offer;
        if let Some(reason) = offer.host.mismatch() {
            return Err(Failed(format!(
                "this host cannot run the VM: {reason} (this host: {:?})",
                HostRequirements::of_this_host()
            )));
        }
        // Everything of the configuration but the disks, which the source still holds.
        let mut probe = VmConfig::new(
            offer.config.name.clone(),
            GuestSpec::Builtin {
                cmdline: offer.config.cmdline.clone(),
            },
        );
        probe.vcpus = offer.config.vcpus;
        probe.memory = offer.config.memory;
        probe.dynamic_memory = offer.config.dynamic_memory;
        probe.validate()?;
        if offer.config.disks.len() > crate::builder::MAX_DISKS {
            return Err(Failed(format!(
                "the VM has {} disks, more than {}",
                offer.config.disks.len(),
                crate::builder::MAX_DISKS
            )));
        }
        // A VM of that name that is itself arriving, or being thrown away after a
        // failed arrival, may be gone in a moment (the source may be retrying); one
        // that is migrating away from here may be `migrated` in a moment (it may be
        // coming back before this host has heard that it arrived there).
        let busy_until = Instant::now() + NAME_BUSY_WAIT;
        while !self.context.registry.accepts_incoming(&offer.config.name) {
            let existing = self.context.registry.find(&offer.config.name);
            let moving_away = existing.as_ref().and_then(|vm| vm.migration_id());
            if moving_away == Some(offer.id) {
                return Err(Failed(format!(
                    "vm '{}' is on this host already (a migration to itself)",
                    offer.config.name
                )));
            }
            let in_flux = moving_away.is_some()
                || existing.is_some_and(|vm| vm.state() == crate::vm::VmState::Incoming);
            if !in_flux || Instant::now() >= busy_until {
                return Err(Failed(format!(
                    "a vm named '{}' already exists here",
                    offer.config.name
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let expected: Vec<(u64, u64)> = ram_ranges(offer.config.memory)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64))
            .collect();
        if offer.regions != expected {
            return Err(Failed(format!(
                "its memory regions {:x?} do not fit {} bytes of RAM",
                offer.regions, offer.config.memory
            )));
        }
        let idle = Duration::from_millis(offer.idle_timeout_ms)
            .clamp(Duration::from_secs(1), MAX_IDLE_TIMEOUT);
        let size = offer.config.memory;
        let prepared::PreparedVm { vm_fd, memory } = match prepared::take(prepared::Kind {
            size,
            log_dirty: false,
        }) {
            Some(ready) => ready,
            None => prepared::prepare(size)?,
        };
        if region_layout(&memory) != expected {
            return Err(Failed("the prepared guest RAM has another layout".into()));
        }
        self.channel.set_read_timeout(Some(idle))?;
        let accepted = encode(&Accepted {
            instance: self.context.instance,
        })
        .map_err(Failed)?;
        self.channel.send(KIND_ACCEPT, &accepted)?;

        // Pages, until the final state.
        let Some(final_state) = self.receive_memory(&memory)? else {
            return Ok(false);
        };
        if let Flow::Dropped = self.fault(FaultPoint::State) {
            return Ok(false);
        }
        final_state.machine.layout.check()?;
        let arrives_paused = final_state.paused;

        // The VM, built paused. The source flushed and released its disks before it
        // sent the state.
        let build_started = Instant::now();
        let mut saved = self.offer.config.clone();
        for disk in &mut saved.disks {
            // Both hosts open the same images: never an overlay of our own.
            disk.shared = true;
        }
        let (mut config, _) = config_from_saved(&saved, &saved.name)?;
        config.agent = final_state.machine.layout.has_agent();
        let vm = self.context.registry.create_incoming(config)?;
        self.vm = Some(vm.clone());
        let _ = vm.set_memory_target(final_state.memory_target, "arrived by live migration");
        vm.launch_incoming(RestoreParts {
            state: &final_state.machine,
            vm_fd,
            memory,
        })?;
        let build = build_started.elapsed();
        if let Flow::Dropped = self.fault(FaultPoint::Built) {
            return Ok(false);
        }
        self.channel.send(KIND_READY, &[])?;
        if let Flow::Dropped = self.fault(FaultPoint::Ready) {
            return Ok(false);
        }

        // GO, or the end.
        let mut buf = Vec::new();
        let kind = match self.channel.recv_into(&mut buf) {
            Ok(kind) => kind,
            Err(e) => {
                tracing::info!(peer = self.peer, error = %e, "the connection ended before GO; the VM is dropped");
                return Ok(false);
            }
        };
        match kind {
            KIND_GO => {}
            KIND_ABORT => return Ok(false),
            other => return Err(Failed(format!("expected GO, got frame kind {other}"))),
        }
        if let Flow::Dropped = self.fault(FaultPoint::Go) {
            return Ok(false);
        }
        if !self.context.outcomes.try_start(self.offer.id) {
            // A query (on another connection) said it would never run here.
            return Ok(false);
        }
        let start_began = Instant::now();
        if let Err(e) = vm.start_incoming(arrives_paused) {
            self.context.outcomes.set(self.offer.id, Record::Abandoned);
            return Err(e.into());
        }
        self.context.outcomes.set(self.offer.id, Record::Started);
        let started = Started {
            build_us: build.as_micros() as u64,
            start_us: start_began.elapsed().as_micros() as u64,
        };
        let arrival = Arrival {
            vm: vm.clone(),
            peer: self.peer.clone(),
            bytes_received: self.bytes,
            total: self.started_at.elapsed(),
            build,
        };
        tracing::info!(
            peer = self.peer,
            vm = vm.name(),
            bytes = self.bytes,
            build_us = started.build_us,
            paused = arrives_paused,
            "vm arrived"
        );
        if let Flow::Dropped = self.fault(FaultPoint::Started) {
            // The VM runs and stays: only the confirmation is lost.
            self.notify(arrival);
            return Ok(true);
        }
        if let Ok(bytes) = encode(&started) {
            // If it does not arrive, the source asks (a query) and learns the VM runs.
            let _ = self.channel.send(KIND_RUNNING, &bytes);
        }
        self.notify(arrival);
        Ok(true)
    }

    /// Receives pages until the final state arrives: `Ok(None)` when the migration
    /// ended quietly (the source gave up, or an injected fault dropped it).
    fn receive_memory(&mut self, memory: &GuestRam) -> Result<Option<FinalState>, Failed> {
        let progress = PrefaultProgress::default();
        std::thread::scope(|scope| {
            // However this ends, the prefaulter stops before the scope waits for it.
            let _stop = StopOnDrop(&progress.stop);
            let mut prefaulter: Option<SyncSender<Vec<PlannedRun>>> = None;
            let stop_prefaulting = |prefaulter: &mut Option<_>| {
                if prefaulter.take().is_some() {
                    progress.stop.store(true, Ordering::Release);
                }
            };
            let mut buf = Vec::new();
            let result = loop {
                let mut frame = self.channel.recv_streamed()?;
                let kind = frame.kind();
                self.bytes += frame.remaining() as u64;
                if kind == KIND_PAGES {
                    let ahead = prefaulter.as_ref().map(|_| &progress);
                    receive_pages(frame, memory, &mut buf, ahead)?;
                    self.frames += 1;
                    if let Flow::Dropped = self.fault(FaultPoint::Pages(self.frames)) {
                        break None;
                    }
                    continue;
                }
                buf.resize(frame.remaining(), 0);
                frame.read(&mut buf)?;
                frame.finish()?;
                match kind {
                    KIND_PLAN => {
                        let runs = plan_in(memory, &buf)?;
                        if prefaulter.is_none() && !progress.stop.load(Ordering::Acquire) {
                            let (work, planned) = sync_channel(PLANS_QUEUED);
                            let progress = &progress;
                            let spawned = std::thread::Builder::new()
                                .name("mig-prefault".into())
                                // SAFETY: only runs from `plan_in` on `memory` are sent
                                // to it, and `memory` outlives this scope.
                                .spawn_scoped(scope, move || unsafe {
                                    prefault(planned, progress)
                                });
                            if spawned.is_ok() {
                                prefaulter = Some(work);
                            }
                        }
                        if let Some(work) = &prefaulter {
                            queue_plan(work, runs);
                        }
                    }
                    KIND_SYNC => {
                        // The full pass is over: later passes rewrite pages in no
                        // particular order, which the prefaulter cannot run ahead of.
                        stop_prefaulting(&mut prefaulter);
                        self.channel.send(KIND_SYNCED, &[])?;
                    }
                    KIND_STATE => {
                        tracing::debug!(
                            peer = self.peer,
                            frames = self.frames,
                            bytes = self.bytes,
                            ms = self.started_at.elapsed().as_secs_f64() * 1000.0,
                            cpu_ms = super::thread_cpu_time().as_secs_f64() * 1000.0,
                            "pages received"
                        );
                        break Some(decode(&buf, "final state").map_err(Failed)?);
                    }
                    KIND_ABORT => {
                        tracing::info!(
                            peer = self.peer,
                            reason = %String::from_utf8_lossy(&buf),
                            "the source gave up the migration"
                        );
                        break None;
                    }
                    KIND_ERROR => {
                        return Err(Failed(format!(
                            "the source failed: {}",
                            String::from_utf8_lossy(&buf)
                        )))
                    }
                    other => {
                        return Err(Failed(format!("unexpected frame kind {other} among pages")))
                    }
                }
            };
            Ok(result)
        })
    }

    fn notify(&self, arrival: Arrival) {
        let arrivals = self
            .context
            .arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(sender) = arrivals.as_ref() {
            let _ = sender.send(arrival);
        }
    }
}

/// A run of a plan, checked against guest RAM: its guest-physical address, and its
/// host address and length.
type PlannedRun = (u64, usize, usize);

/// Where the prefaulter and the receiver are, shared between them.
#[derive(Default)]
struct PrefaultProgress {
    /// Every planned page below this guest-physical address has been faulted in (the
    /// plan and the full pass both go in address order).
    done_until: AtomicU64,
    /// Where the receiver writes now: the prefaulter skips what lies below.
    receiver_at: AtomicU64,
    /// Set when the prefaulter must end (the full pass is over, or the migration).
    stop: AtomicBool,
}

/// Sets a flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// How much the prefaulter faults in at once.
const PREFAULT_CHUNK: usize = 2 << 20;
/// Plan frames waiting for the prefaulter at most (each at most `PLAN_FRAME_RUNS` runs,
/// 1.5 MiB decoded): the queue must not grow with what a source sends.
const PLANS_QUEUED: usize = 8;

/// Hands a plan to the prefaulter without waiting: a plan that finds the queue full is
/// dropped (it is a hint only: pages it would have faulted in ahead are faulted in as
/// their data lands), so neither the receiver stalls nor the queue grows. Whether it
/// was queued.
fn queue_plan(work: &SyncSender<Vec<PlannedRun>>, runs: Vec<PlannedRun>) -> bool {
    match work.try_send(runs) {
        Ok(()) => true,
        Err(TrySendError::Full(runs)) => {
            tracing::debug!(
                runs = runs.len(),
                "the prefaulter is behind; a plan frame is dropped"
            );
            false
        }
        // The prefaulter ended (told to stop): nothing to plan for.
        Err(TrySendError::Disconnected(_)) => false,
    }
}

/// The runs of a plan frame, checked to lie in guest RAM.
fn plan_in(memory: &GuestRam, payload: &[u8]) -> Result<Vec<PlannedRun>, Failed> {
    decode_plan(payload)
        .map_err(Failed)?
        .into_iter()
        .map(|(gpa, pages)| {
            let (host, len) = host_range(memory, gpa, pages)?;
            Ok((gpa, host as usize, len))
        })
        .collect()
}

/// The host address of `pages` pages of guest RAM from `gpa`, and their length; an
/// error if they are not all inside one RAM region.
fn host_range(memory: &GuestRam, gpa: u64, pages: u64) -> Result<(*mut u8, usize), Failed> {
    let len = pages * PAGE_SIZE;
    let region = memory
        .find_region(GuestAddress(gpa))
        .filter(|r| {
            gpa.checked_add(len)
                .is_some_and(|end| end <= r.start_addr().0 + r.len())
        })
        .ok_or_else(|| {
            Failed(format!(
                "pages at {gpa:#x} (+{len:#x}) are not inside guest RAM"
            ))
        })?;
    let offset = (gpa - region.start_addr().0) as usize;
    // SAFETY: [offset, offset + len) lies inside the region's live mapping (checked just
    // above).
    let host = unsafe { mapping(region).as_ptr().add(offset) };
    Ok((host, len as usize))
}

/// The prefaulter: faults in the planned RAM in address order, a chunk at a time,
/// skipping what the receiver has passed already, until told to stop.
///
/// Faulting in a fresh 4 KiB page (allocate, clear, map) costs more than receiving and
/// checking its data; the full pass is its bulk. Done here, on a second thread, it
/// runs beside the receiver instead of before each of its copies. It only allocates
/// pages the source holds (the plan is what the source has in memory), never writes
/// a byte of them, and nothing depends on it: a page it has not reached is faulted in
/// by the receiver, as without a plan.
///
/// # Safety
///
/// Every run sent to it must lie in anonymous guest RAM mapped read-write that stays
/// mapped until this returns (runs from [`plan_in`], on RAM that outlives the thread).
unsafe fn prefault(planned: Receiver<Vec<PlannedRun>>, progress: &PrefaultProgress) {
    while let Ok(runs) = planned.recv() {
        for (gpa, host, len) in runs {
            let mut offset = 0;
            while offset < len {
                if progress.stop.load(Ordering::Acquire) {
                    return;
                }
                let chunk = (len - offset).min(PREFAULT_CHUNK);
                let end = gpa + (offset + chunk) as u64;
                if end > progress.receiver_at.load(Ordering::Acquire) {
                    // SAFETY: the chunk lies in a run, which lies in live guest RAM
                    // (the caller vouches for the runs).
                    unsafe { populate_for_write((host + offset) as *mut u8, chunk) };
                }
                progress.done_until.store(end, Ordering::Release);
                offset += chunk;
            }
        }
    }
}

/// Receives a pages frame straight into guest RAM: the run table first, then each data
/// run read from the socket into its place; the frame's tag is checked at its end, and
/// only then are the zero runs cleared. `table` is scratch room for the run table. An
/// error (a run outside RAM, a malformed table, a failed check) ends the migration.
///
/// # Why unverified bytes may land in guest RAM here
///
/// The data reaches guest RAM before the tag at the end of its frame is checked. That
/// is safe because of where this RAM is and what happens on a failed check:
///
/// - Where: the run table is checked against this VM's RAM before any byte is written,
///   so whatever a tampered table says, writes land only in the RAM of this incoming
///   VM, which does not exist yet as a machine: pages frames come only before STATE, no
///   vCPU or device of it exists, and nothing reads this RAM until the VM is built.
/// - A failed check: [`SecureChannel`] refuses every later frame after one fails (and
///   after a frame left half read), so STATE, READY and GO can no longer happen on this
///   connection. The migration fails, the source resumes its VM, and this RAM is
///   dropped with everything unverified in it, never run. A VM is built here only from
///   a STATE frame that arrived after every earlier frame checked out.
///
/// # Why the work before the check is bounded
///
/// Until the tag checks out, the frame may come from anyone on the path, so what it
/// makes this host do must be bounded by the bytes it carries, or an injected frame
/// could keep a core busy for hours with no read (and so no idle timeout) in between:
///
/// - its size is bounded before the table is read: at most [`PAGES_FRAME_TABLE`] bytes
///   of run table and [`PAGES_FRAME_DATA`] of data ([`run_table_len`]);
/// - each data run is faulted in and read only for bytes the frame still has to carry
///   (the run table's sum was checked against them, and each run is checked again
///   before its RAM is faulted in), so unverified input cannot make this host commit
///   more RAM than the frame brings;
/// - zero runs carry no bytes, and clearing them is work per page: they are applied
///   only after the check. Runs go up in address order without overlapping
///   ([`decode_run_table`]), so deferring them changes nothing (no data run of the
///   frame shares a page with them), and one frame clears each page at most once.
///
/// What it saves: a frame buffer, and a second copy of every byte (receive into the
/// buffer, then copy into RAM), on the core that was the migration's bottleneck.
///
/// [`PAGES_FRAME_TABLE`]: super::protocol::PAGES_FRAME_TABLE
/// [`PAGES_FRAME_DATA`]: super::protocol::PAGES_FRAME_DATA
fn receive_pages(
    mut frame: IncomingFrame<'_>,
    memory: &GuestRam,
    table: &mut Vec<u8>,
    prefaulted: Option<&PrefaultProgress>,
) -> Result<(), Failed> {
    let payload_len = frame.remaining();
    let mut count = [0u8; 4];
    frame.read(&mut count)?;
    let table_len = run_table_len(count, payload_len).map_err(Failed)?;
    table.resize(table_len, 0);
    frame.read(table)?;
    let runs = decode_run_table(table, frame.remaining() as u64).map_err(Failed)?;
    // Every run is checked before any is written.
    let places = runs
        .iter()
        .map(|run| host_range(memory, run.gpa, run.pages))
        .collect::<Result<Vec<_>, _>>()?;
    for (run, &(host, len)) in runs.iter().zip(&places) {
        if !run.data {
            continue;
        }
        // The frame must still carry every byte of the run before its RAM is faulted
        // in (the table's sum says so already; this holds without relying on it).
        frame.check_room(len)?;
        let end = run.gpa + len as u64;
        match prefaulted {
            Some(progress) if end <= progress.done_until.load(Ordering::Acquire) => {}
            Some(progress) => {
                progress.receiver_at.store(run.gpa, Ordering::Release);
                // SAFETY: the run lies in guest RAM (checked above).
                unsafe { populate_for_write(host, len) };
            }
            // SAFETY: as above.
            None => unsafe { populate_for_write(host, len) },
        }
        // SAFETY: `host` has `len` writable bytes of guest RAM (checked above), and
        // nothing else reads or writes their contents: the VM is not built yet (see
        // the function's docs for why unverified bytes may land there). The prefaulter
        // may run MADV_POPULATE_WRITE over these pages at the same time; that only maps
        // zeroed pages where none are and changes no byte already there, so the bytes
        // recv writes stay as written.
        unsafe { frame.read_raw(host, len) }?;
    }
    frame.finish()?;
    // The frame checked out: now the zero runs, which carry no data (see above).
    for (run, &(host, _)) in runs.iter().zip(&places) {
        if run.data {
            continue;
        }
        for page in 0..run.pages {
            // SAFETY: each page lies inside the run, which lies in guest RAM (checked
            // above), and mappings are page-aligned. Nothing else reads or writes the
            // contents of this RAM: the VM is not built yet. The prefaulter may
            // populate these pages concurrently, which changes no byte, so a page read
            // as non-zero here is still non-zero when it is cleared.
            unsafe {
                let at = host.add((page * PAGE_SIZE) as usize);
                if !page_is_zero(at) {
                    std::ptr::write_bytes(at, 0, PAGE_SIZE as usize);
                }
            }
        }
    }
    Ok(())
}

/// Faults in `len` bytes of fresh anonymous guest RAM at `host` for writing, in one call
/// rather than one page fault per 4 KiB page as the copy would take them (a page fault
/// costs about a microsecond here, more than copying the page). Best effort: a kernel
/// without `MADV_POPULATE_WRITE` (before 5.14) leaves it to the faults.
///
/// # Safety
///
/// `host` must be page-aligned and `len` bytes from it must be anonymous guest RAM mapped
/// read-write (populating such memory only allocates zeroed pages where none are, and
/// changes no byte already there).
unsafe fn populate_for_write(host: *mut u8, len: usize) {
    // SAFETY: the caller vouches for the range (above).
    let result = unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) };
    if result != 0 {
        tracing::trace!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::channel::raw::loopback_pair;
    use crate::migration::channel::TAG;
    use crate::migration::protocol::{PageEncoder, RUN_DATA, RUN_ZERO};
    use crate::vstate::memory::create_ram;
    use vm_memory::Bytes;

    /// Sends `encoder`'s frame over a loopback channel, then `tail` (another frame
    /// kind, or raw bytes that corrupt the stream) and receives the pages frame into
    /// `memory`.
    fn deliver(memory: &GuestRam, encoder: &PageEncoder, tamper: bool) -> Result<(), Failed> {
        let (mut client, mut server) = loopback_pair();
        if tamper {
            // The same frame with one data byte flipped: its tag no longer checks.
            let payload = encoder.payload();
            let mut raw = client.frame_bytes(KIND_PAGES, &payload);
            let last_data = raw.len() - TAG - 1;
            raw[last_data] ^= 1;
            client.send_raw(&raw);
        } else {
            client.send_parts(KIND_PAGES, &encoder.parts()).unwrap();
        }
        client.send(KIND_SYNC, &[]).unwrap();
        let frame = server.recv_streamed().unwrap();
        let result = receive_pages(frame, memory, &mut Vec::new(), None);
        if result.is_ok() {
            assert_eq!(server.recv().unwrap().0, KIND_SYNC);
        } else {
            assert!(
                server.recv().is_err(),
                "the channel is dead after a failed frame"
            );
        }
        result
    }

    #[test]
    fn pages_land_where_they_belong_and_nowhere_else() {
        let memory = create_ram(1 << 20).unwrap();
        memory.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(0xAB));
        encoder.push_zero(0x3000);
        encoder.push_data(0x5000, |b| b.fill(0xCD));
        deliver(&memory, &encoder, false).unwrap();
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0xAB);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 0xAB);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x5fff)).unwrap(), 0xCD);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x6000)).unwrap(), 0);

        // Past the end of RAM, or straddling it: refused, nothing written (not even
        // the runs before it).
        for gpa in [1 << 20, (1 << 20) - 0x1000] {
            let mut encoder = PageEncoder::default();
            encoder.push_data(0x8000, |b| b.fill(1));
            encoder.push_data(gpa, |b| b.fill(1));
            encoder.push_data(gpa + 0x1000, |b| b.fill(1));
            let Err(err) = deliver(&memory, &encoder, false) else {
                panic!("pages at {gpa:#x} were accepted");
            };
            assert!(err.0.contains("not inside guest RAM"), "{}", err.0);
            assert_eq!(memory.read_obj::<u8>(GuestAddress(0x8000)).unwrap(), 0);
        }
    }

    #[test]
    fn a_tampered_pages_frame_fails_and_kills_the_channel() {
        let memory = create_ram(1 << 20).unwrap();
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(0xAB));
        let err = deliver(&memory, &encoder, true).unwrap_err();
        assert!(err.0.contains("integrity"), "{}", err.0);
    }

    #[test]
    fn zero_runs_are_applied_only_after_the_frame_checks_out() {
        let memory = create_ram(1 << 20).unwrap();
        memory.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        memory.write_obj(9u64, GuestAddress(0x9000)).unwrap();
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(0xAB));
        encoder.push_zero(0x3000);
        encoder.push_data(0x5000, |b| b.fill(0xCD));
        encoder.push_zero(0x9000);
        let err = deliver(&memory, &encoder, true).unwrap_err();
        assert!(err.0.contains("integrity"), "{}", err.0);
        // The frame failed its check: no zero run was applied.
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 7);
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 9);
        // The same frame untampered clears them.
        deliver(&memory, &encoder, false).unwrap();
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x5000)).unwrap(), 0xCD);
    }

    /// Sends `payload` as a pages frame (from another thread: it may be larger than
    /// the socket buffers, and the receiver may stop reading it) and receives it into
    /// `memory`. The channel is dead after a refused frame.
    fn deliver_payload(memory: &GuestRam, payload: Vec<u8>) -> Result<(), Failed> {
        let (mut client, mut server) = loopback_pair();
        let sender = std::thread::spawn(move || {
            // The receiver may hang up in the middle: that is what is tested.
            let _ = client.send(KIND_PAGES, &payload);
            let _ = client.send(KIND_SYNC, &[]);
            client
        });
        let frame = server.recv_streamed().unwrap();
        let result = receive_pages(frame, memory, &mut Vec::new(), None);
        if result.is_err() {
            assert!(
                server.recv().is_err(),
                "the channel is dead after a refused frame"
            );
        }
        server.shutdown();
        sender.join().unwrap();
        result
    }

    /// A run header as a source writes it.
    fn run(gpa: u64, pages: u32, kind: u8) -> Vec<u8> {
        let mut h = gpa.to_le_bytes().to_vec();
        h.extend_from_slice(&pages.to_le_bytes());
        h.push(kind);
        h
    }

    /// A pages frame's payload from run headers and data.
    fn pages_payload(runs: &[Vec<u8>], data: &[u8]) -> Vec<u8> {
        let mut payload = (runs.len() as u32).to_le_bytes().to_vec();
        for header in runs {
            payload.extend_from_slice(header);
        }
        payload.extend_from_slice(data);
        payload
    }

    #[test]
    fn an_injected_frame_of_overlapping_zero_runs_is_refused_without_touching_ram() {
        // The attack: one frame of zero runs that each cover all of guest RAM, with a
        // forged tag. Each run would be a pass over RAM before the tag is checked.
        let memory = create_ram(16 << 20).unwrap();
        memory.write_obj(7u64, GuestAddress(0x4000)).unwrap();
        let all = ((16 << 20) / PAGE_SIZE) as u32;
        let runs: Vec<Vec<u8>> = (0..1000).map(|_| run(0, all, RUN_ZERO)).collect();
        let err = deliver_payload(&memory, pages_payload(&runs, &[])).unwrap_err();
        assert!(err.0.contains("address order"), "{}", err.0);
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x4000)).unwrap(), 7);
        // One such run alone is well-formed; with a forged tag it fails the check and
        // clears nothing.
        let (mut client, mut server) = loopback_pair();
        let mut raw = client.frame_bytes(KIND_PAGES, &pages_payload(&[run(0, all, RUN_ZERO)], &[]));
        let tag_byte = raw.len() - 1;
        raw[tag_byte] ^= 1;
        client.send_raw(&raw);
        let frame = server.recv_streamed().unwrap();
        let err = receive_pages(frame, &memory, &mut Vec::new(), None).unwrap_err();
        assert!(err.0.contains("integrity"), "{}", err.0);
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x4000)).unwrap(), 7);
    }

    #[test]
    fn a_frame_over_the_table_or_data_limit_is_refused_before_anything_is_written() {
        use crate::migration::protocol::{PAGES_FRAME_DATA, PAGES_FRAME_TABLE, RUN_HEADER};
        let memory = create_ram(16 << 20).unwrap();
        let resident = crate::vstate::memory::resident_bytes(&memory);
        // One run more than a source puts in a frame: scattered zero pages.
        let runs: Vec<Vec<u8>> = (0..(PAGES_FRAME_TABLE - 4) / RUN_HEADER + 1)
            .map(|i| run(2 * i as u64 * PAGE_SIZE, 1, RUN_ZERO))
            .collect();
        let err = deliver_payload(&memory, pages_payload(&runs, &[])).unwrap_err();
        assert!(err.0.contains("run table"), "{}", err.0);
        // One page of data more than a frame carries.
        let pages = PAGES_FRAME_DATA / PAGE_SIZE as usize + 1;
        let data = vec![0xEE; pages * PAGE_SIZE as usize];
        let err = deliver_payload(
            &memory,
            pages_payload(&[run(0, pages as u32, RUN_DATA)], &data),
        )
        .unwrap_err();
        assert!(err.0.contains("page data"), "{}", err.0);
        // Nothing was faulted in for them, so nothing was written either.
        assert_eq!(crate::vstate::memory::resident_bytes(&memory), resident);
    }

    #[test]
    fn a_run_table_that_claims_more_data_than_the_frame_carries_faults_nothing_in() {
        // A data run of u32::MAX pages (16 TiB) in a frame with one page of data: no
        // RAM is committed for it (the table's sum does not match what the frame
        // carries).
        let memory = create_ram(16 << 20).unwrap();
        let resident = crate::vstate::memory::resident_bytes(&memory);
        let payload = pages_payload(&[run(0, 4096, RUN_DATA)], &[1; PAGE_SIZE as usize]);
        let err = deliver_payload(&memory, payload).unwrap_err();
        assert!(err.0.contains("more than"), "{}", err.0);
        assert_eq!(crate::vstate::memory::resident_bytes(&memory), resident);
    }

    #[test]
    fn the_prefaulter_faults_in_planned_pages_only_and_writes_nothing() {
        let memory = create_ram(16 << 20).unwrap();
        memory.write_obj(0x5Au8, GuestAddress(0x20_0000)).unwrap();
        let plan = crate::migration::protocol::encode_plan(&[(0x20_0000, 600), (0x80_0000, 1)]);
        let runs = plan_in(&memory, &plan).unwrap();
        let before = crate::vstate::memory::resident_bytes(&memory);
        let progress = PrefaultProgress::default();
        let (work, planned) = std::sync::mpsc::channel();
        work.send(runs).unwrap();
        drop(work);
        // SAFETY: the runs come from `plan_in` on `memory`, which outlives the call.
        unsafe { prefault(planned, &progress) };
        assert_eq!(progress.done_until.load(Ordering::Acquire), 0x80_1000);
        // The 601 planned pages are in memory now (one of them was already), and no
        // byte changed.
        let after = crate::vstate::memory::resident_bytes(&memory);
        assert_eq!(after - before, 600 * PAGE_SIZE);
        assert_eq!(
            memory.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(),
            0x5A
        );
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x20_1000)).unwrap(), 0);

        // A plan that leaves RAM is refused; a stopped prefaulter does nothing.
        let outside = crate::migration::protocol::encode_plan(&[(15 << 20, 257)]);
        assert!(plan_in(&memory, &outside)
            .unwrap_err()
            .0
            .contains("not inside guest RAM"));
        let progress = PrefaultProgress::default();
        progress.stop.store(true, Ordering::Release);
        let (work, planned) = std::sync::mpsc::channel();
        work.send(
            plan_in(
                &memory,
                &crate::migration::protocol::encode_plan(&[(0xA0_0000, 16)]),
            )
            .unwrap(),
        )
        .unwrap();
        drop(work);
        // SAFETY: as above.
        unsafe { prefault(planned, &progress) };
        assert_eq!(crate::vstate::memory::resident_bytes(&memory), after);
    }

    #[test]
    fn plans_beyond_the_queue_are_dropped_without_waiting() {
        let (work, planned) = sync_channel(PLANS_QUEUED);
        let plan = || vec![(0x1000, 0, PAGE_SIZE as usize)];
        for _ in 0..PLANS_QUEUED {
            assert!(queue_plan(&work, plan()));
        }
        // The prefaulter is behind: more plans neither wait nor pile up.
        for _ in 0..1000 {
            assert!(!queue_plan(&work, plan()));
        }
        assert_eq!(planned.try_iter().count(), PLANS_QUEUED);
        // Once it caught up, plans are queued again; once it ended, they go nowhere.
        assert!(queue_plan(&work, plan()));
        drop(planned);
        assert!(!queue_plan(&work, plan()));
    }

    #[test]
    fn a_query_is_answered_with_this_instance_id() {
        let context = Context {
            registry: Arc::new(Registry::new()),
            instance: 0x1234_5678_9abc_def0,
            outcomes: Arc::new(Outcomes::default()),
            fault: None,
            fault_fired: AtomicBool::new(false),
            arrivals: Mutex::new(None),
        };
        assert!(context.outcomes.begin(7));
        for (id, outcome) in [(7, Outcome::Abandoned), (8, Outcome::Unknown)] {
            let (mut client, server) = loopback_pair();
            let hello = encode(&Hello::Query { id }).unwrap();
            serve(server, &hello, &context);
            let (kind, payload) = client.recv().unwrap();
            assert_eq!(kind, KIND_OUTCOME);
            let answer: QueryAnswer = decode(&payload, "outcome").unwrap();
            assert_eq!(
                answer,
                QueryAnswer {
                    instance: 0x1234_5678_9abc_def0,
                    outcome
                }
            );
        }
    }

    #[test]
    fn a_query_abandons_a_pending_migration_and_keeps_a_started_one() {
        let outcomes = Outcomes::default();
        assert_eq!(outcomes.query(1), Outcome::Unknown);
        assert!(outcomes.begin(1));
        assert!(!outcomes.begin(1), "an id is taken once");
        assert_eq!(outcomes.query(1), Outcome::Abandoned);
        assert!(
            !outcomes.try_start(1),
            "GO after the query must not start it"
        );
        assert!(outcomes.begin(2));
        assert!(outcomes.try_start(2));
        outcomes.set(2, Record::Started);
        assert_eq!(outcomes.query(2), Outcome::Started);
        outcomes.abandon(2);
        assert_eq!(
            outcomes.query(2),
            Outcome::Started,
            "a started VM stays started"
        );
    }
}
