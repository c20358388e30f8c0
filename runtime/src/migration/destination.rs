//! The destination side of a live migration: it checks the offer, fills fresh guest
//! RAM with the pages that arrive, builds the VM from the final state with its vCPUs
//! and devices waiting paused (state `incoming`), says READY, and runs the VM only
//! when the source says GO. Anything that goes wrong before GO throws the VM away
//! here; the source still has it. See `source.rs` for the whole state machine.

use std::collections::VecDeque;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{
    decode, decode_pages, encode, FaultAction, FaultPoint, FinalState, Hello, Offer, Outcome,
    PageRun, Started, KIND_ABORT, KIND_ACCEPT, KIND_ERROR, KIND_GO, KIND_OUTCOME, KIND_PAGES,
    KIND_READY, KIND_RUNNING, KIND_STATE, KIND_SYNC, KIND_SYNCED,
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
            if let Ok(bytes) = encode(&outcome) {
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
            if vm.state() != crate::vm::VmState::Running {
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
        self.channel.send(KIND_ACCEPT, &[])?;

        // Pages, until the final state.
        let mut buf = Vec::new();
        let final_state: FinalState = loop {
            let kind = self.channel.recv_into(&mut buf)?;
            self.bytes += buf.len() as u64;
            match kind {
                KIND_PAGES => {
                    apply_pages(&memory, &buf)?;
                    self.frames += 1;
                    if let Flow::Dropped = self.fault(FaultPoint::Pages(self.frames)) {
                        return Ok(false);
                    }
                }
                KIND_SYNC => self.channel.send(KIND_SYNCED, &[])?,
                KIND_STATE => break decode(&buf, "final state").map_err(Failed)?,
                KIND_ABORT => {
                    tracing::info!(
                        peer = self.peer,
                        reason = %String::from_utf8_lossy(&buf),
                        "the source gave up the migration"
                    );
                    return Ok(false);
                }
                KIND_ERROR => {
                    return Err(Failed(format!(
                        "the source failed: {}",
                        String::from_utf8_lossy(&buf)
                    )))
                }
                other => return Err(Failed(format!("unexpected frame kind {other} among pages"))),
            }
        };
        drop(buf);
        if let Flow::Dropped = self.fault(FaultPoint::State) {
            return Ok(false);
        }
        final_state.machine.layout.check()?;

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
        if let Err(e) = vm.start_incoming() {
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
            "vm arrived and runs"
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

/// Copies the runs of a pages frame into guest RAM. Zero runs clear only pages that are
/// not zero already, so they cost no host memory.
fn apply_pages(memory: &GuestRam, frame: &[u8]) -> Result<(), Failed> {
    for run in decode_pages(frame) {
        let run = run.map_err(Failed)?;
        let (gpa, pages) = match &run {
            PageRun::Data { gpa, data } => (*gpa, data.len() as u64 / PAGE_SIZE),
            PageRun::Zero { gpa, pages } => (*gpa, *pages),
        };
        let len = pages * PAGE_SIZE;
        let region = memory
            .find_region(GuestAddress(gpa))
            .filter(|r| gpa + len <= r.start_addr().0 + r.len())
            .ok_or_else(|| {
                Failed(format!(
                    "pages at {gpa:#x} (+{len:#x}) are not inside guest RAM"
                ))
            })?;
        let offset = (gpa - region.start_addr().0) as usize;
        // SAFETY: [offset, offset + len) lies inside the region's live mapping (checked
        // just above); the VM is not built yet, so nothing else touches this memory.
        let host = unsafe { mapping(region).as_ptr().add(offset) };
        match run {
            PageRun::Data { data, .. } => {
                // SAFETY: `host` has `len` writable bytes (above); `data` is exactly
                // `len` bytes of the frame buffer, which does not overlap guest RAM.
                unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), host, data.len()) };
            }
            PageRun::Zero { .. } => {
                for page in 0..pages {
                    // SAFETY: each page lies inside the `len` bytes checked above, and
                    // mappings are page-aligned.
                    unsafe {
                        let at = host.add((page * PAGE_SIZE) as usize);
                        if !page_is_zero(at) {
                            std::ptr::write_bytes(at, 0, PAGE_SIZE as usize);
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::PageEncoder;
    use crate::vstate::memory::create_ram;
    use vm_memory::Bytes;

    #[test]
    fn pages_land_where_they_belong_and_nowhere_else() {
        let memory = create_ram(1 << 20).unwrap();
        memory.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        let mut encoder = PageEncoder::default();
        encoder.push_data(0x1000, |b| b.fill(0xAB));
        encoder.push_zero(0x3000);
        apply_pages(&memory, encoder.payload()).unwrap();
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x1fff)).unwrap(), 0xAB);
        assert_eq!(memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert_eq!(memory.read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);

        // Past the end of RAM, or straddling it: refused, nothing written.
        for gpa in [1 << 20, (1 << 20) - 0x1000] {
            let mut encoder = PageEncoder::default();
            encoder.push_data(gpa, |b| b.fill(1));
            encoder.push_data(gpa + 0x1000, |b| b.fill(1));
            let Err(err) = apply_pages(&memory, encoder.payload()) else {
                panic!("pages at {gpa:#x} were accepted");
            };
            assert!(err.0.contains("not inside guest RAM"), "{}", err.0);
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
