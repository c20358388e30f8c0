//! vCPU threads.
//!
//! Each vCPU runs `KVM_RUN` on its own thread and is driven by [`VcpuCommand`]s. The
//! thread follows a small state machine, reported to the VM through [`VcpuHost`]:
//!
//! ```text
//! Running --Pause--> Paused --Resume--> Running
//!    |                 |
//!    +------Stop-------+--> Exited   (also on guest exit, crash or host error)
//! ```
//!
//! A command reaches a vCPU that is inside `KVM_RUN` through a kick: a real-time signal
//! whose handler sets `kvm_run.immediate_exit`, so `KVM_RUN` returns `EINTR` even when
//! the signal lands just before the ioctl is entered.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu_state::{VcpuState, VcpuStateError};
use crate::devices::bus::{Bus, IoAction};

/// Most I/O exits served while completing a pending access before a pause (a `rep`
/// string instruction exits once per piece).
const MAX_PENDING_IO_PIECES: usize = 4096;

/// Offset from SIGRTMIN of the signal that kicks a vCPU out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;

/// Commands a vCPU thread obeys. `Pause`, `Resume` and `Stop` are answered through
/// [`VcpuHost::vcpu_state_changed`]; `SaveState` carries its own reply channel.
#[derive(Debug, Clone)]
pub enum VcpuCommand {
    /// Finish any port or MMIO access the guest is in the middle of, leave `KVM_RUN` and
    /// wait for `Resume` or `Stop`.
    Pause,
    /// Continue exactly where the guest was.
    Resume,
    /// End the thread.
    Stop,
    /// An event arrived for the VM: end an idle wait early.
    Wake,
    /// Reply with the vCPU's complete state. Only a paused vCPU answers with its state;
    /// a running one answers [`VcpuStateError::NotPaused`].
    SaveState(Sender<Result<VcpuState, VcpuStateError>>),
}

/// Where a vCPU thread is in its state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuRunState {
    Running,
    Paused,
    Exited,
}

/// How the guest ended, as seen by the vCPU that noticed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEnd {
    /// The guest wrote its exit code to the exit port.
    Exited(u32),
    /// A triple fault, an emulation failure, or a host-side error; the reason says which.
    Crashed(String),
}

/// The VM side of a vCPU thread: where it reports what happened.
pub trait VcpuHost: Send + Sync {
    fn vcpu_state_changed(&self, index: usize, state: VcpuRunState);
    fn guest_ready(&self);
    fn guest_ended(&self, index: usize, end: GuestEnd);
}

/// Everything a vCPU thread owns.
pub struct Vcpu {
    pub index: usize,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub host: Arc<dyn VcpuHost>,
    /// Where its commands arrive; the sending side is made by [`command_channel`].
    pub commands: Receiver<VcpuCommand>,
    /// A `Wake` arrived while the guest was running: its next idle returns at once. (The
    /// guest checks its devices before idling; without this, an event that lands between
    /// that check and the idle would be lost until the idle's deadline.)
    pub wake_pending: bool,
}

/// A channel for a vCPU's commands. Senders can be cloned, e.g. for devices that wake
/// idle vCPUs.
pub fn command_channel() -> (Sender<VcpuCommand>, Receiver<VcpuCommand>) {
    mpsc::channel()
}

/// The control side's handle on a running vCPU thread.
pub struct VcpuHandle {
    pub index: usize,
    commands: Sender<VcpuCommand>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Sends a command; a thread that already ended ignores it.
    pub fn send(&self, command: VcpuCommand) {
        let _ = self.commands.send(command);
    }

    /// Interrupts `KVM_RUN` so the thread looks at its commands.
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            if !thread.is_finished() {
                // ESRCH just means the thread ended between the check and the signal.
                let _ = thread.kill(SIGRTMIN() + KICK_SIGNAL_OFFSET);
            }
        }
    }

    /// Sends `command` and kicks the thread so it acts on it now.
    pub fn command(&self, command: VcpuCommand) {
        self.send(command);
        self.kick();
    }

    /// Stops the thread and waits for it to end.
    pub fn stop_and_join(mut self) {
        self.command(VcpuCommand::Stop);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!(vcpu = self.index, "vCPU thread panicked");
            }
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.command(VcpuCommand::Stop);
            let _ = thread.join();
        }
    }
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: one thread-local read and one byte store.
    let flag = IMMEDIATE_EXIT.with(|f| f.get());
    if !flag.is_null() {
        // SAFETY: the pointer targets this thread's mapped kvm_run page; it is set after
        // the VcpuFd is in place and cleared before the VcpuFd is dropped, on this thread.
        unsafe { flag.write_volatile(1) };
    }
}

fn install_kick_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| {
        result = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()));
    });
    result
}

/// Starts the vCPU's thread, which enters the guest at once. `commands` is the sending
/// side of the channel whose receiver `vcpu` holds.
pub fn spawn(
    vcpu: Vcpu,
    vm_name: &str,
    commands: Sender<VcpuCommand>,
) -> std::io::Result<VcpuHandle> {
    install_kick_handler()?;
    let index = vcpu.index;
    let thread = std::thread::Builder::new()
        .name(format!("vcpu-{vm_name}-{index}"))
        .spawn(move || vcpu.run())?;
    Ok(VcpuHandle {
        index,
        commands,
        thread: Some(thread),
    })
}

/// What the run loop does next.
enum Flow {
    Continue,
    Stop,
}

/// A KVM exit, decoded while `kvm_run` is borrowed, acted on afterwards.
enum Step {
    Continue,
    Action(IoAction),
    Crash(String),
    CrashWithRip(&'static str),
    HostError(String),
}

impl Vcpu {
    fn run(mut self) {
        let immediate_exit = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        IMMEDIATE_EXIT.with(|f| f.set(immediate_exit));
        self.host
            .vcpu_state_changed(self.index, VcpuRunState::Running);
        // A bug in a device or in this loop must not leave the VM half-alive: it becomes
        // a crash with a reason, and the thread still reports that it exited.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop()));
        if let Err(panic) = outcome {
            let reason = panic_message(panic.as_ref());
            tracing::error!(vcpu = self.index, reason, "vCPU thread panicked");
            self.host.guest_ended(
                self.index,
                GuestEnd::Crashed(format!(
                    "host error: vcpu {} panicked: {reason}",
                    self.index
                )),
            );
        }
        IMMEDIATE_EXIT.with(|f| f.set(std::ptr::null_mut()));
        self.host
            .vcpu_state_changed(self.index, VcpuRunState::Exited);
    }

    fn run_loop(&mut self) {
        loop {
            loop {
                match self.commands.try_recv() {
                    Ok(command) => {
                        if let Flow::Stop = self.obey(command) {
                            return;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
            let step = self.enter_guest();
            let flow = match step {
                Step::Continue | Step::Action(IoAction::None) => Flow::Continue,
                Step::Action(IoAction::Ready) => {
                    self.host.guest_ready();
                    Flow::Continue
                }
                Step::Action(IoAction::Idle(timeout)) => self.idle(timeout),
                Step::Action(IoAction::Exit(code)) => self.end(GuestEnd::Exited(code)),
                Step::Crash(reason) => self.end(GuestEnd::Crashed(reason)),
                Step::CrashWithRip(what) => {
                    let rip = self
                        .fd
                        .get_regs()
                        .map(|r| format!("{:#x}", r.rip))
                        .unwrap_or_else(|_| "unknown".into());
                    self.end(GuestEnd::Crashed(format!(
                        "{what} at rip={rip} on vcpu {}",
                        self.index
                    )))
                }
                Step::HostError(reason) => {
                    self.end(GuestEnd::Crashed(format!("host error: {reason}")))
                }
            };
            if let Flow::Stop = flow {
                return;
            }
        }
    }

    fn end(&self, end: GuestEnd) -> Flow {
        self.host.guest_ended(self.index, end);
        Flow::Stop
    }

    fn enter_guest(&mut self) -> Step {
        match self.fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match self.pio.write(port as u64, data) {
                Some(action) => Step::Action(action),
                None => {
                    tracing::trace!(port, "write to an unclaimed port");
                    Step::Continue
                }
            },
            Ok(VcpuExit::IoIn(port, data)) => {
                if !self.pio.read(port as u64, data) {
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                Step::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => match self.mmio.write(addr, data) {
                Some(action) => Step::Action(action),
                None => {
                    tracing::trace!(addr, "write to unclaimed MMIO");
                    Step::Continue
                }
            },
            Ok(VcpuExit::Shutdown) => Step::CrashWithRip("triple fault (shutdown exit)"),
            Ok(VcpuExit::Hlt) => Step::CrashWithRip("hlt with no interrupt to wake the guest"),
            Ok(VcpuExit::InternalError) => {
                Step::CrashWithRip("KVM internal error (instruction emulation failed)")
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Step::Crash(format!(
                "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
            )),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Step::Action(IoAction::Exit(0)),
                KVM_SYSTEM_EVENT_RESET => Step::CrashWithRip("guest requested a reset"),
                KVM_SYSTEM_EVENT_CRASH => Step::CrashWithRip("guest reported a crash"),
                other => Step::Crash(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::Intr) => Step::Continue,
            Ok(other) => Step::CrashWithRip(exit_name(&other)),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::HostError(format!("KVM_RUN failed on vcpu {}: {e}", self.index)),
        }
    }

    /// Sleeps until `timeout` passes or a command arrives. Any command ends the idle
    /// wait: the guest rechecks its clock and devices and idles again if it must.
    fn idle(&mut self, timeout: Option<Duration>) -> Flow {
        if std::mem::take(&mut self.wake_pending) {
            return Flow::Continue;
        }
        let command = match timeout {
            Some(timeout) => match self.commands.recv_timeout(timeout) {
                Ok(c) => c,
                Err(RecvTimeoutError::Timeout) => return Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => return Flow::Stop,
            },
            None => match self.commands.recv() {
                Ok(c) => c,
                Err(_) => return Flow::Stop,
            },
        };
        if matches!(command, VcpuCommand::Wake) {
            return Flow::Continue; // This wake ends this idle; it is not kept for the next.
        }
        self.obey(command)
    }

    fn obey(&mut self, command: VcpuCommand) -> Flow {
        match command {
            VcpuCommand::Stop => Flow::Stop,
            VcpuCommand::Wake => {
                self.wake_pending = true;
                Flow::Continue
            }
            VcpuCommand::Resume => Flow::Continue,
            VcpuCommand::Pause => self.paused(),
            VcpuCommand::SaveState(reply) => {
                let _ = reply.send(Err(VcpuStateError::NotPaused { index: self.index }));
                Flow::Continue
            }
        }
    }

    /// Completes the port or MMIO access the last exit reported, without running any
    /// further guest instruction. KVM finishes such an access (stores the value a read
    /// returned, moves `rip` past the instruction) only on the next `KVM_RUN`; entering
    /// with `immediate_exit` set does that and returns at once. Without this, a state
    /// saved now would replay or lose the access.
    fn complete_pending_io(&mut self) {
        // A string instruction (`rep ins/outs`) or an access KVM splits completes one
        // piece per entry and exits again for the next: serve each through the bus, as
        // the run loop would, until KVM reports that nothing is left (EINTR).
        for _ in 0..MAX_PENDING_IO_PIECES {
            self.fd.set_kvm_immediate_exit(1);
            let exit = match self.fd.run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
                Ok(VcpuExit::IoOut(port, data)) => {
                    let _ = self.pio.write(port as u64, data);
                    Some(())
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !self.pio.read(port as u64, data) {
                        data.fill(0xff);
                    }
                    Some(())
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !self.mmio.read(addr, data) {
                        data.fill(0xff);
                    }
                    Some(())
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let _ = self.mmio.write(addr, data);
                    Some(())
                }
                other => {
                    tracing::debug!(
                        vcpu = self.index,
                        result = ?other.map(|exit| exit_name(&exit)),
                        "completing pending I/O returned an unexpected exit"
                    );
                    None
                }
            };
            if exit.is_none() {
                break;
            }
        }
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Outside `KVM_RUN`, blocked until told to resume or stop; answers state requests.
    fn paused(&mut self) -> Flow {
        self.complete_pending_io();
        self.host
            .vcpu_state_changed(self.index, VcpuRunState::Paused);
        loop {
            match self.commands.recv() {
                Ok(VcpuCommand::Resume) => {
                    self.host
                        .vcpu_state_changed(self.index, VcpuRunState::Running);
                    return Flow::Continue;
                }
                Ok(VcpuCommand::SaveState(reply)) => {
                    let _ = reply.send(VcpuState::save(&self.fd, self.index));
                }
                Ok(VcpuCommand::Stop) | Err(_) => return Flow::Stop,
                Ok(VcpuCommand::Pause) | Ok(VcpuCommand::Wake) => {}
            }
        }
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Exception => "unexpected exception exit",
        VcpuExit::Debug(_) => "unexpected debug exit",
        VcpuExit::Unknown => "unknown exit",
        VcpuExit::Unsupported(_) => "exit reason this KVM crate does not know",
        _ => "unexpected exit",
    }
}

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// A deadline `timeout` from now, saturating far in the future.
pub fn deadline_after(timeout: Duration) -> Instant {
    Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365))
}
