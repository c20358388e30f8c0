//! When a freshly started VM counts as ready: labs and warm pools wait for this before
//! they hand a VM out.
//!
//! A readiness is written as text (`ready = "..."` in `hv.lab{}` and `hv.pool.define{}`):
//!
//! - `"kvp:KEY"`: the guest has published the key/value pair KEY (any value), and
//!   `"kvp:KEY=VALUE"` with that value. The built-in guest publishes `ready = "1"` once it
//!   serves the agent channel. Waiting for it goes through [`wait_kvp_ready`], the one
//!   place that talks to the agent channel. A key or value the agent would refuse from
//!   the guest ([`crate::agent::check_pair`]) is refused by [`Readiness::parse`]: it
//!   could never be met.
//! - `"console:PATTERN"`: the console shows PATTERN (plain text, not a Lua pattern).
//! - anything else: a console pattern, as if written `"console:..."`.

use std::time::Duration;

use thiserror::Error;

use crate::agent::{check_pair, AgentError};
use crate::vm::{Vm, WaitError};

/// The longest readiness text accepted (a console pattern or a KVP key and value).
pub const MAX_READINESS: usize = 1024;

/// When a VM counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// The console shows this text.
    Console(String),
    /// The guest published this key (with this value, when given) over the agent channel.
    Kvp { key: String, value: Option<String> },
}

/// Why a readiness text is refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ReadinessParseError {
    #[error(
        "the readiness {0:?} is empty; give \"kvp:KEY\", \"console:PATTERN\" or a console pattern"
    )]
    Empty(String),
    #[error("the readiness is {0} bytes; at most {MAX_READINESS} are accepted")]
    TooLong(usize),
    /// The KVP key or value breaks the agent protocol's rules, so the guest could never
    /// publish it: the agent's own message says why.
    #[error("the readiness {text:?} can never be met: {reason}")]
    BadKvp { text: String, reason: String },
}

impl Readiness {
    /// Reads `"kvp:KEY[=VALUE]"`, `"console:PATTERN"` or a plain console pattern.
    pub fn parse(text: &str) -> Result<Readiness, ReadinessParseError> {
        if text.len() > MAX_READINESS {
            return Err(ReadinessParseError::TooLong(text.len()));
        }
        let readiness = if let Some(rest) = text.strip_prefix("kvp:") {
            let (key, value) = match rest.split_once('=') {
                Some((key, value)) => (key, Some(value.to_string())),
                None => (rest, None),
            };
            if key.is_empty() {
                return Err(ReadinessParseError::Empty(text.to_string()));
            }
            // The agent refuses such a pair from the guest, so waiting for it could only
            // time out.
            check_pair(key, value.as_deref().unwrap_or("")).map_err(|e| {
                ReadinessParseError::BadKvp {
                    text: text.to_string(),
                    reason: e.to_string(),
                }
            })?;
            Readiness::Kvp {
                key: key.to_string(),
                value,
            }
        } else {
            let pattern = text.strip_prefix("console:").unwrap_or(text);
            if pattern.is_empty() {
                return Err(ReadinessParseError::Empty(text.to_string()));
            }
            Readiness::Console(pattern.to_string())
        };
        Ok(readiness)
    }

    /// The readiness as it is written.
    pub fn describe(&self) -> String {
        match self {
            Readiness::Console(pattern) => format!("console:{pattern}"),
            Readiness::Kvp { key, value: None } => format!("kvp:{key}"),
            Readiness::Kvp {
                key,
                value: Some(value),
            } => format!("kvp:{key}={value}"),
        }
    }
}

impl std::fmt::Display for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// Why a VM did not become ready.
#[derive(Debug, Error)]
pub enum ReadyError {
    /// It crashed, exited, timed out, or the wait was cancelled; the message says which.
    #[error(transparent)]
    Wait(#[from] WaitError),
    /// The agent channel could not tell (no channel, the VM ended, timed out, cancelled).
    #[error(transparent)]
    Agent(#[from] AgentError),
}

impl ReadyError {
    /// The wait was cancelled (an interrupt, or another VM of a lab failed first).
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            ReadyError::Wait(WaitError::Cancelled { .. })
                | ReadyError::Agent(AgentError::Cancelled { .. })
        )
    }
}

/// Waits up to `timeout` until `vm` (already started) is ready as `readiness` says.
/// `cancel` is polled while waiting; it must be cheap.
pub fn wait_ready(
    vm: &Vm,
    readiness: &Readiness,
    timeout: Duration,
    cancel: &dyn Fn() -> bool,
) -> Result<(), ReadyError> {
    match readiness {
        Readiness::Console(pattern) => {
            vm.wait_for_console_cancellable(pattern, 0, timeout, cancel)?;
            Ok(())
        }
        Readiness::Kvp { key, value } => wait_kvp_ready(vm, key, value.as_deref(), timeout, cancel),
    }
}

/// Waits until the guest of `vm` has published `key` (with `value`, when given) over the
/// agent channel.
pub fn wait_kvp_ready(
    vm: &Vm,
    key: &str,
    value: Option<&str>,
    timeout: Duration,
    cancel: &dyn Fn() -> bool,
) -> Result<(), ReadyError> {
    vm.wait_for_guest_kvp_cancellable(key, value, timeout, cancel)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_texts_parse() {
        assert_eq!(
            Readiness::parse("kvp:ready").unwrap(),
            Readiness::Kvp {
                key: "ready".into(),
                value: None
            }
        );
        assert_eq!(
            Readiness::parse("kvp:ready=1").unwrap(),
            Readiness::Kvp {
                key: "ready".into(),
                value: Some("1".into())
            }
        );
        assert_eq!(
            Readiness::parse("console:hello from").unwrap(),
            Readiness::Console("hello from".into())
        );
        assert_eq!(
            Readiness::parse("listening").unwrap(),
            Readiness::Console("listening".into())
        );
        for bad in ["", "kvp:", "console:", "kvp:=1"] {
            assert!(Readiness::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Readiness::parse(&"x".repeat(MAX_READINESS + 1)).is_err());
        // A key the agent would refuse is refused here, with the agent's message, rather
        // than waited for until the timeout.
        let bad = Readiness::parse("kvp:my key").unwrap_err();
        assert_eq!(
            bad.to_string(),
            format!(
                "the readiness \"kvp:my key\" can never be met: {}",
                crate::agent::AgentError::BadKey {
                    key: "my key".into()
                }
            )
        );
        for bad in ["kvp:a/b", "kvp:é=1"] {
            assert!(
                matches!(
                    Readiness::parse(bad),
                    Err(ReadinessParseError::BadKvp { .. })
                ),
                "{bad:?}"
            );
        }
        let long_key = format!("kvp:{}", "k".repeat(crate::agent::MAX_KEY + 1));
        assert!(Readiness::parse(&long_key).is_err());
        // Values may hold anything the protocol carries.
        assert!(Readiness::parse("kvp:state=up and running").is_ok());
        for text in ["kvp:ready", "kvp:a=b", "console:x"] {
            assert_eq!(Readiness::parse(text).unwrap().describe(), text);
        }
    }
}
