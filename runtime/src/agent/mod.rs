//! The agent channel's host side: the services on top of the virtio-console device
//! (`devices/virtio/agent/`) that carries them.
//!
//! - [`channel`]: [`AgentChannel`], what a VM and its agent device share: messages
//!   waiting for the guest, the key-value pairs of both sides, heartbeat and clock
//!   figures, the exec and shutdown in flight. Control threads call it through the
//!   [`Vm`](crate::Vm) methods in `vm/agent.rs`; the device calls it on the VM's event
//!   thread with each frame the guest sent.
//! - [`stream`]: [`FrameReader`](stream::FrameReader), which cuts the guest's byte
//!   stream into frames and drops (and counts) whatever is not one.
//!
//! The protocol itself (frame header, message types, limits) is
//! `luvisor_guest_abi::agent`, shared with the built-in guest, and `docs/agent.md`.
//!
//! **Heartbeat.** Every [`HEARTBEAT_INTERVAL`] of running time the device's timer sends
//! a PING; any frame from the guest counts as a sign of life. A guest silent for
//! [`LATE_AFTER`] is `late`, for [`LOST_AFTER`] `lost`. Times are the VM's running time,
//! so a paused VM does not go late. Going lost (after being heard at least once) raises
//! the [`HeartbeatLost`](crate::events::VmEventKind::HeartbeatLost) event, hearing the
//! guest again [`HeartbeatRestored`](crate::events::VmEventKind::HeartbeatRestored).

pub mod channel;
pub mod stream;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use channel::AgentChannel;
pub use luvisor_guest_abi::agent::{MAX_COMMAND, MAX_KEY, MAX_KEYS, MAX_OUTPUT, MAX_VALUE};

/// How often the host pings the guest. Each ping wakes an idle guest (about 0.5 ms of
/// host CPU on PVM), so this is what an idle VM costs.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A guest not heard from for this long (running time) is `late`.
pub const LATE_AFTER: Duration = Duration::from_millis(2500);
/// A guest not heard from for this long (running time) is `lost`.
pub const LOST_AFTER: Duration = Duration::from_millis(5000);
/// Most bytes waiting for a guest that does not read its channel; past this, new
/// requests are refused with [`AgentError::Backlog`].
pub const MAX_OUTBOX: usize = 1 << 20;

/// How the guest's agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HealthState {
    /// Heard from within [`LATE_AFTER`].
    Ok,
    /// Silent for [`LATE_AFTER`] or more.
    Late,
    /// Silent for [`LOST_AFTER`] or more.
    Lost,
    /// The VM runs (or is paused) but its agent has not said HELLO yet.
    Waiting,
    /// The VM has no agent channel, or no machine (not started, or ended).
    None,
}

impl HealthState {
    /// `"ok"`, `"late"`, `"lost"`, `"waiting"` or `"none"`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Ok => "ok",
            HealthState::Late => "late",
            HealthState::Lost => "lost",
            HealthState::Waiting => "waiting",
            HealthState::None => "none",
        }
    }
}

impl std::fmt::Display for HealthState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// [`Vm::health`](crate::Vm::health).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// Milliseconds of running time since the guest last sent a frame; `None` when it
    /// never did.
    pub last_seen_ms: Option<u64>,
}

/// What an exec returned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    /// The command's exit code: 0 ok, 2 an error (as on the guest's command line).
    pub code: u32,
    /// What the command printed (lossy UTF-8), at most [`MAX_OUTPUT`] bytes.
    pub stdout: String,
    /// The guest cut the output at [`MAX_OUTPUT`] bytes.
    pub truncated: bool,
}

/// How [`Vm::shutdown`](crate::Vm::shutdown) ended the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownHow {
    /// The guest exited by itself after it was asked.
    Graceful,
    /// The guest did not exit in time (or could not be asked): a hard stop. Also a VM
    /// that something else ended meanwhile (a stop from elsewhere, a migration away);
    /// [`ShutdownOutcome::outcome`] says what.
    Forced,
    /// The guest crashed before it exited.
    Crashed,
    /// The VM had already ended.
    AlreadyStopped,
}

impl ShutdownHow {
    /// `"graceful"`, `"forced"`, `"crashed"` or `"already_stopped"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ShutdownHow::Graceful => "graceful",
            ShutdownHow::Forced => "forced",
            ShutdownHow::Crashed => "crashed",
            ShutdownHow::AlreadyStopped => "already_stopped",
        }
    }

    /// How a shutdown that saw the VM end with `outcome` ended it: graceful only when
    /// the guest exited (and was `asked` to), crashed for a crash, forced otherwise.
    pub fn from_outcome(outcome: Option<&crate::vm::VmOutcome>, asked: bool) -> ShutdownHow {
        match outcome {
            Some(crate::vm::VmOutcome::Exited(_)) if asked => ShutdownHow::Graceful,
            Some(crate::vm::VmOutcome::Crashed(_)) => ShutdownHow::Crashed,
            _ => ShutdownHow::Forced,
        }
    }
}

/// [`Vm::shutdown`](crate::Vm::shutdown)'s answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownOutcome {
    pub how: ShutdownHow,
    /// How the VM ended.
    pub outcome: crate::vm::VmOutcome,
    /// The guest's agent answered the request (SHUTDOWN_ACK) before it ended.
    pub acknowledged: bool,
    /// From the call to the end of the VM.
    pub took: Duration,
}

impl ShutdownOutcome {
    /// The guest's exit code, when it exited with one.
    pub fn code(&self) -> Option<u32> {
        match self.outcome {
            crate::vm::VmOutcome::Exited(code) => Some(code),
            _ => None,
        }
    }
}

/// What the channel has carried and refused: `vm.agent` in Lua.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStats {
    /// Valid frames from the guest.
    pub frames_received: u64,
    /// Frames queued for the guest.
    pub frames_sent: u64,
    /// Frames dropped: bad version, flags or CRC, or a payload that does not decode.
    pub malformed: u64,
    /// Frame headers announcing a payload over the 64 KiB frame limit.
    pub oversized: u64,
    /// Bytes dropped while getting back in step after garbage.
    pub discarded_bytes: u64,
    /// Frames of a type the host does not know, or that only the host sends.
    pub unknown: u64,
    /// Key-value pairs from the guest refused: a bad key, a value over the limit, or
    /// more keys than allowed.
    pub kvp_refused: u64,
    /// Exec results nobody waits for (timed out, or from before a restore).
    pub stale_replies: u64,
    /// Buffers the guest posted that the device could not use (no writable part, or
    /// outside guest memory).
    pub bad_buffers: u64,
    /// HELLOs: sessions the guest's agent started.
    pub sessions: u64,
    /// Pings sent, and pongs received.
    pub pings: u64,
    pub pongs: u64,
    /// The last clock setting pushed to the guest, and the last one it applied.
    pub time_generation: u32,
    pub time_generation_applied: u32,
}

/// Why an agent call failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("vm '{name}' has no agent channel (it was created with agent = false)")]
    NoAgent { name: String },
    #[error("cannot {op} vm '{name}': it is {state}")]
    NotRunning {
        name: String,
        op: &'static str,
        state: crate::vm::VmState,
    },
    #[error(
        "key {key:?} is invalid: give 1 to {MAX_KEY} bytes of letters, digits, '_', '-', '.' or ':'"
    )]
    BadKey { key: String },
    #[error("the value of key {key:?} is {len} bytes; a value has at most {MAX_VALUE}")]
    ValueTooLong { key: String, len: usize },
    #[error("vm '{name}' already has {MAX_KEYS} host keys; delete one before adding {key:?}")]
    TooManyKeys { name: String, key: String },
    #[error("the command is {len} bytes; an exec command has at most {MAX_COMMAND}")]
    CommandTooLong { len: usize },
    #[error("the command {command:?} is invalid: {reason}")]
    BadCommand {
        command: String,
        reason: &'static str,
    },
    #[error(
        "vm '{name}': {bytes} bytes already wait for the guest, which does not read its \
         agent channel (the limit is {MAX_OUTBOX})"
    )]
    Backlog { name: String, bytes: usize },
    #[error(
        "timed out after {timeout:?} waiting for vm '{name}' to {}{detail}",
        .what.to_do()
    )]
    TimedOut {
        name: String,
        what: Awaited,
        timeout: Duration,
        /// What held the request up, when the host knows (`" (...)"`), or empty.
        detail: String,
    },
    #[error("cancelled while waiting for vm '{name}' to {}", .what.to_do())]
    Cancelled { name: String, what: Awaited },
    #[error(
        "vm '{name}' ended ({outcome}) before it {}{}",
        .what.done(),
        if *.never_served { NOT_SERVED_HINT } else { "" }
    )]
    Ended {
        name: String,
        what: Awaited,
        outcome: String,
        /// The guest exited without ever publishing `ready`: a built-in guest whose
        /// command line did not serve the channel.
        never_served: bool,
    },
    #[error("the agent of vm '{name}' restarted before it {}", .what.done())]
    Reset { name: String, what: Awaited },
}

/// Added to [`AgentError::Ended`] for a guest that exited without serving its channel.
const NOT_SERVED_HINT: &str = " (the built-in guest serves its agent channel only when \
     its command line is empty or ends with `serve`)";

/// What a caller waits for from the guest's agent; errors say it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Awaited {
    /// The answer to an exec of this command.
    Exec { command: String },
    /// The guest publishing `key` (with `value`, when given).
    GuestKey { key: String, value: Option<String> },
}

impl Awaited {
    /// `answer exec "hello"`, `publish guest key "ready" = "1"`.
    pub fn to_do(&self) -> String {
        match self {
            Awaited::Exec { command } => format!("answer exec {command:?}"),
            Awaited::GuestKey { .. } => format!("publish {}", self.object()),
        }
    }

    /// `answered exec "hello"`, `published guest key "ready" = "1"`.
    pub fn done(&self) -> String {
        match self {
            Awaited::Exec { command } => format!("answered exec {command:?}"),
            Awaited::GuestKey { .. } => format!("published {}", self.object()),
        }
    }

    fn object(&self) -> String {
        match self {
            Awaited::Exec { command } => format!("exec {command:?}"),
            Awaited::GuestKey { key, value: None } => format!("guest key {key:?}"),
            Awaited::GuestKey {
                key,
                value: Some(value),
            } => format!("guest key {key:?} = {value:?}"),
        }
    }
}

/// Checks a key-value pair against the protocol's limits.
pub fn check_pair(key: &str, value: &str) -> Result<(), AgentError> {
    if !luvisor_guest_abi::agent::valid_key(key) {
        return Err(AgentError::BadKey {
            key: key.to_string(),
        });
    }
    if value.len() > MAX_VALUE {
        return Err(AgentError::ValueTooLong {
            key: key.to_string(),
            len: value.len(),
        });
    }
    Ok(())
}

/// Checks an exec command: at most [`MAX_COMMAND`] bytes of text without control
/// characters (it is one line of the guest's commands).
pub fn check_command(command: &str) -> Result<(), AgentError> {
    if command.len() > MAX_COMMAND {
        return Err(AgentError::CommandTooLong { len: command.len() });
    }
    let bad = |reason| AgentError::BadCommand {
        command: command.to_string(),
        reason,
    };
    if command.trim().is_empty() {
        return Err(bad("it is empty"));
    }
    if command.chars().any(|c| c.is_control() && c != '\t') {
        return Err(bad("it holds a control character (give one line)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_exit_after_the_request_is_a_graceful_shutdown() {
        use crate::vm::VmOutcome;
        let how = ShutdownHow::from_outcome;
        assert_eq!(
            how(Some(&VmOutcome::Exited(0)), true),
            ShutdownHow::Graceful
        );
        assert_eq!(how(Some(&VmOutcome::Exited(0)), false), ShutdownHow::Forced);
        let crash = VmOutcome::Crashed("triple fault at rip 0x1000".into());
        assert_eq!(how(Some(&crash), true), ShutdownHow::Crashed);
        assert_eq!(how(Some(&crash), false), ShutdownHow::Crashed);
        assert_eq!(how(Some(&VmOutcome::Stopped), true), ShutdownHow::Forced);
        let moved = VmOutcome::Migrated {
            to: "10.0.0.2:7000".into(),
        };
        assert_eq!(how(Some(&moved), true), ShutdownHow::Forced);
        assert_eq!(how(None, true), ShutdownHow::Forced);
        assert_eq!(ShutdownHow::Crashed.as_str(), "crashed");
    }

    #[test]
    fn pairs_and_commands_are_checked() {
        assert!(check_pair("boot_id", "x").is_ok());
        assert!(check_pair(&"k".repeat(MAX_KEY), &"v".repeat(MAX_VALUE)).is_ok());
        let e = check_pair(&"k".repeat(MAX_KEY + 1), "v").unwrap_err();
        assert!(e.to_string().contains("1 to 64 bytes"), "{e}");
        assert!(check_pair("", "v").is_err());
        assert!(check_pair("a b", "v").is_err());
        let e = check_pair("k", &"v".repeat(MAX_VALUE + 1)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the value of key \"k\" is 1025 bytes; a value has at most 1024"
        );
        assert!(check_command("hello").is_ok());
        assert!(check_command(" ").is_err());
        assert!(check_command("hello\nexit 3").is_err());
        assert!(check_command(&"x".repeat(MAX_COMMAND + 1)).is_err());
    }
}
