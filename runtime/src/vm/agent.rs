//! The agent channel's services as `Vm` methods: health, time drift, key-value pairs,
//! graceful shutdown and exec (see `crate::agent`).
//!
//! Every wait here ends early when the VM ends, and takes a `cancel` function that is
//! polled every [`CANCEL_POLL`] without any lock held (the Lua side runs event handlers
//! in it).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Vm, VmError, VmOutcome, VmState};
use crate::agent::{
    AgentChannel, AgentError, AgentStats, ExecResult, Health, HealthState, ShutdownHow,
    ShutdownOutcome,
};
use crate::devices::console::CANCEL_POLL;
use crate::vstate::vcpu::deadline_after;

impl Vm {
    /// The VM's agent channel, or the error for a VM created without one.
    fn agent(&self) -> Result<&Arc<AgentChannel>, AgentError> {
        self.agent.as_ref().ok_or_else(|| AgentError::NoAgent {
            name: self.config.name.clone(),
        })
    }

    /// The channel of a VM that runs, for a call that needs the guest's answer.
    fn running_agent(&self, op: &'static str) -> Result<&Arc<AgentChannel>, AgentError> {
        let agent = self.agent()?;
        match self.state() {
            VmState::Running => Ok(agent),
            state => Err(AgentError::NotRunning {
                name: self.config.name.clone(),
                op,
                state,
            }),
        }
    }

    /// Whether the VM has an agent channel.
    pub fn has_agent(&self) -> bool {
        self.agent.is_some()
    }

    /// How the guest's agent answers heartbeats (see `crate::agent` for the thresholds).
    /// `HealthState::None` for a VM without an agent channel or without a machine.
    pub fn health(&self) -> Health {
        match &self.agent {
            Some(agent) => agent.health(),
            None => Health {
                state: HealthState::None,
                last_seen_ms: None,
            },
        }
    }

    /// The guest's clock minus the host's, in milliseconds, as of the guest's last
    /// report (every heartbeat, and after each time it is set); `None` before it
    /// reported a time, or without an agent.
    pub fn time_drift_ms(&self) -> Option<f64> {
        self.agent.as_ref().and_then(|a| a.drift_ms())
    }

    /// What the channel carried and refused; `None` without an agent.
    pub fn agent_stats(&self) -> Option<AgentStats> {
        self.agent.as_ref().map(|a| a.stats())
    }

    /// The name the guest's agent gave in its HELLO, once it did.
    pub fn agent_name(&self) -> Option<String> {
        self.agent.as_ref()?.session().map(|s| s.agent)
    }

    /// Publishes `key = value` to the guest. Set before the VM starts, or while its
    /// agent has not connected, it is delivered when the agent says HELLO. Keys are 1 to
    /// 64 bytes of letters, digits, `_-.:`; values at most 1 KiB; at most 256 keys.
    pub fn kvp_host_set(&self, key: &str, value: &str) -> Result<(), AgentError> {
        self.agent()?.host_set(key, value)
    }

    /// Withdraws a host key; returns whether it was set.
    pub fn kvp_host_delete(&self, key: &str) -> Result<bool, AgentError> {
        self.agent()?.host_delete(key)
    }

    /// A key the host published.
    pub fn kvp_host_get(&self, key: &str) -> Option<String> {
        self.agent.as_ref()?.host_get(key)
    }

    /// Every key the host published, sorted.
    pub fn kvp_host_list(&self) -> Vec<(String, String)> {
        self.agent.as_ref().map_or_else(Vec::new, |a| a.host_list())
    }

    /// A key the guest published (the built-in guest publishes `boot_id`, `uptime_ms`
    /// and `ready`).
    pub fn kvp_guest_get(&self, key: &str) -> Option<String> {
        self.agent.as_ref()?.guest_get(key)
    }

    /// Every key the guest published, sorted.
    pub fn kvp_guest_list(&self) -> Vec<(String, String)> {
        self.agent
            .as_ref()
            .map_or_else(Vec::new, |a| a.guest_list())
    }

    /// Waits until the guest publishes `key` (equal to `value`, when given); returns
    /// its value.
    pub fn wait_for_guest_kvp(
        &self,
        key: &str,
        value: Option<&str>,
        timeout: Duration,
    ) -> Result<String, AgentError> {
        self.wait_for_guest_kvp_cancellable(key, value, timeout, &|| false)
    }

    /// [`Vm::wait_for_guest_kvp`], also ending once `cancel` returns true.
    pub fn wait_for_guest_kvp_cancellable(
        &self,
        key: &str,
        value: Option<&str>,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<String, AgentError> {
        let agent = self.agent()?;
        if self.state() == VmState::Created {
            return Err(AgentError::NotRunning {
                name: self.config.name.clone(),
                op: "wait for a guest key of",
                state: VmState::Created,
            });
        }
        agent.wait_guest_kvp(key, value, timeout, cancel)
    }

    /// Runs one of the guest's commands (a line of `;`-separated commands, as the
    /// built-in guest's command line takes) and returns its exit code and output. One
    /// exec runs at a time per VM; before the guest's agent has connected, the call
    /// waits for it (within `timeout`).
    pub fn exec(&self, command: &str, timeout: Duration) -> Result<ExecResult, AgentError> {
        self.exec_cancellable(command, timeout, &|| false)
    }

    /// [`Vm::exec`], also ending once `cancel` returns true.
    pub fn exec_cancellable(
        &self,
        command: &str,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<ExecResult, AgentError> {
        self.running_agent("exec in")?
            .exec(command, timeout, cancel)
    }

    /// Shuts the VM down: asks the guest's agent, waits up to `timeout` for the guest to
    /// end, then stops it hard. A paused VM, or one without an agent channel, is stopped
    /// hard at once (it cannot answer); one that has already ended is left as it is.
    /// Only a guest that exits is [`ShutdownHow::Graceful`]; one that crashes meanwhile
    /// is [`ShutdownHow::Crashed`].
    pub fn shutdown(&self, timeout: Duration) -> Result<ShutdownOutcome, VmError> {
        self.shutdown_cancellable(timeout, &|| false)
    }

    /// [`Vm::shutdown`]; `cancel` returning true ends the wait early with the hard stop.
    pub fn shutdown_cancellable(
        &self,
        timeout: Duration,
        cancel: &dyn Fn() -> bool,
    ) -> Result<ShutdownOutcome, VmError> {
        let started = Instant::now();
        let state = self.state();
        let ended = |how, acknowledged| ShutdownOutcome {
            how,
            outcome: self.outcome().unwrap_or(VmOutcome::Stopped),
            acknowledged,
            took: started.elapsed(),
        };
        match state {
            VmState::Running => {}
            VmState::Paused => {
                self.stop();
                return Ok(ended(ShutdownHow::Forced, false));
            }
            s if s.is_final() => return Ok(ended(ShutdownHow::AlreadyStopped, false)),
            other => return Err(self.invalid("shut down", other)),
        }
        let asked = self
            .agent
            .as_ref()
            .is_some_and(|a| a.request_shutdown().is_ok());
        if asked {
            let deadline = deadline_after(timeout);
            let mut inner = self.lock();
            loop {
                if inner.state.is_final() {
                    drop(inner);
                    // Frees the machine's resources (the guest already ended).
                    self.stop();
                    let acked = self.agent.as_ref().is_some_and(|a| a.shutdown_acked());
                    // Ended is not shut down: a guest that crashed (or a VM stopped or
                    // moved away by someone else meanwhile) did not exit gracefully.
                    let how = ShutdownHow::from_outcome(self.outcome().as_ref(), true);
                    return Ok(ended(how, acked));
                }
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                inner = self
                    .changed
                    .wait_timeout(inner, (deadline - now).min(CANCEL_POLL))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                drop(inner);
                if cancel() {
                    break;
                }
                inner = self.lock();
            }
        }
        let acked = self.agent.as_ref().is_some_and(|a| a.shutdown_acked());
        self.stop();
        // The guest may have ended on its own (or crashed) just before the hard stop.
        let how = ShutdownHow::from_outcome(self.outcome().as_ref(), asked);
        Ok(ended(how, acked))
    }

    /// Tells the agent channel the VM has no machine any more (`guest_exited`: the guest
    /// exited by itself); its waiters give up.
    pub(super) fn agent_ended(&self, outcome: &str, guest_exited: bool) {
        if let Some(agent) = &self.agent {
            agent.machine_ended(outcome.to_string(), guest_exited);
        }
    }
}
