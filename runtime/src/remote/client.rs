//! The client side of remote control: a connection to one `luvisor serve` host, with a
//! typed method per request. `hv.connect` (in `luvisor-lua`) is built on it, and Rust
//! tests use it directly.
//!
//! A call whose connection fails returns the error; the connection is then dropped and
//! the next call opens a new one (a host that restarted is reached again; its VMs have
//! new ids, so old handles get "no longer exists").

use std::path::Path;
use std::time::{Duration, Instant};

use super::protocol::*;
use super::KIND_CONTROL_HELLO;
use crate::migration::{ChannelError, MigrationProgress, PeerKey, SecureChannel};

/// How much longer than a request's own wait the client waits for its answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);
/// A connection unused for this long is replaced before the next call: hosts close idle
/// connections after [`IDLE_TIMEOUT`](super::handler::IDLE_TIMEOUT), which is longer, so
/// a call never goes out on a connection the host already closed for idling.
const RECONNECT_AFTER_IDLE: Duration = Duration::from_secs(30 * 60);
const _: () = assert!(RECONNECT_AFTER_IDLE.as_secs() < super::handler::IDLE_TIMEOUT.as_secs());

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("cannot open a control connection to host {addr}")]
    Connect {
        addr: String,
        #[source]
        source: ChannelError,
    },
    #[error("host {addr} refused the control connection: {reason}")]
    Refused { addr: String, reason: String },
    #[error("host {addr} speaks control protocol version {version}; this luvisor speaks {CONTROL_VERSION}")]
    Version { addr: String, version: u32 },
    #[error("the control connection to host {addr} failed (the next call reconnects)")]
    Channel {
        addr: String,
        #[source]
        source: ChannelError,
    },
    #[error("host {addr} sent an answer this luvisor cannot read: {reason}")]
    Protocol { addr: String, reason: String },
    #[error("host {addr}: {message}")]
    Remote {
        addr: String,
        kind: FailureKind,
        message: String,
    },
    #[error("{what} of {len} bytes is more than the {max} a request to host {addr} may carry")]
    TooLarge {
        addr: String,
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("interrupted while waiting for {what} of vm '{vm}' on host {addr}")]
    Cancelled {
        addr: String,
        vm: String,
        what: &'static str,
    },
}

impl RemoteError {
    /// The kind of a failure the host reported; `None` for errors on this side.
    pub fn failure_kind(&self) -> Option<FailureKind> {
        match self {
            RemoteError::Remote { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// What a migration asks, from the client's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateOptions {
    pub key_file: Option<String>,
    pub max_downtime: Duration,
    pub timeout: Duration,
    pub auto_converge: bool,
}

/// `max_downtime` when a script gives none.
pub const DEFAULT_MAX_DOWNTIME: Duration = Duration::from_millis(300);
/// `timeout` of a migration when a script gives none.
pub const DEFAULT_MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

impl Default for MigrateOptions {
    fn default() -> MigrateOptions {
        MigrateOptions {
            key_file: None,
            max_downtime: DEFAULT_MAX_DOWNTIME,
            timeout: DEFAULT_MIGRATE_TIMEOUT,
            auto_converge: false,
        }
    }
}

/// A control connection to one host.
pub struct RemoteHost {
    addr: String,
    key: PeerKey,
    timeout: Duration,
    /// `None` after a failure: the next call connects again.
    channel: Option<SecureChannel>,
    /// The host's name, from its welcome.
    name: String,
    next_id: u64,
    /// When the connection last carried a call.
    last_used: Instant,
}

impl std::fmt::Debug for RemoteHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteHost")
            .field("addr", &self.addr)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl RemoteHost {
    /// Connects to the host at `addr` with the key in `key_file`. `timeout` bounds the
    /// connection and every answer (waits add their own time to it).
    pub fn connect_with_key_file(
        addr: &str,
        key_file: &Path,
        timeout: Duration,
    ) -> Result<RemoteHost, RemoteError> {
        let key = PeerKey::from_file(key_file).map_err(|source| RemoteError::Connect {
            addr: addr.to_string(),
            source,
        })?;
        RemoteHost::connect(addr, key, timeout)
    }

    /// Connects to the host at `addr`, authenticating with `key`.
    pub fn connect(addr: &str, key: PeerKey, timeout: Duration) -> Result<RemoteHost, RemoteError> {
        let mut host = RemoteHost {
            addr: addr.to_string(),
            key,
            timeout,
            channel: None,
            name: String::new(),
            next_id: 1,
            last_used: Instant::now(),
        };
        host.open()?;
        Ok(host)
    }

    /// The address this client connects to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The host's name (its hostname), as it said when this client last connected.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Opens the channel and checks the host's welcome.
    fn open(&mut self) -> Result<(), RemoteError> {
        let connect_error = |source| RemoteError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let mut channel =
            SecureChannel::connect(&self.addr, &self.key, self.timeout).map_err(connect_error)?;
        let hello = encode(&Hello {
            version: CONTROL_VERSION,
        })
        .map_err(|reason| self.protocol(reason))?;
        channel
            .send(KIND_CONTROL_HELLO, &hello)
            .map_err(connect_error)?;
        let (kind, payload) = channel.recv().map_err(connect_error)?;
        if kind != KIND_CONTROL_HELLO {
            return Err(self.protocol(format!(
                "its first frame has kind {kind}, not the control welcome ({KIND_CONTROL_HELLO})"
            )));
        }
        let welcome: Welcome = decode(&payload).map_err(|reason| {
            self.protocol(format!(
                "its welcome does not decode ({reason}); it may speak another control protocol"
            ))
        })?;
        let info = welcome.map_err(|reason| RemoteError::Refused {
            addr: self.addr.clone(),
            reason,
        })?;
        if info.version != CONTROL_VERSION {
            return Err(RemoteError::Version {
                addr: self.addr.clone(),
                version: info.version,
            });
        }
        self.name = info.host;
        self.channel = Some(channel);
        Ok(())
    }

    fn protocol(&self, reason: impl Into<String>) -> RemoteError {
        RemoteError::Protocol {
            addr: self.addr.clone(),
            reason: reason.into(),
        }
    }

    /// Sends `request` and returns the host's reply; `wait` is how long the host may
    /// take beyond the usual answer time.
    pub fn call(&mut self, request: Request, wait: Duration) -> Result<Reply, RemoteError> {
        self.call_with_progress(request, wait, None)
    }

    /// [`RemoteHost::call`] for a request that may get progress frames before its
    /// response (a migrate request that asked for them): `on_progress` gets the newest
    /// report whenever no further frame waits. Reports that a newer one already
    /// follows are skipped, and none is given once the response is there, so a slow
    /// `on_progress` never works through a backlog of stale reports (nor delays the
    /// answer by it). A
    /// progress frame for another request, or for a call without `on_progress`, is a
    /// protocol error. The whole exchange, progress included, must end within the time
    /// [`RemoteHost::call`] allows for the answer.
    fn call_with_progress(
        &mut self,
        request: Request,
        wait: Duration,
        mut on_progress: Option<&mut dyn FnMut(&MigrationProgress)>,
    ) -> Result<Reply, RemoteError> {
        let id = self.next_id;
        self.next_id += 1;
        let payload = encode(&RequestFrame { id, request }).map_err(|r| self.protocol(r))?;
        let read_timeout = self
            .timeout
            .saturating_add(wait)
            .saturating_add(ANSWER_MARGIN);
        let addr = self.addr.clone();
        let channel_error = |source| RemoteError::Channel {
            addr: addr.clone(),
            source,
        };
        if self.last_used.elapsed() > RECONNECT_AFTER_IDLE {
            self.drop_channel();
        }
        if self.channel.is_none() {
            self.open()?;
        }
        self.last_used = Instant::now();
        let Some(channel) = self.channel.as_mut() else {
            return Err(self.protocol("no connection after connecting"));
        };
        let deadline = Instant::now().checked_add(read_timeout);
        let mut exchanged = channel.send(KIND_CONTROL_REQUEST, &payload);
        let (kind, answer) = loop {
            let remaining = deadline.map_or(read_timeout, |d| {
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            });
            let frame = exchanged
                .and_then(|()| channel.set_read_timeout(Some(remaining)))
                .and_then(|()| channel.recv());
            let (kind, answer) = match frame {
                Ok(frame) => frame,
                Err(e) => {
                    self.drop_channel();
                    return Err(channel_error(e));
                }
            };
            if kind != KIND_CONTROL_PROGRESS {
                break (kind, answer);
            }
            let progress = match (&mut on_progress, decode::<ProgressFrame>(&answer)) {
                (Some(f), Ok(frame)) if frame.id == id => {
                    // A frame waiting already is a newer report or the response, which
                    // makes this one stale: skip it, and report only when the stream has
                    // caught up.
                    if !channel.has_input() {
                        f(&frame.progress);
                    }
                    Ok(())
                }
                (Some(_), Ok(frame)) => Err(format!(
                    "progress of request {} came during request {id}",
                    frame.id
                )),
                (Some(_), Err(reason)) => {
                    Err(format!("a progress frame does not decode: {reason}"))
                }
                (None, _) => Err(format!(
                    "progress came for request {id}, which did not ask for it"
                )),
            };
            if let Err(reason) = progress {
                self.drop_channel();
                return Err(self.protocol(reason));
            }
            exchanged = Ok(());
        };
        let response = if kind == KIND_CONTROL_RESPONSE {
            decode::<ResponseFrame>(&answer)
        } else {
            Err(format!("a frame of kind {kind} instead of a response"))
        };
        let response = match response {
            Ok(response) if response.id == id => response,
            Ok(response) => {
                self.drop_channel();
                return Err(self.protocol(format!(
                    "the answer to request {} came for request {id}",
                    response.id
                )));
            }
            Err(reason) => {
                // The stream may be out of step now: start afresh next time.
                self.drop_channel();
                return Err(self.protocol(reason));
            }
        };
        response.result.map_err(|failure| RemoteError::Remote {
            addr: self.addr.clone(),
            kind: failure.kind,
            message: failure.message,
        })
    }

    /// Breaks the connection under the client, as a network failure would.
    #[cfg(test)]
    pub(crate) fn break_connection(&self) {
        if let Some(channel) = &self.channel {
            channel.shutdown();
        }
    }

    fn drop_channel(&mut self) {
        if let Some(channel) = self.channel.take() {
            channel.shutdown();
        }
    }

    fn call_quick(&mut self, request: Request) -> Result<Reply, RemoteError> {
        self.call(request, Duration::ZERO)
    }

    fn unexpected(&self, reply: Reply, wanted: &str) -> RemoteError {
        self.protocol(format!("it answered {reply:?} where {wanted} was due"))
    }

    pub fn host_info(&mut self) -> Result<HostReport, RemoteError> {
        match self.call_quick(Request::HostInfo)? {
            Reply::Host(report) => Ok(report),
            other => Err(self.unexpected(other, "a host report")),
        }
    }

    pub fn list_vms(&mut self) -> Result<Vec<VmInfo>, RemoteError> {
        match self.call_quick(Request::ListVms)? {
            Reply::Vms(vms) => Ok(vms),
            other => Err(self.unexpected(other, "a list of VMs")),
        }
    }

    pub fn find_vm(&mut self, name: &str) -> Result<VmInfo, RemoteError> {
        self.check("a vm name", name.len(), MAX_TEXT)?;
        self.vm_reply(Request::FindVm {
            name: name.to_string(),
        })
    }

    pub fn vm_info(&mut self, vm: &VmRef) -> Result<VmInfo, RemoteError> {
        self.vm_reply(Request::VmInfo { vm: vm.clone() })
    }

    fn vm_reply(&mut self, request: Request) -> Result<VmInfo, RemoteError> {
        match self.call_quick(request)? {
            Reply::Vm(info) => Ok(info),
            other => Err(self.unexpected(other, "a VM")),
        }
    }

    fn done(&mut self, request: Request) -> Result<(), RemoteError> {
        match self.call_quick(request)? {
            Reply::Done => Ok(()),
            other => Err(self.unexpected(other, "done")),
        }
    }

    pub fn start(&mut self, vm: &VmRef) -> Result<(), RemoteError> {
        self.done(Request::Start { vm: vm.clone() })
    }

    pub fn pause(&mut self, vm: &VmRef) -> Result<(), RemoteError> {
        self.done(Request::Pause { vm: vm.clone() })
    }

    pub fn resume(&mut self, vm: &VmRef) -> Result<(), RemoteError> {
        self.done(Request::Resume { vm: vm.clone() })
    }

    pub fn stop(&mut self, vm: &VmRef) -> Result<(), RemoteError> {
        self.done(Request::Stop { vm: vm.clone() })
    }

    pub fn send(&mut self, vm: &VmRef, bytes: &[u8]) -> Result<(), RemoteError> {
        self.check("serial input", bytes.len(), MAX_INPUT)?;
        self.done(Request::Send {
            vm: vm.clone(),
            bytes: bytes.to_vec(),
        })
    }

    pub fn console(&mut self, vm: &VmRef) -> Result<String, RemoteError> {
        match self.call_quick(Request::Console { vm: vm.clone() })? {
            Reply::Console(text) => Ok(text),
            other => Err(self.unexpected(other, "console text")),
        }
    }

    /// `vm:wait_for_console`: waits on the host in slices of [`WAIT_SLICE`], calling
    /// `cancel` between them.
    pub fn wait_for_console(
        &mut self,
        vm: &VmRef,
        pattern: &str,
        after: u64,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(String, u64), RemoteError> {
        self.check("a console pattern", pattern.len(), MAX_PATTERN)?;
        let reply = self.sliced(vm, "console output", timeout, cancel, |slice| {
            Request::WaitForConsole {
                vm: vm.clone(),
                pattern: pattern.to_string(),
                after,
                timeout_ms: millis(slice),
                overall_timeout_ms: millis(timeout),
            }
        })?;
        match reply {
            Reply::ConsoleMatch { line, end } => Ok((line, end)),
            other => Err(self.unexpected(other, "a console match")),
        }
    }

    /// `vm:wait`: (exit code, state, reason).
    pub fn wait(
        &mut self,
        vm: &VmRef,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<(Option<u32>, String, Option<String>), RemoteError> {
        let reply = self.sliced(vm, "the guest to end", timeout, cancel, |slice| {
            Request::Wait {
                vm: vm.clone(),
                timeout_ms: millis(slice),
                overall_timeout_ms: millis(timeout),
            }
        })?;
        match reply {
            Reply::Ended {
                exit_code,
                state,
                reason,
            } => Ok((exit_code, state, reason)),
            other => Err(self.unexpected(other, "how the VM ended")),
        }
    }

    /// Asks `request(slice)` until it does not time out or `timeout` has passed; stops
    /// early, between slices, when `cancel` says so.
    fn sliced(
        &mut self,
        vm: &VmRef,
        what: &'static str,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
        request: impl Fn(Duration) -> Request,
    ) -> Result<Reply, RemoteError> {
        let deadline = Instant::now().checked_add(timeout);
        loop {
            if cancel() {
                return Err(RemoteError::Cancelled {
                    addr: self.addr.clone(),
                    vm: vm.name.clone(),
                    what,
                });
            }
            let remaining = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let slice = remaining.min(WAIT_SLICE);
            match self.call(request(slice), slice) {
                Err(e) if e.failure_kind() == Some(FailureKind::TimedOut) && remaining > slice => {
                    continue
                }
                other => return other,
            }
        }
    }

    pub fn memory(&mut self, vm: &VmRef) -> Result<MemoryReport, RemoteError> {
        match self.call_quick(Request::Memory { vm: vm.clone() })? {
            Reply::Memory(report) => Ok(report),
            other => Err(self.unexpected(other, "a memory report")),
        }
    }

    /// `vm.memory:set_target`: (applied, clamped).
    pub fn set_memory_target(
        &mut self,
        vm: &VmRef,
        target: u64,
        reason: &str,
    ) -> Result<(u64, bool), RemoteError> {
        self.check("a reason", reason.len(), MAX_TEXT)?;
        match self.call_quick(Request::SetMemoryTarget {
            vm: vm.clone(),
            target,
            reason: reason.to_string(),
        })? {
            Reply::TargetSet { applied, clamped } => Ok((applied, clamped)),
            other => Err(self.unexpected(other, "the target set")),
        }
    }

    pub fn set_memory_stats_period(
        &mut self,
        vm: &VmRef,
        period: Duration,
    ) -> Result<(), RemoteError> {
        self.done(Request::SetMemoryStatsPeriod {
            vm: vm.clone(),
            period_ms: millis(period),
        })
    }

    /// Reads `len` bytes of guest memory at `gpa`, in chunks of [`MAX_MEMORY_CHUNK`].
    pub fn read_memory(&mut self, vm: &VmRef, gpa: u64, len: u64) -> Result<Vec<u8>, RemoteError> {
        let mut out = Vec::with_capacity(len.min(MAX_MEMORY_CHUNK) as usize);
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(MAX_MEMORY_CHUNK);
            match self.call_quick(Request::ReadMemory {
                vm: vm.clone(),
                gpa: gpa.saturating_add(done),
                len: chunk,
            })? {
                Reply::Bytes(bytes) if bytes.len() as u64 == chunk => out.extend_from_slice(&bytes),
                other => return Err(self.unexpected(other, "the bytes read")),
            }
            done += chunk;
        }
        Ok(out)
    }

    /// Writes `bytes` into guest memory at `gpa`, in chunks of [`MAX_MEMORY_CHUNK`].
    pub fn write_memory(&mut self, vm: &VmRef, gpa: u64, bytes: &[u8]) -> Result<(), RemoteError> {
        for (i, chunk) in bytes.chunks(MAX_MEMORY_CHUNK as usize).enumerate() {
            self.done(Request::WriteMemory {
                vm: vm.clone(),
                gpa: gpa.saturating_add(i as u64 * MAX_MEMORY_CHUNK),
                bytes: chunk.to_vec(),
            })?;
        }
        Ok(())
    }

    /// `hv.policy.status()` of the host, as JSON.
    pub fn policies(&mut self) -> Result<serde_json::Value, RemoteError> {
        let reply = self.call_quick(Request::Policies)?;
        self.json(reply)
    }

    /// Asks the host to live-migrate `vm` to `addr`; the migration's report
    /// ([`MigrationReport::to_json`](crate::migration::MigrationReport::to_json)).
    /// With `on_progress`, the host streams the migration's progress while it runs
    /// (at most one report per pass and per [`PROGRESS_INTERVAL`], and always the
    /// final pass's), and `on_progress` gets the newest whenever it has caught up with
    /// what arrived, before this returns; none once the response is there.
    pub fn migrate(
        &mut self,
        vm: &VmRef,
        addr: &str,
        options: &MigrateOptions,
        on_progress: Option<&mut dyn FnMut(&MigrationProgress)>,
    ) -> Result<serde_json::Value, RemoteError> {
        self.check("a destination address", addr.len(), MAX_TEXT)?;
        if let Some(path) = &options.key_file {
            self.check("a key file path", path.len(), MAX_TEXT)?;
        }
        let reply = self.call_with_progress(
            Request::Migrate {
                vm: vm.clone(),
                addr: addr.to_string(),
                key_file: options.key_file.clone(),
                max_downtime_ms: millis(options.max_downtime),
                timeout_ms: millis(options.timeout),
                auto_converge: options.auto_converge,
                progress: on_progress.is_some(),
            },
            options.timeout,
            on_progress,
        )?;
        self.json(reply)
    }

    /// `vm.health`, `vm.agent` and `vm:time_drift_ms()`.
    pub fn agent(&mut self, vm: &VmRef) -> Result<AgentReport, RemoteError> {
        match self.call_quick(Request::Agent { vm: vm.clone() })? {
            Reply::Agent(report) => Ok(report),
            other => Err(self.unexpected(other, "an agent report")),
        }
    }

    /// `vm.kvp.host:set(key, value)`.
    pub fn kvp_host_set(&mut self, vm: &VmRef, key: &str, value: &str) -> Result<(), RemoteError> {
        self.check("a key", key.len(), MAX_TEXT)?;
        self.check("a value", value.len(), MAX_TEXT)?;
        self.done(Request::KvpHostSet {
            vm: vm.clone(),
            key: key.to_string(),
            value: value.to_string(),
        })
    }

    /// `vm.kvp.host:delete(key)`: whether it was set.
    pub fn kvp_host_delete(&mut self, vm: &VmRef, key: &str) -> Result<bool, RemoteError> {
        self.check("a key", key.len(), MAX_TEXT)?;
        match self.call_quick(Request::KvpHostDelete {
            vm: vm.clone(),
            key: key.to_string(),
        })? {
            Reply::Deleted(deleted) => Ok(deleted),
            other => Err(self.unexpected(other, "whether the key was set")),
        }
    }

    /// Every key the host (`guest` false) or the guest published.
    pub fn kvp_list(
        &mut self,
        vm: &VmRef,
        guest: bool,
    ) -> Result<Vec<(String, String)>, RemoteError> {
        match self.call_quick(Request::KvpList {
            vm: vm.clone(),
            guest,
        })? {
            Reply::Pairs(pairs) => Ok(pairs),
            other => Err(self.unexpected(other, "key-value pairs")),
        }
    }

    /// `vm.kvp.guest:wait(key, { value, timeout })`: the key's value.
    pub fn wait_for_guest_kvp(
        &mut self,
        vm: &VmRef,
        key: &str,
        value: Option<&str>,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<String, RemoteError> {
        self.check("a key", key.len(), MAX_TEXT)?;
        self.check("a value", value.map_or(0, str::len), MAX_TEXT)?;
        let reply = self.sliced(vm, "a guest key", timeout, cancel, |slice| {
            Request::WaitForGuestKvp {
                vm: vm.clone(),
                key: key.to_string(),
                value: value.map(str::to_string),
                timeout_ms: millis(slice),
                overall_timeout_ms: millis(timeout),
            }
        })?;
        match reply {
            Reply::Value(value) => Ok(value),
            other => Err(self.unexpected(other, "a key's value")),
        }
    }

    /// `vm:exec(command, { timeout })`; `timeout` at most [`MAX_AGENT_WAIT`].
    pub fn exec(
        &mut self,
        vm: &VmRef,
        command: &str,
        timeout: Duration,
    ) -> Result<crate::agent::ExecResult, RemoteError> {
        self.check("a command", command.len(), MAX_TEXT)?;
        let timeout = timeout.min(MAX_AGENT_WAIT);
        let reply = self.call(
            Request::Exec {
                vm: vm.clone(),
                command: command.to_string(),
                timeout_ms: millis(timeout),
            },
            timeout,
        )?;
        match reply {
            Reply::Exec(result) => Ok(result),
            other => Err(self.unexpected(other, "an exec result")),
        }
    }

    /// `vm:shutdown{ timeout }`; `timeout` at most [`MAX_AGENT_WAIT`].
    pub fn shutdown(
        &mut self,
        vm: &VmRef,
        timeout: Duration,
    ) -> Result<ShutdownReport, RemoteError> {
        let timeout = timeout.min(MAX_AGENT_WAIT);
        let reply = self.call(
            Request::Shutdown {
                vm: vm.clone(),
                timeout_ms: millis(timeout),
            },
            timeout,
        )?;
        match reply {
            Reply::Shutdown(report) => Ok(report),
            other => Err(self.unexpected(other, "how the VM was shut down")),
        }
    }

    fn json(&self, reply: Reply) -> Result<serde_json::Value, RemoteError> {
        match reply {
            Reply::Json(text) => serde_json::from_str(&text)
                .map_err(|e| self.protocol(format!("its JSON does not parse: {e}"))),
            other => Err(self.unexpected(other, "JSON")),
        }
    }

    fn check(&self, what: &'static str, len: usize, max: usize) -> Result<(), RemoteError> {
        if len > max {
            return Err(RemoteError::TooLarge {
                addr: self.addr.clone(),
                what,
                len,
                max,
            });
        }
        Ok(())
    }
}
