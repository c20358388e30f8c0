//! Warm pools: ready VMs of a template, restored from a snapshot of a booted template VM,
//! handed out by [`Pool::claim`] and refilled in the background.
//!
//! ```text
//! Pools::define   template VM NAME-template (its disks overlays of their bases) boots,
//!                 becomes ready, is snapshotted into DIR/snapshot (its disks frozen) and
//!                 destroyed; returns once the filler has `min` VMs ready
//! filler thread   keeps `target` VMs ready (NAME-1, NAME-2, ...; never reused names),
//!                 each restored from that snapshot with its own disk overlays
//! Pool::claim     hands out a ready VM (warm), or restores one on the spot (cold)
//! vm destroyed    the pool notices (on its next look), removes the VM's overlays and
//!                 counts it returned
//! Pools::remove   every VM of the pool, claimed ones too, and every file are removed
//! ```
//!
//! `target` starts at `min`. Policies change it (`ctx:pool_target`, see `luvisor-lua`'s
//! policy engine) through [`Pools::set_target`], which keeps it within `[min, max]` and
//! within the host's free memory above the reserve ([`clamp_target`]); what they read is
//! [`PoolSnapshot`], which counts the claims of the last `window`.
//!
//! Pools belong to a [`Registry`] ([`pools`]); [`shutdown`] removes them all (the CLI
//! calls it before it exits).

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::devices::console::CANCEL_POLL;
use crate::lab::{make_vm, remove_files, valid_name, MakeVmError, OwnedDir, Template, MAX_NAME};
use crate::readiness::{wait_ready, Readiness, ReadyError};
use crate::registry::{Registry, RegistryError, VmId};
use crate::size::format_size;
use crate::storage::StorageError;
use crate::vm::{SnapshotOptions, Vm, VmError, VmState};

/// Most ready VMs one pool keeps.
pub const MAX_POOL_VMS: usize = 256;
/// The claim-rate window when none is given.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(10);
/// Most claims a pool remembers the times of (for the window).
const MAX_CLAIM_TIMES: usize = 65_536;
/// How often the filler looks at claimed VMs even when nothing wakes it.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);
/// How long the filler waits after a failed restore or while memory is short.
const BACKOFF: Duration = Duration::from_secs(1);

/// What [`Pools::define`] makes.
#[derive(Debug, Clone)]
pub struct PoolSpec {
    pub name: String,
    pub template: Template,
    pub readiness: Readiness,
    /// Fewest ready VMs kept (the target starts here).
    pub min: usize,
    /// Most ready VMs kept.
    pub max: usize,
    /// The claims of this window are what policies scale on.
    pub window: Duration,
    /// Where the template's overlays, the snapshot and the VMs' overlays go;
    /// `NAME.pool` in the current directory when `None`.
    pub dir: Option<PathBuf>,
    /// How long the template VM may take to become ready, and then how long the
    /// filler may take to have the first `min` VMs ready.
    pub ready_timeout: Duration,
}

/// One pool as policies see it (`ctx.pools`), and as `hv.pool.status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSnapshot {
    pub name: String,
    pub min: u64,
    pub max: u64,
    /// Ready VMs the pool keeps now.
    pub target: u64,
    /// Ready VMs, not claimed.
    pub ready: u64,
    /// Claimed VMs that still exist.
    pub claimed: u64,
    /// Restores under way.
    pub restoring: u64,
    /// Claims since the pool was defined.
    pub claims: u64,
    /// Claims within the last `window_ms`.
    pub claims_window: u64,
    pub window_ms: u64,
    /// Claimed VMs destroyed since the pool was defined.
    pub returned: u64,
    /// Guest memory of one VM (bytes): what one more ready VM may cost the host.
    pub memory: u64,
}

/// How a claim was served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimKind {
    /// A ready VM was there.
    Warm,
    /// None was: one was restored for this claim.
    Cold,
}

impl ClaimKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ClaimKind::Warm => "warm",
            ClaimKind::Cold => "cold",
        }
    }
}

/// A target after [`clamp_target`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clamped {
    pub target: u64,
    /// The target differs from what was asked.
    pub clamped: bool,
}

/// The target a pool takes when `asked` for: within `[min, max]`, and never more new VMs
/// than the host's free memory above its reserve (`free`) holds at `memory` each. Ready
/// VMs it has already are not taken back for memory. A pure function of its inputs, so
/// a policy's decision (computed from a tick's input) and the pool (from the live host)
/// clamp alike.
pub fn clamp_target(asked: u64, pool: &PoolSnapshot, free: u64) -> Clamped {
    let mut target = asked.clamp(pool.min, pool.max.max(pool.min));
    let have = pool.ready + pool.restoring;
    if target > have && pool.memory > 0 {
        let fits = free / pool.memory;
        target = target.min(have.saturating_add(fits));
    }
    Clamped {
        target,
        clamped: target != asked,
    }
}

/// The host's memory available above the reserve (bytes).
pub fn host_free_memory() -> u64 {
    crate::host::HostInfo::query()
        .memory_available
        .saturating_sub(crate::host::memory_reserve())
}

#[derive(Debug, Error)]
pub enum PoolError {
    #[error("pool name {0:?} is invalid: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.', not starting with '.' or '-'")]
    Name(String),
    #[error("pool '{pool}': min = {min} and max = {max} are out of range: give 0 <= min <= max, 1 <= max <= {MAX_POOL_VMS}")]
    Range {
        pool: String,
        min: usize,
        max: usize,
    },
    #[error("pool '{pool}': the claim window must be longer than 0 s")]
    Window { pool: String },
    #[error("pool '{0}' already exists; remove it first (hv.pool.remove)")]
    Exists(String),
    #[error("no pool named '{name}'{known}")]
    NoSuchPool { name: String, known: String },
    #[error("pool '{pool}': the template's disks are given as disk templates ({{ base = ... }}), not as opened disks")]
    TemplateDisks { pool: String },
    #[error("pool '{pool}': {path} already exists; choose another dir or remove it")]
    SnapshotExists { pool: String, path: PathBuf },
    #[error("pool '{pool}': cannot create its directory {path}")]
    Dir {
        pool: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pool '{pool}': cannot make the overlay {path} of {base} for the template VM")]
    Overlay {
        pool: String,
        base: PathBuf,
        path: PathBuf,
        #[source]
        source: Box<StorageError>,
    },
    #[error("pool '{pool}': cannot create the template VM")]
    Create {
        pool: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("pool '{pool}': the template VM failed to start")]
    Start {
        pool: String,
        #[source]
        source: Box<VmError>,
    },
    #[error("pool '{pool}': the template VM did not become ready")]
    NotReady {
        pool: String,
        #[source]
        source: Box<ReadyError>,
    },
    #[error("pool '{pool}': cannot snapshot the template VM")]
    Snapshot {
        pool: String,
        #[source]
        source: Box<VmError>,
    },
    #[error("pool '{pool}': {ready} of its min = {min} VMs were ready after {:.1}s: {why}", waited.as_secs_f64())]
    NotFilled {
        pool: String,
        ready: usize,
        min: usize,
        waited: Duration,
        why: String,
    },
    #[error("pool '{pool}': interrupted while its first {min} VMs were restored")]
    FillInterrupted { pool: String, min: usize },
    #[error("pool '{pool}': cannot start its filler thread")]
    Thread {
        pool: String,
        #[source]
        source: std::io::Error,
    },
    #[error("pool '{pool}': cannot restore a VM for a claim")]
    Restore {
        pool: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("pool '{pool}': no ready VM within {waited:?}: {why}")]
    Empty {
        pool: String,
        waited: Duration,
        why: String,
    },
    #[error("pool '{pool}': interrupted while waiting for a VM")]
    Interrupted { pool: String },
    #[error("pool '{pool}' was removed")]
    Removed { pool: String },
    #[error("the pools of this process have shut down")]
    ShutDown,
    #[error("the VMs' registry is gone")]
    NoRegistry,
}

/// A VM the pool made, and its disk overlays.
#[derive(Debug, Clone)]
struct PoolVm {
    id: VmId,
    name: String,
    overlays: Vec<PathBuf>,
}

/// A restore under way: the VM it makes is in the registry before the pool lists it as
/// ready or claimed, and [`Pool::holds_unclaimed`] must count it as the pool's meanwhile.
#[derive(Debug, Clone)]
struct InFlight {
    name: String,
    /// The highest VM id in the registry when the restore started: the restored VM's id
    /// is above it (a VM of the same name made before is someone else's).
    after: Option<VmId>,
}

#[derive(Debug)]
struct PoolState {
    target: usize,
    /// Why the target is what it is (the last policy's reason, or "min").
    target_reason: String,
    ready: VecDeque<PoolVm>,
    claimed: Vec<PoolVm>,
    restoring: usize,
    /// The restores under way, by the name of the VM each makes. An entry goes when its
    /// VM is listed (ready or claimed) or discarded, under the same lock.
    in_flight: Vec<InFlight>,
    /// The number of the next VM name (NAME-N).
    next_number: u64,
    claims: u64,
    claim_times: VecDeque<Instant>,
    returned: u64,
    /// The filler's last problem (a failed restore, memory), cleared by a success.
    last_error: Option<String>,
    /// Restores of the filler that failed, since the pool was defined.
    failed_restores: u64,
    stopping: bool,
    /// The last restore's duration.
    last_restore: Option<Duration>,
}

/// A warm pool: see the module documentation.
pub struct Pool {
    name: String,
    min: usize,
    max: usize,
    window: Duration,
    /// Guest memory of one VM.
    memory: u64,
    dir: OwnedDir,
    snapshot: PathBuf,
    template_overlays: Vec<PathBuf>,
    registry: Weak<Registry>,
    state: Mutex<PoolState>,
    changed: Condvar,
    filler: Mutex<Option<JoinHandle<()>>>,
}

/// More about a pool than policies read: for `hv.pool.status`.
#[derive(Debug, Clone)]
pub struct PoolStatus {
    pub snapshot: PoolSnapshot,
    pub target_reason: String,
    pub last_error: Option<String>,
    pub last_restore: Option<Duration>,
    pub dir: PathBuf,
    /// Names of the ready VMs, oldest first.
    pub ready_vms: Vec<String>,
    /// Names of the claimed VMs that still exist.
    pub claimed_vms: Vec<String>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Pool {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
    pub fn snapshot_dir(&self) -> &Path {
        &self.snapshot
    }
    pub fn memory_per_vm(&self) -> u64 {
        self.memory
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    fn registry(&self) -> Result<Arc<Registry>, PoolError> {
        self.registry.upgrade().ok_or(PoolError::NoRegistry)
    }

    /// Forgets claimed and ready VMs that were destroyed (removing their overlays) and
    /// takes out ready VMs that ended (returned for destruction outside the lock).
    fn reconcile(&self, state: &mut PoolState, registry: &Registry) -> Vec<PoolVm> {
        let mut returned = 0;
        state.claimed.retain(|vm| {
            let alive = registry.get(vm.id).is_some();
            if !alive {
                remove_files(&vm.overlays);
                returned += 1;
            }
            alive
        });
        state.returned += returned;
        let mut ended = Vec::new();
        state.ready.retain(|vm| match registry.get(vm.id) {
            Some(live) if live.state() == VmState::Running => true,
            Some(_) => {
                ended.push(vm.clone());
                false
            }
            None => {
                remove_files(&vm.overlays);
                false
            }
        });
        ended
    }

    fn discard(&self, registry: &Registry, vms: Vec<PoolVm>) {
        for vm in vms {
            registry.destroy(vm.id);
            remove_files(&vm.overlays);
        }
    }

    fn snapshot_locked(&self, state: &mut PoolState) -> PoolSnapshot {
        let now = Instant::now();
        while state
            .claim_times
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.window)
        {
            state.claim_times.pop_front();
        }
        PoolSnapshot {
            name: self.name.clone(),
            min: self.min as u64,
            max: self.max as u64,
            target: state.target as u64,
            ready: state.ready.len() as u64,
            claimed: state.claimed.len() as u64,
            restoring: state.restoring as u64,
            claims: state.claims,
            claims_window: state.claim_times.len() as u64,
            window_ms: self.window.as_millis() as u64,
            returned: state.returned,
            memory: self.memory,
        }
    }

    /// The pool as policies see it, after noticing destroyed VMs.
    pub fn snapshot(&self) -> PoolSnapshot {
        let registry = self.registry.upgrade();
        let mut state = self.lock();
        let ended = match &registry {
            Some(registry) => self.reconcile(&mut state, registry),
            None => Vec::new(),
        };
        let snapshot = self.snapshot_locked(&mut state);
        drop(state);
        if let (Some(registry), false) = (registry, ended.is_empty()) {
            self.discard(&registry, ended);
            self.changed.notify_all();
        }
        snapshot
    }

    /// Everything `hv.pool.status` shows.
    pub fn status(&self) -> PoolStatus {
        let snapshot = self.snapshot();
        let registry = self.registry.upgrade();
        let state = self.lock();
        let names = |vms: &mut dyn Iterator<Item = &PoolVm>| -> Vec<String> {
            vms.filter_map(|vm| {
                registry
                    .as_ref()
                    .and_then(|r| r.get(vm.id))
                    .map(|v| v.name().to_string())
            })
            .collect()
        };
        PoolStatus {
            snapshot,
            target_reason: state.target_reason.clone(),
            last_error: state.last_error.clone(),
            last_restore: state.last_restore,
            dir: self.dir.path.clone(),
            ready_vms: names(&mut state.ready.iter()),
            claimed_vms: names(&mut state.claimed.iter()),
        }
    }

    /// Sets how many ready VMs to keep (clamped, see [`clamp_target`]); the filler
    /// restores or destroys VMs to match. Returns what was applied.
    pub fn set_target(&self, asked: u64, reason: &str) -> Clamped {
        let mut state = self.lock();
        let snapshot = self.snapshot_locked(&mut state);
        let clamped = clamp_target(asked, &snapshot, host_free_memory());
        if state.target as u64 != clamped.target {
            tracing::info!(
                pool = self.name.as_str(),
                from = state.target,
                to = clamped.target,
                asked,
                "pool target: {reason}"
            );
        }
        state.target = clamped.target as usize;
        state.target_reason = reason.to_string();
        drop(state);
        self.changed.notify_all();
        clamped
    }

    /// Restores one VM from the pool's snapshot under the next free name. The VM stays
    /// in `in_flight` until the caller lists or discards it (see [`Pool::settle`]).
    fn restore_one(&self, registry: &Registry) -> Result<PoolVm, RegistryError> {
        let mut attempts = 0;
        loop {
            let after = registry.list().last().map(|vm| vm.id());
            let name = {
                let mut state = self.lock();
                state.next_number += 1;
                let name = format!("{}-{}", self.name, state.next_number);
                state.in_flight.push(InFlight {
                    name: name.clone(),
                    after,
                });
                name
            };
            let started = Instant::now();
            let restored = registry.restore(&self.snapshot, Some(&name));
            if restored.is_err() {
                Self::settle(&mut self.lock(), &name);
            }
            match restored {
                Ok(vm) => {
                    self.lock().last_restore = Some(started.elapsed());
                    let overlays = vm
                        .config()
                        .disks
                        .iter()
                        .map(|d| d.path().to_path_buf())
                        .filter(|p| !self.template_overlays.contains(p))
                        .collect();
                    return Ok(PoolVm {
                        id: vm.id(),
                        name,
                        overlays,
                    });
                }
                // Someone else has a VM of that name: take the next number.
                Err(RegistryError::DuplicateName(_)) if attempts < 16 => attempts += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Forgets the restore of `name` as under way: its VM is listed or discarded now.
    fn settle(state: &mut PoolState, name: &str) {
        state.in_flight.retain(|f| f.name != name);
    }

    /// Whether `vm` is one of this pool's and not handed out: ready, or being restored
    /// by the filler. Such a VM belongs to the pool, not to whoever runs while it is made
    /// (a test's cleanup must leave it alone).
    pub fn holds_unclaimed(&self, vm: &Vm) -> bool {
        let state = self.lock();
        state.ready.iter().any(|p| p.id == vm.id())
            || state
                .in_flight
                .iter()
                .any(|f| f.name == vm.name() && f.after.is_none_or(|after| vm.id() > after))
    }

    /// Hands out a ready VM, or restores one (cold) when none is ready and the host's
    /// memory allows; otherwise waits up to `timeout` for one. `cancel` is polled.
    pub fn claim(
        &self,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(Arc<Vm>, ClaimKind), PoolError> {
        let registry = self.registry()?;
        let started = Instant::now();
        let deadline = crate::vstate::vcpu::deadline_after(timeout);
        let mut state = self.lock();
        loop {
            if state.stopping {
                return Err(PoolError::Removed {
                    pool: self.name.clone(),
                });
            }
            let ended = self.reconcile(&mut state, &registry);
            if !ended.is_empty() {
                drop(state);
                self.discard(&registry, ended);
                state = self.lock();
                continue;
            }
            if let Some(pooled) = state.ready.pop_front() {
                if let Some(vm) = registry.get(pooled.id) {
                    self.count_claim(&mut state, pooled);
                    drop(state);
                    self.changed.notify_all();
                    return Ok((vm, ClaimKind::Warm));
                }
                // Destroyed since `reconcile` looked: nobody else knows of its overlays.
                remove_files(&pooled.overlays);
                continue;
            }
            let free = host_free_memory();
            if free >= self.memory {
                state.restoring += 1;
                drop(state);
                let restored = self.restore_one(&registry);
                state = self.lock();
                state.restoring -= 1;
                let pooled = restored.map_err(|source| PoolError::Restore {
                    pool: self.name.clone(),
                    source: Box::new(source),
                })?;
                Self::settle(&mut state, &pooled.name);
                if state.stopping {
                    // The pool was removed during the restore: `remove` has emptied its
                    // lists already and would never see this VM.
                    drop(state);
                    self.discard(&registry, vec![pooled]);
                    return Err(PoolError::Removed {
                        pool: self.name.clone(),
                    });
                }
                let Some(vm) = registry.get(pooled.id) else {
                    remove_files(&pooled.overlays);
                    continue;
                };
                self.count_claim(&mut state, pooled);
                drop(state);
                self.changed.notify_all();
                return Ok((vm, ClaimKind::Cold));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(PoolError::Empty {
                    pool: self.name.clone(),
                    waited: started.elapsed(),
                    why: format!(
                        "none is ready and the host has {} free above its reserve, less than \
                         the {} one more VM needs",
                        format_size(free),
                        format_size(self.memory)
                    ),
                });
            }
            if cancel() {
                return Err(PoolError::Interrupted {
                    pool: self.name.clone(),
                });
            }
            state = self
                .changed
                .wait_timeout(state, (deadline - now).min(CANCEL_POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Waits until the filler has `min` VMs ready. Fails at the filler's first failed
    /// restore (a restore that fails once fails again: the snapshot is the same), when
    /// `timeout` is over (the host's memory did not allow them), or once `stop` returns
    /// true (polled every 50 ms).
    fn wait_filled(&self, timeout: Duration, stop: &dyn Fn() -> bool) -> Result<(), PoolError> {
        let started = Instant::now();
        let deadline = crate::vstate::vcpu::deadline_after(timeout);
        let mut state = self.lock();
        loop {
            if state.ready.len() >= self.min {
                return Ok(());
            }
            let now = Instant::now();
            if state.failed_restores > 0 || now >= deadline {
                return Err(PoolError::NotFilled {
                    pool: self.name.clone(),
                    ready: state.ready.len(),
                    min: self.min,
                    waited: started.elapsed(),
                    why: state
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "the restores did not finish in time".into()),
                });
            }
            if stop() {
                return Err(PoolError::FillInterrupted {
                    pool: self.name.clone(),
                    min: self.min,
                });
            }
            state = self
                .changed
                .wait_timeout(state, (deadline - now).min(CANCEL_POLL))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn count_claim(&self, state: &mut PoolState, pooled: PoolVm) {
        state.claimed.push(pooled);
        state.claims += 1;
        state.claim_times.push_back(Instant::now());
        if state.claim_times.len() > MAX_CLAIM_TIMES {
            state.claim_times.pop_front();
        }
    }

    /// The filler thread: keeps `target` VMs ready until the pool stops.
    fn fill(self: Arc<Self>) {
        loop {
            let Some(registry) = self.registry.upgrade() else {
                return;
            };
            let mut state = self.lock();
            if state.stopping {
                return;
            }
            let ended = self.reconcile(&mut state, &registry);
            if !ended.is_empty() {
                drop(state);
                self.discard(&registry, ended);
                continue;
            }
            let have = state.ready.len() + state.restoring;
            if have < state.target {
                let free = host_free_memory();
                if free < self.memory {
                    state.last_error = Some(format!(
                        "the host has {} free above its reserve, less than the {} one more VM needs",
                        format_size(free),
                        format_size(self.memory)
                    ));
                    drop(registry);
                    let _ = self.changed.wait_timeout(state, BACKOFF);
                    continue;
                }
                state.restoring += 1;
                drop(state);
                let restored = self.restore_one(&registry);
                let mut state = self.lock();
                state.restoring -= 1;
                if let Ok(pooled) = &restored {
                    Self::settle(&mut state, &pooled.name);
                }
                match restored {
                    Ok(pooled) if state.stopping => {
                        drop(state);
                        self.discard(&registry, vec![pooled]);
                    }
                    Ok(pooled) => {
                        state.ready.push_back(pooled);
                        state.last_error = None;
                        drop(state);
                        self.changed.notify_all();
                    }
                    Err(e) => {
                        let message = crate::error_chain(&e);
                        tracing::warn!(pool = self.name.as_str(), "cannot restore a VM: {message}");
                        state.last_error = Some(message);
                        state.failed_restores += 1;
                        drop(registry);
                        // `Pools::define` waits for the first VMs and gives up on this.
                        self.changed.notify_all();
                        let _ = self.changed.wait_timeout(state, BACKOFF);
                    }
                }
                continue;
            }
            if state.ready.len() > state.target {
                // The newest first: the oldest have waited longest and go out first.
                let extra = state.ready.pop_back();
                drop(state);
                if let Some(extra) = extra {
                    self.discard(&registry, vec![extra]);
                }
                continue;
            }
            drop(registry);
            let _ = self.changed.wait_timeout(state, RECONCILE_EVERY);
        }
    }

    /// Stops the filler, destroys every VM of the pool (claimed ones too) and removes
    /// every file it made.
    fn remove(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
        if let Some(filler) = lock(&self.filler).take() {
            if filler.thread().id() != std::thread::current().id() {
                let _ = filler.join();
            }
        }
        let vms: Vec<PoolVm> = {
            let mut state = self.lock();
            let mut vms: Vec<PoolVm> = state.ready.drain(..).collect();
            vms.append(&mut state.claimed);
            vms
        };
        match self.registry.upgrade() {
            Some(registry) => self.discard(&registry, vms),
            None => {
                for vm in &vms {
                    remove_files(&vm.overlays);
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.snapshot);
        remove_files(&self.template_overlays);
        self.dir.release();
        tracing::debug!(pool = self.name.as_str(), "pool removed");
    }
}

/// The pools of one registry.
pub struct Pools {
    registry: Weak<Registry>,
    pools: Mutex<BTreeMap<String, Arc<Pool>>>,
    /// Names being defined (the template boots outside the lock).
    defining: Mutex<Vec<String>>,
    shut_down: AtomicBool,
}

/// The pools of each registry that has used them.
static POOLS: Mutex<Vec<(Weak<Registry>, Arc<Pools>)>> = Mutex::new(Vec::new());

/// The pools of `registry`, made on first use.
pub fn pools(registry: &Arc<Registry>) -> Arc<Pools> {
    let mut all = lock(&POOLS);
    all.retain(|(r, _)| r.strong_count() > 0);
    if let Some((_, pools)) = all
        .iter()
        .find(|(r, _)| std::ptr::eq(r.as_ptr(), Arc::as_ptr(registry)))
    {
        return pools.clone();
    }
    let pools = Arc::new(Pools {
        registry: Arc::downgrade(registry),
        pools: Mutex::new(BTreeMap::new()),
        defining: Mutex::new(Vec::new()),
        shut_down: AtomicBool::new(false),
    });
    all.push((Arc::downgrade(registry), pools.clone()));
    pools
}

/// Whether `vm` belongs to a live pool of `registry` that has not handed it out (ready,
/// or being restored by its filler). Test cleanup leaves such VMs to their pool.
pub fn holds_unclaimed(registry: &Arc<Registry>, vm: &Vm) -> bool {
    let pools = {
        let all = lock(&POOLS);
        all.iter()
            .find(|(r, _)| std::ptr::eq(r.as_ptr(), Arc::as_ptr(registry)))
            .map(|(_, pools)| pools.clone())
    };
    pools.is_some_and(|pools| pools.list().iter().any(|pool| pool.holds_unclaimed(vm)))
}

/// Removes every pool of `registry` (their VMs and files), if it has any; later defines
/// fail.
pub fn shutdown(registry: &Arc<Registry>) {
    let pools = {
        let mut all = lock(&POOLS);
        let at = all
            .iter()
            .position(|(r, _)| std::ptr::eq(r.as_ptr(), Arc::as_ptr(registry)));
        at.map(|i| all.remove(i).1)
    };
    if let Some(pools) = pools {
        pools.shutdown();
    }
}

impl Pools {
    /// Boots the template, waits until it is ready, snapshots it, starts keeping `min` VMs
    /// ready and returns once they are (each wait within `spec.ready_timeout`), so that a
    /// claim right after it is warm. `cancel` is polled while it waits. On failure
    /// nothing of the pool is left.
    pub fn define(
        &self,
        spec: PoolSpec,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Arc<Pool>, PoolError> {
        let name = spec.name.clone();
        if !valid_name(&name) {
            return Err(PoolError::Name(name));
        }
        if spec.min > spec.max || !(1..=MAX_POOL_VMS).contains(&spec.max) {
            return Err(PoolError::Range {
                pool: name,
                min: spec.min,
                max: spec.max,
            });
        }
        if spec.window.is_zero() {
            return Err(PoolError::Window { pool: name });
        }
        if !spec.template.config.disks.is_empty() {
            return Err(PoolError::TemplateDisks { pool: name });
        }
        {
            let pools = lock(&self.pools);
            let mut defining = lock(&self.defining);
            if self.shut_down.load(Ordering::SeqCst) {
                return Err(PoolError::ShutDown);
            }
            if pools.contains_key(&name) || defining.contains(&name) {
                return Err(PoolError::Exists(name));
            }
            defining.push(name.clone());
        }
        let result = self.build(spec, cancel);
        lock(&self.defining).retain(|n| *n != name);
        let pool = result?;
        let mut pools = lock(&self.pools);
        if self.shut_down.load(Ordering::SeqCst) {
            drop(pools);
            pool.remove();
            return Err(PoolError::ShutDown);
        }
        pools.insert(name, pool.clone());
        Ok(pool)
    }

    /// Makes the pool's template, snapshot and filler (see [`Pools::define`]).
    fn build(&self, spec: PoolSpec, cancel: &dyn Fn() -> bool) -> Result<Arc<Pool>, PoolError> {
        let pool = spec.name.clone();
        let registry = self.registry.upgrade().ok_or(PoolError::NoRegistry)?;
        let dir_path = spec
            .dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{pool}.pool")));
        let snapshot = dir_path.join("snapshot");
        if snapshot.exists() {
            return Err(PoolError::SnapshotExists {
                pool,
                path: snapshot,
            });
        }
        let dir = OwnedDir::open(&dir_path).map_err(|source| PoolError::Dir {
            pool: pool.clone(),
            path: dir_path.clone(),
            source,
        })?;
        let template_name = format!("{pool}-template");
        let (template, overlays) =
            match make_vm(&registry, &spec.template, &template_name, &dir.path) {
                Ok(made) => made,
                Err(e) => {
                    dir.release();
                    return Err(match e {
                        MakeVmError::Overlay { base, path, source } => PoolError::Overlay {
                            pool,
                            base,
                            path,
                            source: Box::new(source),
                        },
                        MakeVmError::Create(source) => PoolError::Create {
                            pool,
                            source: Box::new(source),
                        },
                    });
                }
            };
        let undo = |e: PoolError| {
            registry.destroy(template.id());
            let _ = std::fs::remove_dir_all(&snapshot);
            remove_files(&overlays);
            dir.release();
            e
        };
        template.start().map_err(|source| {
            undo(PoolError::Start {
                pool: pool.clone(),
                source: Box::new(source),
            })
        })?;
        wait_ready(&template, &spec.readiness, spec.ready_timeout, cancel).map_err(|source| {
            undo(PoolError::NotReady {
                pool: pool.clone(),
                source: Box::new(source),
            })
        })?;
        // Not `stop`: a stopping snapshot leaves its disks as they are, and every restore
        // would then open the template's own overlay. Frozen, each restore gets an
        // overlay of its own; the template goes on (briefly) in one more, removed here.
        let report = template
            .snapshot(&snapshot, &SnapshotOptions::default())
            .map_err(|source| {
                undo(PoolError::Snapshot {
                    pool: pool.clone(),
                    source: Box::new(source),
                })
            })?;
        registry.destroy(template.id());
        remove_files(report.new_overlays.iter().map(|(_, path)| path));
        let built = Arc::new(Pool {
            name: pool.clone(),
            min: spec.min,
            max: spec.max,
            window: spec.window,
            memory: spec.template.config.memory,
            dir,
            snapshot,
            template_overlays: overlays,
            registry: Arc::downgrade(&registry),
            state: Mutex::new(PoolState {
                target: spec.min,
                target_reason: "min".into(),
                ready: VecDeque::new(),
                claimed: Vec::new(),
                restoring: 0,
                in_flight: Vec::new(),
                next_number: 0,
                claims: 0,
                claim_times: VecDeque::new(),
                returned: 0,
                last_error: None,
                failed_restores: 0,
                stopping: false,
                last_restore: None,
            }),
            changed: Condvar::new(),
            filler: Mutex::new(None),
        });
        let filler = built.clone();
        let thread = std::thread::Builder::new()
            .name(format!("pool-{pool}"))
            .spawn(move || filler.fill());
        match thread {
            Ok(thread) => *lock(&built.filler) = Some(thread),
            Err(source) => {
                built.remove();
                return Err(PoolError::Thread { pool, source });
            }
        }
        // A claim right after define is then warm.
        let stop = || cancel() || self.shut_down.load(Ordering::SeqCst);
        if let Err(e) = built.wait_filled(spec.ready_timeout, &stop) {
            built.remove();
            if self.shut_down.load(Ordering::SeqCst) {
                return Err(PoolError::ShutDown);
            }
            return Err(e);
        }
        Ok(built)
    }

    /// The pool named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<Pool>, PoolError> {
        let pools = lock(&self.pools);
        pools.get(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = pools.keys().map(String::as_str).collect();
            PoolError::NoSuchPool {
                name: name.to_string(),
                known: if names.is_empty() {
                    ": no pool is defined (hv.pool.define)".into()
                } else {
                    format!("; the pools are: {}", names.join(", "))
                },
            }
        })
    }

    /// Every pool, by name.
    pub fn list(&self) -> Vec<Arc<Pool>> {
        lock(&self.pools).values().cloned().collect()
    }

    /// Every pool as policies see it.
    pub fn snapshot(&self) -> Vec<PoolSnapshot> {
        self.list().iter().map(|p| p.snapshot()).collect()
    }

    /// Removes the pool `name`: its VMs (claimed ones too) and its files.
    pub fn remove(&self, name: &str) -> Result<(), PoolError> {
        let pool = self.get(name)?;
        lock(&self.pools).remove(name);
        pool.remove();
        Ok(())
    }

    /// Removes every pool; later defines fail.
    pub fn shutdown(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        let pools: Vec<Arc<Pool>> = std::mem::take(&mut *lock(&self.pools))
            .into_values()
            .collect();
        for pool in pools {
            pool.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(ready: u64, memory: u64) -> PoolSnapshot {
        PoolSnapshot {
            name: "t".into(),
            min: 1,
            max: 16,
            target: 1,
            ready,
            claimed: 0,
            restoring: 0,
            claims: 0,
            claims_window: 0,
            window_ms: 10_000,
            returned: 0,
            memory,
        }
    }

    #[test]
    fn targets_stay_within_min_max_and_free_memory() {
        const M: u64 = 1 << 20;
        let p = pool(2, 32 * M);
        assert_eq!(clamp_target(4, &p, 1 << 40).target, 4);
        assert!(!clamp_target(4, &p, 1 << 40).clamped);
        assert_eq!(clamp_target(0, &p, 1 << 40).target, 1);
        assert_eq!(clamp_target(100, &p, 1 << 40).target, 16);
        assert!(clamp_target(100, &p, 1 << 40).clamped);
        // 70M free holds two more 32M VMs: 2 ready + 2.
        assert_eq!(clamp_target(10, &p, 70 * M).target, 4);
        // Ready VMs are not taken back for memory.
        assert_eq!(clamp_target(2, &p, 0).target, 2);
        assert_eq!(clamp_target(1, &p, 0).target, 1);
    }
}
