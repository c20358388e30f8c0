//! The source side of a live migration: [`Vm::migrate`].
//!
//! # Pre-copy
//!
//! 1. Connect and authenticate ([`SecureChannel`]); offer the VM (its configuration,
//!    with the disks by path: both hosts see the same images) and wait for ACCEPT.
//! 2. Turn KVM's dirty log on (if a snapshot did not already) and take it once as the
//!    baseline: from then on every page the guest or the VMM writes is in the log ∪
//!    the VMM's bitmap ([`take_dirty`]).
//! 3. Send every page that may hold data (pages the host never mapped read as zero
//!    and the destination's fresh RAM is zero already): zero pages are skipped, the
//!    rest go as data, 1 MiB per frame. A plan of those pages goes first, so the
//!    destination can fault its RAM in ahead of them on a second thread.
//! 4. While the VM runs, take the dirty pages and send them again, zero pages as
//!    markers; the bandwidth of the last pass tells how long the remaining pages would
//!    take. Once that fits `max_downtime`, go to the final phase. If the remainder does
//!    not shrink and `auto_converge` is set, a duty cycle pauses the vCPUs for a
//!    growing share of each 20 ms (up to 95 %) so the guest dirties less.
//! 5. Final phase: pause the VM; send the pages dirtied since the last pass; save the
//!    machine state (vCPUs, irqchip, clocks, devices, as a snapshot does); flush each
//!    disk and drop its image locks; send the state.
//!
//! # Hand-over: exactly one owner
//!
//! ```text
//!  source                                   destination
//!  OWNS, running ──pages──────────────────▶ fills RAM
//!  OWNS, paused, disks released ──STATE──▶  opens disks, builds the VM paused (incoming)
//!  OWNS, paused  ◀──────────────READY──────  waits for GO
//!  IN DOUBT      ──GO──────────────────────▶ starts vCPUs (owns from here)
//!  RELEASED      ◀──────────────RUNNING────  runs
//! ```
//!
//! - Until GO is written, the source owns the VM: any failure (a cut connection, a
//!   destination that dies, refuses, times out or cannot build) sends ABORT if it can,
//!   takes the disk locks back and resumes the VM (if it was running). The destination
//!   never runs a VM it has not been told GO for, and drops it when the connection ends
//!   first.
//! - A failed write of GO means GO did not arrive whole (its MAC is its last bytes), so
//!   the source still owns the VM and rolls back as above.
//! - A VM that was paused when the migration began is never resumed by it: the pre-copy
//!   is one full pass, the final state says `paused` ([`FinalState::paused`]), and on
//!   GO the destination takes the VM over without starting its vCPUs (state `paused`
//!   there; RUNNING then means "it is yours"). A rollback leaves it paused here.
//! - Once GO is written the source cannot tell by itself whether it arrived: the
//!   destination starts the VM on GO and the source may not resume it. If RUNNING comes
//!   back, the source commits: the VM becomes `migrated` and its machine is released.
//!   If the connection fails instead, the source asks the destination on a new
//!   connection what became of this migration (by its random id). The destination
//!   answers from its records, and a question about a migration still waiting for GO
//!   abandons it for good, so a late GO can no longer start it. `Started`: the source
//!   commits. `Abandoned` or `Unknown` (another process, or it never heard of it), or a
//!   refused connection (no destination process runs there, so neither does the VM):
//!   the source rolls back and resumes. If no answer comes within 30 s, the VM is left
//!   paused on the source and the error says so: the source keeps the complete copy, so
//!   the VM is not lost, and resuming it is left to the operator, who can see whether
//!   it runs on the destination.
//! - An answer counts only if it comes from the instance that accepted the VM: ACCEPT
//!   names the destination's instance id (random per peer server) and every answer to a
//!   query repeats the answering one's. The handshake proves only that the other end
//!   holds the key, so someone on the path could otherwise send the question to
//!   another host with the key, or back to the source's own listener, both of which
//!   would truly say `Unknown`, and the source would resume a VM that runs at the
//!   destination. An answer from another instance (that, or a destination restarted in
//!   between) decides nothing: the VM is left paused at once, as when no answer comes.
//!   The question is also sent with [`SecureChannel::connect_elsewhere`], which this
//!   process's own listener refuses.
//!
//! Why this is safe: the VM runs on the destination only after GO, and the source
//! resumes only when GO certainly did not arrive (failed write), or the destination
//! said it will never start it, or the destination process is gone. The one case the
//! source cannot decide it does not decide. A destination that dies after starting the
//! VM but before its RUNNING reaches the source takes its running VM down with it; the
//! source then finds no process there and resumes its copy from the pause (the guest
//! loses at most the moments it ran there).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::channel::{ChannelError, PeerKey, SecureChannel, FRAME_OVERHEAD};
use super::protocol::{
    decode, encode, encode_plan, Accepted, FinalState, Hello, Offer, Outcome, PageEncoder,
    QueryAnswer, Started, KIND_ABORT, KIND_ACCEPT, KIND_ERROR, KIND_GO, KIND_OUTCOME, KIND_PAGES,
    KIND_PLAN, KIND_READY, KIND_RUNNING, KIND_STATE, KIND_SYNC, KIND_SYNCED, PLAN_FRAME_RUNS,
};
use super::KIND_MIGRATE_HELLO;
use crate::snapshot::file::{HostRequirements, SavedDisk};
use crate::storage::StorageError;
use crate::vm::{region_layout, Vm, VmError, VmState};
use crate::vstate::memory::snapshot::page_is_zero;
use crate::vstate::memory::{
    mapping, pages_that_may_hold_data_in, take_dirty, DirtyPages, GuestRam, MemoryError, PAGE_SIZE,
};

/// How long connecting and authenticating may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The shortest wait for the destination in the final phase, however close the
/// deadline is: the VM is paused then, and giving up early only costs a rollback.
const FINAL_MIN_WAIT: Duration = Duration::from_secs(5);
/// How long the source keeps asking a destination that did not confirm.
const RESOLVE_WINDOW: Duration = Duration::from_secs(30);
/// How long the source tries to take its disk locks back after a failure (the
/// destination drops its copy as soon as it sees the connection end).
const RETAKE_WAIT: Duration = Duration::from_secs(10);
/// The auto-converge duty cycle's period.
const THROTTLE_PERIOD: Duration = Duration::from_millis(20);
/// Throttle steps, in percent of each period the vCPUs are paused.
const THROTTLE_STEP: u32 = 20;
const THROTTLE_MAX: u32 = 95;
/// Pages read per run of the dirty set (1 MiB).
const RUN_PAGES: u64 = 256;

/// How a VM is migrated.
#[derive(Clone)]
pub struct MigrateOptions {
    /// The key both hosts hold (`--key-file`).
    pub key: PeerKey,
    /// The longest the final pages may take to send, by the measured bandwidth: the
    /// pre-copy goes on until the dirty pages fit. The VM's pause also includes saving
    /// its state and building it on the destination (a few ms).
    pub max_downtime: Duration,
    /// The most the whole migration may take before it gives up and the VM goes on
    /// here.
    pub timeout: Duration,
    /// Slow the vCPUs down when the guest dirties memory faster than it can be sent.
    pub auto_converge: bool,
    /// Polled between frames; true cancels the migration (before the hand-over).
    #[allow(clippy::type_complexity)]
    pub cancel: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl MigrateOptions {
    pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(50);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

    pub fn new(key: PeerKey) -> MigrateOptions {
        MigrateOptions {
            key,
            max_downtime: Self::DEFAULT_MAX_DOWNTIME,
            timeout: Self::DEFAULT_TIMEOUT,
            auto_converge: false,
            cancel: None,
        }
    }
}

impl std::fmt::Debug for MigrateOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigrateOptions")
            .field("max_downtime", &self.max_downtime)
            .field("timeout", &self.timeout)
            .field("auto_converge", &self.auto_converge)
            .finish_non_exhaustive()
    }
}

/// Where a migration is, reported before each pass over memory. Remote control sends
/// it as it is (postcard) to a client that asked for progress, so a remote
/// `vm:migrate`'s `on_progress` sees the same fields as a local one.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MigrationProgress {
    /// 0 for the first (full) pass, then 1, 2, ... for each pass over dirtied pages.
    pub iteration: u32,
    /// Bytes this pass is about to send (at most: zero pages go as markers).
    pub remaining_bytes: u64,
    /// Bytes sent so far.
    pub sent_bytes: u64,
    /// The link's measured throughput, in megabits per second (as QEMU reports it).
    pub mbps: f64,
    /// The share of time the vCPUs are held paused (auto-converge), 0 to 0.95.
    pub throttle: f64,
    /// True for the last pass, which runs with the VM paused.
    pub final_pass: bool,
}

impl MigrationReport {
    /// The report as JSON: the one conversion of a report into named fields (durations
    /// in milliseconds). A local `vm:migrate`'s table, a remote one's (remote control
    /// sends this JSON) and a policy migration's status report are all made from it, so
    /// they carry the same fields.
    pub fn to_json(&self) -> serde_json::Value {
        let MigrationReport {
            downtime,
            total,
            bytes_sent,
            iterations,
            pages_sent,
            zero_pages,
            final_pages,
            throttle,
            mbps,
            destination_build,
        } = self;
        let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
        // Destructured above so that a new field cannot be forgotten here.
        serde_json::json!({
            "downtime_ms": ms(downtime),
            "total_ms": ms(total),
            "bytes_sent": bytes_sent,
            "iterations": iterations,
            "pages_sent": pages_sent,
            "zero_pages": zero_pages,
            "final_pages": final_pages,
            "throttle": throttle,
            "mbps": mbps,
            "destination_build_ms": ms(destination_build),
        })
    }
}

/// What a migration took.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationReport {
    /// From pausing the VM here to its vCPUs running there (RUNNING received).
    pub downtime: Duration,
    /// From the call to the end.
    pub total: Duration,
    /// Bytes of frames sent (pages, state, messages).
    pub bytes_sent: u64,
    /// Passes over memory: the full one, those while the VM ran, and the final one.
    pub iterations: u32,
    /// Pages sent as data.
    pub pages_sent: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Pages the final pass sent (data and markers).
    pub final_pages: u64,
    /// The highest auto-converge throttle used.
    pub throttle: f64,
    /// Average throughput of the page passes, megabits per second.
    pub mbps: f64,
    /// What the destination took from the state to a built VM.
    pub destination_build: Duration,
}

#[derive(Debug, Error)]
pub enum MigrationError {
    #[error("cannot reach or authenticate the destination")]
    Connect(#[source] ChannelError),
    #[error("the connection failed while {stage}")]
    Channel {
        stage: &'static str,
        #[source]
        source: ChannelError,
    },
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    #[error("the destination failed: {0}")]
    DestinationFailed(String),
    #[error("the destination sent {0}")]
    BadMessage(String),
    #[error("the destination sent frame kind {kind} while the source expected {expected}")]
    Protocol { kind: u8, expected: &'static str },
    #[error(
        "it did not converge within {timeout:?}: the guest dirtied {dirty_mib_s:.0} MiB/s and \
         the link carried {link_mib_s:.0} MiB/s; allow more downtime (max_downtime_ms), or \
         set auto_converge"
    )]
    NotConverging {
        timeout: Duration,
        dirty_mib_s: f64,
        link_mib_s: f64,
    },
    #[error("it timed out after {timeout:?} while {stage}")]
    TimedOut {
        timeout: Duration,
        stage: &'static str,
    },
    #[error("it was cancelled")]
    Cancelled,
    #[error("the vm ended during the migration (it is {0})")]
    VmEnded(VmState),
    #[error("guest memory")]
    Memory(#[source] MemoryError),
    #[error("disk {path}")]
    Disk {
        path: PathBuf,
        #[source]
        source: StorageError,
    },
    #[error("cannot encode the {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error(
        "the destination was told to run the VM and did not confirm, and it cannot be asked \
         whether it does ({0})"
    )]
    InDoubt(String),
    #[error("pausing or saving the vm")]
    Vm(#[source] Box<VmError>),
    /// The key to authenticate to the destination with could not be read (remote
    /// control reads it on the VM's host): nothing began.
    #[error(transparent)]
    Key(ChannelError),
    #[error("no key_file was given and this host serves without a key")]
    NoKey,
}

/// Where a failed migration leaves the VM, for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Left {
    Running,
    Paused,
    Ended(VmState),
    /// No answer came whether the destination runs the VM. `was_running` says how the
    /// VM was when the migration began: one that was paused would sit paused on the
    /// destination if it arrived, so "does it run there" is the wrong check for it.
    InDoubt {
        was_running: bool,
    },
    NotResumed(String),
}

impl Left {
    /// Where a VM in `state` is when the migration changed nothing.
    fn unchanged(state: VmState) -> Left {
        match state {
            VmState::Running => Left::Running,
            VmState::Paused => Left::Paused,
            other => Left::Ended(other),
        }
    }

    fn describe(&self, to: &str) -> String {
        match self {
            Left::Running => "it goes on running here".into(),
            Left::Paused => "it stays paused here".into(),
            Left::Ended(state) => format!("it is {state} here"),
            Left::InDoubt { was_running: true } => {
                format!("it is left paused here: resume it here only if it does not run on {to}")
            }
            Left::InDoubt { was_running: false } => format!(
                "it is left paused here, and if it arrived it waits paused on {to}: resume \
                 it here only if it is not on {to} (neither running nor paused)"
            ),
            Left::NotResumed(reason) => {
                format!("it stays paused here, because resuming it failed: {reason}")
            }
        }
    }
}

impl Vm {
    /// The error of a migration of this VM to `to` that failed before it began (its
    /// key could not be read): framed like any failed migration, saying that the VM
    /// is as it was.
    pub fn migration_not_begun(&self, to: &str, source: MigrationError) -> VmError {
        VmError::Migration {
            name: self.name().to_string(),
            to: to.to_string(),
            left: Left::unchanged(self.state()).describe(to),
            source: Box::new(source),
        }
    }

    /// Moves this running (or paused) VM to the `luvisor serve --listen` host at
    /// `addr`, live. `progress` is called before each pass over memory. On success the
    /// VM is `migrated` here and runs there, or, if it was paused here, waits paused
    /// there; on failure it is as it was (see the module docs for the one case in which
    /// a running VM is left paused), and the error says so.
    pub fn migrate(
        &self,
        addr: &str,
        options: &MigrateOptions,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<MigrationReport, VmError> {
        let _control = self.control_guard();
        let state = self.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(VmError::InvalidState {
                name: self.name().to_string(),
                op: "migrate",
                state,
            });
        }
        let started = Instant::now();
        let mut source = Source {
            vm: self,
            addr,
            options,
            started,
            deadline: crate::vstate::vcpu::deadline_after(options.timeout),
            was_running: state == VmState::Running,
            id: super::random_u64().max(1),
            instance: None,
            logging_was_on: None,
            paused: false,
            released: Vec::new(),
            encoder: PageEncoder::default(),
            bytes_sent: 0,
            pages_sent: 0,
            zero_pages: 0,
            page_bytes: 0,
            page_time: Duration::ZERO,
            throttle: Throttle::default(),
            max_throttle: 0,
            iterations: 0,
            steps: Vec::new(),
            cpu_started: super::thread_cpu_time(),
        };
        self.set_migrating(source.id);
        let result = std::thread::scope(|scope| source.run(scope, progress));
        self.set_migrating(0);
        match result {
            Ok(report) => {
                tracing::info!(
                    vm = self.name(),
                    to = addr,
                    downtime_ms = report.downtime.as_secs_f64() * 1000.0,
                    total_ms = report.total.as_secs_f64() * 1000.0,
                    bytes = report.bytes_sent,
                    "live migration done"
                );
                Ok(report)
            }
            Err((source, left)) => {
                let left = left.describe(addr);
                tracing::info!(vm = self.name(), to = addr, error = %source, left, "live migration failed");
                Err(VmError::Migration {
                    name: self.name().to_string(),
                    to: addr.to_string(),
                    left,
                    source: Box::new(source),
                })
            }
        }
    }
}

/// The auto-converge duty cycle: shared with its thread.
#[derive(Default)]
struct Throttle {
    /// Percent of each period the vCPUs are held paused.
    percent: Arc<AtomicU32>,
    stop: Arc<StopFlag>,
}

/// A flag a sleeping thread wakes up for at once, and whether it must leave the vCPUs
/// paused.
#[derive(Default)]
struct StopFlag {
    /// `Some(leave_paused)` once stopped.
    stopped: std::sync::Mutex<Option<bool>>,
    changed: std::sync::Condvar,
}

impl StopFlag {
    fn stop(&self, leave_paused: bool) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = Some(leave_paused);
        self.changed.notify_all();
    }

    /// Sleeps for `time` or until stopped; `Some(leave_paused)` once stopped.
    fn sleep(&self, time: Duration) -> Option<bool> {
        let stopped = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let (stopped, _) = self
            .changed
            .wait_timeout_while(stopped, time, |stopped| stopped.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *stopped
    }
}

/// What a failure returns: the error and where the VM is left.
type Failure = (MigrationError, Left);

struct Source<'a> {
    vm: &'a Vm,
    addr: &'a str,
    options: &'a MigrateOptions,
    started: Instant,
    deadline: Instant,
    was_running: bool,
    id: u64,
    /// The destination instance that accepted the VM ([`Accepted::instance`]): a query
    /// must be answered by it.
    instance: Option<u64>,
    /// Set once dirty tracking is on: whether it was on before.
    logging_was_on: Option<bool>,
    /// This migration paused the VM.
    paused: bool,
    /// Disks whose image locks were dropped for the destination, by index.
    released: Vec<(usize, PathBuf)>,
    encoder: PageEncoder,
    bytes_sent: u64,
    pages_sent: u64,
    zero_pages: u64,
    /// Bytes and time of the last pass, for the bandwidth estimate.
    page_bytes: u64,
    page_time: Duration,
    throttle: Throttle,
    max_throttle: u32,
    /// Passes over memory so far.
    iterations: u32,
    /// When each step ended, for the debug log of where the time went.
    steps: Vec<(&'static str, Instant)>,
    /// This thread's CPU time when the migration started.
    cpu_started: Duration,
}

impl<'a> Source<'a> {
    fn run<'scope>(
        &mut self,
        scope: &'scope std::thread::Scope<'scope, '_>,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<MigrationReport, Failure>
    where
        'a: 'scope,
    {
        // Nothing has changed until the offer is accepted.
        let unchanged = Left::unchanged(if self.was_running {
            VmState::Running
        } else {
            VmState::Paused
        });
        let connect_timeout = CONNECT_TIMEOUT.min(self.options.timeout.max(Duration::from_secs(1)));
        let mut channel = SecureChannel::connect(self.addr, &self.options.key, connect_timeout)
            .map_err(|e| (MigrationError::Connect(e), unchanged.clone()))?;
        self.step("connect");
        if let Err(e) = self.offer(&mut channel) {
            channel.shutdown();
            return Err((e, unchanged));
        }
        self.step("offer");
        let mut throttle_thread = None;
        if self.options.auto_converge && self.was_running {
            let vm = self.vm;
            let percent = self.throttle.percent.clone();
            let stop = self.throttle.stop.clone();
            throttle_thread = Some(scope.spawn(move || throttle_loop(vm, &percent, &stop)));
        }
        let copied = self.copy_while_running(&mut channel, progress);
        // The duty cycle ends before anything else touches the vCPUs. Going to the final
        // pass, it leaves them paused: the pause that follows then finds them so, and
        // the guest dirties nothing in between.
        self.throttle.stop.stop(copied.is_ok());
        if let Some(thread) = throttle_thread {
            let _ = thread.join();
        }
        let final_set = match copied {
            Ok(set) => set,
            Err(e) => return Err(self.roll_back(Some(&mut channel), e)),
        };
        self.hand_over(channel, final_set, progress)
    }

    /// Notes that `what` ended now.
    fn step(&mut self, what: &'static str) {
        self.steps.push((what, Instant::now()));
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    fn check(&self, stage: &'static str) -> Result<(), MigrationError> {
        if Instant::now() >= self.deadline {
            return Err(MigrationError::TimedOut {
                timeout: self.options.timeout,
                stage,
            });
        }
        if self.options.cancel.as_ref().is_some_and(|cancel| cancel()) {
            return Err(MigrationError::Cancelled);
        }
        Ok(())
    }

    fn send(
        &mut self,
        channel: &mut SecureChannel,
        kind: u8,
        payload: &[u8],
        stage: &'static str,
    ) -> Result<(), MigrationError> {
        channel
            .send(kind, payload)
            .map_err(|source| MigrationError::Channel { stage, source })?;
        self.bytes_sent += (payload.len() + FRAME_OVERHEAD) as u64;
        Ok(())
    }

    /// Waits up to `wait` for the destination's next frame.
    fn receive(
        &self,
        channel: &mut SecureChannel,
        wait: Duration,
        stage: &'static str,
    ) -> Result<(u8, Vec<u8>), MigrationError> {
        let channel_error = |source| MigrationError::Channel { stage, source };
        channel
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(channel_error)?;
        channel.recv().map_err(|e| match &e {
            ChannelError::Io { source, .. }
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                MigrationError::TimedOut {
                    timeout: self.options.timeout,
                    stage,
                }
            }
            _ => channel_error(e),
        })
    }

    /// The offer, and the destination's answer.
    fn offer(&mut self, channel: &mut SecureChannel) -> Result<(), MigrationError> {
        let memory = self
            .vm
            .memory_handle()
            .ok_or(MigrationError::VmEnded(self.vm.state()))?;
        let disks = self
            .vm
            .live_disks()
            .iter()
            .map(|disk| SavedDisk {
                path: std::fs::canonicalize(disk.path())
                    .unwrap_or_else(|_| disk.path().to_path_buf()),
                format: disk.format(),
                readonly: disk.readonly(),
                serial: disk.serial().to_string(),
                shared: true,
            })
            .collect();
        let offer = Hello::Migrate(Box::new(Offer {
            id: self.id,
            host: HostRequirements::of_this_host(),
            config: self.vm.saved_config(disks),
            regions: region_layout(&memory),
            idle_timeout_ms: self.options.timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        }));
        let bytes = encode(&offer).map_err(|reason| MigrationError::Encode {
            what: "offer",
            reason,
        })?;
        self.send(channel, KIND_MIGRATE_HELLO, &bytes, "offering the VM")?;
        let (kind, payload) = self.receive(
            channel,
            self.remaining(),
            "waiting for the answer to the offer",
        )?;
        match kind {
            KIND_ACCEPT => {
                let accepted: Accepted =
                    decode(&payload, "accept").map_err(MigrationError::BadMessage)?;
                self.instance = Some(accepted.instance);
                Ok(())
            }
            KIND_ERROR => Err(MigrationError::Refused(
                String::from_utf8_lossy(&payload).into_owned(),
            )),
            other => Err(MigrationError::Protocol {
                kind: other,
                expected: "ACCEPT",
            }),
        }
    }

    fn take_dirty(&self) -> Result<DirtyPages, MigrationError> {
        self.vm
            .with_vm_memory(take_dirty)
            .ok_or_else(|| MigrationError::VmEnded(self.vm.state()))?
            .map_err(MigrationError::Memory)
    }

    /// Bytes per second of the page passes: the last pass, or all of them when the
    /// last one was too short to measure.
    fn bandwidth(&self, last: (u64, Duration)) -> f64 {
        let (bytes, time) = if last.0 >= 1 << 20 && last.1 >= Duration::from_millis(2) {
            last
        } else {
            (self.page_bytes, self.page_time)
        };
        if time.is_zero() || bytes == 0 {
            // Nothing measured yet: assume a slow link, so the first estimates err long.
            return 100e6;
        }
        bytes as f64 / time.as_secs_f64()
    }

    /// Steps 2–4: the pre-copy. Returns the pages dirtied since the last pass.
    fn copy_while_running(
        &mut self,
        channel: &mut SecureChannel,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<DirtyPages, MigrationError> {
        self.logging_was_on = Some(
            self.vm
                .start_dirty_tracking()
                .map_err(|e| MigrationError::Vm(Box::new(e)))?,
        );
        // The baseline: pages written before now are read by the full pass.
        self.take_dirty()?;
        self.step("dirty log on");
        let memory = self
            .vm
            .memory_handle()
            .ok_or_else(|| MigrationError::VmEnded(self.vm.state()))?;
        let candidates = pages_that_may_hold_data_in(&memory);
        self.step("resident pages");
        progress(&MigrationProgress {
            iteration: 0,
            remaining_bytes: candidates.count() * PAGE_SIZE,
            sent_bytes: self.bytes_sent,
            mbps: 0.0,
            throttle: 0.0,
            final_pass: false,
        });
        self.send_plan(channel, &memory, &candidates)?;
        self.step("plan");
        let mut last = self.send_pages(channel, &memory, &candidates, true, false)?;
        self.step("full pass");
        let mut iteration = 0u32;
        let mut previous_remaining = u64::MAX;
        let mut not_shrinking = 0;
        loop {
            self.check("copying memory")
                .map_err(|e| self.explain_timeout(e, last))?;
            let dirty = self.take_dirty()?;
            let remaining = dirty.count() * PAGE_SIZE;
            let bandwidth = self.bandwidth(last);
            let estimate = Duration::from_secs_f64(remaining as f64 / bandwidth);
            if !self.was_running || estimate <= self.options.max_downtime {
                return Ok(dirty);
            }
            iteration += 1;
            // Shrinking by less than a tenth a pass is not converging.
            if remaining.saturating_mul(10) >= previous_remaining.saturating_mul(9) {
                not_shrinking += 1;
            } else {
                not_shrinking = 0;
            }
            if self.options.auto_converge && not_shrinking >= 2 {
                let percent = self.throttle.percent.load(Ordering::SeqCst);
                let raised = (percent + THROTTLE_STEP).min(THROTTLE_MAX);
                if raised != percent {
                    tracing::debug!(vm = self.vm.name(), throttle = raised, "auto-converge");
                    self.throttle.percent.store(raised, Ordering::SeqCst);
                    self.max_throttle = self.max_throttle.max(raised);
                }
                not_shrinking = 0;
            }
            previous_remaining = remaining;
            progress(&MigrationProgress {
                iteration,
                remaining_bytes: remaining,
                sent_bytes: self.bytes_sent,
                mbps: bandwidth * 8.0 / 1e6,
                throttle: f64::from(self.throttle.percent.load(Ordering::SeqCst)) / 100.0,
                final_pass: false,
            });
            last = self.send_pages(channel, &memory, &dirty, false, false)?;
            self.step("dirty pass");
        }
    }

    /// Tells the destination which pages the full pass is about to send, so that it
    /// can fault its RAM in ahead of them ([`KIND_PLAN`]).
    fn send_plan(
        &mut self,
        channel: &mut SecureChannel,
        memory: &GuestRam,
        candidates: &DirtyPages,
    ) -> Result<(), MigrationError> {
        let bases: Vec<u64> = memory.iter().map(|r| r.start_addr().0).collect();
        let mut runs = Vec::with_capacity(PLAN_FRAME_RUNS.min(1024));
        for run in candidates.runs(u64::from(u32::MAX)) {
            runs.push((
                bases[run.region] + run.first_page * PAGE_SIZE,
                run.pages as u32,
            ));
            if runs.len() == PLAN_FRAME_RUNS {
                self.send(channel, KIND_PLAN, &encode_plan(&runs), "sending memory")?;
                runs.clear();
            }
        }
        if !runs.is_empty() {
            self.send(channel, KIND_PLAN, &encode_plan(&runs), "sending memory")?;
        }
        Ok(())
    }

    /// A timeout during the pre-copy is a failure to converge: say by how much.
    fn explain_timeout(&self, e: MigrationError, last: (u64, Duration)) -> MigrationError {
        match e {
            MigrationError::TimedOut { timeout, .. } => {
                let link = self.bandwidth(last) / f64::from(1 << 20);
                let dirty = if last.1.is_zero() {
                    0.0
                } else {
                    last.0 as f64 / last.1.as_secs_f64() / f64::from(1 << 20)
                };
                MigrationError::NotConverging {
                    timeout,
                    dirty_mib_s: dirty.min(link),
                    link_mib_s: link,
                }
            }
            other => other,
        }
    }

    /// Sends the pages of `set`: with `full`, zero pages are skipped (the destination's
    /// RAM is zero); otherwise they go as markers. While the VM runs (`paused` false),
    /// the pass ends when the destination confirms it took them all in. Returns the
    /// bytes and time taken.
    fn send_pages(
        &mut self,
        channel: &mut SecureChannel,
        memory: &GuestRam,
        set: &DirtyPages,
        full: bool,
        paused: bool,
    ) -> Result<(u64, Duration), MigrationError> {
        let started = Instant::now();
        let before = self.bytes_sent;
        self.iterations += 1;
        let regions: Vec<_> = memory.iter().collect();
        self.encoder.clear();
        for run in set.runs(RUN_PAGES) {
            let region = regions[run.region];
            let base = region.start_addr().0;
            let host = mapping(region).as_ptr();
            for page in run.first_page..run.first_page + run.pages {
                if self.encoder.full() {
                    self.flush_pages(channel)?;
                }
                let offset = (page * PAGE_SIZE) as usize;
                // SAFETY: the set was taken from this RAM (it fits it), so the page
                // lies inside the region's live, page-aligned mapping. The guest may
                // change it meanwhile: then it is in the next dirty set and sent again.
                let at = unsafe { host.add(offset) };
                // SAFETY: as above; `at` points to a whole page.
                if unsafe { page_is_zero(at) } {
                    if !full {
                        self.encoder.push_zero(base + page * PAGE_SIZE);
                    }
                    continue;
                }
                // SAFETY: `at` has PAGE_SIZE readable bytes of guest memory (above),
                // which is not the encoder's buffer; a torn copy of a page the guest
                // writes meanwhile is sent again with the next dirty set.
                unsafe { self.encoder.push_data_from(base + page * PAGE_SIZE, at) };
            }
        }
        if !self.encoder.is_empty() {
            self.flush_pages(channel)?;
        }
        if !paused {
            // Until the destination has taken in every page, they are not moved: a
            // pass ends when it says so.
            self.send(channel, KIND_SYNC, &[], "sending memory")?;
            let (kind, _) = self.receive(channel, self.remaining(), "sending memory")?;
            if kind != KIND_SYNCED {
                return Err(MigrationError::Protocol {
                    kind,
                    expected: "SYNCED",
                });
            }
        }
        let bytes = self.bytes_sent - before;
        let time = started.elapsed();
        self.page_bytes += bytes;
        self.page_time += time;
        Ok((bytes, time))
    }

    fn flush_pages(&mut self, channel: &mut SecureChannel) -> Result<(), MigrationError> {
        self.check("copying memory")?;
        let (pages, zero) = self.encoder.counts();
        let result = channel
            .send_parts(KIND_PAGES, &self.encoder.parts())
            .map_err(|source| MigrationError::Channel {
                stage: "sending memory",
                source,
            });
        let payload: usize = self.encoder.parts().iter().map(|p| p.len()).sum();
        self.encoder.clear();
        result?;
        self.bytes_sent += (payload + FRAME_OVERHEAD) as u64;
        self.pages_sent += pages - zero;
        self.zero_pages += zero;
        Ok(())
    }

    /// Step 5 and the hand-over (module docs).
    fn hand_over(
        &mut self,
        mut channel: SecureChannel,
        dirty: DirtyPages,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<MigrationReport, Failure> {
        let pause_started = Instant::now();
        self.step("converged");
        let prepared = self.final_pass(&mut channel, dirty, progress);
        let final_pages = match prepared {
            Ok(pages) => pages,
            Err(e) => return Err(self.roll_back(Some(&mut channel), e)),
        };
        // READY, or the destination's error.
        let wait = self.remaining().max(FINAL_MIN_WAIT);
        let ready = self
            .receive(
                &mut channel,
                wait,
                "waiting for the destination to build the VM",
            )
            .and_then(|(kind, payload)| match kind {
                KIND_READY => Ok(()),
                KIND_ERROR => Err(MigrationError::DestinationFailed(
                    String::from_utf8_lossy(&payload).into_owned(),
                )),
                other => Err(MigrationError::Protocol {
                    kind: other,
                    expected: "READY",
                }),
            });
        if let Err(e) = ready {
            return Err(self.roll_back(Some(&mut channel), e));
        }
        if let Err(e) = self.send(
            &mut channel,
            KIND_GO,
            &[],
            "letting the destination run the VM",
        ) {
            // A write that failed did not deliver the whole frame: GO never arrived.
            return Err(self.roll_back(Some(&mut channel), e));
        }
        // In doubt from here: the destination may run the VM.
        let wait = self.remaining().max(FINAL_MIN_WAIT);
        let confirmed = self.receive(
            &mut channel,
            wait,
            "waiting for the destination to run the VM",
        );
        channel.shutdown();
        let started = match confirmed {
            Ok((KIND_RUNNING, payload)) => {
                decode::<Started>(&payload, "running").unwrap_or_default()
            }
            Ok((KIND_ERROR, payload)) => {
                // It could not start the VM and stopped it: the VM is ours again.
                let e = MigrationError::DestinationFailed(
                    String::from_utf8_lossy(&payload).into_owned(),
                );
                return Err(self.roll_back(None, e));
            }
            other => {
                let why = match other {
                    Ok((kind, _)) => format!("it sent frame kind {kind} instead of RUNNING"),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    vm = self.vm.name(),
                    why,
                    "no confirmation from the destination; asking it"
                );
                match self.resolve() {
                    Ok(Answer::Said(Outcome::Started)) => Started::default(),
                    Ok(answer) => {
                        let e = MigrationError::DestinationFailed(format!(
                            "{why}; asked afterwards, {}",
                            match answer {
                                Answer::NobodyThere =>
                                    "nothing listens there any more, so \
                                                        the VM does not run there",
                                Answer::Said(Outcome::Unknown) => "it does not know the VM",
                                _ => "it says the VM never ran there and never will",
                            }
                        ));
                        return Err(self.roll_back(None, e));
                    }
                    Err(reason) => {
                        return Err((
                            MigrationError::InDoubt(format!("{why}; then: {reason}")),
                            Left::InDoubt {
                                was_running: self.was_running,
                            },
                        ))
                    }
                }
            }
        };
        let downtime = pause_started.elapsed();
        self.step("running there");
        let mut previous = self.started;
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(what, at)| {
                let ms = at.duration_since(previous).as_secs_f64() * 1000.0;
                previous = *at;
                format!("{what} {ms:.1}")
            })
            .collect();
        tracing::debug!(
            vm = self.vm.name(),
            steps = steps.join(", "),
            cpu_ms = (super::thread_cpu_time() - self.cpu_started).as_secs_f64() * 1000.0,
            "where the time went (ms)"
        );
        tracing::debug!(
            vm = self.vm.name(),
            downtime_us = downtime.as_micros() as u64,
            build_us = started.build_us,
            start_us = started.start_us,
            "hand-over done"
        );
        self.vm.mark_migrated_locked(self.addr);
        let page_mbps = if self.page_time.is_zero() {
            0.0
        } else {
            self.page_bytes as f64 * 8.0 / 1e6 / self.page_time.as_secs_f64()
        };
        Ok(MigrationReport {
            downtime,
            total: self.started.elapsed(),
            bytes_sent: self.bytes_sent,
            iterations: self.iterations,
            pages_sent: self.pages_sent,
            zero_pages: self.zero_pages,
            final_pages,
            throttle: f64::from(self.max_throttle) / 100.0,
            mbps: page_mbps,
            destination_build: Duration::from_micros(started.build_us),
        })
    }
}

impl Source<'_> {
    /// Pauses the VM, sends the last pages and the machine state, and releases the
    /// disks. Returns the number of pages of the final pass.
    fn final_pass(
        &mut self,
        channel: &mut SecureChannel,
        mut dirty: DirtyPages,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<u64, MigrationError> {
        let vm_error = |e: VmError| match e {
            VmError::InvalidState { state, .. } => MigrationError::VmEnded(state),
            other => MigrationError::Vm(Box::new(other)),
        };
        let steps = Instant::now();
        if self.was_running {
            self.vm.pause_for_migration().map_err(vm_error)?;
            self.paused = true;
        }
        let paused_at = steps.elapsed();
        dirty
            .union_with(&self.take_dirty()?)
            .map_err(MigrationError::Memory)?;
        let memory = self
            .vm
            .memory_handle()
            .ok_or_else(|| MigrationError::VmEnded(self.vm.state()))?;
        let final_pages = dirty.count();
        progress(&MigrationProgress {
            iteration: self.iterations,
            remaining_bytes: final_pages * PAGE_SIZE,
            sent_bytes: self.bytes_sent,
            mbps: self.bandwidth((0, Duration::ZERO)) * 8.0 / 1e6,
            throttle: 0.0,
            final_pass: true,
        });
        self.send_pages(channel, &memory, &dirty, false, true)?;
        let pages_at = steps.elapsed();
        let (machine, _, devices) = self.vm.save_machine_state().map_err(vm_error)?;
        let saved_at = steps.elapsed();
        // The disks: everything written reaches the images, then the destination may
        // lock them.
        for (index, disk) in self.vm.live_disks().iter().enumerate() {
            let path = disk.path().to_path_buf();
            let disk_error = |source| MigrationError::Disk {
                path: path.clone(),
                source,
            };
            if let Some(Err(e)) = devices.with_block(index, |block| block.flush()) {
                return Err(disk_error(StorageError::Io {
                    path: path.clone(),
                    source: e,
                }));
            }
            if disk.readonly() {
                continue;
            }
            if let Some(Err(e)) = devices.with_block(index, |block| block.release_image(&path)) {
                return Err(disk_error(e));
            }
            self.released.push((index, path));
        }
        let state = FinalState {
            machine,
            memory_target: self.vm.memory_target(),
            // A VM paused here stays paused there: GO hands it over without running it.
            paused: !self.was_running,
        };
        let bytes = encode(&state).map_err(|reason| MigrationError::Encode {
            what: "machine state",
            reason,
        })?;
        self.send(channel, KIND_STATE, &bytes, "sending the machine state")?;
        tracing::debug!(
            vm = self.vm.name(),
            pause_us = paused_at.as_micros() as u64,
            pages_us = (pages_at - paused_at).as_micros() as u64,
            save_us = (saved_at - pages_at).as_micros() as u64,
            disks_and_state_us = (steps.elapsed() - saved_at).as_micros() as u64,
            final_pages,
            "final pass"
        );
        Ok(final_pages)
    }

    /// Undoes a migration that failed while the source owned the VM: tells the
    /// destination (if the connection is there), takes the disks back, resumes the VM
    /// if it was running and turns the dirty log off if the migration turned it on.
    fn roll_back(&mut self, channel: Option<&mut SecureChannel>, error: MigrationError) -> Failure {
        if let Some(channel) = channel {
            // A connection that failed (or is stuck) gets no ABORT: writing it could
            // block; closing says enough.
            if !matches!(
                error,
                MigrationError::Channel { .. } | MigrationError::TimedOut { .. }
            ) {
                let _ = channel.send(KIND_ABORT, error.to_string().as_bytes());
            }
            channel.shutdown();
        }
        let state = self.vm.state();
        if state.is_final() {
            return (error, Left::Ended(state));
        }
        self.retake_disks();
        if self.was_running && !self.paused {
            // The duty cycle may have left the vCPUs paused for a final pass that
            // never came.
            let _ = self.vm.throttle_vcpus(false);
        }
        let mut left = if self.was_running {
            Left::Running
        } else {
            Left::Paused
        };
        if self.paused {
            if let Err(e) = self.vm.resume_after_migration() {
                left = Left::NotResumed(crate::migration::destination::error_chain(&e));
            }
            self.paused = false;
        }
        if self.logging_was_on == Some(false) {
            self.vm.stop_dirty_tracking();
        }
        (error, left)
    }

    /// Locks the released disk images again. The destination drops its copy (and its
    /// locks) when it sees the connection end, so this retries for a while; if an image
    /// stays locked elsewhere, the VM goes on without the lock (its writes still work)
    /// and the error is logged.
    fn retake_disks(&mut self) {
        let Some(devices) = self.vm.devices() else {
            return;
        };
        let until = Instant::now() + RETAKE_WAIT;
        for (index, path) in std::mem::take(&mut self.released) {
            loop {
                match devices.with_block(index, |block| block.retake_image(&path)) {
                    None | Some(Ok(())) => break,
                    Some(Err(e)) if Instant::now() >= until => {
                        tracing::error!(
                            vm = self.vm.name(),
                            disk = %path.display(),
                            error = %e,
                            "cannot lock the disk image again after the failed migration; \
                             the VM goes on without the lock"
                        );
                        break;
                    }
                    Some(Err(_)) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    /// Asks the destination, on new connections, what became of this migration; see
    /// the module docs. `Err` when no answer came within [`RESOLVE_WINDOW`], or at once
    /// when another instance than the one that accepted the VM answered (it cannot
    /// know), or the question came back to this very process.
    fn resolve(&self) -> Result<Answer, String> {
        let until = Instant::now() + RESOLVE_WINDOW;
        loop {
            let last = match self.ask() {
                Ok(outcome) => return Ok(Answer::Said(outcome)),
                Err(Asked::NobodyThere) => return Ok(Answer::NobodyThere),
                Err(Asked::Elsewhere(reason)) => return Err(reason),
                Err(Asked::Failed(reason)) => reason,
            };
            if Instant::now() >= until {
                return Err(last);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ask(&self) -> Result<Outcome, Asked> {
        let failed = |e: &dyn std::fmt::Display| Asked::Failed(e.to_string());
        // Not to this process's own listener: someone on the path could send the
        // question there, and it would answer that it does not know the VM.
        let mut channel = match SecureChannel::connect_elsewhere(
            self.addr,
            &self.options.key,
            CONNECT_TIMEOUT,
        ) {
            Ok(channel) => channel,
            Err(ChannelError::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                // No process listens there: none runs the VM either.
                return Err(Asked::NobodyThere);
            }
            Err(e @ ChannelError::ReachedItself { .. }) => {
                tracing::warn!(vm = self.vm.name(), error = %e, "the question about the migration came back to this process");
                return Err(Asked::Elsewhere(e.to_string()));
            }
            Err(e) => return Err(failed(&e)),
        };
        let query = encode(&Hello::Query { id: self.id }).map_err(|e| failed(&e))?;
        channel
            .send(KIND_MIGRATE_HELLO, &query)
            .map_err(|e| failed(&e))?;
        let (kind, payload) = channel.recv().map_err(|e| failed(&e))?;
        channel.shutdown();
        match kind {
            KIND_OUTCOME => {
                let answer: QueryAnswer = decode(&payload, "outcome").map_err(|e| failed(&e))?;
                if Some(answer.instance) != self.instance {
                    let accepted = self
                        .instance
                        .map_or_else(|| "none".to_string(), |i| format!("{i:016x}"));
                    let reason = format!(
                        "{} answered as luvisor instance {:016x}, not as instance {accepted}, \
                         which took the VM: that is another process (the destination \
                         restarted, or the connection was redirected to another host), \
                         which cannot know whether the VM runs there",
                        self.addr, answer.instance
                    );
                    tracing::warn!(
                        vm = self.vm.name(),
                        reason,
                        "a question about the migration reached another instance"
                    );
                    return Err(Asked::Elsewhere(reason));
                }
                Ok(answer.outcome)
            }
            KIND_ERROR => Err(Asked::Failed(
                String::from_utf8_lossy(&payload).into_owned(),
            )),
            other => Err(Asked::Failed(format!("it answered frame kind {other}"))),
        }
    }
}

/// What the source learnt by asking.
enum Answer {
    Said(Outcome),
    /// Nothing listens at the address.
    NobodyThere,
}

/// Why a question to the destination got no answer.
enum Asked {
    /// Nothing listens at the address.
    NobodyThere,
    /// Another instance than the one that accepted the VM answered, or the question
    /// came back to this process: that says nothing about the VM, and asking again at
    /// the same address would reach the same.
    Elsewhere(String),
    Failed(String),
}

/// The auto-converge duty cycle: each period, the vCPUs are held paused for
/// `percent` of it. Ends as soon as `stop` is set, with the vCPUs running, or paused if
/// the stop says so (the final pass follows); or when the VM ends.
fn throttle_loop(vm: &Vm, percent: &AtomicU32, stop: &StopFlag) {
    let mut held = false;
    let finish = |held: bool, leave_paused: bool| {
        if held && !leave_paused {
            let _ = vm.throttle_vcpus(false);
        }
    };
    loop {
        let share = percent.load(Ordering::SeqCst).min(THROTTLE_MAX);
        let hold = THROTTLE_PERIOD * share / 100;
        if share > 0 {
            if vm.throttle_vcpus(true).is_err() {
                let _ = vm.throttle_vcpus(false);
                return;
            }
            held = true;
            if let Some(leave_paused) = stop.sleep(hold) {
                return finish(held, leave_paused);
            }
            if vm.throttle_vcpus(false).is_err() {
                return;
            }
            held = false;
        }
        if let Some(leave_paused) = stop.sleep(THROTTLE_PERIOD - hold) {
            return finish(held, leave_paused);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_has_every_field_in_its_json() {
        let report = MigrationReport {
            downtime: Duration::from_micros(2500),
            total: Duration::from_millis(400),
            bytes_sent: 9 << 20,
            iterations: 4,
            pages_sent: 2300,
            zero_pages: 12,
            final_pages: 7,
            throttle: 0.4,
            mbps: 8000.5,
            destination_build: Duration::from_micros(1200),
        };
        assert_eq!(
            report.to_json(),
            serde_json::json!({
                "downtime_ms": 2.5, "total_ms": 400.0, "bytes_sent": 9 << 20,
                "iterations": 4, "pages_sent": 2300, "zero_pages": 12, "final_pages": 7,
                "throttle": 0.4, "mbps": 8000.5, "destination_build_ms": 1.2,
            })
        );
    }

    #[test]
    fn a_migration_that_changed_nothing_leaves_the_vm_as_it_was() {
        assert_eq!(
            Left::unchanged(VmState::Running).describe("b"),
            "it goes on running here"
        );
        assert_eq!(
            Left::unchanged(VmState::Paused).describe("b"),
            "it stays paused here"
        );
        assert_eq!(
            Left::unchanged(VmState::Created).describe("b"),
            "it is created here"
        );
    }

    #[test]
    fn a_migration_in_doubt_says_what_to_look_for_on_the_destination() {
        // A VM that ran would run there if it arrived.
        assert_eq!(
            Left::InDoubt { was_running: true }.describe("b:7000"),
            "it is left paused here: resume it here only if it does not run on b:7000"
        );
        // A paused one would sit there paused: "not running there" proves nothing.
        let paused = Left::InDoubt { was_running: false }.describe("b:7000");
        assert_eq!(
            paused,
            "it is left paused here, and if it arrived it waits paused on b:7000: resume it \
             here only if it is not on b:7000 (neither running nor paused)"
        );
        assert!(!paused.contains("does not run"));
    }
}
