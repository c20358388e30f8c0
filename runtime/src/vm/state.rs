//! Where a VM is in its lifecycle, and how it ended.

/// Where a VM is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    Created,
    Running,
    Paused,
    Stopped,
    Crashed,
    /// Arriving by live migration: built on this host from the state the source sent,
    /// not running, and out of reach of control calls until the source has let it go
    /// (then it runs) or the migration failed (then it goes away).
    Incoming,
    /// Moved to another host by live migration; final, like `Stopped`. Nothing of it
    /// runs here any more.
    Migrated,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Incoming => "incoming",
            VmState::Migrated => "migrated",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            VmState::Stopped | VmState::Crashed | VmState::Migrated
        )
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmOutcome {
    /// The guest wrote this code to its exit port: any 32-bit value, reported unsigned.
    Exited(u32),
    /// The host stopped it (`stop`).
    Stopped,
    /// It crashed; the reason names the exit kind and RIP.
    Crashed(String),
    /// It moved to the host at this address by live migration.
    Migrated { to: String },
}

/// A short human description of an outcome, for messages.
pub fn describe_outcome(outcome: Option<&VmOutcome>) -> String {
    match outcome {
        Some(VmOutcome::Exited(code)) => format!("exit code {code}"),
        Some(VmOutcome::Stopped) => "stopped by the host".into(),
        Some(VmOutcome::Crashed(reason)) => format!("crashed: {reason}"),
        Some(VmOutcome::Migrated { to }) => format!("migrated to {to}"),
        None => "still running".into(),
    }
}
