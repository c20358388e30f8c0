//! The agent channel in Lua: `vm.health`, `vm.agent`, `vm:time_drift_ms()`, `vm.kvp`,
//! `vm:shutdown{}` and `vm:exec()` (the `Vm` handle in `vm.rs` calls these).
//!
//! `vm.kvp.host` and `vm.kvp.guest` are handles like `vm.memory`: they hold the VM's
//! handle and resolve it on every call.

use std::time::Duration;

use luvisor_runtime::agent::{check_command, AgentStats, ExecResult, Health};
use luvisor_runtime::remote::protocol::ShutdownReport;
use luvisor_runtime::Vm;
use mlua::{Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::events::SafePoint;
use crate::options::{a_type_name, utf8_text, Options};
use crate::vm::{VmHandle, DEFAULT_WAIT};

/// `vm:shutdown{}` without a `timeout`: how long the guest gets to end by itself.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// `{ state = "ok", last_seen_ms = 12 }`.
pub fn health_table(lua: &Lua, health: Health) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("state", health.state.as_str())?;
    t.set("last_seen_ms", health.last_seen_ms)?;
    Ok(t)
}

/// `vm.agent`: what the channel carried and refused, or nil without one.
pub fn stats_table(lua: &Lua, stats: &AgentStats, agent: Option<String>) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("connected", agent.is_some())?;
    t.set("name", agent)?;
    t.set("frames_received", stats.frames_received)?;
    t.set("frames_sent", stats.frames_sent)?;
    t.set("malformed", stats.malformed)?;
    t.set("oversized", stats.oversized)?;
    t.set("discarded_bytes", stats.discarded_bytes)?;
    t.set("unknown", stats.unknown)?;
    t.set("kvp_refused", stats.kvp_refused)?;
    t.set("stale_replies", stats.stale_replies)?;
    t.set("bad_buffers", stats.bad_buffers)?;
    t.set("sessions", stats.sessions)?;
    t.set("pings", stats.pings)?;
    t.set("pongs", stats.pongs)?;
    t.set("time_generation", stats.time_generation)?;
    t.set("time_generation_applied", stats.time_generation_applied)?;
    Ok(t)
}

/// `{ code = 0, stdout = "...", truncated = false }`.
pub fn exec_table(lua: &Lua, result: &ExecResult) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("code", result.code)?;
    t.set("stdout", result.stdout.as_str())?;
    t.set("truncated", result.truncated)?;
    Ok(t)
}

/// `{ how = "graceful", code = 0, state = "stopped", acknowledged = true, took_ms,
/// outcome }`; `reason` for a crash.
pub fn shutdown_table(lua: &Lua, report: &ShutdownReport) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("how", report.how.as_str())?;
    t.set("code", report.code)?;
    t.set("state", report.state.as_str())?;
    t.set("acknowledged", report.acknowledged)?;
    t.set("took_ms", report.took_ms)?;
    t.set("outcome", report.outcome.as_str())?;
    t.set("reason", report.reason.as_deref())?;
    Ok(t)
}

/// `vm:exec(command, { timeout })`'s arguments. Shared with remote VM handles.
pub(crate) fn exec_arguments(
    lua: &Lua,
    command: Value,
    opts: Value,
) -> mlua::Result<(String, Duration)> {
    let command = match command {
        Value::String(s) => utf8_text("vm:exec", "the command", &s)?,
        other => {
            return Err(mlua::Error::runtime(format!(
                "vm:exec: the command must be a string such as \"blk-verify 0 100 7\", got {}",
                a_type_name(&other)
            )))
        }
    };
    // Checked here, so a bad command gets the same `vm:exec:` error as any other bad
    // argument (and a remote VM's before it goes over the network).
    check_command(&command).map_err(|e| mlua::Error::runtime(format!("vm:exec: {e}")))?;
    let opts = Options::from_value(lua, "vm:exec", opts, &["timeout"])?;
    Ok((command, opts.seconds("timeout")?.unwrap_or(DEFAULT_WAIT)))
}

/// `vm:shutdown{ timeout }`'s timeout. Shared with remote VM handles.
pub(crate) fn shutdown_timeout(lua: &Lua, opts: Value) -> mlua::Result<Duration> {
    let opts = Options::from_value(lua, "vm:shutdown", opts, &["timeout"])?;
    Ok(opts.seconds("timeout")?.unwrap_or(DEFAULT_SHUTDOWN_TIMEOUT))
}

pub fn exec(lua: &Lua, vm: &Vm, command: Value, opts: Value) -> mlua::Result<Table> {
    let (command, timeout) = exec_arguments(lua, command, opts)?;
    let safe = SafePoint::new(lua);
    let result = vm.exec_cancellable(&command, timeout, &|| safe.poll());
    exec_table(lua, &safe.finish(result)?)
}

pub fn shutdown(lua: &Lua, vm: &Vm, opts: Value) -> mlua::Result<Table> {
    let timeout = shutdown_timeout(lua, opts)?;
    let safe = SafePoint::new(lua);
    let result = vm.shutdown_cancellable(timeout, &|| safe.poll());
    let outcome = safe.finish(result)?;
    shutdown_table(lua, &ShutdownReport::new(&outcome, vm.state().as_str()))
}

/// Whose pairs a `vm.kvp` handle reads: a local VM's, or a remote one's.
#[derive(Clone)]
pub enum KvpTarget {
    Local(VmHandle),
    Remote(crate::remote::RemoteVmHandle),
}

impl KvpTarget {
    fn name(&self) -> String {
        match self {
            KvpTarget::Local(vm) => vm.name.clone(),
            KvpTarget::Remote(vm) => vm.name().to_string(),
        }
    }

    fn list(&self, side: Side) -> mlua::Result<Vec<(String, String)>> {
        match self {
            KvpTarget::Local(vm) => {
                let vm = vm.resolve()?;
                Ok(match side {
                    Side::Host => vm.kvp_host_list(),
                    Side::Guest => vm.kvp_guest_list(),
                })
            }
            KvpTarget::Remote(vm) => vm.kvp_list(side == Side::Guest),
        }
    }

    fn get(&self, side: Side, key: &str) -> mlua::Result<Option<String>> {
        match self {
            KvpTarget::Local(vm) => {
                let vm = vm.resolve()?;
                Ok(match side {
                    Side::Host => vm.kvp_host_get(key),
                    Side::Guest => vm.kvp_guest_get(key),
                })
            }
            KvpTarget::Remote(_) => Ok(self
                .list(side)?
                .into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)),
        }
    }

    fn set(&self, key: &str, value: &str) -> mlua::Result<()> {
        match self {
            KvpTarget::Local(vm) => vm
                .resolve()?
                .kvp_host_set(key, value)
                .map_err(|e| mlua::Error::runtime(format!("vm.kvp.host:set: {e}"))),
            KvpTarget::Remote(vm) => vm.kvp_set(key, value),
        }
    }

    fn delete(&self, key: &str) -> mlua::Result<bool> {
        match self {
            KvpTarget::Local(vm) => vm
                .resolve()?
                .kvp_host_delete(key)
                .map_err(|e| mlua::Error::runtime(format!("vm.kvp.host:delete: {e}"))),
            KvpTarget::Remote(vm) => vm.kvp_delete(key),
        }
    }

    fn wait(
        &self,
        lua: &Lua,
        key: &str,
        value: Option<&str>,
        timeout: Duration,
    ) -> mlua::Result<String> {
        match self {
            KvpTarget::Local(vm) => {
                let vm = vm.resolve()?;
                let safe = SafePoint::new(lua);
                let result =
                    vm.wait_for_guest_kvp_cancellable(key, value, timeout, &|| safe.poll());
                safe.finish(result)
            }
            KvpTarget::Remote(vm) => vm.kvp_wait(lua, key, value, timeout),
        }
    }
}

/// `vm.kvp`: the host's and the guest's key-value pairs.
#[derive(Clone)]
pub struct VmKvp(pub KvpTarget);

/// Which side's pairs a handle reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Host,
    Guest,
}

/// `vm.kvp.host` or `vm.kvp.guest`.
#[derive(Clone)]
pub struct KvpSide {
    target: KvpTarget,
    side: Side,
}

impl UserData for VmKvp {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("host", |_, this| {
            Ok(KvpSide {
                target: this.0.clone(),
                side: Side::Host,
            })
        });
        fields.add_field_method_get("guest", |_, this| {
            Ok(KvpSide {
                target: this.0.clone(),
                side: Side::Guest,
            })
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!("kvp<{}>", this.0.name()))
        });
    }
}

fn key_argument(method: &str, key: Value) -> mlua::Result<String> {
    match key {
        Value::String(s) => utf8_text(method, "the key", &s),
        other => Err(mlua::Error::runtime(format!(
            "{method}: the key must be a string, got {}",
            a_type_name(&other)
        ))),
    }
}

fn pairs_table(lua: &Lua, pairs: Vec<(String, String)>) -> mlua::Result<Table> {
    let t = lua.create_table_with_capacity(0, pairs.len())?;
    for (k, v) in pairs {
        t.set(k, v)?;
    }
    Ok(t)
}

impl UserData for KvpSide {
    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("get", |_, this, key: Value| {
            let method = match this.side {
                Side::Host => "vm.kvp.host:get",
                Side::Guest => "vm.kvp.guest:get",
            };
            let key = key_argument(method, key)?;
            this.target.get(this.side, &key)
        });
        methods.add_method("list", |lua, this, ()| {
            pairs_table(lua, this.target.list(this.side)?)
        });
        methods.add_method("set", |_, this, (key, value): (Value, Value)| {
            if this.side == Side::Guest {
                return Err(mlua::Error::runtime(
                    "vm.kvp.guest is read-only: the guest publishes its own keys (set host keys with vm.kvp.host:set)",
                ));
            }
            let key = key_argument("vm.kvp.host:set", key)?;
            let value = match value {
                Value::String(s) => utf8_text("vm.kvp.host:set", "the value", &s)?,
                Value::Integer(i) => i.to_string(),
                Value::Number(n) => n.to_string(),
                Value::Boolean(b) => b.to_string(),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "vm.kvp.host:set: the value must be a string (or a number or boolean), got {}",
                        a_type_name(&other)
                    )))
                }
            };
            this.target.set(&key, &value)
        });
        methods.add_method("delete", |_, this, key: Value| {
            if this.side == Side::Guest {
                return Err(mlua::Error::runtime(
                    "vm.kvp.guest is read-only: the guest publishes its own keys",
                ));
            }
            let key = key_argument("vm.kvp.host:delete", key)?;
            this.target.delete(&key)
        });
        methods.add_method("wait", |lua, this, (key, opts): (Value, Value)| {
            if this.side == Side::Host {
                return Err(mlua::Error::runtime(
                    "vm.kvp.host:wait: only the guest's keys can be waited for (vm.kvp.guest:wait)",
                ));
            }
            let key = key_argument("vm.kvp.guest:wait", key)?;
            let opts = Options::from_value(lua, "vm.kvp.guest:wait", opts, &["value", "timeout"])?;
            let value = opts.string("value")?;
            let timeout = opts.seconds("timeout")?.unwrap_or(DEFAULT_WAIT);
            this.target.wait(lua, &key, value.as_deref(), timeout)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(format!(
                "kvp<{} {}>",
                this.target.name(),
                match this.side {
                    Side::Host => "host",
                    Side::Guest => "guest",
                }
            ))
        });
    }
}
