//! Labs: a set of VMs made from one template, each disk a copy-on-write overlay of its
//! base, brought up in parallel until every VM is ready, and torn down as a whole.
//!
//! ```text
//! Lab::create   overlays NAME-1.disk0.qcow2 ... and VMs NAME-1 .. NAME-N (created)
//! Lab::start    at most `parallel` VMs booting at a time, each until it is ready;
//!               the first failure (crash, exit, timeout, readiness error, interrupt)
//!               stops the others and destroys the lab
//! Lab::shutdown every guest asked to end, one deadline for all, then hard stops (state
//!               "shut down": the VMs and overlays stay)
//! Lab::destroy  every VM destroyed, every overlay removed (also on drop)
//! ```
//!
//! A lab owns what it made: its VMs (by id, so a VM of the same name made later by
//! someone else is never touched), its overlay files and its directory when it created
//! it. [`Lab::destroy`] is idempotent and runs on drop, so a lab whose owner goes away
//! (a Lua handle collected, a test's cleanup) leaves nothing behind. [`destroy_all`]
//! destroys every lab of the process, for exits that skip destructors.
//!
//! Bring-up runs on scoped worker threads (`lab-NAME-K`), all joined before
//! [`Lab::start`] returns, and so does [`Lab::shutdown`] (`lab-NAME-stopK`); progress
//! events and the cancel check stay on the caller's thread, so neither needs to be
//! `Sync`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::agent::ShutdownHow;
use crate::devices::console::CANCEL_POLL;
use crate::readiness::{wait_ready, Readiness, ReadyError};
use crate::registry::{Registry, RegistryError, VmId};
use crate::storage::{Disk, DiskFormat, StorageError};
use crate::vm::{Vm, VmConfig, VmError, VmOutcome};

/// Most VMs in one lab.
pub const MAX_LAB_VMS: usize = 1024;
/// Most VMs a lab boots at a time.
pub const MAX_PARALLEL: usize = 64;
/// How long each VM may take to become ready, unless the caller says.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most VMs [`Lab::shutdown`] waits for at a time (one thread each).
pub const SHUTDOWN_THREADS: usize = 64;
/// Longest lab or pool name (it is part of VM and file names).
pub const MAX_NAME: usize = 64;

/// One disk of a template: every VM gets its own qcow2 overlay of `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskTemplate {
    pub base: PathBuf,
    /// The base's format; probed when `None`.
    pub format: Option<DiskFormat>,
    /// The serial every VM's overlay reports (the overlay file's default otherwise).
    pub serial: Option<String>,
}

/// What every VM of a lab (or pool) is made from: a configuration whose name and disks
/// are filled in per VM, and the disks to overlay.
#[derive(Debug, Clone)]
pub struct Template {
    pub config: VmConfig,
    pub disks: Vec<DiskTemplate>,
}

/// What [`Lab::create`] makes.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// VMs are named NAME-1 .. NAME-count.
    pub name: String,
    pub template: Template,
    pub count: usize,
    pub readiness: Readiness,
    /// Where the overlays go; the current directory when `None`. Created with its parents
    /// when it does not exist; every directory made is removed with the lab, if empty
    /// then.
    pub dir: Option<PathBuf>,
}

/// How [`Lab::start`] brings the VMs up.
#[derive(Debug, Clone, Copy)]
pub struct StartOptions {
    /// Most VMs booting (started, not yet ready) at a time.
    pub parallel: usize,
    /// How long each VM may take from its start until it is ready.
    pub ready_timeout: Duration,
}

impl Default for StartOptions {
    fn default() -> StartOptions {
        StartOptions {
            parallel: 4,
            ready_timeout: DEFAULT_READY_TIMEOUT,
        }
    }
}

/// What happens during [`Lab::start`], for progress displays. Delivered on the caller's
/// thread, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// `vm` is starting; `booting` VMs (this one included) are between start and ready.
    Booting { vm: String, booting: usize },
    /// `vm` is ready; `ready` of `total` are.
    Ready {
        vm: String,
        ready: usize,
        total: usize,
    },
}

/// What [`Lab::start`] reports.
#[derive(Debug, Clone)]
pub struct StartReport {
    /// From the call until every VM was ready.
    pub elapsed: Duration,
    /// Each VM's time from its start until it was ready, in VM order.
    pub ready_after: Vec<(String, Duration)>,
}

/// Where a lab is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabState {
    /// VMs and overlays made, nothing started.
    Created,
    Starting,
    /// Every VM became ready.
    Ready,
    /// [`Lab::shutdown`] ended every VM; the VMs and overlays stay until destroyed.
    ShutDown,
    /// Everything is gone.
    Destroyed,
}

impl LabState {
    pub fn as_str(self) -> &'static str {
        match self {
            LabState::Created => "created",
            LabState::Starting => "starting",
            LabState::Ready => "ready",
            LabState::ShutDown => "shut down",
            LabState::Destroyed => "destroyed",
        }
    }
}

#[derive(Debug, Error)]
pub enum LabError {
    #[error("lab name {0:?} is invalid: use 1 to {MAX_NAME} letters, digits, '-', '_' or '.', not starting with '.' or '-'")]
    Name(String),
    #[error("lab '{lab}': count = {count} is out of range: a lab has 1 to {MAX_LAB_VMS} VMs")]
    Count { lab: String, count: usize },
    #[error("lab '{lab}': parallel = {parallel} is out of range: give 1 to {MAX_PARALLEL}")]
    Parallel { lab: String, parallel: usize },
    #[error("lab '{lab}': the template's disks are given as disk templates ({{ base = ... }}), not as opened disks")]
    TemplateDisks { lab: String },
    #[error(
        "lab '{lab}': a vm named '{vm}' already exists; destroy it or choose another lab name"
    )]
    Exists { lab: String, vm: String },
    #[error("lab '{lab}': cannot create its directory {path}")]
    Dir {
        lab: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab '{lab}': cannot make the overlay {path} of {base} for vm '{vm}'")]
    Overlay {
        lab: String,
        vm: String,
        base: PathBuf,
        path: PathBuf,
        #[source]
        source: Box<StorageError>,
    },
    #[error("lab '{lab}': cannot create vm '{vm}'")]
    Create {
        lab: String,
        vm: String,
        #[source]
        source: Box<RegistryError>,
    },
    #[error("lab '{lab}': vm '{vm}' failed to start (the lab was destroyed)")]
    Start {
        lab: String,
        vm: String,
        #[source]
        source: Box<VmError>,
    },
    #[error("lab '{lab}': vm '{vm}' did not become ready (the lab was destroyed)")]
    NotReady {
        lab: String,
        vm: String,
        #[source]
        source: Box<ReadyError>,
    },
    #[error("lab '{lab}': vm '{vm}' was destroyed while the lab started (the lab was destroyed)")]
    Gone { lab: String, vm: String },
    #[error("lab '{lab}': interrupted while starting, {ready} of {total} VMs ready (the lab was destroyed)")]
    Interrupted {
        lab: String,
        ready: usize,
        total: usize,
    },
    #[error("lab '{lab}': cannot start a thread to boot its VMs (the lab was destroyed)")]
    Thread {
        lab: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "lab '{lab}': interrupted while shutting down (the VMs still running were stopped hard)"
    )]
    ShutdownInterrupted { lab: String },
    #[error("cannot {op} lab '{lab}': it is {state}")]
    InvalidState {
        lab: String,
        op: &'static str,
        state: &'static str,
    },
}

/// Checks a lab or pool name: it becomes part of VM names and file names.
pub fn valid_name(name: &str) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// One VM of a lab and the files made for it.
#[derive(Debug, Clone)]
pub struct LabMember {
    pub name: String,
    pub id: VmId,
    pub overlays: Vec<PathBuf>,
}

/// Every lab alive in this process, for [`destroy_all`].
static LABS: Mutex<Vec<Weak<Lab>>> = Mutex::new(Vec::new());

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Destroys every lab of this process (for `os.exit` and the end of `main`, which skip
/// destructors).
pub fn destroy_all() {
    let labs: Vec<Arc<Lab>> = lock(&LABS).iter().filter_map(Weak::upgrade).collect();
    for lab in labs {
        lab.destroy();
    }
}

/// A directory for a lab or pool: the directories made for it (the directory and those
/// of its parents that were missing) are removed with it, each only if nothing else is
/// left in it.
#[derive(Debug)]
pub(crate) struct OwnedDir {
    pub path: PathBuf,
    /// The directories made for this owner, deepest first.
    made: Vec<PathBuf>,
}

impl OwnedDir {
    /// `path`, created with its parents when missing.
    pub fn open(path: &Path) -> std::io::Result<OwnedDir> {
        // The missing ones, from `path` up to the first that exists.
        let made: Vec<PathBuf> = path
            .ancestors()
            .take_while(|dir| !dir.as_os_str().is_empty() && !dir.exists())
            .map(Path::to_path_buf)
            .collect();
        if !made.is_empty() {
            std::fs::create_dir_all(path)?;
        }
        Ok(OwnedDir {
            path: path.to_path_buf(),
            made,
        })
    }

    /// Removes the directories made for this owner, deepest first, while each is empty.
    pub fn release(&self) {
        for dir in &self.made {
            // Fails, harmlessly, when something else was put there; its parents are then
            // not empty either.
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

/// Removes files a lab or pool made, reporting failures other than "already gone".
pub(crate) fn remove_files<'a>(files: impl IntoIterator<Item = &'a PathBuf>) {
    for path in files {
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), "cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// Makes one VM of `template` named `name`: an overlay per disk in `dir` (named
/// `NAME.diskK.qcow2`), then the VM in `registry`, in state `created`. On error nothing
/// of it is left. Shared by labs and pools.
pub(crate) fn make_vm(
    registry: &Registry,
    template: &Template,
    name: &str,
    dir: &Path,
) -> Result<(Arc<Vm>, Vec<PathBuf>), MakeVmError> {
    let mut overlays = Vec::with_capacity(template.disks.len());
    let mut disks = Vec::with_capacity(template.disks.len());
    for (k, disk) in template.disks.iter().enumerate() {
        let path = dir.join(format!("{name}.disk{k}.qcow2"));
        match Disk::create_overlay_with(&disk.base, disk.format, &path) {
            Ok(mut overlay) => {
                if let Some(serial) = &disk.serial {
                    overlay.set_serial(serial);
                }
                overlays.push(path);
                disks.push(Arc::new(overlay));
            }
            Err(source) => {
                remove_files(&overlays);
                return Err(MakeVmError::Overlay {
                    base: disk.base.clone(),
                    path,
                    source,
                });
            }
        }
    }
    let mut config = template.config.clone();
    config.name = name.to_string();
    config.disks = disks;
    match registry.create(config) {
        Ok(vm) => Ok((vm, overlays)),
        Err(source) => {
            remove_files(&overlays);
            Err(MakeVmError::Create(source))
        }
    }
}

/// Why [`make_vm`] failed.
#[derive(Debug)]
pub(crate) enum MakeVmError {
    Overlay {
        base: PathBuf,
        path: PathBuf,
        source: StorageError,
    },
    Create(RegistryError),
}

/// A lab: see the module documentation.
pub struct Lab {
    name: String,
    registry: Arc<Registry>,
    readiness: Readiness,
    dir: OwnedDir,
    members: Vec<LabMember>,
    state: Mutex<LabState>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("name", &self.name)
            .field("count", &self.members.len())
            .field("state", &self.state())
            .finish()
    }
}

/// What a failed [`Lab::start`] worker saw.
enum Failure {
    Start(String, VmError),
    NotReady(String, ReadyError),
    Gone(String),
}

/// What a worker tells the caller's thread.
enum Event {
    Booting(String),
    Ready(usize, String, Duration),
    Failed(Failure),
}

impl Lab {
    /// Makes the lab's overlays and VMs (in state `created`). Everything is checked first;
    /// if anything fails part way, what was made is removed.
    pub fn create(registry: &Arc<Registry>, spec: LabSpec) -> Result<Arc<Lab>, LabError> {
        let lab = spec.name.clone();
        if !valid_name(&lab) {
            return Err(LabError::Name(lab));
        }
        if !(1..=MAX_LAB_VMS).contains(&spec.count) {
            return Err(LabError::Count {
                lab,
                count: spec.count,
            });
        }
        if !spec.template.config.disks.is_empty() {
            return Err(LabError::TemplateDisks { lab });
        }
        let names: Vec<String> = (1..=spec.count).map(|i| format!("{lab}-{i}")).collect();
        if let Some(taken) = names.iter().find(|n| registry.find(n).is_some()) {
            return Err(LabError::Exists {
                lab,
                vm: taken.clone(),
            });
        }
        // The whole configuration is checked once (with the last, longest name) before
        // any file is made.
        let mut probe = spec.template.config.clone();
        probe.name = names.last().cloned().unwrap_or_default();
        probe.validate().map_err(|e| LabError::Create {
            lab: lab.clone(),
            vm: probe.name.clone(),
            source: Box::new(e.into()),
        })?;
        let dir_path = spec.dir.clone().unwrap_or_else(|| PathBuf::from("."));
        let dir = OwnedDir::open(&dir_path).map_err(|source| LabError::Dir {
            lab: lab.clone(),
            path: dir_path.clone(),
            source,
        })?;
        let mut members: Vec<LabMember> = Vec::with_capacity(spec.count);
        let undo = |members: &[LabMember], dir: &OwnedDir| {
            for member in members {
                registry.destroy(member.id);
                remove_files(&member.overlays);
            }
            dir.release();
        };
        for name in names {
            match make_vm(registry, &spec.template, &name, &dir.path) {
                Ok((vm, overlays)) => members.push(LabMember {
                    name,
                    id: vm.id(),
                    overlays,
                }),
                Err(e) => {
                    undo(&members, &dir);
                    return Err(match e {
                        MakeVmError::Overlay { base, path, source } => LabError::Overlay {
                            lab,
                            vm: name,
                            base,
                            path,
                            source: Box::new(source),
                        },
                        MakeVmError::Create(source) => LabError::Create {
                            lab,
                            vm: name,
                            source: Box::new(source),
                        },
                    });
                }
            }
        }
        let lab = Arc::new(Lab {
            name: spec.name,
            registry: registry.clone(),
            readiness: spec.readiness,
            dir,
            members,
            state: Mutex::new(LabState::Created),
        });
        let mut labs = lock(&LABS);
        labs.retain(|l| l.strong_count() > 0);
        labs.push(Arc::downgrade(&lab));
        Ok(lab)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }
    pub fn dir(&self) -> &Path {
        &self.dir.path
    }
    pub fn state(&self) -> LabState {
        *lock(&self.state)
    }
    /// How many VMs the lab was made with.
    pub fn len(&self) -> usize {
        self.members.len()
    }
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
    /// The lab's VMs and their files, in order (NAME-1 first).
    pub fn members(&self) -> &[LabMember] {
        &self.members
    }
    /// The `index`th VM (0-based), while it exists.
    pub fn vm(&self, index: usize) -> Option<Arc<Vm>> {
        self.registry.get(self.members.get(index)?.id)
    }
    /// The VM of this lab named `name`, while it exists.
    pub fn find(&self, name: &str) -> Option<Arc<Vm>> {
        let member = self.members.iter().find(|m| m.name == name)?;
        self.registry.get(member.id)
    }
    /// Every overlay file the lab made.
    pub fn overlays(&self) -> Vec<PathBuf> {
        self.members
            .iter()
            .flat_map(|m| m.overlays.iter().cloned())
            .collect()
    }

    fn invalid(&self, op: &'static str, state: LabState) -> LabError {
        LabError::InvalidState {
            lab: self.name.clone(),
            op,
            state: state.as_str(),
        }
    }

    /// Starts every VM, at most `options.parallel` booting at a time, and waits until each
    /// is ready. `progress` hears of each VM booting and becoming ready; `cancel` is
    /// polled (every 50 ms) and stops the start when it returns true. Both are called on
    /// this thread only.
    ///
    /// The first VM that fails to start or to become ready (it crashed, exited, timed
    /// out, or its readiness cannot be checked) ends the start: the others stop waiting,
    /// the lab is destroyed, and the error names that VM and why. A cancel destroys it
    /// too. No thread started here outlives the call.
    pub fn start(
        &self,
        options: StartOptions,
        progress: &mut dyn FnMut(&Progress),
        cancel: &dyn Fn() -> bool,
    ) -> Result<StartReport, LabError> {
        if !(1..=MAX_PARALLEL).contains(&options.parallel) {
            return Err(LabError::Parallel {
                lab: self.name.clone(),
                parallel: options.parallel,
            });
        }
        {
            let mut state = lock(&self.state);
            if *state != LabState::Created {
                return Err(self.invalid("start", *state));
            }
            *state = LabState::Starting;
        }
        let result = self.bring_up(options, progress, cancel);
        match result {
            Ok(report) => {
                let mut state = lock(&self.state);
                if *state == LabState::Starting {
                    *state = LabState::Ready;
                }
                Ok(report)
            }
            Err(e) => {
                self.destroy();
                Err(e)
            }
        }
    }

    fn bring_up(
        &self,
        options: StartOptions,
        progress: &mut dyn FnMut(&Progress),
        cancel: &dyn Fn() -> bool,
    ) -> Result<StartReport, LabError> {
        let started = Instant::now();
        let total = self.members.len();
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let workers = options.parallel.min(total);
        let mut ready_after: Vec<Option<Duration>> = vec![None; total];
        let mut failure: Option<LabError> = None;
        std::thread::scope(|scope| {
            let (events, inbox) = channel::<Event>();
            for k in 0..workers {
                let events: Sender<Event> = events.clone();
                let (next, abort) = (&next, &abort);
                let spawned = std::thread::Builder::new()
                    .name(format!("lab-{}-{k}", self.name))
                    .spawn_scoped(scope, move || {
                        self.worker(next, abort, options.ready_timeout, &events)
                    });
                if let Err(source) = spawned {
                    abort.store(true, Ordering::SeqCst);
                    failure = Some(LabError::Thread {
                        lab: self.name.clone(),
                        source,
                    });
                    break;
                }
            }
            // Only the workers hold senders now: the channel ends when they all have.
            drop(events);
            let mut booting = 0;
            let mut ready = 0;
            loop {
                match inbox.recv_timeout(CANCEL_POLL) {
                    Ok(Event::Booting(vm)) => {
                        booting += 1;
                        progress(&Progress::Booting { vm, booting });
                    }
                    Ok(Event::Ready(index, vm, after)) => {
                        booting -= 1;
                        ready += 1;
                        ready_after[index] = Some(after);
                        progress(&Progress::Ready { vm, ready, total });
                    }
                    Ok(Event::Failed(f)) => {
                        abort.store(true, Ordering::SeqCst);
                        if failure.is_none() {
                            failure = Some(self.failure_error(f));
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                if failure.is_none() && cancel() {
                    abort.store(true, Ordering::SeqCst);
                    failure = Some(LabError::Interrupted {
                        lab: self.name.clone(),
                        ready,
                        total,
                    });
                }
            }
        });
        if let Some(e) = failure {
            return Err(e);
        }
        Ok(StartReport {
            elapsed: started.elapsed(),
            ready_after: self
                .members
                .iter()
                .zip(ready_after)
                .map(|(m, after)| (m.name.clone(), after.unwrap_or_default()))
                .collect(),
        })
    }

    fn failure_error(&self, failure: Failure) -> LabError {
        let lab = self.name.clone();
        match failure {
            Failure::Start(vm, source) => LabError::Start {
                lab,
                vm,
                source: Box::new(source),
            },
            Failure::NotReady(vm, source) => LabError::NotReady {
                lab,
                vm,
                source: Box::new(source),
            },
            Failure::Gone(vm) => LabError::Gone { lab, vm },
        }
    }

    /// One bring-up thread: takes the next VM, starts it and waits until it is ready,
    /// until none is left or the start is aborted.
    fn worker(
        &self,
        next: &AtomicUsize,
        abort: &AtomicBool,
        ready_timeout: Duration,
        events: &Sender<Event>,
    ) {
        let aborted = || abort.load(Ordering::SeqCst);
        while !aborted() {
            let index = next.fetch_add(1, Ordering::SeqCst);
            let Some(member) = self.members.get(index) else {
                return;
            };
            let name = member.name.clone();
            let Some(vm) = self.registry.get(member.id) else {
                let _ = events.send(Event::Failed(Failure::Gone(name)));
                return;
            };
            let _ = events.send(Event::Booting(name.clone()));
            let started = Instant::now();
            if let Err(e) = vm.start() {
                let _ = events.send(Event::Failed(Failure::Start(name, e)));
                return;
            }
            match wait_ready(&vm, &self.readiness, ready_timeout, &aborted) {
                Ok(()) => {
                    let _ = events.send(Event::Ready(index, name, started.elapsed()));
                }
                // Another VM failed, or the caller cancelled: that one is the error.
                Err(e) if e.is_cancelled() && aborted() => return,
                Err(e) => {
                    let _ = events.send(Event::Failed(Failure::NotReady(name, e)));
                    return;
                }
            }
        }
    }

    /// Shuts every VM of the lab down gracefully, all at once, within one `timeout` for
    /// the whole lab: each guest is asked to end, and whatever still runs when `timeout`
    /// is over is stopped hard. Returns how each VM was ended and how it ended, in VM
    /// order. The VMs and overlays stay until [`Lab::destroy`]; the lab's state is then
    /// [`LabState::ShutDown`] (also after an interrupted shutdown: every VM was stopped).
    ///
    /// `cancel` is polled on this thread (every 50 ms); once it returns true the waits end
    /// and every VM still running is stopped hard at once, and the call returns
    /// [`LabError::ShutdownInterrupted`]. At most [`SHUTDOWN_THREADS`] VMs are waited for
    /// at a time, on threads that end before this returns; if none can be started, this
    /// thread shuts the VMs down one after the other, under the same deadline.
    pub fn shutdown(
        &self,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<Vec<(String, ShutdownHow, VmOutcome)>, LabError> {
        let vms: Vec<Option<Arc<Vm>>> = self
            .members
            .iter()
            .map(|m| self.registry.get(m.id))
            .collect();
        let deadline = crate::vstate::vcpu::deadline_after(timeout);
        let next = AtomicUsize::new(0);
        let abort = AtomicBool::new(false);
        let ended: Mutex<Vec<Option<(ShutdownHow, VmOutcome)>>> = Mutex::new(vec![None; vms.len()]);
        let queue = ShutdownQueue {
            vms: &vms,
            next: &next,
            deadline,
            ended: &ended,
        };
        std::thread::scope(|scope| {
            let (done, finished) = channel::<()>();
            let mut workers = Vec::new();
            for k in 0..SHUTDOWN_THREADS.min(vms.len()) {
                let done = done.clone();
                let (queue, abort) = (&queue, &abort);
                let spawned = std::thread::Builder::new()
                    .name(format!("lab-{}-stop{k}", self.name))
                    .spawn_scoped(scope, move || {
                        queue.run(&|| abort.load(Ordering::SeqCst), &|| {
                            let _ = done.send(());
                        })
                    });
                match spawned {
                    Ok(worker) => workers.push(worker),
                    Err(e) => {
                        tracing::warn!(
                            lab = self.name.as_str(),
                            "cannot start a shutdown thread ({e}); going on with {k}"
                        );
                        break;
                    }
                }
            }
            // Only the workers hold senders now: the channel ends when they all have.
            drop(done);
            if workers.is_empty() {
                let stop = || {
                    if !abort.load(Ordering::SeqCst) && cancel() {
                        abort.store(true, Ordering::SeqCst);
                    }
                    abort.load(Ordering::SeqCst)
                };
                queue.run(&stop, &|| {});
            } else {
                // Until every worker is done: each VM's end, or every 50 ms, checks the
                // cancel.
                while finished.recv_timeout(CANCEL_POLL) != Err(RecvTimeoutError::Disconnected) {
                    if !abort.load(Ordering::SeqCst) && cancel() {
                        abort.store(true, Ordering::SeqCst);
                    }
                }
            }
            // Joined by hand: a worker that panicked would otherwise make the scope panic.
            for worker in workers {
                if worker.join().is_err() {
                    tracing::warn!(lab = self.name.as_str(), "a shutdown thread panicked");
                }
            }
        });
        {
            let mut state = lock(&self.state);
            if *state != LabState::Destroyed {
                *state = LabState::ShutDown;
            }
        }
        let ended = ended.into_inner().unwrap_or_else(|p| p.into_inner());
        let outcomes = self
            .members
            .iter()
            .zip(vms.iter().zip(ended))
            .map(|(member, (vm, ended))| {
                // Only a VM whose thread panicked has no result: stop it here.
                let (how, outcome) = ended.unwrap_or_else(|| match vm {
                    Some(vm) => {
                        vm.stop();
                        (
                            ShutdownHow::Forced,
                            vm.outcome().unwrap_or(VmOutcome::Stopped),
                        )
                    }
                    None => (ShutdownHow::AlreadyStopped, VmOutcome::Stopped),
                });
                (member.name.clone(), how, outcome)
            })
            .collect();
        if abort.load(Ordering::SeqCst) {
            return Err(LabError::ShutdownInterrupted {
                lab: self.name.clone(),
            });
        }
        Ok(outcomes)
    }

    /// Destroys every VM of the lab and removes its overlays (and its directory, when the
    /// lab made it and it is empty now). Idempotent; also runs when the lab is dropped.
    pub fn destroy(&self) {
        {
            let mut state = lock(&self.state);
            if *state == LabState::Destroyed {
                return;
            }
            *state = LabState::Destroyed;
        }
        for member in &self.members {
            self.registry.destroy(member.id);
        }
        for member in &self.members {
            remove_files(&member.overlays);
        }
        self.dir.release();
        lock(&LABS).retain(|l| l.strong_count() > 0 && !std::ptr::eq(l.as_ptr(), self));
        tracing::debug!(lab = self.name.as_str(), "lab destroyed");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// The VMs [`Lab::shutdown`] works through, shared by its threads.
struct ShutdownQueue<'a> {
    vms: &'a [Option<Arc<Vm>>],
    /// The index of the next VM to take.
    next: &'a AtomicUsize,
    /// When every wait ends, for the whole lab.
    deadline: Instant,
    /// How each VM ended, by index; `None` until its shutdown returned.
    ended: &'a Mutex<Vec<Option<(ShutdownHow, VmOutcome)>>>,
}

impl ShutdownQueue<'_> {
    /// Takes VMs until none is left and shuts each down within what is left of the
    /// deadline, stopping it hard once `stop` returns true; `done` after each.
    fn run(&self, stop: &dyn Fn() -> bool, done: &dyn Fn()) {
        loop {
            let index = self.next.fetch_add(1, Ordering::SeqCst);
            let Some(vm) = self.vms.get(index) else {
                return;
            };
            let ended = match vm {
                Some(vm) => {
                    // Once stopped, the VMs left are not asked and waited for at all.
                    let left = if stop() {
                        Duration::ZERO
                    } else {
                        self.deadline.saturating_duration_since(Instant::now())
                    };
                    shutdown_vm_cancellable(vm, left, stop)
                }
                None => (ShutdownHow::AlreadyStopped, VmOutcome::Stopped),
            };
            lock(self.ended)[index] = Some(ended);
            done();
        }
    }
}

/// Ends `vm` within `timeout` through the agent channel's graceful shutdown (ask the
/// guest, wait, fall back to a hard stop): how it was ended and how the VM ended.
pub fn shutdown_vm(vm: &Vm, timeout: Duration) -> (ShutdownHow, VmOutcome) {
    shutdown_vm_cancellable(vm, timeout, &|| false)
}

/// [`shutdown_vm`]; once `cancel` returns true the wait ends with the hard stop.
pub fn shutdown_vm_cancellable(
    vm: &Vm,
    timeout: Duration,
    cancel: &dyn Fn() -> bool,
) -> (ShutdownHow, VmOutcome) {
    match vm.shutdown_cancellable(timeout, cancel) {
        Ok(report) => (report.how, report.outcome),
        Err(e) => {
            tracing::warn!(vm = vm.name(), error = %crate::error_chain(&e), "graceful shutdown failed; stopping hard");
            vm.stop();
            (
                ShutdownHow::Forced,
                vm.outcome().unwrap_or(VmOutcome::Stopped),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::GuestSpec;

    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luvisor-lab-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn spec(dir: &Path, name: &str, count: usize) -> LabSpec {
        let mut config = VmConfig::new(
            "",
            GuestSpec::Builtin {
                cmdline: "hello; idle".into(),
            },
        );
        config.memory = 16 << 20;
        LabSpec {
            name: name.into(),
            template: Template {
                config,
                disks: vec![DiskTemplate {
                    base: dir.join("base.img"),
                    format: None,
                    serial: Some("lab-disk".into()),
                }],
            },
            count,
            readiness: Readiness::Console("hello".into()),
            dir: Some(dir.join("lab")),
        }
    }

    // No KVM needed: the VMs stay in state `created`.
    #[test]
    fn a_lab_makes_an_overlay_per_vm_and_destroy_removes_everything() {
        let dir = scratch("make");
        Disk::create(&dir.join("base.img"), 1 << 20, None).unwrap();
        let registry = Arc::new(Registry::new());
        let lab = Lab::create(&registry, spec(&dir, "t", 3)).unwrap();
        assert_eq!(lab.len(), 3);
        assert_eq!(lab.state(), LabState::Created);
        let names: Vec<&str> = lab.members().iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["t-1", "t-2", "t-3"]);
        for (i, path) in lab.overlays().iter().enumerate() {
            assert_eq!(*path, dir.join(format!("lab/t-{}.disk0.qcow2", i + 1)));
            assert!(path.exists());
        }
        let vm = lab.find("t-2").unwrap();
        assert_eq!(vm.config().disks[0].serial(), "lab-disk");
        assert_eq!(
            vm.config().disks[0].backing_chain()[0].path,
            dir.join("base.img")
        );
        // A second lab of the same name is refused before it makes anything.
        let again = Lab::create(&registry, spec(&dir, "t", 1)).unwrap_err();
        assert_eq!(
            again.to_string(),
            "lab 't': a vm named 't-1' already exists; destroy it or choose another lab name"
        );
        let overlays = lab.overlays();
        drop(lab);
        assert!(registry.list().is_empty());
        assert!(overlays.iter().all(|p| !p.exists()));
        assert!(
            !dir.join("lab").exists(),
            "the lab's own directory goes with it"
        );
        assert!(dir.join("base.img").exists());
    }

    #[test]
    fn a_lab_that_fails_half_way_leaves_nothing() {
        let dir = scratch("half");
        Disk::create(&dir.join("base.img"), 1 << 20, None).unwrap();
        let registry = Arc::new(Registry::new());
        // The third VM's overlay path is taken: the first two are undone.
        std::fs::create_dir_all(dir.join("lab")).unwrap();
        std::fs::write(dir.join("lab/h-3.disk0.qcow2"), b"mine").unwrap();
        let error = Lab::create(&registry, spec(&dir, "h", 4)).unwrap_err();
        assert!(
            matches!(error, LabError::Overlay { ref vm, .. } if vm == "h-3"),
            "{error}"
        );
        assert!(registry.list().is_empty());
        assert!(!dir.join("lab/h-1.disk0.qcow2").exists());
        assert_eq!(
            std::fs::read(dir.join("lab/h-3.disk0.qcow2")).unwrap(),
            b"mine"
        );
        let mut bad = spec(&dir, "b", 2);
        bad.template.config.vcpus = 0;
        assert!(Lab::create(&registry, bad).is_err());
        assert!(Lab::create(&registry, spec(&dir, "c", 0)).is_err());
        assert!(Lab::create(&registry, spec(&dir, "a/b", 1)).is_err());
        assert!(registry.list().is_empty());
    }

    #[test]
    fn a_lab_removes_every_directory_it_made_when_empty() {
        let dir = scratch("parents");
        Disk::create(&dir.join("base.img"), 1 << 20, None).unwrap();
        let registry = Arc::new(Registry::new());
        // sub/ and sub/dir/ are made for the lab: both go with it.
        let mut nested = spec(&dir, "n", 2);
        nested.dir = Some(dir.join("sub/dir"));
        let lab = Lab::create(&registry, nested.clone()).unwrap();
        assert!(dir.join("sub/dir/n-1.disk0.qcow2").exists());
        lab.destroy();
        assert!(
            !dir.join("sub").exists(),
            "an empty parent the lab made is left"
        );
        // A made directory that is not empty then stays, and so do its parents.
        let lab = Lab::create(&registry, nested.clone()).unwrap();
        std::fs::write(dir.join("sub/dir/mine"), b"x").unwrap();
        lab.destroy();
        assert!(dir.join("sub/dir/mine").exists());
        std::fs::remove_dir_all(dir.join("sub")).unwrap();
        // Directories that existed before stay, even when empty.
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let lab = Lab::create(&registry, nested).unwrap();
        lab.destroy();
        assert!(dir.join("sub").exists() && !dir.join("sub/dir").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// KVP readiness goes through the agent channel, so a VM made without one is refused
    /// with a message that says why.
    #[test]
    fn kvp_readiness_needs_an_agent_channel() {
        let registry = Registry::new();
        let mut config = VmConfig::new(
            "k",
            GuestSpec::Builtin {
                cmdline: String::new(),
            },
        );
        config.agent = false;
        let vm = registry.create(config).unwrap();
        let error = crate::readiness::wait_kvp_ready(&vm, "ready", None, Duration::ZERO, &|| false)
            .unwrap_err();
        assert!(
            error.to_string().contains("has no agent channel"),
            "{error}"
        );
    }

    #[test]
    fn names_become_file_and_vm_names() {
        for good in ["ci", "a.b-c_d", "x1"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(MAX_NAME + 1)] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
