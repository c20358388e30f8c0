//! The host side of remote control: serves one authenticated connection's requests
//! against this process's [`Registry`].
//!
//! The host's accept loop (`luvisor serve --listen`) hands every channel whose first frame
//! has kind [`KIND_CONTROL_HELLO`] to the function [`control_handler`] returns; that
//! function serves the connection on a thread of its own and returns at once.
//!
//! What the runtime cannot do itself comes in through [`ControlHooks`]: the policy
//! engine's status (the engine lives in `luvisor-lua`) and live migration.

use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::protocol::*;
use super::KIND_CONTROL_HELLO;
use crate::host::HostInfo;
use crate::migration::{ChannelError, MigrationError, MigrationProgress, SecureChannel};
use crate::registry::{Registry, VmId};
use crate::vm::{describe_outcome, Vm, VmOutcome, WaitError};

/// Returns `hv.policy.status()` of this host as JSON: a list of status objects.
pub type PolicyStatusProvider = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// What a `Migrate` request asks of the migration code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateParams {
    /// The destination host.
    pub addr: String,
    /// The key file on this host to authenticate to the destination with; `None`: the
    /// key this host serves with.
    pub key_file: Option<PathBuf>,
    pub max_downtime: Duration,
    pub timeout: Duration,
    pub auto_converge: bool,
}

/// Live-migrates `vm` as `params` say, calling the progress callback before each pass
/// over memory (it never waits for the client); returns the migration's report (any
/// JSON object; the client shows it as a Lua table) or the error.
pub type MigrateHook = Arc<
    dyn Fn(
            &Arc<Vm>,
            &MigrateParams,
            &mut dyn FnMut(&MigrationProgress),
        ) -> Result<serde_json::Value, Box<dyn std::error::Error>>
        + Send
        + Sync,
>;

/// The migrate hook a `serve` host uses: [`Vm::migrate`](crate::Vm::migrate) to
/// `params.addr`, authenticated with `params.key_file`, or with `serve_key` (the key
/// the host serves with) when the request names none. A key that cannot be read fails
/// like any migration that could not begin (`cannot migrate vm 'x' to ADDR (it goes on
/// running here): ...`).
pub fn migrate_hook(serve_key: Option<crate::migration::PeerKey>) -> MigrateHook {
    Arc::new(
        move |vm: &Arc<Vm>,
              params: &MigrateParams,
              progress: &mut dyn FnMut(&MigrationProgress)| {
            let key = match (&params.key_file, &serve_key) {
                (Some(path), _) => {
                    crate::migration::PeerKey::from_file(path).map_err(MigrationError::Key)
                }
                (None, Some(key)) => Ok(key.clone()),
                (None, None) => Err(MigrationError::NoKey),
            };
            let key = key.map_err(|e| vm.migration_not_begun(&params.addr, e))?;
            let mut options = crate::migration::MigrateOptions::new(key);
            options.max_downtime = params.max_downtime;
            options.timeout = params.timeout;
            options.auto_converge = params.auto_converge;
            let report = vm.migrate(&params.addr, &options, progress)?;
            Ok(report.to_json())
        },
    )
}

/// Carries a migration's progress from the migration, which must never wait for the
/// client (its final pass runs with the VM paused), to the thread that sends it on the
/// control connection: the newest report waits in a one-place slot (a newer one
/// replaces it), and the sender sends at most one per [`PROGRESS_INTERVAL`]. So the
/// client gets at most one report per pass and per interval, and always the last one.
#[derive(Default)]
struct ProgressRelay {
    state: Mutex<RelayState>,
    changed: Condvar,
}

#[derive(Default)]
struct RelayState {
    newest: Option<MigrationProgress>,
    /// The migration is over: send what waits, then stop.
    finished: bool,
}

impl ProgressRelay {
    fn lock(&self) -> MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The migration's side: `progress` is the newest report.
    fn push(&self, progress: &MigrationProgress) {
        self.lock().newest = Some(progress.clone());
        self.changed.notify_all();
    }

    fn finish(&self) {
        self.lock().finished = true;
        self.changed.notify_all();
    }

    /// The next report to send: waits for one, and until `not_before` unless the
    /// migration is over. `None` once it is over and nothing waits.
    fn next(&self, not_before: Instant) -> Option<MigrationProgress> {
        let mut state = self.lock();
        loop {
            let now = Instant::now();
            if state.newest.is_some() && (state.finished || now >= not_before) {
                return state.newest.take();
            }
            if state.finished {
                return None;
            }
            state = if state.newest.is_some() {
                self.changed
                    .wait_timeout(state, not_before - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            } else {
                self.changed.wait(state).unwrap_or_else(|p| p.into_inner())
            };
        }
    }

    /// The sender's side: sends the reports of request `id` on `channel` until the
    /// migration is over. Stops at the first failed send, and returns false then: that
    /// send may have left part of a frame on the connection, so no response can follow
    /// it and the connection must close.
    fn forward(&self, id: u64, channel: &mut SecureChannel) -> bool {
        let mut not_before = Instant::now();
        while let Some(progress) = self.next(not_before) {
            let bytes = match encode(&ProgressFrame { id, progress }) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!(error = e, "cannot encode a progress frame");
                    continue;
                }
            };
            if let Err(e) = channel.send(KIND_CONTROL_PROGRESS, &bytes) {
                tracing::warn!(peer = channel.peer(), error = %e, "cannot send migration progress");
                return false;
            }
            not_before = Instant::now() + PROGRESS_INTERVAL;
        }
        true
    }
}

/// Runs `work` (a migration, which pushes its reports into the relay) while `send`
/// forwards them from a thread of its own; returns what `work` returned and what `send`
/// returned (`None` when its thread could not start: the work goes on without
/// progress). Every report is sent before this returns.
fn with_relay<R, S: Send>(
    send: impl FnOnce(&ProgressRelay) -> S + Send,
    work: impl FnOnce(&ProgressRelay) -> R,
) -> (R, Option<S>) {
    let relay = ProgressRelay::default();
    std::thread::scope(|scope| {
        let relay = &relay;
        // The sender waits in `next` until the relay is finished, and the scope waits
        // for the sender: finishing from a guard means that a panic in `work` (or in
        // anything after it) ends the sender too, and the panic reaches the caller
        // instead of the scope waiting forever.
        let finish = FinishOnDrop(relay);
        let sender = std::thread::Builder::new()
            .name("control-progress".into())
            .spawn_scoped(scope, move || send(relay));
        if let Err(e) = &sender {
            tracing::warn!(error = %e, "cannot start the progress thread; the migration goes on without progress");
        }
        let result = work(relay);
        drop(finish);
        // Every report is sent before the response.
        let sent = sender.ok().and_then(|sender| sender.join().ok());
        (result, sent)
    })
}

/// Finishes a [`ProgressRelay`] when dropped, on every way out.
struct FinishOnDrop<'a>(&'a ProgressRelay);

impl Drop for FinishOnDrop<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// What the host adds to the runtime's own answers. `None` fields answer: no policies
/// (an empty list), and "migration is not available on this host".
#[derive(Clone, Default)]
pub struct ControlHooks {
    pub policies: Option<PolicyStatusProvider>,
    pub migrate: Option<MigrateHook>,
}

/// How many control connections one host serves at once; more are refused in the
/// welcome.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection that sends no request for this long is closed (the client reconnects
/// on its next call).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// Serves control connections for one registry.
pub struct ControlServer {
    registry: Arc<Registry>,
    hooks: ControlHooks,
    host_name: String,
    connections: AtomicUsize,
}

/// The handler the host's accept loop calls with each control channel (after it read
/// the hello frame). It serves the connection on a thread of its own and returns at once.
///
/// `luvisor serve --listen` builds it once at startup through
/// `luvisor_lua::remote::control_handler(&registry)` (which adds the policy status
/// provider) and puts it in `ServerHandlers::control`.
pub fn control_handler(
    registry: Arc<Registry>,
    hooks: ControlHooks,
) -> Arc<dyn Fn(SecureChannel) + Send + Sync> {
    let server = ControlServer::new(registry, hooks);
    Arc::new(move |channel: SecureChannel| server.spawn(channel))
}

impl ControlServer {
    pub fn new(registry: Arc<Registry>, hooks: ControlHooks) -> Arc<ControlServer> {
        Arc::new(ControlServer {
            registry,
            hooks,
            host_name: host_name(),
            connections: AtomicUsize::new(0),
        })
    }

    /// Serves `channel` on a new thread.
    pub fn spawn(self: &Arc<Self>, channel: SecureChannel) {
        let server = self.clone();
        let peer = channel.peer().to_string();
        let spawned = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || server.serve(channel));
        if let Err(e) = spawned {
            tracing::error!(peer, error = %e, "cannot start a control connection thread");
        }
    }

    /// Serves one connection until the peer closes it, it fails, or it idles for
    /// [`IDLE_TIMEOUT`]. Never panics on what the peer sends.
    pub fn serve(&self, mut channel: SecureChannel) {
        let peer = channel.peer().to_string();
        let open = self.connections.fetch_add(1, Ordering::AcqRel) + 1;
        let _count = CountGuard(&self.connections);
        let welcome: Welcome = if open > MAX_CONNECTIONS {
            tracing::warn!(peer, "control connection refused: too many");
            Err(format!(
                "host {} serves at most {MAX_CONNECTIONS} control connections at once",
                self.host_name
            ))
        } else {
            Ok(WelcomeInfo {
                version: CONTROL_VERSION,
                host: self.host_name.clone(),
            })
        };
        let refused = welcome.is_err();
        let sent = encode(&welcome)
            .map_err(|e| tracing::error!(peer, error = e))
            .ok()
            .map(|bytes| channel.send(KIND_CONTROL_HELLO, &bytes));
        if refused || !matches!(sent, Some(Ok(()))) {
            channel.shutdown();
            return;
        }
        let _ = channel.set_read_timeout(Some(IDLE_TIMEOUT));
        tracing::info!(peer, "control connection opened");
        loop {
            let response = match channel.recv() {
                Ok((KIND_CONTROL_REQUEST, payload)) => {
                    match self.handle_frame_on(&payload, &mut channel) {
                        Some(response) => response,
                        None => {
                            tracing::warn!(
                                peer,
                                "a progress frame could not be sent whole; closing the \
                                 connection instead of answering after it"
                            );
                            break;
                        }
                    }
                }
                Ok((kind, _)) => response_bytes(&ResponseFrame {
                    id: 0,
                    result: Err(Failure::new(
                        FailureKind::BadRequest,
                        format!("unexpected frame kind {kind} on a control connection"),
                    )),
                }),
                Err(ChannelError::Closed { .. }) => break,
                Err(ChannelError::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    tracing::info!(peer, "control connection idle; closing it");
                    break;
                }
                Err(e) => {
                    tracing::warn!(peer, error = %e, "control connection failed");
                    break;
                }
            };
            if let Err(e) = channel.send(KIND_CONTROL_RESPONSE, &response) {
                tracing::warn!(peer, error = %e, "cannot answer on a control connection");
                break;
            }
        }
        channel.shutdown();
        tracing::info!(peer, "control connection closed");
    }

    /// Answers one request frame's payload with a response frame's payload. Malformed
    /// input and panics in the code that serves it become failure responses. A
    /// migration's progress is not sent (there is no connection to send it on).
    pub fn handle_frame(&self, payload: &[u8]) -> Vec<u8> {
        match self.decode_request(payload) {
            Ok(frame) => self.answer(frame, &mut |_| {}),
            Err(response) => response,
        }
    }

    /// [`ControlServer::handle_frame`] for a request that came on `channel`: a
    /// migration that asked for progress sends it there, from a thread of its own
    /// ([`ProgressRelay`]), before the response. `None` when sending progress failed:
    /// part of a frame may be on the connection, so the caller closes it rather than
    /// answer (the client would read the response as the rest of that frame).
    fn handle_frame_on(&self, payload: &[u8], channel: &mut SecureChannel) -> Option<Vec<u8>> {
        let frame = match self.decode_request(payload) {
            Ok(frame) => frame,
            Err(response) => return Some(response),
        };
        if !matches!(frame.request, Request::Migrate { progress: true, .. }) {
            return Some(self.answer(frame, &mut |_| {}));
        }
        let id = frame.id;
        let (response, all_sent) = with_relay(
            move |relay| relay.forward(id, channel),
            |relay| self.answer(frame, &mut |p| relay.push(p)),
        );
        // A sender that could not start sent nothing: the stream is in step.
        (all_sent != Some(false)).then_some(response)
    }

    /// The request in a frame's payload, or the failure response to send instead.
    fn decode_request(&self, payload: &[u8]) -> Result<RequestFrame, Vec<u8>> {
        match decode::<RequestFrame>(payload) {
            Ok(frame) => Ok(frame),
            Err(e) => {
                // The id comes first, then the request's variant: answer with the id
                // when it decodes on its own, and say when the variant is one this host
                // does not know.
                let (id, rest) = postcard::take_from_bytes::<u64>(payload).unwrap_or((0, &[]));
                let variant = postcard::take_from_bytes::<u32>(rest).map(|(v, _)| v);
                let message = match variant {
                    Ok(v) if v >= REQUEST_VARIANTS => {
                        format!("unknown request #{v}; the client may be newer than this host")
                    }
                    _ => format!("malformed request: {e}"),
                };
                Err(response_bytes(&ResponseFrame {
                    id,
                    result: Err(Failure::new(FailureKind::BadRequest, message)),
                }))
            }
        }
    }

    /// Serves a decoded request: the response frame's payload. `progress` gets a
    /// migration's progress.
    fn answer(&self, frame: RequestFrame, progress: &mut dyn FnMut(&MigrationProgress)) -> Vec<u8> {
        let name = frame.request.name();
        tracing::debug!(request = name, id = frame.id, "control request");
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.dispatch(frame.request, progress)))
                .unwrap_or_else(|panic| {
                    let reason = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown".into());
                    tracing::error!(request = name, reason, "a control request panicked");
                    Err(Failure::new(
                        FailureKind::Failed,
                        format!("host error: the {name} request panicked: {reason}"),
                    ))
                });
        response_bytes(&ResponseFrame {
            id: frame.id,
            result,
        })
    }

    fn dispatch(
        &self,
        request: Request,
        progress: &mut dyn FnMut(&MigrationProgress),
    ) -> Result<Reply, Failure> {
        match request {
            Request::HostInfo => Ok(Reply::Host(self.host_report())),
            Request::ListVms => Ok(Reply::Vms(
                self.registry.list().iter().map(|vm| vm_info(vm)).collect(),
            )),
            Request::FindVm { name } => {
                check_text("vm name", &name)?;
                match self.registry.find(&name) {
                    Some(vm) => Ok(Reply::Vm(vm_info(&vm))),
                    None => {
                        let names: Vec<String> = self
                            .registry
                            .list()
                            .iter()
                            .map(|vm| vm.name().to_string())
                            .collect();
                        Err(Failure::new(
                            FailureKind::NoSuchVm,
                            if names.is_empty() {
                                format!("there is no vm named '{name}' (this host has no VMs)")
                            } else {
                                format!(
                                    "there is no vm named '{name}'; its VMs are: {}",
                                    names.join(", ")
                                )
                            },
                        ))
                    }
                }
            }
            Request::VmInfo { vm } => Ok(Reply::Vm(vm_info(&*self.resolve(&vm)?))),
            Request::Start { vm } => {
                self.resolve(&vm)?.start().map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::Pause { vm } => {
                self.resolve(&vm)?.pause().map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::Resume { vm } => {
                self.resolve(&vm)?.resume().map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::Stop { vm } => {
                self.resolve(&vm)?.stop();
                Ok(Reply::Done)
            }
            Request::Send { vm, bytes } => {
                check_len("serial input", bytes.len(), MAX_INPUT)?;
                self.resolve(&vm)?.send_input(&bytes).map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::Console { vm } => {
                let text = self.resolve(&vm)?.console().text();
                Ok(Reply::Console(newest(text, MAX_CONSOLE_REPLY)))
            }
            Request::WaitForConsole {
                vm,
                pattern,
                after,
                timeout_ms,
                overall_timeout_ms,
            } => {
                check_len("console pattern", pattern.len(), MAX_PATTERN)?;
                let timeout = wait_slice(timeout_ms)?;
                let (line, end) = self
                    .resolve(&vm)?
                    .wait_for_console(&pattern, after, timeout)
                    .map_err(|e| wait_failure(e, overall_timeout_ms))?;
                Ok(Reply::ConsoleMatch { line, end })
            }
            Request::Wait {
                vm,
                timeout_ms,
                overall_timeout_ms,
            } => {
                let timeout = wait_slice(timeout_ms)?;
                let vm = self.resolve(&vm)?;
                let outcome = vm
                    .wait(timeout)
                    .map_err(|e| wait_failure(e, overall_timeout_ms))?;
                let state = vm.state().as_str().to_string();
                Ok(match outcome {
                    VmOutcome::Exited(code) => Reply::Ended {
                        exit_code: Some(code),
                        state,
                        reason: None,
                    },
                    other => Reply::Ended {
                        exit_code: None,
                        state,
                        reason: Some(describe_outcome(Some(&other))),
                    },
                })
            }
            Request::Memory { vm } => Ok(Reply::Memory(memory_report(&*self.resolve(&vm)?))),
            Request::SetMemoryTarget { vm, target, reason } => {
                check_text("reason", &reason)?;
                let applied = self
                    .resolve(&vm)?
                    .set_memory_target(target, &reason)
                    .map_err(failed)?;
                Ok(Reply::TargetSet {
                    applied: applied.applied,
                    clamped: applied.clamped,
                })
            }
            Request::SetMemoryStatsPeriod { vm, period_ms } => {
                self.resolve(&vm)?
                    .set_memory_stats_period(Duration::from_millis(period_ms))
                    .map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::ReadMemory { vm, gpa, len } => {
                if len > MAX_MEMORY_CHUNK {
                    return Err(Failure::new(
                        FailureKind::BadRequest,
                        format!(
                            "a read of {len} bytes is more than the {MAX_MEMORY_CHUNK} one request may read"
                        ),
                    ));
                }
                let vm = self.resolve(&vm)?;
                let mut buf = vec![0u8; len as usize];
                vm.read_memory(gpa, &mut buf).map_err(failed)?;
                Ok(Reply::Bytes(buf))
            }
            Request::WriteMemory { vm, gpa, bytes } => {
                check_len("a memory write", bytes.len(), MAX_MEMORY_CHUNK as usize)?;
                self.resolve(&vm)?
                    .write_memory(gpa, &bytes)
                    .map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::Policies => {
                let statuses = match &self.hooks.policies {
                    Some(provider) => provider(),
                    None => serde_json::Value::Array(Vec::new()),
                };
                Ok(Reply::Json(statuses.to_string()))
            }
            Request::Migrate {
                vm,
                addr,
                key_file,
                max_downtime_ms,
                timeout_ms,
                auto_converge,
                progress: _,
            } => {
                check_text("destination address", &addr)?;
                if let Some(path) = &key_file {
                    check_text("key file path", path)?;
                }
                let vm = self.resolve(&vm)?;
                let Some(migrate) = &self.hooks.migrate else {
                    return Err(Failure::new(
                        FailureKind::Unavailable,
                        format!(
                            "cannot migrate vm '{}': migration is not available on this host",
                            vm.name()
                        ),
                    ));
                };
                let params = MigrateParams {
                    addr,
                    key_file: key_file.map(PathBuf::from),
                    max_downtime: Duration::from_millis(max_downtime_ms),
                    timeout: Duration::from_millis(timeout_ms),
                    auto_converge,
                };
                let report = migrate(&vm, &params, progress)
                    .map_err(|e| Failure::new(FailureKind::Failed, error_chain(e.as_ref())))?;
                Ok(Reply::Json(report.to_string()))
            }
            Request::Agent { vm } => {
                let vm = self.resolve(&vm)?;
                Ok(Reply::Agent(AgentReport {
                    health: vm.health(),
                    drift_ms: vm.time_drift_ms(),
                    stats: vm.agent_stats(),
                    agent: vm.agent_name(),
                }))
            }
            Request::KvpHostSet { vm, key, value } => {
                check_text("key", &key)?;
                check_text("value", &value)?;
                self.resolve(&vm)?
                    .kvp_host_set(&key, &value)
                    .map_err(failed)?;
                Ok(Reply::Done)
            }
            Request::KvpHostDelete { vm, key } => {
                check_text("key", &key)?;
                let deleted = self.resolve(&vm)?.kvp_host_delete(&key).map_err(failed)?;
                Ok(Reply::Deleted(deleted))
            }
            Request::KvpList { vm, guest } => {
                let vm = self.resolve(&vm)?;
                Ok(Reply::Pairs(if guest {
                    vm.kvp_guest_list()
                } else {
                    vm.kvp_host_list()
                }))
            }
            Request::WaitForGuestKvp {
                vm,
                key,
                value,
                timeout_ms,
                overall_timeout_ms,
            } => {
                check_text("key", &key)?;
                if let Some(value) = &value {
                    check_text("value", value)?;
                }
                let timeout = wait_slice(timeout_ms)?;
                let vm = self.resolve(&vm)?;
                match vm.wait_for_guest_kvp(&key, value.as_deref(), timeout) {
                    Ok(value) => Ok(Reply::Value(value)),
                    Err(crate::agent::AgentError::TimedOut { name, what, .. }) => {
                        Err(Failure::new(
                            FailureKind::TimedOut,
                            format!(
                                "timed out after {:?} waiting for vm '{name}' to {}",
                                Duration::from_millis(overall_timeout_ms),
                                what.to_do()
                            ),
                        ))
                    }
                    Err(e) => Err(failed(e)),
                }
            }
            Request::Exec {
                vm,
                command,
                timeout_ms,
            } => {
                check_text("command", &command)?;
                let timeout = agent_wait(timeout_ms)?;
                let result = self.resolve(&vm)?.exec(&command, timeout).map_err(failed)?;
                Ok(Reply::Exec(result))
            }
            Request::Shutdown { vm, timeout_ms } => {
                let timeout = agent_wait(timeout_ms)?;
                let vm = self.resolve(&vm)?;
                let outcome = vm.shutdown(timeout).map_err(failed)?;
                Ok(Reply::Shutdown(ShutdownReport::new(
                    &outcome,
                    vm.state().as_str(),
                )))
            }
        }
    }

    /// The VM `vm` names: same id and same name, or "no longer exists".
    fn resolve(&self, vm: &VmRef) -> Result<Arc<Vm>, Failure> {
        check_text("vm name", &vm.name)?;
        match self.registry.get(VmId(vm.id)) {
            Some(found) if found.name() == vm.name => Ok(found),
            _ => Err(Failure::new(
                FailureKind::NoSuchVm,
                format!("vm '{}' no longer exists", vm.name),
            )),
        }
    }

    fn host_report(&self) -> HostReport {
        let info = HostInfo::query();
        let kvm = KvmReport::query();
        HostReport {
            name: self.host_name.clone(),
            cpus: info.cpus as u64,
            memory_total: info.memory_total,
            memory_available: info.memory_available,
            memory_reserve: crate::host::memory_reserve(),
            vms_resident: self.registry.vms_resident(),
            process_rss: crate::host::process_rss(),
            process_cpu_seconds: crate::host::process_cpu_seconds(),
            kvm,
        }
    }
}

/// Decrements the connection count when a connection ends, however it ends.
struct CountGuard<'a>(&'a AtomicUsize);

impl Drop for CountGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn response_bytes(frame: &ResponseFrame) -> Vec<u8> {
    encode(frame).unwrap_or_else(|e| {
        // Cannot happen for these types; answer with something the client can read.
        tracing::error!(error = e, "cannot encode a control response");
        encode(&ResponseFrame {
            id: frame.id,
            result: Err(Failure::new(FailureKind::Failed, e)),
        })
        .unwrap_or_default()
    })
}

fn vm_info(vm: &Vm) -> VmInfo {
    let outcome = vm.outcome();
    VmInfo {
        id: vm.id().0,
        name: vm.name().to_string(),
        state: vm.state().as_str().to_string(),
        vcpus: vm.config().vcpus,
        memory_size: vm.config().memory,
        boot_time_ms: vm.boot_time().map(|d| d.as_secs_f64() * 1000.0),
        run_time_ms: vm.run_time().as_secs_f64() * 1000.0,
        exit_code: match outcome {
            Some(VmOutcome::Exited(code)) => Some(code),
            _ => None,
        },
        crash_reason: match outcome {
            Some(VmOutcome::Crashed(reason)) => Some(reason),
            _ => None,
        },
        console_offset: vm.console().total(),
        console_error: vm.console().tee_error(),
        memory_resident: vm.memory_resident(),
    }
}

fn memory_report(vm: &Vm) -> MemoryReport {
    let knobs = vm.memory_knobs();
    MemoryReport {
        size: vm.memory_size(),
        target: vm.memory_target(),
        resident: vm.memory_resident(),
        held: vm.balloon_status().held_bytes(),
        stats_period_ms: millis(vm.memory_stats_period()),
        min: knobs.min,
        max: knobs.max,
        startup: knobs.startup,
        buffer: knobs.buffer_percent,
        weight: knobs.weight,
        stats: vm
            .memory_stats()
            .map(|s| (s.stats.clone(), s.age.as_secs_f64() * 1000.0)),
    }
}

fn failed(e: impl std::error::Error) -> Failure {
    Failure::new(FailureKind::Failed, error_chain(&e))
}

/// A wait's failure; a time-out names the whole timeout the client asked for, not the
/// slice this request waited.
fn wait_failure(e: WaitError, overall_timeout_ms: u64) -> Failure {
    match e {
        WaitError::TimedOut {
            name,
            what,
            state,
            last_line,
            ..
        } => Failure::new(
            FailureKind::TimedOut,
            WaitError::TimedOut {
                name,
                what,
                timeout: Duration::from_millis(overall_timeout_ms),
                state,
                last_line,
            }
            .to_string(),
        ),
        other => failed(other),
    }
}

fn wait_slice(timeout_ms: u64) -> Result<Duration, Failure> {
    let timeout = Duration::from_millis(timeout_ms);
    if timeout > MAX_WAIT_SLICE {
        return Err(Failure::new(
            FailureKind::BadRequest,
            format!(
                "a wait of {timeout_ms} ms is longer than the {} ms one request may wait; ask again",
                MAX_WAIT_SLICE.as_millis()
            ),
        ));
    }
    Ok(timeout)
}

/// An exec's or a shutdown's timeout, at most [`MAX_AGENT_WAIT`].
fn agent_wait(timeout_ms: u64) -> Result<Duration, Failure> {
    let timeout = Duration::from_millis(timeout_ms);
    if timeout > MAX_AGENT_WAIT {
        return Err(Failure::new(
            FailureKind::BadRequest,
            format!(
                "a timeout of {timeout_ms} ms is longer than the {} ms an exec or a shutdown may wait",
                MAX_AGENT_WAIT.as_millis()
            ),
        ));
    }
    Ok(timeout)
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), Failure> {
    if len > max {
        return Err(Failure::new(
            FailureKind::BadRequest,
            format!("{what} of {len} bytes is more than the {max} one request may carry"),
        ));
    }
    Ok(())
}

fn check_text(what: &str, text: &str) -> Result<(), Failure> {
    check_len(what, text.len(), MAX_TEXT)
}

/// The last `max` bytes of `text` (at a character boundary).
fn newest(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}

pub(crate) use crate::error_chain;

/// This host's name, for the welcome and `host:info().name`.
fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into the buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "localhost".into();
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

#[cfg(test)]
mod tests;
