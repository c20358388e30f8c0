//! The remote-control protocol: what a client asks a `luvisor serve` host and what it
//! answers, on top of the authenticated [`SecureChannel`](crate::migration::SecureChannel).
//!
//! **Connection.** The client opens a channel and sends one frame of kind
//! [`KIND_CONTROL_HELLO`](super::KIND_CONTROL_HELLO) holding a [`Hello`]; the host's
//! accept loop sees that kind and hands the channel to the control handler, which answers
//! with one frame of the same kind holding a [`Welcome`] (`Ok`: the control protocol
//! version and the host's name; `Err`: why it refuses). The accept loop does not pass the
//! hello's payload on, so nothing in it may matter: the version check happens on the
//! client, against the welcome.
//!
//! **Calls.** Then the client sends [`KIND_CONTROL_REQUEST`] frames holding a
//! [`RequestFrame`] and the host answers each with one [`KIND_CONTROL_RESPONSE`] frame
//! holding a [`ResponseFrame`] with the same id. One request is outstanding at a time.
//! Only a [`Request::Migrate`] with `progress` set gets frames before its response:
//! [`KIND_CONTROL_PROGRESS`] frames holding a [`ProgressFrame`] with the request's id,
//! at most one per pass over memory and per [`PROGRESS_INTERVAL`] (the last one, of
//! the final pass, is never held back), all of them before the response.
//! Everything is postcard-encoded; a frame that does not decode gets a
//! [`FailureKind::BadRequest`] response (with the id, when the id itself decoded) and the
//! connection goes on. Enums only ever grow at the end, so an older host answers a newer
//! request with "unknown request" instead of misreading it.
//!
//! **Waits** (`wait`, `wait_for_console`) run on the host, at most [`MAX_WAIT_SLICE`] per
//! request. Clients wait longer by asking again (the Rust client does, in slices of
//! [`WAIT_SLICE`], and checks for Ctrl-C in between); `overall_timeout_ms` is the timeout
//! a final "timed out" message names.
//!
//! **Sizes** are bounded twice: the channel refuses frames over
//! [`MAX_FRAME`](crate::migration::channel::MAX_FRAME), and the host refuses fields over
//! the limits below with a `BadRequest` response. Guest memory moves in chunks of at most
//! [`MAX_MEMORY_CHUNK`]; the client splits bigger reads and writes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::vm::dynamic_memory::MemoryStats;

/// The control protocol this build speaks (in the [`Welcome`]). Version 2 changed
/// [`Request::Migrate`] in place (`auto_converge`, `progress`) and added the
/// [`KIND_CONTROL_PROGRESS`] frames. That is a change within peer protocol 3, which
/// is not released yet, so the request was changed rather than a new variant
/// appended; the version went up so that a client refuses a host of the other
/// version in the welcome instead of either misreading a migrate request.
pub const CONTROL_VERSION: u32 = 2;
/// Frame kind of a request (client → host), after the hello.
pub const KIND_CONTROL_REQUEST: u8 = 3;
/// Frame kind of a response (host → client).
pub const KIND_CONTROL_RESPONSE: u8 = 4;
/// Frame kind of a migration's progress (host → client), before the response to a
/// [`Request::Migrate`] that asked for it.
pub const KIND_CONTROL_PROGRESS: u8 = 5;
/// The host sends a migration's progress at most this often.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// Longest VM name, host address, key file path or reason a request may carry.
pub const MAX_TEXT: usize = 4096;
/// Longest console pattern.
pub const MAX_PATTERN: usize = 4096;
/// Most bytes of serial input in one request (the VM's own buffer is smaller and refuses
/// what does not fit, with its own message).
pub const MAX_INPUT: usize = 1 << 20;
/// Most guest memory read or written by one request.
pub const MAX_MEMORY_CHUNK: u64 = 4 << 20;
/// Most console text a response carries: the newest bytes of the console are sent.
pub const MAX_CONSOLE_REPLY: usize = 8 << 20;
/// The longest a host waits for one request; longer waits are several requests.
pub const MAX_WAIT_SLICE: Duration = Duration::from_secs(60);
/// How long the Rust client lets the host wait per request.
pub const WAIT_SLICE: Duration = Duration::from_secs(1);
/// The longest an exec or a shutdown may wait on the host (one request each).
pub const MAX_AGENT_WAIT: Duration = Duration::from_secs(600);

/// The client's first frame (kind [`KIND_CONTROL_HELLO`](super::KIND_CONTROL_HELLO)).
/// Informational only: the accept loop does not pass it to the handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
}

/// The host's first frame: it serves this connection, or why not.
pub type Welcome = Result<WelcomeInfo, String>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WelcomeInfo {
    /// The host's control protocol ([`CONTROL_VERSION`]).
    pub version: u32,
    /// The host's name (its hostname).
    pub host: String,
}

/// Which VM a request is about: its id on that host, and its name. A handle whose VM was
/// destroyed (even if another VM took the name since) gets "no longer exists".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef {
    pub id: u64,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestFrame {
    /// Chosen by the client; the response carries it back.
    pub id: u64,
    pub request: Request,
}

/// One call. Each names the local `hv` function or method it stands for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// `hv.host()` → [`Reply::Host`].
    HostInfo,
    /// `hv.vms()` → [`Reply::Vms`].
    ListVms,
    /// The VM named `name` → [`Reply::Vm`], or a `NoSuchVm` failure.
    FindVm { name: String },
    /// Every field of a VM handle → [`Reply::Vm`].
    VmInfo { vm: VmRef },
    /// `vm:start()` → [`Reply::Done`].
    Start { vm: VmRef },
    /// `vm:pause()` → [`Reply::Done`].
    Pause { vm: VmRef },
    /// `vm:resume()` → [`Reply::Done`].
    Resume { vm: VmRef },
    /// `vm:stop()` → [`Reply::Done`].
    Stop { vm: VmRef },
    /// `vm:send(bytes)` → [`Reply::Done`].
    Send { vm: VmRef, bytes: Vec<u8> },
    /// `vm:console()` → [`Reply::Console`].
    Console { vm: VmRef },
    /// `vm:wait_for_console(pattern, { after, timeout })` → [`Reply::ConsoleMatch`], or a
    /// `TimedOut` failure after `timeout_ms` (at most [`MAX_WAIT_SLICE`]).
    WaitForConsole {
        vm: VmRef,
        pattern: String,
        after: u64,
        timeout_ms: u64,
        overall_timeout_ms: u64,
    },
    /// `vm:wait{ timeout }` → [`Reply::Ended`], or a `TimedOut` failure.
    Wait {
        vm: VmRef,
        timeout_ms: u64,
        overall_timeout_ms: u64,
    },
    /// Every field of `vm.memory` → [`Reply::Memory`].
    Memory { vm: VmRef },
    /// `vm.memory:set_target(target, { reason })` → [`Reply::TargetSet`].
    SetMemoryTarget {
        vm: VmRef,
        target: u64,
        reason: String,
    },
    /// `vm.memory:set_stats_period(seconds)` → [`Reply::Done`].
    SetMemoryStatsPeriod { vm: VmRef, period_ms: u64 },
    /// `vm.memory:read(gpa, len)` → [`Reply::Bytes`]; `len` ≤ [`MAX_MEMORY_CHUNK`].
    ReadMemory { vm: VmRef, gpa: u64, len: u64 },
    /// `vm.memory:write(gpa, bytes)` → [`Reply::Done`].
    WriteMemory { vm: VmRef, gpa: u64, bytes: Vec<u8> },
    /// `hv.policy.status()` → [`Reply::Json`] (a list of status objects).
    Policies,
    /// Live-migrate the VM from this host to `addr` → [`Reply::Json`] (the migration's
    /// report, [`MigrationReport::to_json`](crate::migration::MigrationReport::to_json)),
    /// or an `Unavailable` failure on a host without migration.
    Migrate {
        vm: VmRef,
        /// The destination host (`luvisor serve --listen` there).
        addr: String,
        /// The key file, on the source host, to authenticate to the destination with;
        /// `None`: the key the source host serves with.
        key_file: Option<String>,
        max_downtime_ms: u64,
        timeout_ms: u64,
        /// Throttle the vCPUs of a guest that dirties memory faster than the link.
        auto_converge: bool,
        /// Send [`KIND_CONTROL_PROGRESS`] frames while the migration runs.
        progress: bool,
    },
    /// `vm.health`, `vm.agent` and `vm:time_drift_ms()` → [`Reply::Agent`].
    Agent { vm: VmRef },
    /// `vm.kvp.host:set(key, value)` → [`Reply::Done`].
    KvpHostSet {
        vm: VmRef,
        key: String,
        value: String,
    },
    /// `vm.kvp.host:delete(key)` → [`Reply::Deleted`].
    KvpHostDelete { vm: VmRef, key: String },
    /// `vm.kvp.host:list()` (`guest` false) or `vm.kvp.guest:list()` →
    /// [`Reply::Pairs`].
    KvpList { vm: VmRef, guest: bool },
    /// `vm.kvp.guest:wait(key, { value, timeout })` → [`Reply::Value`], or a `TimedOut`
    /// failure after `timeout_ms` (at most [`MAX_WAIT_SLICE`]).
    WaitForGuestKvp {
        vm: VmRef,
        key: String,
        value: Option<String>,
        timeout_ms: u64,
        overall_timeout_ms: u64,
    },
    /// `vm:exec(command, { timeout })` → [`Reply::Exec`]; `timeout_ms` at most
    /// [`MAX_AGENT_WAIT`] (an exec cannot be asked again in slices).
    Exec {
        vm: VmRef,
        command: String,
        timeout_ms: u64,
    },
    /// `vm:shutdown{ timeout }` → [`Reply::Shutdown`]; `timeout_ms` at most
    /// [`MAX_AGENT_WAIT`].
    Shutdown { vm: VmRef, timeout_ms: u64 },
}

/// How many variants [`Request`] has (a request with a higher variant comes from a newer
/// client).
pub const REQUEST_VARIANTS: u32 = 26;

impl Request {
    /// The request's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::HostInfo => "host_info",
            Request::ListVms => "list_vms",
            Request::FindVm { .. } => "find_vm",
            Request::VmInfo { .. } => "vm_info",
            Request::Start { .. } => "start",
            Request::Pause { .. } => "pause",
            Request::Resume { .. } => "resume",
            Request::Stop { .. } => "stop",
            Request::Send { .. } => "send",
            Request::Console { .. } => "console",
            Request::WaitForConsole { .. } => "wait_for_console",
            Request::Wait { .. } => "wait",
            Request::Memory { .. } => "memory",
            Request::SetMemoryTarget { .. } => "set_memory_target",
            Request::SetMemoryStatsPeriod { .. } => "set_memory_stats_period",
            Request::ReadMemory { .. } => "read_memory",
            Request::WriteMemory { .. } => "write_memory",
            Request::Policies => "policies",
            Request::Migrate { .. } => "migrate",
            Request::Agent { .. } => "agent",
            Request::KvpHostSet { .. } => "kvp_host_set",
            Request::KvpHostDelete { .. } => "kvp_host_delete",
            Request::KvpList { .. } => "kvp_list",
            Request::WaitForGuestKvp { .. } => "wait_for_guest_kvp",
            Request::Exec { .. } => "exec",
            Request::Shutdown { .. } => "shutdown",
        }
    }
}

/// A migration's progress, sent before the response to the [`Request::Migrate`] whose
/// id it carries (kind [`KIND_CONTROL_PROGRESS`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressFrame {
    pub id: u64,
    pub progress: crate::migration::MigrationProgress,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseFrame {
    /// The request's id; 0 when the request was too malformed to have one.
    pub id: u64,
    pub result: Result<Reply, Failure>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    Host(HostReport),
    Vms(Vec<VmInfo>),
    Vm(VmInfo),
    Console(String),
    /// The line that holds the match, and the console offset just past it.
    ConsoleMatch {
        line: String,
        end: u64,
    },
    /// How a VM ended (`vm:wait`): its exit code, or why it has none; and its state.
    Ended {
        exit_code: Option<u32>,
        state: String,
        reason: Option<String>,
    },
    Memory(MemoryReport),
    TargetSet {
        applied: u64,
        clamped: bool,
    },
    Bytes(Vec<u8>),
    /// JSON text (policy statuses, a migration report): shapes the runtime does not own.
    Json(String),
    Agent(AgentReport),
    /// Whether a deleted key was set.
    Deleted(bool),
    /// Key-value pairs, sorted by key.
    Pairs(Vec<(String, String)>),
    /// A guest key's value.
    Value(String),
    Exec(crate::agent::ExecResult),
    Shutdown(ShutdownReport),
}

/// The agent channel of a VM: `vm.health`, `vm.agent`, `vm:time_drift_ms()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentReport {
    pub health: crate::agent::Health,
    pub drift_ms: Option<f64>,
    /// `None` for a VM without an agent channel.
    pub stats: Option<crate::agent::AgentStats>,
    /// The name the guest's agent gave, once connected.
    pub agent: Option<String>,
}

/// How `vm:shutdown{}` ended the VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// `"graceful"`, `"forced"`, `"crashed"` or `"already_stopped"`.
    pub how: String,
    pub code: Option<u32>,
    /// The VM's state after the call.
    pub state: String,
    pub acknowledged: bool,
    pub took_ms: f64,
    /// How the VM ended, in words.
    pub outcome: String,
    /// Why it crashed, if it did.
    pub reason: Option<String>,
}

impl ShutdownReport {
    pub fn new(outcome: &crate::agent::ShutdownOutcome, state: &str) -> ShutdownReport {
        ShutdownReport {
            how: outcome.how.as_str().to_string(),
            code: outcome.code(),
            state: state.to_string(),
            acknowledged: outcome.acknowledged,
            took_ms: outcome.took.as_secs_f64() * 1000.0,
            outcome: crate::vm::describe_outcome(Some(&outcome.outcome)),
            reason: match &outcome.outcome {
                crate::vm::VmOutcome::Crashed(reason) => Some(reason.clone()),
                _ => None,
            },
        }
    }
}

/// Why a request failed. The client shows `message`, saying which host it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The request did not decode, or a field is out of bounds.
    BadRequest,
    /// No such VM (any more).
    NoSuchVm,
    /// A wait ran out of its `timeout_ms`.
    TimedOut,
    /// The host cannot do this (e.g. migration is not wired in).
    Unavailable,
    /// The operation failed; the message is the runtime's.
    Failed,
}

impl Failure {
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Failure {
        Failure {
            kind,
            message: message.into(),
        }
    }
}

/// `hv.host()` of the remote host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostReport {
    /// The host's name (its hostname).
    pub name: String,
    pub cpus: u64,
    pub memory_total: u64,
    pub memory_available: u64,
    pub memory_reserve: u64,
    pub vms_resident: u64,
    pub process_rss: u64,
    pub process_cpu_seconds: f64,
    /// What `/dev/kvm` is, or why it cannot be opened.
    pub kvm: Result<KvmReport, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvmReport {
    pub api: i32,
    pub backend: String,
    pub max_vcpus: u64,
    pub irqchip: bool,
    pub irqfd: bool,
    pub ioeventfd: bool,
    pub dirty_log: bool,
}

impl KvmReport {
    /// This host's `/dev/kvm`, or why it cannot be opened: what `hv.host()` shows and
    /// what a remote `host:info()` is sent.
    pub fn query() -> Result<KvmReport, String> {
        let kvm = crate::vstate::kvm().map_err(|e| crate::error_chain(&e))?;
        let k = crate::host::KvmInfo::query(&kvm);
        Ok(KvmReport {
            api: k.api_version,
            backend: k.backend.as_str().to_string(),
            max_vcpus: k.max_vcpus as u64,
            irqchip: k.irqchip,
            irqfd: k.irqfd,
            ioeventfd: k.ioeventfd,
            dirty_log: k.dirty_log,
        })
    }
}

/// The fields of a VM handle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: u64,
    pub name: String,
    pub state: String,
    pub vcpus: u8,
    /// The configured memory (the maximum for dynamic memory).
    pub memory_size: u64,
    pub boot_time_ms: Option<f64>,
    pub run_time_ms: f64,
    pub exit_code: Option<u32>,
    pub crash_reason: Option<String>,
    pub console_offset: u64,
    pub console_error: Option<String>,
    pub memory_resident: u64,
}

impl VmInfo {
    pub fn vm_ref(&self) -> VmRef {
        VmRef {
            id: self.id,
            name: self.name.clone(),
        }
    }
}

/// The fields of `vm.memory`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    pub size: u64,
    pub target: u64,
    pub resident: u64,
    pub held: u64,
    pub stats_period_ms: u64,
    pub min: u64,
    pub max: u64,
    pub startup: u64,
    pub buffer: u32,
    pub weight: u32,
    /// The guest's last statistics and their age; `None` before its first report.
    pub stats: Option<(MemoryStats, f64)>,
}

/// Encodes a protocol value (never fails for these types; an error would be a bug, and
/// is reported rather than panicking).
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| format!("cannot encode a control message: {e}"))
}

/// Decodes a protocol value; the whole buffer must be used.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    match postcard::take_from_bytes::<T>(bytes) {
        Ok((value, [])) => Ok(value),
        Ok((_, rest)) => Err(format!("{} trailing bytes", rest.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// Milliseconds of `d`, saturating (`Duration::MAX` is "no limit").
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frame = RequestFrame {
            id: 7,
            request: Request::Migrate {
                vm: VmRef {
                    id: 1,
                    name: "web".into(),
                },
                addr: "10.0.0.2:7001".into(),
                key_file: None,
                max_downtime_ms: 300,
                timeout_ms: 60_000,
                auto_converge: true,
                progress: true,
            },
        };
        assert_eq!(decode::<RequestFrame>(&encode(&frame).unwrap()), Ok(frame));
        let progress = ProgressFrame {
            id: 7,
            progress: crate::migration::MigrationProgress {
                iteration: 2,
                remaining_bytes: 4096,
                sent_bytes: 1 << 20,
                mbps: 812.5,
                throttle: 0.2,
                final_pass: true,
            },
        };
        assert_eq!(
            decode::<ProgressFrame>(&encode(&progress).unwrap()),
            Ok(progress)
        );
        let response = ResponseFrame {
            id: 7,
            result: Err(Failure::new(FailureKind::NoSuchVm, "no vm 'x'")),
        };
        assert_eq!(
            decode::<ResponseFrame>(&encode(&response).unwrap()),
            Ok(response)
        );
    }

    #[test]
    fn request_variants_counts_every_request() {
        let last = Request::Shutdown {
            vm: VmRef {
                id: 0,
                name: String::new(),
            },
            timeout_ms: 0,
        };
        // Shutdown is the last variant: its index is the count minus one.
        assert_eq!(encode(&last).unwrap()[0] as u32, REQUEST_VARIANTS - 1);
    }

    #[test]
    fn trailing_and_truncated_bytes_are_errors() {
        let mut bytes = encode(&RequestFrame {
            id: 1,
            request: Request::ListVms,
        })
        .unwrap();
        bytes.push(0);
        assert!(decode::<RequestFrame>(&bytes)
            .unwrap_err()
            .contains("trailing"));
        let bytes = encode(&RequestFrame {
            id: 1,
            request: Request::FindVm { name: "x".into() },
        })
        .unwrap();
        assert!(decode::<RequestFrame>(&bytes[..bytes.len() - 1]).is_err());
    }
}
