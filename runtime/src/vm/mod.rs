//! One VM's lifecycle.
//!
//! ```text
//!            start            pause
//! Created ---------> Running <------> Paused
//!    |                 |  \   resume    |
//!    |           stop  |   \ guest      | stop
//!    +------------> Stopped  \ exits    |
//!                      ^      +----> Stopped (with exit code)
//!                      +------------------+
//!            Running --triple fault / emulation failure / host error--> Crashed
//!  Running/Paused --live migration, once the destination runs it--> Migrated
//!
//! On the destination of a live migration:
//!   Incoming --the source let it go--> Running      (failure: destroyed)
//! ```
//!
//! `Stopped`, `Crashed` and `Migrated` are final: the vCPU threads are gone and guest
//! memory is freed, but the record (console, exit code, crash reason) stays until the VM
//! is destroyed through the [`Registry`](crate::Registry). An `Incoming` VM is built but
//! its vCPUs and devices wait paused; no control call but `stop` applies to it (see
//! `crate::migration`).
//!
//! Who moves the state: control calls (`start`, `pause`, `resume`, `stop`) hold the
//! `control` lock so they never interleave; vCPU threads report the guest's own ending
//! through [`VcpuHost`], and the VM's event thread then tears the machine down.
//!
//! - `config.rs`: [`VmConfig`] and its validation;
//! - `state.rs`: [`VmState`] and [`VmOutcome`];
//! - `error.rs`: [`VmError`] and [`WaitError`].

mod agent;
mod config;
pub mod dynamic_memory;
mod error;
mod snapshot;
mod state;

pub use config::{ConfigError, GuestSpec, VmConfig, MAX_VCPUS};
pub use error::{VmError, WaitError};
pub(crate) use snapshot::{config_from_saved, region_layout};
pub use snapshot::{restored_config, SnapshotOptions, SnapshotReport};
pub use state::{describe_outcome, VmOutcome, VmState};

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestRam;
use event_manager::{EventManager, EventOps, EventSet, EventSubscriber, Events, SubscriberOps};
use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE};
use kvm_ioctls::VmFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::agent::AgentChannel;
use crate::builder::{self, BuildContext, RestoreParts};
use crate::devices::console::{Console, ConsoleFileError, ConsoleWaitEnd, Tee, CANCEL_POLL};
use crate::devices::legacy::SerialDevice;
use crate::devices::manager::DeviceManager;
use crate::events::EventBus;
use crate::registry::VmId;
use crate::vstate::clock::RunClock;
use crate::vstate::memory;
use crate::vstate::vcpu::{
    self, deadline_after, GuestEnd, VcpuCommand, VcpuHandle, VcpuHost, VcpuRunState,
};
use error::VCPU_ACK_TIMEOUT;

/// The parts of a running VM. Dropped in this order: vCPU threads, the VM fd (and with it
/// every memory slot), then guest memory (devices on the event thread hold the last
/// reference until that thread ends).
struct Machine {
    vcpus: Vec<VcpuHandle>,
    vm_fd: VmFd,
    memory: Arc<GuestRam>,
    devices: Arc<DeviceManager>,
    /// COM1, for host input to the guest.
    serial: Arc<Mutex<SerialDevice>>,
}

impl Machine {
    fn shutdown(self) {
        self.stop_vcpus().free();
    }

    /// Stops and joins the vCPU threads: no guest code runs after this.
    fn stop_vcpus(self) -> StoppedMachine {
        let Machine {
            vcpus,
            vm_fd,
            memory,
            devices,
            serial,
        } = self;
        for v in &vcpus {
            v.command(VcpuCommand::Stop);
        }
        for v in vcpus {
            v.stop_and_join();
        }
        StoppedMachine {
            vm_fd,
            memory,
            devices,
            serial,
        }
    }
}

/// A machine whose vCPUs are gone: what is left to free.
struct StoppedMachine {
    vm_fd: VmFd,
    memory: Arc<GuestRam>,
    devices: Arc<DeviceManager>,
    serial: Arc<Mutex<SerialDevice>>,
}

impl StoppedMachine {
    fn free(self) {
        let StoppedMachine {
            vm_fd,
            memory,
            devices,
            serial,
        } = self;
        drop(vm_fd);
        drop(devices);
        drop(memory);
        drop(serial);
    }
}

/// The event thread's control eventfd as a subscriber: a pause waits inside `process`
/// (so no device is served), and a teardown ends the loop.
struct ControlSubscriber {
    vm: Arc<Vm>,
    control: EventFd,
    end: Arc<AtomicBool>,
}

impl EventSubscriber for ControlSubscriber {
    fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control, EventSet::IN)) {
            tracing::error!(vm = self.vm.name(), error = ?e, "cannot watch the control eventfd");
            self.end.store(true, Ordering::Release);
        }
    }

    fn process(&self, _events: Events, _ops: &mut EventOps) {
        let _ = self.control.read();
        if self.vm.event_control_point() {
            self.end.store(true, Ordering::Release);
        }
    }
}

/// What the control side asks of the event thread, and what it answers. The event
/// thread looks at this whenever its control eventfd fires.
#[derive(Default)]
struct EventControl {
    /// Tear the machine down and end.
    teardown: bool,
    /// Stop serving queues until this is cleared.
    pause: bool,
    /// The event thread's answer: it serves nothing until `pause` is cleared.
    paused: bool,
}

struct Inner {
    state: VmState,
    outcome: Option<VmOutcome>,
    started_at: Option<Instant>,
    boot_time: Option<Duration>,
    vcpu_states: Vec<VcpuRunState>,
    machine: Option<Machine>,
    event_thread: Option<JoinHandle<()>>,
    /// Wakes the event thread to look at `events`.
    event_control: Option<EventFd>,
    events: EventControl,
    /// The snapshot whose memory KVM's dirty log (with the VMM's bitmap) has tracked
    /// changes from since: a diff snapshot must name it as its base.
    tracking_since: Option<(std::path::PathBuf, u64)>,
    /// Whether the memory slots are registered with KVM's dirty log on.
    dirty_logging: bool,
    /// The disks the VM writes now, once a snapshot switched them to new overlays
    /// (empty until then: the configured disks).
    live_disks: Vec<Arc<crate::storage::Disk>>,
}

/// A virtual machine and its record.
pub struct Vm {
    id: VmId,
    config: VmConfig,
    /// Serialises the control operations.
    control: Mutex<()>,
    inner: Mutex<Inner>,
    changed: Condvar,
    console: Arc<Console>,
    clock: Arc<RunClock>,
    /// The balloon target (bytes the guest is asked to have); see `dynamic_memory.rs`.
    memory_target: Mutex<u64>,
    /// What the balloon device reports (held memory, guest statistics).
    balloon: Arc<dynamic_memory::BalloonStatus>,
    /// The id of the live migration of this VM to another host under way (0: none).
    migrating: AtomicU64,
    /// The agent channel the VM's agent device serves (`None`: created without one).
    agent: Option<Arc<AgentChannel>>,
}

impl Vm {
    pub(crate) fn new(
        id: VmId,
        config: VmConfig,
        events: Arc<EventBus>,
    ) -> Result<Vm, ConsoleFileError> {
        let target = config
            .dynamic_memory
            .map_or(config.memory, |knobs| knobs.startup);
        let tee = config.console_file.as_deref().map(Tee::open).transpose()?;
        let clock = Arc::new(RunClock::new());
        let agent = config
            .agent
            .then(|| Arc::new(AgentChannel::new(id, &config.name, clock.clone(), events)));
        Ok(Vm {
            id,
            console: Console::new(config.console_capacity, tee),
            config,
            control: Mutex::new(()),
            inner: Mutex::new(Inner {
                state: VmState::Created,
                outcome: None,
                started_at: None,
                boot_time: None,
                vcpu_states: Vec::new(),
                machine: None,
                event_thread: None,
                event_control: None,
                events: EventControl::default(),
                tracking_since: None,
                dirty_logging: false,
                live_disks: Vec::new(),
            }),
            changed: Condvar::new(),
            clock,
            memory_target: Mutex::new(target),
            balloon: Arc::default(),
            migrating: AtomicU64::new(0),
            agent,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_control(&self) -> MutexGuard<'_, ()> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn id(&self) -> VmId {
        self.id
    }
    pub fn name(&self) -> &str {
        &self.config.name
    }
    pub fn config(&self) -> &VmConfig {
        &self.config
    }
    pub fn state(&self) -> VmState {
        self.lock().state
    }
    pub fn outcome(&self) -> Option<VmOutcome> {
        self.lock().outcome.clone()
    }
    /// Time from `start` until the guest wrote the ready port.
    pub fn boot_time(&self) -> Option<Duration> {
        self.lock().boot_time
    }
    /// Running time of the guest (paused time excluded).
    pub fn run_time(&self) -> Duration {
        self.clock.elapsed()
    }
    /// Bytes of guest memory resident on the host (0 once the VM no longer runs).
    pub fn memory_resident(&self) -> u64 {
        // Counted without the VM's lock: mincore over gigabytes takes a while.
        let memory = self.lock().machine.as_ref().map(|m| m.memory.clone());
        memory.map_or(0, |m| memory::resident_bytes(&m))
    }
    /// Runs `f` on the guest's RAM while the VM has a machine (running or paused), for
    /// harnesses that inspect guest memory. Does not hold the VM's lock while `f` runs.
    pub fn with_memory<R>(&self, f: impl FnOnce(&GuestRam) -> R) -> Option<R> {
        let memory = self.lock().machine.as_ref().map(|m| m.memory.clone())?;
        Some(f(&memory))
    }

    /// The guest's RAM while the VM has a machine.
    pub(crate) fn memory_handle(&self) -> Option<Arc<GuestRam>> {
        self.lock().machine.as_ref().map(|m| m.memory.clone())
    }

    /// Legacy IRQ lines (0–15) the in-kernel PIC has latched and not yet delivered, as a
    /// bit mask; `None` when the VM does not run. Device interrupts arrive here through
    /// irqfds, so this shows whether a device signalled a guest that did not take it.
    pub fn pending_legacy_irqs(&self) -> Option<u16> {
        let inner = self.lock();
        let machine = inner.machine.as_ref()?;
        let mut irr = 0u16;
        for (chip_id, shift) in [(KVM_IRQCHIP_PIC_MASTER, 0), (KVM_IRQCHIP_PIC_SLAVE, 8)] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            machine.vm_fd.get_irqchip(&mut chip).ok()?;
            // SAFETY: for the PIC chip ids KVM fills the `pic` member of the union.
            irr |= (unsafe { chip.chip.pic }.irr as u16) << shift;
        }
        Some(irr)
    }
    pub fn console(&self) -> &Arc<Console> {
        &self.console
    }

    fn invalid(&self, op: &'static str, state: VmState) -> VmError {
        VmError::InvalidState {
            name: self.config.name.clone(),
            op,
            state,
        }
    }

    /// Builds the machine and starts every vCPU.
    pub fn start(self: &Arc<Self>) -> Result<(), VmError> {
        let _control = self.lock_control();
        self.launch(None)
    }

    /// Builds the machine (booting it, or from `restore`) and starts its threads.
    /// Called with the control lock held.
    fn launch(self: &Arc<Self>, restore: Option<RestoreParts<'_>>) -> Result<(), VmError> {
        self.launch_with(restore, false)
    }

    /// Builds an `Incoming` VM from the state a migration source sent, with every vCPU
    /// and the device thread waiting paused: no guest instruction runs and no device is
    /// served until [`Vm::start_incoming`].
    pub(crate) fn launch_incoming(
        self: &Arc<Self>,
        restore: RestoreParts<'_>,
    ) -> Result<(), VmError> {
        let _control = self.lock_control();
        self.launch_with(Some(restore), true)
    }

    /// [`Vm::launch`], or with `incoming` the paused build of [`Vm::launch_incoming`].
    fn launch_with(
        self: &Arc<Self>,
        restore: Option<RestoreParts<'_>>,
        incoming: bool,
    ) -> Result<(), VmError> {
        let state = self.state();
        let expected = if incoming {
            VmState::Incoming
        } else {
            VmState::Created
        };
        if state != expected || (incoming && restore.is_none()) {
            return Err(self.invalid("start", state));
        }
        let restoring = restore.is_some();
        let started_at = Instant::now();
        let built = builder::build(BuildContext {
            config: &self.config,
            console: self.console.clone(),
            clock: self.clock.clone(),
            host: self.clone(),
            balloon_status: self.balloon.clone(),
            memory_target: self.memory_target(),
            agent: self.agent.clone(),
            restore,
        })?;
        tracing::debug!(
            vm = self.name(),
            took_us = started_at.elapsed().as_micros() as u64,
            "machine built"
        );
        let control = EventFd::new(EFD_NONBLOCK).map_err(|e| self.thread_error(e))?;
        let event_control = control.try_clone().map_err(|e| self.thread_error(e))?;
        // The lock is held until every thread is spawned and recorded: a vCPU thread
        // reports `running` (taking this lock) before it first enters the guest, so no
        // guest code runs, and nothing can end, before the machine is complete.
        let mut inner = self.lock();
        inner.state = if incoming {
            VmState::Incoming
        } else {
            VmState::Running
        };
        inner.outcome = None;
        inner.started_at = Some(started_at);
        inner.vcpu_states = vec![VcpuRunState::Running; built.vcpus.len()];
        inner.machine = Some(Machine {
            vcpus: Vec::new(),
            vm_fd: built.vm_fd,
            memory: built.memory,
            devices: built.devices.clone(),
            serial: built.serial,
        });
        inner.events = EventControl::default();
        if incoming {
            // The device thread's first look at its control eventfd makes it wait
            // paused, before it serves anything.
            inner.events.pause = true;
            let _ = control.write(1);
        }
        inner.event_control = Some(control);
        if let Some(agent) = &self.agent {
            agent.machine_started();
        }
        if restoring {
            // A restored guest already went through its boot: it is ready now.
            inner.boot_time = Some(started_at.elapsed());
        }
        let vm = self.clone();
        let devices = built.devices;
        if !incoming {
            self.clock.start();
            if restoring {
                devices.resume_after_restore();
                // The guest's clock stood still since the snapshot was taken.
                if let Some(agent) = &self.agent {
                    agent.push_time();
                }
            }
        }
        let spawned: std::io::Result<()> = 'spawn: {
            let thread = std::thread::Builder::new()
                .name(format!("events-{}", self.name()))
                .spawn(move || vm.event_loop(event_control, devices));
            match thread {
                Ok(t) => inner.event_thread = Some(t),
                Err(e) => break 'spawn Err(e),
            }
            for (v, commands) in built.vcpus {
                if incoming {
                    // Obeyed before the thread first enters the guest.
                    let _ = commands.send(VcpuCommand::Pause);
                }
                match vcpu::spawn(v, self.name(), commands) {
                    Ok(handle) => inner
                        .machine
                        .as_mut()
                        .expect("machine installed above")
                        .vcpus
                        .push(handle),
                    Err(e) => break 'spawn Err(e),
                }
            }
            Ok(())
        };
        drop(inner);
        if let Err(e) = spawned {
            // Undo everything: the VM goes back to `created` (or stays `incoming`).
            self.release();
            self.agent_ended("not started", false);
            let mut inner = self.lock();
            inner.state = expected;
            inner.started_at = None;
            return Err(self.thread_error(e));
        }
        if incoming {
            // Every vCPU and the device thread wait paused before this returns.
            drop(self.command_vcpus("pause", VcpuCommand::Pause, VcpuRunState::Paused)?);
            self.pause_devices()?;
            tracing::debug!(vm = self.name(), "incoming vm built, waiting paused");
            return Ok(());
        }
        tracing::info!(
            vm = self.name(),
            vcpus = self.config.vcpus,
            memory = self.config.memory,
            "vm started"
        );
        Ok(())
    }

    /// Lets an `Incoming` VM run: its devices pick up the requests the guest had
    /// posted, then the clock and the vCPUs go on where the source stopped them. If
    /// the vCPUs do not all answer, the VM is stopped (it must not run half started)
    /// and the error returned.
    ///
    /// With `paused` (the VM was paused at the source) it becomes `paused` instead,
    /// exactly as [`Vm::pause`] leaves a VM: vCPUs and device thread waiting, clock
    /// stopped. The devices' kicks for the requests in flight wait in their eventfds
    /// until [`Vm::resume`] lets the device thread go on.
    pub(crate) fn start_incoming(&self, paused: bool) -> Result<(), VmError> {
        let _control = self.lock_control();
        let state = self.state();
        if state != VmState::Incoming {
            return Err(self.invalid("start the incoming", state));
        }
        if let Some(devices) = self.devices() {
            devices.resume_after_restore();
        }
        if paused {
            let mut inner = self.lock();
            if inner.state != VmState::Incoming {
                return Err(self.invalid("take over the incoming", inner.state));
            }
            inner.state = VmState::Paused;
            drop(inner);
            self.changed.notify_all();
            tracing::info!(vm = self.name(), "incoming vm taken over paused");
            return Ok(());
        }
        self.clock.start();
        self.resume_devices();
        // The guest's clock stood still while the VM moved.
        if let Some(agent) = &self.agent {
            agent.push_time();
        }
        let result = self
            .command_vcpus("resume", VcpuCommand::Resume, VcpuRunState::Running)
            .map(|mut inner| {
                if inner.state == VmState::Incoming {
                    inner.state = VmState::Running;
                }
                inner.state
            });
        match result {
            Ok(VmState::Running) => {
                tracing::info!(vm = self.name(), "incoming vm running");
                Ok(())
            }
            Ok(other) => Err(self.invalid("start the incoming", other)),
            Err(e) => {
                self.stop_locked();
                Err(e)
            }
        }
    }

    /// Marks an `Incoming` VM as created on this host (from a snapshot-like state that
    /// a migration brings); only the registry calls it, before anyone sees the VM.
    pub(crate) fn set_incoming(&self) {
        let mut inner = self.lock();
        if inner.state == VmState::Created {
            inner.state = VmState::Incoming;
        }
    }

    /// The end of a successful migration on the source: the VM is `migrated` (to
    /// `to`), its machine released. Called with the control lock held, while paused.
    pub(crate) fn mark_migrated_locked(&self, to: &str) {
        {
            let mut inner = self.lock();
            if !inner.state.is_final() {
                inner.state = VmState::Migrated;
                inner.outcome = Some(VmOutcome::Migrated { to: to.to_string() });
            }
        }
        self.release_in_background();
        self.console.close();
        self.agent_ended(&format!("migrated to {to}"), false);
        self.changed.notify_all();
        tracing::info!(vm = self.name(), to, "vm migrated");
    }

    /// The control lock, for the migration source, which holds it from start to end.
    pub(crate) fn control_guard(&self) -> MutexGuard<'_, ()> {
        self.lock_control()
    }

    /// Marks the live migration `id` of this VM as under way (0: over).
    pub(crate) fn set_migrating(&self, id: u64) {
        self.migrating.store(id, Ordering::SeqCst);
    }

    /// The id of the live migration of this VM under way, if any.
    pub(crate) fn migration_id(&self) -> Option<u64> {
        Some(self.migrating.load(Ordering::SeqCst)).filter(|&id| id != 0)
    }

    /// Runs `f` with the machine's VM fd and RAM (for the dirty log) under the VM's
    /// lock; `None` once the machine is gone.
    pub(crate) fn with_vm_memory<R>(&self, f: impl FnOnce(&VmFd, &GuestRam) -> R) -> Option<R> {
        let inner = self.lock();
        inner.machine.as_ref().map(|m| f(&m.vm_fd, &m.memory))
    }

    /// Turns KVM's dirty log on if it is not (for live migration); returns whether it
    /// was on. Diff snapshots lose their base: the pages taken from now on are gone
    /// from the log.
    pub(crate) fn start_dirty_tracking(&self) -> Result<bool, VmError> {
        let mut inner = self.lock();
        let was_on = inner.dirty_logging;
        inner.tracking_since = None;
        let machine = inner
            .machine
            .as_ref()
            .ok_or_else(|| self.invalid("migrate", inner.state))?;
        if !was_on {
            memory::set_dirty_logging(&machine.vm_fd, &machine.memory, true).map_err(|source| {
                VmError::Memory {
                    name: self.config.name.clone(),
                    source,
                }
            })?;
        }
        inner.dirty_logging = true;
        Ok(was_on)
    }

    /// Turns KVM's dirty log off again after a failed migration that turned it on.
    pub(crate) fn stop_dirty_tracking(&self) {
        let mut inner = self.lock();
        if let Some(machine) = inner.machine.as_ref() {
            match memory::set_dirty_logging(&machine.vm_fd, &machine.memory, false) {
                Ok(()) => inner.dirty_logging = false,
                Err(e) => {
                    tracing::warn!(vm = self.name(), error = %e, "cannot turn the dirty log off")
                }
            }
        }
    }

    /// Pauses (`true`) or resumes the vCPUs alone, leaving the VM `running`: the duty
    /// cycle with which a migration slows a guest that dirties memory faster than the
    /// link carries it.
    pub(crate) fn throttle_vcpus(&self, pause: bool) -> Result<(), VmError> {
        let (command, want) = if pause {
            (VcpuCommand::Pause, VcpuRunState::Paused)
        } else {
            (VcpuCommand::Resume, VcpuRunState::Running)
        };
        self.command_vcpus("throttle", command, want).map(drop)
    }

    pub(crate) fn pause_for_migration(&self) -> Result<(), VmError> {
        self.pause_locked()
    }

    pub(crate) fn resume_after_migration(&self) -> Result<(), VmError> {
        self.resume_locked()
    }

    fn thread_error(&self, source: std::io::Error) -> VmError {
        VmError::Thread {
            name: self.config.name.clone(),
            source,
        }
    }

    /// The VM's event thread: serves virtio queue notifications, and obeys its control
    /// eventfd: a pause (it stops touching queues and guest memory until resumed) or the
    /// request to tear the machine down, which comes from `stop` or from a vCPU that saw
    /// the guest end.
    fn event_loop(self: Arc<Self>, control: EventFd, devices: Arc<DeviceManager>) {
        if let Err(reason) = self.serve_devices(control, &devices) {
            // Without its device thread the VM cannot go on (nor pause): it crashes with
            // the reason rather than hang in `running`.
            tracing::error!(vm = self.name(), reason, "the device thread failed");
            self.guest_ended(
                0,
                GuestEnd::Crashed(format!("host error: the device thread failed: {reason}")),
            );
        }
        let machine = self.lock().machine.take();
        if let Some(machine) = machine {
            machine.shutdown();
        }
        drop(devices);
        self.changed.notify_all();
    }

    /// Runs the event manager until teardown; `Err` says why it could not.
    fn serve_devices(
        self: &Arc<Self>,
        control: EventFd,
        devices: &DeviceManager,
    ) -> Result<(), String> {
        let mut manager: EventManager<Arc<dyn EventSubscriber + Send + Sync>> =
            EventManager::new().map_err(|e| format!("cannot create the event manager: {e:?}"))?;
        let end = Arc::new(AtomicBool::new(false));
        manager.add_subscriber(Arc::new(ControlSubscriber {
            vm: self.clone(),
            control,
            end: end.clone(),
        }));
        if end.load(Ordering::Acquire) {
            return Err("cannot watch the control eventfd".into());
        }
        let vm = self.clone();
        let on_panic: Arc<dyn Fn(String) + Send + Sync> = Arc::new(move |reason| {
            // A device bug: the VM crashes with the reason; the host goes on.
            vm.guest_ended(
                0,
                GuestEnd::Crashed(format!("host error: a device panicked: {reason}")),
            );
        });
        for device in devices.devices() {
            let subscriber = device
                .subscriber(on_panic.clone())
                .map_err(|e| format!("cannot watch the queues of {}: {e}", device.slot.id))?;
            manager.add_subscriber(subscriber);
        }
        while !end.load(Ordering::Acquire) {
            manager
                .run()
                .map_err(|e| format!("the event manager failed: {e:?}"))?;
        }
        Ok(())
    }

    /// The event thread's answer to its control eventfd. Returns true when it must end.
    /// On a pause it reports `paused` and waits here, touching nothing, until resumed.
    fn event_control_point(&self) -> bool {
        let mut inner = self.lock();
        if inner.events.pause && !inner.events.teardown {
            inner.events.paused = true;
            self.changed.notify_all();
            while inner.events.pause && !inner.events.teardown {
                inner = self.changed.wait(inner).unwrap_or_else(|p| p.into_inner());
            }
            inner.events.paused = false;
            self.changed.notify_all();
        }
        inner.events.teardown
    }

    /// Asks the event thread to tear the machine down (it may be waiting paused).
    fn request_teardown(&self, inner: &mut Inner) {
        inner.events.teardown = true;
        if let Some(control) = &inner.event_control {
            let _ = control.write(1);
        }
        self.changed.notify_all();
    }

    /// Stops the device side: returns once the event thread serves nothing (or is gone).
    fn pause_devices(&self) -> Result<(), VmError> {
        let mut inner = self.lock();
        if inner.event_thread.is_none() {
            return Ok(());
        }
        inner.events.pause = true;
        if let Some(control) = &inner.event_control {
            let _ = control.write(1);
        }
        let deadline = deadline_after(VCPU_ACK_TIMEOUT);
        while !inner.events.paused && !inner.events.teardown && !inner.state.is_final() {
            let now = Instant::now();
            if now >= deadline {
                inner.events.pause = false;
                self.changed.notify_all();
                return Err(VmError::VcpuTimeout {
                    name: self.config.name.clone(),
                    op: "pause devices",
                });
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets the event thread serve queues again.
    fn resume_devices(&self) {
        let mut inner = self.lock();
        inner.events.pause = false;
        drop(inner);
        self.changed.notify_all();
    }

    /// Stops the vCPUs, frees memory and ends the event thread. Safe to call twice.
    fn release(&self) {
        let (machine, event_thread) = {
            let mut inner = self.lock();
            (inner.machine.take(), inner.event_thread.take())
        };
        self.clock.stop();
        if let Some(machine) = machine {
            machine.shutdown();
        }
        {
            let mut inner = self.lock();
            self.request_teardown(&mut inner);
            inner.event_control = None;
        }
        if let Some(thread) = event_thread {
            if thread.join().is_err() {
                tracing::error!(vm = self.name(), "event thread panicked");
            }
        }
    }

    /// [`Vm::release`] for a VM that migrated away: the vCPUs stop here, and the rest
    /// (destroying the KVM VM, unmapping guest RAM, ending the device thread) goes on
    /// on a thread of its own. Freeing a large RAM takes tens of milliseconds (about
    /// 0.1 ms per resident MiB) that the migration, which is over once the VM runs on
    /// the destination, need not wait for. Inline if no thread can be started.
    fn release_in_background(&self) {
        let (machine, event_thread) = {
            let mut inner = self.lock();
            (inner.machine.take(), inner.event_thread.take())
        };
        self.clock.stop();
        let stopped = machine.map(Machine::stop_vcpus);
        {
            let mut inner = self.lock();
            self.request_teardown(&mut inner);
            inner.event_control = None;
        }
        let name = self.name().to_string();
        let free = move || {
            if let Some(stopped) = stopped {
                stopped.free();
            }
            // The device thread may hold the last reference to guest RAM.
            if let Some(thread) = event_thread {
                if thread.join().is_err() {
                    tracing::error!(vm = name, "event thread panicked");
                }
            }
        };
        // The closure runs exactly once: on the new thread, or here if none started.
        let free = Arc::new(Mutex::new(Some(free)));
        let run = {
            let free = free.clone();
            move || {
                let taken = free.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(free) = taken {
                    free();
                }
            }
        };
        if let Err(e) = std::thread::Builder::new()
            .name("vm-release".into())
            .spawn(run)
        {
            tracing::debug!(vm = self.name(), error = %e, "cannot start a thread to free the vm; freeing it here");
            let taken = free.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(free) = taken {
                free();
            }
        }
    }

    /// Hard stop: tears down the vCPUs and frees guest memory. The record stays.
    /// Idempotent; a VM that already ended keeps its exit code or crash reason.
    pub fn stop(&self) {
        let _control = self.lock_control();
        self.stop_locked();
    }

    /// [`Vm::stop`] with the control lock held.
    fn stop_locked(&self) {
        {
            let mut inner = self.lock();
            if !inner.state.is_final() {
                inner.state = VmState::Stopped;
                inner.outcome = Some(VmOutcome::Stopped);
            }
        }
        self.release();
        // Nothing will print any more: waiters for console output give up now.
        self.console.close();
        let outcome = self.outcome();
        let exited = matches!(outcome, Some(VmOutcome::Exited(_)));
        self.agent_ended(&describe_outcome(outcome.as_ref()), exited);
        self.changed.notify_all();
        tracing::debug!(vm = self.name(), "vm stopped");
    }

    /// Sends `command` to every vCPU and waits until each reports `want` (or has exited).
    fn command_vcpus(
        &self,
        op: &'static str,
        command: VcpuCommand,
        want: VcpuRunState,
    ) -> Result<MutexGuard<'_, Inner>, VmError> {
        let mut inner = self.lock();
        if let Some(machine) = &inner.machine {
            for v in &machine.vcpus {
                v.command(command.clone());
            }
        }
        let deadline = deadline_after(VCPU_ACK_TIMEOUT);
        loop {
            let done = inner
                .vcpu_states
                .iter()
                .all(|&s| s == want || s == VcpuRunState::Exited);
            if done || inner.state.is_final() {
                return Ok(inner);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::VcpuTimeout {
                    name: self.config.name.clone(),
                    op,
                });
            }
            inner = self
                .changed
                .wait_timeout(inner, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Pauses the guest; returns once every vCPU is out of `KVM_RUN`.
    pub fn pause(&self) -> Result<(), VmError> {
        let _control = self.lock_control();
        self.pause_locked()
    }

    /// [`Vm::pause`] with the control lock held.
    fn pause_locked(&self) -> Result<(), VmError> {
        match self.state() {
            VmState::Running => {}
            VmState::Paused => return Ok(()),
            other => return Err(self.invalid("pause", other)),
        }
        let result = self.command_vcpus("pause", VcpuCommand::Pause, VcpuRunState::Paused);
        let inner = match result {
            Ok(inner) => inner,
            Err(e) => {
                // Leave no vCPU behind in a half-paused VM.
                drop(self.command_vcpus("resume", VcpuCommand::Resume, VcpuRunState::Running));
                return Err(e);
            }
        };
        if inner.state.is_final() {
            return Err(self.invalid("pause", inner.state));
        }
        drop(inner);
        // The vCPUs are out of the guest; now the devices stop touching guest memory.
        if let Err(e) = self.pause_devices() {
            drop(self.command_vcpus("resume", VcpuCommand::Resume, VcpuRunState::Running));
            return Err(e);
        }
        let mut inner = self.lock();
        if inner.state.is_final() {
            return Err(self.invalid("pause", inner.state));
        }
        inner.state = VmState::Paused;
        self.clock.stop();
        Ok(())
    }

    /// Continues a paused guest exactly where it was.
    pub fn resume(&self) -> Result<(), VmError> {
        let _control = self.lock_control();
        self.resume_locked()
    }

    /// [`Vm::resume`] with the control lock held.
    fn resume_locked(&self) -> Result<(), VmError> {
        match self.state() {
            VmState::Paused => {}
            VmState::Running => return Ok(()),
            other => return Err(self.invalid("resume", other)),
        }
        self.clock.start();
        self.resume_devices();
        // The guest's clock stood still while the VM was paused.
        if let Some(agent) = &self.agent {
            agent.push_time();
        }
        let mut inner = self.command_vcpus("resume", VcpuCommand::Resume, VcpuRunState::Running)?;
        if !inner.state.is_final() {
            inner.state = VmState::Running;
        }
        Ok(())
    }

    /// Queues `bytes` for the guest's serial console (COM1's receiver), all of them or,
    /// when they do not fit, none ([`VmError::Input`]). While paused, input waits for
    /// the guest. Idle vCPUs are woken so that a polling guest sees it at once.
    pub fn send_input(&self, bytes: &[u8]) -> Result<(), VmError> {
        let serial = {
            let inner = self.lock();
            match (inner.state, &inner.machine) {
                (VmState::Running | VmState::Paused, Some(machine)) => machine.serial.clone(),
                (state, _) => return Err(self.invalid("send input to", state)),
            }
        };
        let queued = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_input(bytes);
        queued.map_err(|source| VmError::Input {
            name: self.config.name.clone(),
            source,
        })
    }

    /// Waits until the guest ends, then releases its resources and returns how it ended.
    pub fn wait(&self, timeout: Duration) -> Result<VmOutcome, WaitError> {
        self.wait_cancellable(timeout, &|| false)
    }

    /// [`Vm::wait`], also ending (with [`WaitError::Cancelled`]) once `cancel` returns
    /// true; it is polled every [`CANCEL_POLL`], without the VM's lock held.
    pub fn wait_cancellable(
        &self,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<VmOutcome, WaitError> {
        let deadline = deadline_after(timeout);
        let mut inner = self.lock();
        if inner.state == VmState::Created {
            return Err(WaitError::NotStarted {
                name: self.config.name.clone(),
            });
        }
        while !inner.state.is_final() {
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::TimedOut {
                    name: self.config.name.clone(),
                    what: "the guest to end".into(),
                    timeout,
                    state: inner.state,
                    last_line: self.console.last_line(),
                });
            }
            drop(
                self.changed
                    .wait_timeout(inner, (deadline - now).min(CANCEL_POLL))
                    .unwrap_or_else(|p| p.into_inner())
                    .0,
            );
            // Without the VM's lock: `cancel` may run code that looks at this VM.
            if cancel() {
                return Err(WaitError::Cancelled {
                    name: self.config.name.clone(),
                    what: "the guest to end".into(),
                });
            }
            inner = self.lock();
        }
        drop(inner);
        self.stop();
        Ok(self.outcome().unwrap_or(VmOutcome::Stopped))
    }

    /// Waits until the console shows `pattern` at or after stream offset `from`; returns
    /// the line that holds it and the offset just past the match.
    pub fn wait_for_console(
        &self,
        pattern: &str,
        from: u64,
        timeout: Duration,
    ) -> Result<(String, u64), WaitError> {
        self.wait_for_console_cancellable(pattern, from, timeout, &|| false)
    }

    /// [`Vm::wait_for_console`], also ending once `cancel` returns true.
    pub fn wait_for_console_cancellable(
        &self,
        pattern: &str,
        from: u64,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(String, u64), WaitError> {
        if self.state() == VmState::Created {
            return Err(WaitError::NotStarted {
                name: self.config.name.clone(),
            });
        }
        match self
            .console
            .wait_for(pattern, from, deadline_after(timeout), cancel)
        {
            Ok(found) => Ok(found),
            Err(ConsoleWaitEnd::TimedOut) => Err(WaitError::TimedOut {
                name: self.config.name.clone(),
                what: format!("console output {pattern:?}"),
                timeout,
                state: self.state(),
                last_line: self.console.last_line(),
            }),
            Err(ConsoleWaitEnd::Cancelled) => Err(WaitError::Cancelled {
                name: self.config.name.clone(),
                what: format!("console output {pattern:?}"),
            }),
            Err(ConsoleWaitEnd::Closed) => Err(WaitError::Ended {
                name: self.config.name.clone(),
                pattern: pattern.to_string(),
                state: self.state(),
                outcome: describe_outcome(self.outcome().as_ref()),
                last_line: self.console.last_line(),
            }),
        }
    }
}

impl VcpuHost for Vm {
    fn vcpu_state_changed(&self, index: usize, state: VcpuRunState) {
        let mut inner = self.lock();
        if let Some(slot) = inner.vcpu_states.get_mut(index) {
            *slot = state;
        }
        drop(inner);
        self.changed.notify_all();
    }

    fn guest_ready(&self) {
        let mut inner = self.lock();
        if inner.boot_time.is_none() {
            inner.boot_time = inner.started_at.map(|t| t.elapsed());
            tracing::debug!(vm = self.name(), boot_time = ?inner.boot_time, "guest ready");
        }
    }

    fn guest_ended(&self, index: usize, end: GuestEnd) {
        let mut inner = self.lock();
        if inner.state.is_final() {
            return;
        }
        match &end {
            GuestEnd::Exited(code) => {
                tracing::info!(vm = self.name(), vcpu = index, code, "guest exited");
                inner.state = VmState::Stopped;
                inner.outcome = Some(VmOutcome::Exited(*code));
            }
            GuestEnd::Crashed(reason) => {
                tracing::info!(vm = self.name(), vcpu = index, reason, "guest crashed");
                inner.state = VmState::Crashed;
                inner.outcome = Some(VmOutcome::Crashed(reason.clone()));
            }
        }
        self.clock.stop();
        self.request_teardown(&mut inner);
        drop(inner);
        self.console.close();
        let outcome = match &end {
            GuestEnd::Exited(code) => VmOutcome::Exited(*code),
            GuestEnd::Crashed(reason) => VmOutcome::Crashed(reason.clone()),
        };
        let exited = matches!(outcome, VmOutcome::Exited(_));
        self.agent_ended(&describe_outcome(Some(&outcome)), exited);
        self.changed.notify_all();
    }
}
