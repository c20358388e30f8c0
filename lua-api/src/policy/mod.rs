//! The policy engine: Lua policies that decide VM memory targets, each on its own thread
//! in its own sandboxed Lua state, hot-reloaded from their files.
//!
//! - [`context`]: what a tick reads (`ctx`: the host, the VMs, windowed history helpers)
//!   and the intents it makes ([`Decision`]).
//! - [`sandbox`]: the restricted Lua state, instruction budget and memory limit.
//! - [`instance`]: one loaded version of a policy file, and running its `tick`.
//! - [`record`]: traces (JSON lines) of every tick's input and decisions, `policy check`
//!   and `policy simulate`.
//! - [`watch`]: reloading a directory's policies when their files change.
//! - [`peers`]: the peer hosts `hv.hosts` declares, polled in the background for
//!   `ctx.hosts`.
//! - [`migrate`]: `ctx:migrate` intents, their guards, and the threads that run the
//!   accepted ones through a [`MigrationExecutor`] (the seam to live migration).
//!
//! A policy lives in a *slot*, one per file, keyed by the file's canonical path. A slot's
//! worker thread owns the current [`Instance`] and the history. It ticks every
//! `interval_ms`: it captures the host and the VMs, runs `tick`, then applies the
//! decisions through `Vm::set_memory_target` (a failing tick applies nothing). A reload
//! arrives on the worker's channel: the new version loads into a fresh state, runs once
//! in shadow (decisions computed, not applied), and only then replaces the current one,
//! between two ticks; a version that fails leaves the current one running and its error
//! in the status. The new version's first tick runs at once. A tick's accepted migrate
//! intents start migrations on threads of their own (`migrate-<vm>`), never in the tick.

pub mod context;
pub mod instance;
pub mod migrate;
pub mod peers;
pub mod record;
pub mod sandbox;
pub mod watch;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use luvisor_runtime::Registry;
use mlua::{Lua, Table, Value};
use serde::Serialize;

pub use context::{Decision, History, PoolDecision, TickInput};
pub use instance::{Instance, TickResult};
pub use migrate::{MigrateDecision, MigrationExecutor, MigrationLimits, MigrationRecord};
pub use peers::{PeerHost, PeerSnapshot};
pub use record::{RecordSink, TraceFile, TraceRecord};
pub use sandbox::Limits;

use crate::interrupt::Interrupter;
use crate::namespace::{Context, Namespace};

/// What `hv.policy.status()` reports for one policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyStatus {
    /// The policy's name, once a version of it has loaded.
    pub name: Option<String>,
    /// The file, as it was named when loaded or found by a watch.
    pub file: String,
    pub description: Option<String>,
    /// Versions loaded so far: 1 after the first load, +1 per successful reload; 0 when
    /// no version ever loaded (a watched file that fails).
    pub generation: u64,
    /// A version runs.
    pub running: bool,
    pub interval_ms: u64,
    /// Ticks run, failed ones included, over all versions.
    pub ticks: u64,
    /// Ticks that failed.
    pub failures: u64,
    /// How long the last tick took (building ctx and running tick), in milliseconds.
    pub last_tick_ms: Option<f64>,
    /// The last error: a failed tick, or a version that did not load (the previous one
    /// keeps running). A successful reload clears it.
    pub last_error: Option<String>,
    /// The decisions of the last tick that succeeded.
    pub last_decisions: Vec<Decision>,
    /// That tick's number.
    pub last_decisions_tick: u64,
    /// The migrate intents of the last tick that made any, with their verdicts.
    pub last_migrate_decisions: Vec<MigrateDecision>,
    /// That tick's number.
    pub last_migrate_decisions_tick: u64,
    /// The warm pool targets of the last tick that set any.
    pub last_pool_decisions: Vec<PoolDecision>,
    /// That tick's number.
    pub last_pool_decisions_tick: u64,
    /// The migrations this policy started: the ended ones the engine keeps, then those in
    /// flight.
    pub migrations: Vec<MigrationRecord>,
}

impl PolicyStatus {
    fn new(file: &str) -> PolicyStatus {
        PolicyStatus {
            name: None,
            file: file.to_string(),
            description: None,
            generation: 0,
            running: false,
            interval_ms: instance::DEFAULT_INTERVAL_MS,
            ticks: 0,
            failures: 0,
            last_tick_ms: None,
            last_error: None,
            last_decisions: Vec::new(),
            last_decisions_tick: 0,
            last_migrate_decisions: Vec::new(),
            last_migrate_decisions_tick: 0,
            last_pool_decisions: Vec::new(),
            last_pool_decisions_tick: 0,
            migrations: Vec::new(),
        }
    }
}

/// What a worker is asked to do.
enum Command {
    /// Load the file again; answer on `reply` when given.
    Reload(Reload),
    Stop,
}

struct Reload {
    file: String,
    limits: Limits,
    reply: Option<Sender<Result<PolicyStatus, String>>>,
}

/// A slot's running worker.
struct Worker {
    commands: Sender<Command>,
    /// Stops the current version's running tick (set by the worker on each swap).
    interrupter: Arc<Mutex<Option<Interrupter>>>,
    thread: JoinHandle<()>,
}

/// One policy file.
struct Slot {
    status: Mutex<PolicyStatus>,
    worker: Mutex<Option<Worker>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// The policies of one registry's VMs.
pub struct PolicyEngine {
    registry: Weak<Registry>,
    /// `ctx.now_ms` counts from here.
    epoch: Instant,
    slots: Mutex<BTreeMap<PathBuf, Arc<Slot>>>,
    watchers: Mutex<Vec<watch::DirWatcher>>,
    recorder: Mutex<Option<Arc<dyn RecordSink>>>,
    /// The peer hosts `hv.hosts` declared, and their poll threads.
    peers: Mutex<Option<peers::PeerMonitor>>,
    /// Migrations in flight and ended, their limits and the executor.
    migrations: Mutex<migrate::MigrationBook>,
    /// Bumped on every status change; waiters wait on `changed_signal`.
    changed: Mutex<u64>,
    changed_signal: Condvar,
    shut_down: AtomicBool,
}

/// The engine of each registry that has used one.
static ENGINES: Mutex<Vec<(Weak<Registry>, Arc<PolicyEngine>)>> = Mutex::new(Vec::new());

/// The policy engine of `registry`, created on first use.
pub fn engine(registry: &Arc<Registry>) -> Arc<PolicyEngine> {
    let mut engines = lock(&ENGINES);
    engines.retain(|(r, engine)| {
        let alive = r.strong_count() > 0;
        if !alive {
            engine.shutdown();
        }
        alive
    });
    if let Some((_, engine)) = engines
        .iter()
        .find(|(r, _)| std::ptr::eq(r.as_ptr(), Arc::as_ptr(registry)))
    {
        return engine.clone();
    }
    let engine = Arc::new(PolicyEngine {
        registry: Arc::downgrade(registry),
        epoch: Instant::now(),
        slots: Mutex::new(BTreeMap::new()),
        watchers: Mutex::new(Vec::new()),
        recorder: Mutex::new(None),
        peers: Mutex::new(None),
        migrations: Mutex::new(migrate::MigrationBook::new(migrate::builtin_executor())),
        changed: Mutex::new(0),
        changed_signal: Condvar::new(),
        shut_down: AtomicBool::new(false),
    });
    engines.push((Arc::downgrade(registry), engine.clone()));
    engine
}

/// Stops every policy of `registry`'s engine, if it has one (before its VMs stop).
pub fn shutdown(registry: &Arc<Registry>) {
    let engine = {
        let mut engines = lock(&ENGINES);
        let at = engines
            .iter()
            .position(|(r, _)| std::ptr::eq(r.as_ptr(), Arc::as_ptr(registry)));
        at.map(|i| engines.remove(i).1)
    };
    if let Some(engine) = engine {
        engine.shutdown();
    }
}

/// The directory `require` reads for the policy file `file`.
pub fn policy_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The key of a policy file: its directory's canonical path and its name, so a file that
/// was removed still has the key it had.
fn key_of(file: &Path) -> Result<PathBuf, String> {
    let name = file
        .file_name()
        .ok_or_else(|| format!("{} is not a file name", file.display()))?;
    let dir = policy_dir(file);
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("cannot read the directory {}: {e}", dir.display()))?;
    Ok(dir.join(name))
}

/// How a load reports its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadMode {
    /// Wait for the result; a first load that fails leaves no slot (`hv.policy.load`).
    Wait,
    /// Do not wait; a first load that fails leaves a slot that shows the error, so that
    /// `status` tells why a watched file does not run.
    Watch,
}

impl PolicyEngine {
    /// Every policy's status, by file.
    pub fn status(&self) -> Vec<PolicyStatus> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        let mut statuses: Vec<PolicyStatus> =
            slots.iter().map(|s| lock(&s.status).clone()).collect();
        let book = lock(&self.migrations);
        for status in &mut statuses {
            if let Some(name) = &status.name {
                status.migrations = book.of_policy(name);
            }
        }
        statuses
    }

    /// Milliseconds since the engine started (the clock of `ctx.now_ms`).
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// What a tick reads now: the host and VMs, the peers, the migrations and the pools.
    fn capture(&self, registry: &Arc<Registry>) -> TickInput {
        let mut input = TickInput::capture(registry, self.epoch);
        input.hosts = self.hosts();
        input.migrations = lock(&self.migrations).snapshot(input.now_ms);
        input.pools = luvisor_runtime::pool::pools(registry).snapshot();
        input
    }

    /// Declares the peer hosts (replacing those declared before, whose polling stops) and
    /// starts polling them.
    pub fn set_peers(self: &Arc<Self>, hosts: Vec<PeerHost>) -> Result<(), String> {
        if self.shut_down.load(Ordering::SeqCst) {
            return Err("the policy engine has shut down".into());
        }
        let weak = Arc::downgrade(self);
        let changed: peers::ChangeHook = Arc::new(move || {
            if let Some(engine) = weak.upgrade() {
                engine.notify();
            }
        });
        let monitor = if hosts.is_empty() {
            None
        } else {
            Some(peers::PeerMonitor::start(hosts, changed)?)
        };
        // The old monitor's threads stop on drop.
        *lock(&self.peers) = monitor;
        self.notify();
        Ok(())
    }

    /// The declared peer hosts.
    pub fn peers(&self) -> Vec<PeerHost> {
        lock(&self.peers)
            .as_ref()
            .map_or_else(Vec::new, |m| m.hosts())
    }

    /// The declared peer hosts as policies see them (`ctx.hosts`).
    pub fn hosts(&self) -> Vec<PeerSnapshot> {
        lock(&self.peers)
            .as_ref()
            .map_or_else(Vec::new, |m| m.snapshot())
    }

    /// **The seam to live migration**: sets what runs the migrations policies ask for
    /// (`None`: they are refused as not available). See [`MigrationExecutor`].
    pub fn set_migration_executor(&self, executor: Option<MigrationExecutor>) {
        lock(&self.migrations).executor = executor;
        self.notify();
    }

    /// `hv.policy.migration_limits`.
    pub fn migration_limits(&self) -> MigrationLimits {
        lock(&self.migrations).limits
    }

    pub fn set_migration_limits(&self, limits: MigrationLimits) {
        lock(&self.migrations).limits = limits;
        self.notify();
    }

    /// Every migration policies started that the engine still knows, ended ones first.
    pub fn migrations(&self) -> Vec<MigrationRecord> {
        lock(&self.migrations).all()
    }

    /// Starts the accepted intents of `decisions` (made by `policy`'s tick on `input`):
    /// each is checked again against the live book and runs on a thread of its own. An
    /// intent refused now gets its reason.
    fn start_migrations(
        self: &Arc<Self>,
        registry: &Registry,
        policy: &str,
        input: &TickInput,
        decisions: &mut [MigrateDecision],
    ) {
        for decision in decisions.iter_mut() {
            if decision.refused.is_none() {
                if let Err(why) = self.start_migration(registry, policy, input, decision) {
                    decision.refused = Some(why);
                }
            }
            match &decision.refused {
                None => tracing::info!(
                    policy,
                    vm = decision.vm.as_str(),
                    host = decision.host.as_str(),
                    "migration started: {}",
                    decision.reason
                ),
                Some(why) => tracing::debug!(
                    policy,
                    vm = decision.vm.as_str(),
                    host = decision.host.as_str(),
                    "migration refused: {why}"
                ),
            }
        }
    }

    fn start_migration(
        self: &Arc<Self>,
        registry: &Registry,
        policy: &str,
        input: &TickInput,
        decision: &MigrateDecision,
    ) -> Result<(), String> {
        let vm = registry
            .find(&decision.vm)
            .ok_or_else(|| format!("vm '{}' is gone", decision.vm))?;
        let snapshot = input
            .vms
            .iter()
            .find(|v| v.name == decision.vm)
            .ok_or_else(|| format!("vm '{}' is gone", decision.vm))?;
        let host = lock(&self.peers)
            .as_ref()
            .and_then(|m| m.host(&decision.host))
            .ok_or_else(|| format!("host '{}' is no longer declared (hv.hosts)", decision.host))?;
        let (record, executor) =
            lock(&self.migrations).start(policy, decision, snapshot, &host, self.now_ms())?;
        let id = record.id;
        let engine = self.clone();
        let reason = format!("policy {policy}: {}", decision.reason);
        let spawned = std::thread::Builder::new()
            .name(format!("migrate-{}", decision.vm))
            .spawn(move || {
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    executor(&vm, &host, &reason)
                }))
                .unwrap_or_else(|_| Err("the migration executor panicked".into()));
                match &outcome {
                    Ok(_) => tracing::info!(
                        vm = vm.name(),
                        host = host.name.as_str(),
                        "migration succeeded ({reason})"
                    ),
                    Err(error) => tracing::warn!(
                        vm = vm.name(),
                        host = host.name.as_str(),
                        "migration failed ({reason}): {error}"
                    ),
                }
                lock(&engine.migrations).finish(id, outcome, engine.now_ms());
                engine.notify();
            });
        if let Err(e) = spawned {
            lock(&self.migrations).abandon(id);
            return Err(format!("cannot start a thread for the migration: {e}"));
        }
        self.notify();
        Ok(())
    }

    /// The status of the policy named `name`.
    pub fn status_of(&self, name: &str) -> Option<PolicyStatus> {
        self.status()
            .into_iter()
            .find(|s| s.name.as_deref() == Some(name))
    }

    /// Loads the policy file `file` (or reloads it, if it is loaded) and waits until the
    /// version runs or failed. A failed reload leaves the previous version running.
    pub fn load(self: &Arc<Self>, file: &Path, limits: Limits) -> Result<PolicyStatus, String> {
        let (tx, rx) = channel();
        self.start_load(file, limits, LoadMode::Wait, Some(tx))?;
        rx.recv()
            .unwrap_or_else(|_| Err(format!("{}: the policy's thread ended", file.display())))
    }

    /// Loads or reloads `file` without waiting (for watches).
    fn load_in_background(self: &Arc<Self>, file: &Path, limits: Limits) {
        if let Err(e) = self.start_load(file, limits, LoadMode::Watch, None) {
            tracing::warn!(file = %file.display(), "cannot load the policy: {e}");
        }
    }

    fn start_load(
        self: &Arc<Self>,
        file: &Path,
        limits: Limits,
        mode: LoadMode,
        reply: Option<Sender<Result<PolicyStatus, String>>>,
    ) -> Result<(), String> {
        if self.shut_down.load(Ordering::SeqCst) {
            return Err("the policy engine has shut down".into());
        }
        let key = key_of(file)?;
        let display = file.display().to_string();
        let reload = Reload {
            file: display.clone(),
            limits,
            reply,
        };
        let mut slots = lock(&self.slots);
        let slot = slots
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Slot {
                    status: Mutex::new(PolicyStatus::new(&display)),
                    worker: Mutex::new(None),
                })
            })
            .clone();
        let mut worker = lock(&slot.worker);
        let reload = match worker.as_ref() {
            Some(running) => match running.commands.send(Command::Reload(reload)) {
                Ok(()) => return Ok(()),
                // The worker ended (its version failed to load): start a new one.
                Err(std::sync::mpsc::SendError(Command::Reload(reload))) => reload,
                Err(_) => unreachable!("a Reload was sent"),
            },
            None => reload,
        };
        if let Some(old) = worker.take() {
            let _ = old.thread.join();
        }
        let (commands, inbox) = channel();
        let interrupter = Arc::new(Mutex::new(None));
        let thread_name = format!(
            "policy-{}",
            file.file_stem().unwrap_or_default().to_string_lossy()
        );
        let run = WorkerRun {
            engine: self.clone(),
            key: key.clone(),
            slot: slot.clone(),
            interrupter: interrupter.clone(),
            mode,
        };
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || run.main(inbox, reload))
            .map_err(|e| format!("cannot start a thread for {display}: {e}"))?;
        *worker = Some(Worker {
            commands,
            interrupter,
            thread,
        });
        Ok(())
    }

    /// Stops the policy named `name` and forgets it.
    pub fn unload(&self, name: &str) -> Result<PolicyStatus, String> {
        let key = {
            let slots = lock(&self.slots);
            slots
                .iter()
                .find(|(_, s)| lock(&s.status).name.as_deref() == Some(name))
                .map(|(k, _)| k.clone())
        };
        match key {
            Some(key) => self
                .unload_key(&key)
                .ok_or_else(|| format!("no policy named '{name}'")),
            None => {
                let names: Vec<String> = self.status().into_iter().filter_map(|s| s.name).collect();
                Err(if names.is_empty() {
                    format!("no policy named '{name}': no policy is loaded")
                } else {
                    format!("no policy named '{name}'; loaded: {}", names.join(", "))
                })
            }
        }
    }

    /// Stops and forgets the policy of the file with `key`; its last status.
    fn unload_key(&self, key: &Path) -> Option<PolicyStatus> {
        let slot = lock(&self.slots).remove(key)?;
        stop_worker(&slot);
        let mut status = lock(&slot.status).clone();
        status.running = false;
        tracing::info!(file = status.file.as_str(), "policy unloaded");
        self.notify();
        Some(status)
    }

    /// Watches `dir`: loads every policy file in it now, reloads a file when it changes,
    /// and unloads it when it is removed. Returns the status of the policies found.
    pub fn watch(
        self: &Arc<Self>,
        dir: &Path,
        limits: Limits,
    ) -> Result<Vec<PolicyStatus>, String> {
        if self.shut_down.load(Ordering::SeqCst) {
            return Err("the policy engine has shut down".into());
        }
        let real = dir
            .canonicalize()
            .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        if !real.is_dir() {
            return Err(format!("cannot watch {}: not a directory", dir.display()));
        }
        {
            let mut watchers = lock(&self.watchers);
            if !watchers.iter().any(|w| w.dir() == real) {
                watchers.push(watch::DirWatcher::start(
                    Arc::downgrade(self),
                    dir,
                    &real,
                    limits,
                )?);
            }
        }
        let mut files = watch::policy_files(dir)?;
        files.sort();
        let mut keys = Vec::new();
        for file in &files {
            let (tx, rx) = channel();
            match self.start_load(file, limits, LoadMode::Watch, Some(tx)) {
                Ok(()) => {
                    let _ = rx.recv();
                }
                Err(e) => tracing::warn!(file = %file.display(), "cannot load the policy: {e}"),
            }
            keys.push(key_of(file)?);
        }
        let slots = lock(&self.slots);
        Ok(keys
            .iter()
            .filter_map(|k| slots.get(k).map(|s| lock(&s.status).clone()))
            .collect())
    }

    /// Sends every tick's input and decisions (and [`PolicyEngine::record_sample`]) to
    /// `sink`; `None` stops recording.
    pub fn set_recorder(&self, sink: Option<Arc<dyn RecordSink>>) {
        *lock(&self.recorder) = sink;
    }

    fn record(&self, record: impl FnOnce() -> TraceRecord) {
        let sink = lock(&self.recorder).clone();
        if let Some(sink) = sink {
            sink.record(&record());
        }
    }

    /// Records the host and VMs as they are now (a `sample` record), if recording.
    pub fn record_sample(&self) {
        let Some(registry) = self.registry.upgrade() else {
            return;
        };
        self.record(|| TraceRecord::Sample {
            input: self.capture(&registry),
        });
    }

    /// Stops watching and stops every policy. Loads after this fail.
    pub fn shutdown(&self) {
        self.shut_down.store(true, Ordering::SeqCst);
        lock(&self.watchers).clear();
        // Stops polling the peers. Migrations in flight go on: each ends with its
        // executor's call.
        *lock(&self.peers) = None;
        let keys: Vec<PathBuf> = lock(&self.slots).keys().cloned().collect();
        for key in keys {
            self.unload_key(&key);
        }
        self.set_recorder(None);
    }

    fn notify(&self) {
        *lock(&self.changed) += 1;
        self.changed_signal.notify_all();
    }

    /// Waits until `done` holds for the statuses, checking after every change; false if
    /// `timeout` passed first. For tests and benchmarks, which wait for events.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[PolicyStatus]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = *lock(&self.changed);
            if done(&self.status()) {
                return true;
            }
            let mut changed = lock(&self.changed);
            while *changed == seen {
                let now = Instant::now();
                if now >= deadline {
                    return false;
                }
                changed = self
                    .changed_signal
                    .wait_timeout(changed, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
    }

    /// Takes `name` for the slot `key`: no other policy may have it.
    fn claim_name(&self, key: &Path, name: &str) -> Result<(), String> {
        let slots = lock(&self.slots);
        for (other, slot) in slots.iter() {
            if other != key {
                let status = lock(&slot.status);
                if status.name.as_deref() == Some(name) {
                    return Err(format!(
                        "the policy name '{name}' is already taken by {}",
                        status.file
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Stops a slot's worker (interrupting a running tick) and waits for its thread.
fn stop_worker(slot: &Slot) {
    let worker = lock(&slot.worker).take();
    if let Some(worker) = worker {
        let _ = worker.commands.send(Command::Stop);
        if let Some(interrupter) = lock(&worker.interrupter).as_ref() {
            interrupter.interrupt();
        }
        let _ = worker.thread.join();
    }
}

/// What a worker thread works with.
struct WorkerRun {
    engine: Arc<PolicyEngine>,
    key: PathBuf,
    slot: Arc<Slot>,
    interrupter: Arc<Mutex<Option<Interrupter>>>,
    mode: LoadMode,
}

/// A worker's running version and what goes with it.
struct Running {
    instance: Instance,
    history: History,
    /// Ticks run by this slot (over its versions).
    tick: u64,
    generation: u64,
}

impl WorkerRun {
    fn main(self, inbox: Receiver<Command>, first: Reload) {
        let mut running: Option<Running> = None;
        let mut next_tick = Instant::now();
        let mut pending = Some(first);
        loop {
            if let Some(reload) = pending.take() {
                if self.reload(&mut running, reload) {
                    next_tick = Instant::now();
                }
                if running.is_none() {
                    // The first version did not load: nothing runs in this slot (and a
                    // `load` that waited has had it removed before it was answered).
                    return;
                }
                continue;
            }
            let Some(current) = running.as_mut() else {
                return;
            };
            match inbox.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(Command::Reload(reload)) => pending = Some(reload),
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    if !self.tick(current) {
                        break;
                    }
                    let interval = Duration::from_millis(current.instance.interval_ms);
                    next_tick += interval;
                    let now = Instant::now();
                    if next_tick < now {
                        // Behind (a slow tick, a suspended host): skip, do not catch up.
                        next_tick = now + interval;
                    }
                }
            }
        }
        lock(&self.slot.status).running = false;
        self.engine.notify();
    }

    /// Loads a new version, runs it in shadow, and swaps it in. Returns whether it did;
    /// on failure the current version (if any) stays and the status shows the error.
    fn reload(&self, running: &mut Option<Running>, reload: Reload) -> bool {
        let outcome = self.try_load(running.as_ref(), &reload);
        let result = match outcome {
            Ok((instance, history)) => {
                let generation = running.as_ref().map_or(0, |r| r.generation) + 1;
                let tick = running.as_ref().map_or(0, |r| r.tick);
                *lock(&self.interrupter) = instance.interrupter();
                {
                    let mut status = lock(&self.slot.status);
                    status.name = Some(instance.name.clone());
                    status.description = instance.description.clone();
                    status.file = instance.file.clone();
                    status.generation = generation;
                    status.running = true;
                    status.interval_ms = instance.interval_ms;
                    status.last_error = None;
                }
                tracing::info!(
                    policy = instance.name.as_str(),
                    file = instance.file.as_str(),
                    generation,
                    "policy loaded"
                );
                *running = Some(Running {
                    instance,
                    history,
                    tick,
                    generation,
                });
                Ok(lock(&self.slot.status).clone())
            }
            Err(message) => {
                {
                    let mut status = lock(&self.slot.status);
                    status.last_error = Some(message.clone());
                }
                match running {
                    Some(r) => tracing::warn!(
                        file = reload.file.as_str(),
                        generation = r.generation,
                        "policy not reloaded, the previous version keeps running: {message}"
                    ),
                    // A load that waits hands the error to its caller.
                    None if self.mode == LoadMode::Wait => {
                        tracing::debug!(file = reload.file.as_str(), "policy not loaded: {message}")
                    }
                    None => {
                        tracing::warn!(file = reload.file.as_str(), "policy not loaded: {message}")
                    }
                }
                Err(message)
            }
        };
        let swapped = result.is_ok();
        if !swapped && running.is_none() && self.mode == LoadMode::Wait {
            // Forget the slot before answering, so that a load right after the answer
            // makes a slot of its own.
            let mut slots = lock(&self.engine.slots);
            if slots
                .get(&self.key)
                .is_some_and(|s| Arc::ptr_eq(s, &self.slot))
            {
                slots.remove(&self.key);
            }
        }
        self.engine.notify();
        if let Some(reply) = reload.reply {
            let _ = reply.send(result);
        }
        swapped
    }

    /// Loads, validates and shadow-runs a version; the history it will start with.
    fn try_load(
        &self,
        current: Option<&Running>,
        reload: &Reload,
    ) -> Result<(Instance, History), String> {
        let path = Path::new(&reload.file);
        let source = sandbox::read_source(path)?;
        let instance = Instance::load(&reload.file, &policy_dir(path), &source, reload.limits)?;
        self.engine.claim_name(&self.key, &instance.name)?;
        let registry = self
            .engine
            .registry
            .upgrade()
            .ok_or("the VMs' registry is gone")?;
        let history = current.map_or_else(History::default, |r| r.history.clone());
        let input = Rc::new(self.engine.capture(&registry));
        let mut trial = history.clone();
        trial.push(&input);
        let tick = current.map_or(0, |r| r.tick) + 1;
        let (result, _) = instance.run(&input, tick, trial);
        let generation = current.map_or(0, |r| r.generation) + 1;
        self.engine.record(|| TraceRecord::Tick {
            policy: instance.name.clone(),
            file: instance.file.clone(),
            generation,
            tick,
            shadow: true,
            input: (*input).clone(),
            decisions: result.decisions.clone(),
            migrations: result.migrations.clone(),
            pools: result.pools.clone(),
            error: result.error.clone(),
        });
        if let Some(error) = result.error {
            return Err(format!("the shadow run failed: {error}"));
        }
        tracing::debug!(
            policy = instance.name.as_str(),
            decisions = result.decisions.len(),
            "shadow run passed"
        );
        Ok((instance, history))
    }

    /// One tick: capture, run, apply, record. False when the registry is gone.
    fn tick(&self, current: &mut Running) -> bool {
        let Some(registry) = self.engine.registry.upgrade() else {
            return false;
        };
        let input = Rc::new(self.engine.capture(&registry));
        current.tick += 1;
        current.history.push(&input);
        let history = std::mem::take(&mut current.history);
        let (mut result, history) = current.instance.run(&input, current.tick, history);
        current.history = history;
        let name = current.instance.name.as_str();
        match &result.error {
            None => {
                apply(&registry, name, &result.decisions);
                apply_pools(&registry, name, &result.pools);
                self.engine
                    .start_migrations(&registry, name, &input, &mut result.migrations);
            }
            Some(error) => {
                tracing::warn!(policy = name, tick = current.tick, "tick failed: {error}")
            }
        }
        self.engine.record(|| TraceRecord::Tick {
            policy: name.to_string(),
            file: current.instance.file.clone(),
            generation: current.generation,
            tick: current.tick,
            shadow: false,
            input: (*input).clone(),
            decisions: result.decisions.clone(),
            migrations: result.migrations.clone(),
            pools: result.pools.clone(),
            error: result.error.clone(),
        });
        {
            let mut status = lock(&self.slot.status);
            status.ticks += 1;
            status.last_tick_ms = Some(result.duration.as_secs_f64() * 1000.0);
            match result.error {
                Some(error) => {
                    status.failures += 1;
                    status.last_error = Some(error);
                }
                None => {
                    status.last_decisions = result.decisions;
                    status.last_decisions_tick = current.tick;
                    if !result.migrations.is_empty() {
                        status.last_migrate_decisions = result.migrations;
                        status.last_migrate_decisions_tick = current.tick;
                    }
                    if !result.pools.is_empty() {
                        status.last_pool_decisions = result.pools;
                        status.last_pool_decisions_tick = current.tick;
                    }
                }
            }
        }
        self.engine.notify();
        true
    }
}

/// Applies a tick's decisions to the VMs, each with the policy's reason.
fn apply(registry: &Registry, policy: &str, decisions: &[Decision]) {
    for decision in decisions {
        let Some(vm) = registry.find(&decision.vm) else {
            tracing::debug!(
                policy,
                vm = decision.vm.as_str(),
                "vm gone before its decision"
            );
            continue;
        };
        let reason = format!("policy {policy}: {}", decision.reason);
        match vm.set_memory_target(decision.asked, &reason) {
            Ok(applied) if applied.applied != decision.target => tracing::warn!(
                policy,
                vm = decision.vm.as_str(),
                decided = decision.target,
                applied = applied.applied,
                "the vm's memory knobs changed since the tick's snapshot"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(
                policy,
                vm = decision.vm.as_str(),
                "cannot set the memory target: {}",
                crate::host::error_chain(&e)
            ),
        }
    }
}

/// Applies a tick's warm pool targets, each with the policy's reason. The pool clamps
/// again against the host as it is now.
fn apply_pools(registry: &Arc<Registry>, policy: &str, decisions: &[PoolDecision]) {
    if decisions.is_empty() {
        return;
    }
    let pools = luvisor_runtime::pool::pools(registry);
    for decision in decisions {
        match pools.get(&decision.pool) {
            Ok(pool) => {
                let applied = pool.set_target(
                    decision.target,
                    &format!("policy {policy}: {}", decision.reason),
                );
                if applied.target != decision.target {
                    tracing::debug!(
                        policy,
                        pool = decision.pool.as_str(),
                        decided = decision.target,
                        applied = applied.target,
                        "the host's memory changed since the tick's snapshot"
                    );
                }
            }
            Err(_) => tracing::debug!(
                policy,
                pool = decision.pool.as_str(),
                "pool gone before its target"
            ),
        }
    }
}

/// Registers `hv.policy`.
pub const NAMESPACE: Namespace = Namespace {
    name: "policy",
    register,
};

/// Reads `{ instruction_budget = N, memory_limit = "64M" }`.
fn limits_option(lua: &Lua, function: &str, opts: Value) -> mlua::Result<Limits> {
    let opts = crate::options::Options::from_value(
        lua,
        function,
        opts,
        &["instruction_budget", "memory_limit"],
    )?;
    let defaults = Limits::default();
    Ok(Limits {
        instruction_budget: opts
            .integer("instruction_budget", 1000, i64::MAX)?
            .map_or(defaults.instruction_budget, |n| n as u64),
        memory_limit: match opts.size("memory_limit")? {
            Some(bytes) if bytes < (1 << 20) => {
                return Err(opts.error(format!(
                    "option 'memory_limit' must be at least 1M, got {bytes} bytes"
                )))
            }
            Some(bytes) => bytes as usize,
            None => defaults.memory_limit,
        },
    })
}

fn path_argument(function: &str, what: &str, value: Value) -> mlua::Result<PathBuf> {
    match value {
        Value::String(s) => Ok(PathBuf::from(s.to_str()?.to_string())),
        other => Err(mlua::Error::runtime(format!(
            "{function}: {what} must be a string, got {}",
            crate::options::describe(&other)
        ))),
    }
}

pub(crate) fn status_table(lua: &Lua, status: &PolicyStatus) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("name", status.name.as_deref())?;
    t.set("file", status.file.as_str())?;
    t.set("description", status.description.as_deref())?;
    t.set("generation", status.generation)?;
    t.set("running", status.running)?;
    t.set("interval_ms", status.interval_ms)?;
    t.set("ticks", status.ticks)?;
    t.set("failures", status.failures)?;
    t.set("last_tick_ms", status.last_tick_ms)?;
    t.set("last_error", status.last_error.as_deref())?;
    let decisions = lua.create_table()?;
    for (i, d) in status.last_decisions.iter().enumerate() {
        let entry = lua.create_table()?;
        entry.set("vm", d.vm.as_str())?;
        entry.set("asked", d.asked)?;
        entry.set("target", d.target)?;
        entry.set("clamped", d.clamped)?;
        entry.set("previous", d.previous)?;
        entry.set("reason", d.reason.as_str())?;
        decisions.set(i + 1, entry)?;
    }
    t.set("decisions", decisions)?;
    t.set("decisions_tick", status.last_decisions_tick)?;
    let migrate_decisions = lua.create_table()?;
    for (i, d) in status.last_migrate_decisions.iter().enumerate() {
        migrate_decisions.set(i + 1, migrate_decision_table(lua, d)?)?;
    }
    t.set("migrate_decisions", migrate_decisions)?;
    t.set("migrate_decisions_tick", status.last_migrate_decisions_tick)?;
    let pool_decisions = lua.create_table()?;
    for (i, d) in status.last_pool_decisions.iter().enumerate() {
        let entry = lua.create_table()?;
        entry.set("pool", d.pool.as_str())?;
        entry.set("asked", d.asked)?;
        entry.set("target", d.target)?;
        entry.set("clamped", d.clamped)?;
        entry.set("previous", d.previous)?;
        entry.set("reason", d.reason.as_str())?;
        pool_decisions.set(i + 1, entry)?;
    }
    t.set("pool_decisions", pool_decisions)?;
    t.set("pool_decisions_tick", status.last_pool_decisions_tick)?;
    let migrations = lua.create_table()?;
    for (i, m) in status.migrations.iter().enumerate() {
        migrations.set(i + 1, migration_table(lua, m)?)?;
    }
    t.set("migrations", migrations)?;
    Ok(t)
}

/// `{ vm, host, reason, refused }`.
fn migrate_decision_table(lua: &Lua, d: &MigrateDecision) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("vm", d.vm.as_str())?;
    t.set("host", d.host.as_str())?;
    t.set("reason", d.reason.as_str())?;
    t.set("refused", d.refused.as_deref())?;
    Ok(t)
}

/// `{ id, policy, vm, host, addr, reason, state, started_ms, ended_ms, report, error }`.
pub(crate) fn migration_table(lua: &Lua, m: &MigrationRecord) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("id", m.id)?;
    t.set("policy", m.policy.as_str())?;
    t.set("vm", m.vm.as_str())?;
    t.set("host", m.host.as_str())?;
    t.set("addr", m.addr.as_str())?;
    t.set("reason", m.reason.as_str())?;
    t.set("state", m.state)?;
    t.set("started_ms", m.started_ms)?;
    t.set("ended_ms", m.ended_ms)?;
    match &m.report {
        Some(report) => t.set("report", crate::remote::json_to_lua(lua, report, 0)?)?,
        None => t.set("report", Value::Nil)?,
    }
    t.set("error", m.error.as_deref())?;
    Ok(t)
}

/// A policy's status as JSON, with the keys and values of [`status_table`]: what a remote
/// client's `host:policies()` shows.
pub fn status_json(status: &PolicyStatus) -> serde_json::Value {
    serde_json::json!({
        "name": status.name,
        "file": status.file,
        "description": status.description,
        "generation": status.generation,
        "running": status.running,
        "interval_ms": status.interval_ms,
        "ticks": status.ticks,
        "failures": status.failures,
        "last_tick_ms": status.last_tick_ms,
        "last_error": status.last_error,
        "decisions": status.last_decisions,
        "decisions_tick": status.last_decisions_tick,
        "migrate_decisions": status.last_migrate_decisions,
        "migrate_decisions_tick": status.last_migrate_decisions_tick,
        "pool_decisions": status.last_pool_decisions,
        "pool_decisions_tick": status.last_pool_decisions_tick,
        "migrations": status.migrations,
    })
}

fn status_list(lua: &Lua, statuses: &[PolicyStatus]) -> mlua::Result<Table> {
    let list = lua.create_table()?;
    for (i, status) in statuses.iter().enumerate() {
        list.set(i + 1, status_table(lua, status)?)?;
    }
    Ok(list)
}

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let policy = lua.create_table()?;
    let registry = context.registry.clone();
    policy.set(
        "load",
        lua.create_function(move |lua, (path, opts): (Value, Value)| {
            let path = path_argument("hv.policy.load", "path", path)?;
            let limits = limits_option(lua, "hv.policy.load", opts)?;
            let status = engine(&registry)
                .load(&path, limits)
                .map_err(|e| mlua::Error::runtime(format!("hv.policy.load: {e}")))?;
            status_table(lua, &status)
        })?,
    )?;
    let registry = context.registry.clone();
    policy.set(
        "unload",
        lua.create_function(move |_, name: Value| {
            let name = match name {
                Value::String(s) => s.to_str()?.to_string(),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "hv.policy.unload: name must be a string, got {}",
                        crate::options::describe(&other)
                    )))
                }
            };
            engine(&registry)
                .unload(&name)
                .map_err(|e| mlua::Error::runtime(format!("hv.policy.unload: {e}")))?;
            Ok(true)
        })?,
    )?;
    let registry = context.registry.clone();
    policy.set(
        "status",
        lua.create_function(move |lua, name: Value| match name {
            Value::Nil => Ok(Value::Table(status_list(lua, &engine(&registry).status())?)),
            Value::String(s) => {
                let name = s.to_str()?.to_string();
                match engine(&registry).status_of(&name) {
                    Some(status) => Ok(Value::Table(status_table(lua, &status)?)),
                    None => Ok(Value::Nil),
                }
            }
            other => Err(mlua::Error::runtime(format!(
                "hv.policy.status: name must be a string or nil, got {}",
                crate::options::describe(&other)
            ))),
        })?,
    )?;
    let registry = context.registry.clone();
    policy.set(
        "watch",
        lua.create_function(move |lua, (dir, opts): (Value, Value)| {
            let dir = path_argument("hv.policy.watch", "dir", dir)?;
            let limits = limits_option(lua, "hv.policy.watch", opts)?;
            let statuses = engine(&registry)
                .watch(&dir, limits)
                .map_err(|e| mlua::Error::runtime(format!("hv.policy.watch: {e}")))?;
            status_list(lua, &statuses)
        })?,
    )?;
    let registry = context.registry.clone();
    policy.set(
        "record",
        lua.create_function(move |_, path: Value| {
            let engine = engine(&registry);
            match path {
                Value::Nil => engine.set_recorder(None),
                path => {
                    let path = path_argument("hv.policy.record", "path", path)?;
                    let trace = TraceFile::create(&path)
                        .map_err(|e| mlua::Error::runtime(format!("hv.policy.record: {e}")))?;
                    engine.set_recorder(Some(Arc::new(trace)));
                }
            }
            Ok(())
        })?,
    )?;
    let registry = context.registry.clone();
    policy.set(
        "migration_limits",
        lua.create_function(move |lua, opts: Value| {
            let engine = engine(&registry);
            if !opts.is_nil() {
                let limits = migration_limits_option(lua, engine.migration_limits(), opts)?;
                engine.set_migration_limits(limits);
            }
            let limits = engine.migration_limits();
            let t = lua.create_table()?;
            t.set("per_host", limits.per_host)?;
            t.set("cooldown_s", limits.cooldown_ms as f64 / 1000.0)?;
            t.set("bandwidth", limits.bandwidth)?;
            Ok(t)
        })?,
    )?;
    hv.set("policy", policy)?;
    let registry = context.registry.clone();
    hv.set(
        "hosts",
        lua.create_function(move |lua, list: Value| {
            let engine = engine(&registry);
            if !list.is_nil() {
                let hosts = peers::parse_hosts(lua, list)?;
                engine
                    .set_peers(hosts)
                    .map_err(|e| mlua::Error::runtime(format!("hv.hosts: {e}")))?;
            }
            let seen = engine.hosts();
            let out = lua.create_table()?;
            for (i, host) in engine.peers().iter().enumerate() {
                let snapshot = seen.iter().find(|s| s.name == host.name);
                out.set(i + 1, peers::host_table(lua, host, snapshot)?)?;
            }
            Ok(out)
        })?,
    )
}

/// Reads `hv.policy.migration_limits{ per_host, cooldown_s, bandwidth }` over `current`.
fn migration_limits_option(
    lua: &Lua,
    current: MigrationLimits,
    opts: Value,
) -> mlua::Result<MigrationLimits> {
    const FUNCTION: &str = "hv.policy.migration_limits";
    let opts = crate::options::Options::from_value(
        lua,
        FUNCTION,
        opts,
        &["per_host", "cooldown_s", "bandwidth"],
    )?;
    let mut limits = current;
    if let Some(n) = opts.integer("per_host", 0, i64::from(migrate::MAX_PER_HOST))? {
        limits.per_host = n as u32;
    }
    if let Some(cooldown) = opts.seconds("cooldown_s")? {
        limits.cooldown_ms = u64::try_from(cooldown.as_millis()).unwrap_or(u64::MAX);
    }
    if let Some(bandwidth) = opts.size("bandwidth")? {
        if bandwidth < (1 << 20) {
            return Err(opts.error(format!(
                "option 'bandwidth' is bytes per second and must be at least 1M, got {bandwidth}"
            )));
        }
        limits.bandwidth = bandwidth;
    }
    Ok(limits)
}
