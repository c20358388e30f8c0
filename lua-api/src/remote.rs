//! `hv.connect(addr, { key_file, timeout })`: remote control of a `luvisor serve` host.
//!
//! A `Host` handle holds one control connection ([`RemoteHost`], shared with the remote
//! VM handles it gives out). A remote VM handle holds the host's connection and the VM's
//! id and name on that host; like a local handle, every field read and method call asks
//! the host again, so a VM destroyed there raises "vm 'x' no longer exists". Errors from
//! the host are Lua errors that start with `host ADDR:` and carry the host's message.
//!
//! The host side is `luvisor_runtime::remote::handler`; [`control_handler`] builds it with
//! this crate's policy status provider, for `luvisor serve` to hand control connections
//! to.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use luvisor_runtime::migration::{MigrationProgress, SecureChannel};
use luvisor_runtime::remote::protocol::{AgentReport, HostReport, VmInfo, VmRef};
use luvisor_runtime::remote::{
    ControlHooks, MigrateOptions, PolicyStatusProvider, RemoteError, RemoteHost,
};
use luvisor_runtime::size::format_size;
use luvisor_runtime::Registry;
use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{a_type_name, Options};

/// `timeout` of `hv.connect` when none is given: for connecting and for each answer.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most levels of nesting converted from a host's JSON (policy statuses, migration
/// reports) into Lua tables.
const MAX_JSON_DEPTH: usize = 32;

/// Registers `hv.connect`.
pub const NAMESPACE: Namespace = Namespace {
    name: "remote",
    register,
};

fn register(lua: &Lua, hv: &Table, _context: &Context) -> mlua::Result<()> {
    hv.set(
        "connect",
        lua.create_function(|lua, (addr, opts): (Value, Value)| connect(lua, addr, opts))?,
    )
}

/// The policy status provider of `registry`'s engine: `hv.policy.status()` as JSON.
pub fn policy_status_provider(registry: &Arc<Registry>) -> PolicyStatusProvider {
    let registry: Weak<Registry> = Arc::downgrade(registry);
    Arc::new(move || match registry.upgrade() {
        Some(registry) => serde_json::Value::Array(
            crate::policy::engine(&registry)
                .status()
                .iter()
                .map(crate::policy::status_json)
                .collect(),
        ),
        None => serde_json::Value::Array(Vec::new()),
    })
}

/// The hooks a host serving `registry` gives its control handler: this crate's policy
/// status provider, and no migration (set `migrate` to wire it in).
pub fn control_hooks(registry: &Arc<Registry>) -> ControlHooks {
    ControlHooks {
        policies: Some(policy_status_provider(registry)),
        migrate: None,
    }
}

/// What `luvisor serve --listen` serves control connections with: the handler for control
/// connections (the accept loop's `ServerHandlers::control`), serving `registry` with
/// [`control_hooks`].
pub fn control_handler(registry: &Arc<Registry>) -> Arc<dyn Fn(SecureChannel) + Send + Sync> {
    luvisor_runtime::remote::control_handler(registry.clone(), control_hooks(registry))
}

/// [`control_handler`] for a host serving with `key`: remote `vm:migrate` calls run
/// `Vm::migrate`, authenticated with the request's key file or, without one, `key`.
pub fn serving_control_handler(
    registry: &Arc<Registry>,
    key: luvisor_runtime::migration::PeerKey,
) -> Arc<dyn Fn(SecureChannel) + Send + Sync> {
    let mut hooks = control_hooks(registry);
    hooks.migrate = Some(luvisor_runtime::remote::handler::migrate_hook(Some(key)));
    luvisor_runtime::remote::control_handler(registry.clone(), hooks)
}

/// One connection, shared by a host handle and its VM handles.
#[derive(Clone)]
struct Connection {
    host: Arc<Mutex<RemoteHost>>,
    addr: Arc<str>,
    /// The thread running a remote migration's `on_progress` while the connection is
    /// held for that migration: a call from it would wait for itself.
    in_progress_callback: Arc<Mutex<Option<std::thread::ThreadId>>>,
}

impl Connection {
    fn new(host: RemoteHost, addr: &str) -> Connection {
        Connection {
            host: Arc::new(Mutex::new(host)),
            addr: addr.into(),
            in_progress_callback: Arc::new(Mutex::new(None)),
        }
    }

    /// The connection; an error from inside a remote migration's `on_progress`, whose
    /// migration holds it.
    fn lock(&self) -> mlua::Result<MutexGuard<'_, RemoteHost>> {
        let callback = *self
            .in_progress_callback
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if callback == Some(std::thread::current().id()) {
            return Err(mlua::Error::runtime(format!(
                "the connection to host {} is busy with the migration whose on_progress \
                 this is: use another hv.connect to that host from on_progress",
                self.addr
            )));
        }
        Ok(self.host.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Runs `f` on the connection; a failure becomes a Lua error.
    fn call<R>(
        &self,
        f: impl FnOnce(&mut RemoteHost) -> Result<R, RemoteError>,
    ) -> mlua::Result<R> {
        f(&mut *self.lock()?).map_err(|e| mlua::Error::runtime(error_chain(&e)))
    }

    /// Runs `f` (a remote migration's `on_progress`) while this thread's calls on the
    /// connection are refused ([`Connection::lock`]).
    fn in_callback<R>(&self, f: impl FnOnce() -> R) -> R {
        /// Clears the mark however `f` ends.
        struct Mark<'a>(&'a Mutex<Option<std::thread::ThreadId>>);
        impl Drop for Mark<'_> {
            fn drop(&mut self) {
                *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
        }
        *self
            .in_progress_callback
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(std::thread::current().id());
        let _mark = Mark(&self.in_progress_callback);
        f()
    }
}

fn connect(lua: &Lua, addr: Value, opts: Value) -> mlua::Result<HostHandle> {
    let addr = match addr {
        Value::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "hv.connect: addr must be a string such as \"10.0.0.2:7001\", got {}",
                a_type_name(&other)
            )))
        }
    };
    let opts = Options::from_value(lua, "hv.connect", opts, &["key_file", "timeout"])?;
    let key_file = opts.string("key_file")?.ok_or_else(|| {
        opts.error(
            "option 'key_file' is required: the key file `luvisor serve --key-file` uses on that host",
        )
    })?;
    let timeout = opts.seconds("timeout")?.unwrap_or(DEFAULT_CONNECT_TIMEOUT);
    if timeout.is_zero() {
        return Err(opts.error("option 'timeout' must be more than 0 seconds"));
    }
    let host = RemoteHost::connect_with_key_file(&addr, &PathBuf::from(key_file), timeout)
        .map_err(|e| mlua::Error::runtime(format!("hv.connect: {}", error_chain(&e))))?;
    Ok(HostHandle(Connection::new(host, &addr)))
}

/// The Lua handle on a remote host.
#[derive(Clone)]
pub struct HostHandle(Connection);

impl HostHandle {
    fn vm(&self, info: &VmInfo) -> RemoteVmHandle {
        RemoteVmHandle {
            connection: self.0.clone(),
            vm: info.vm_ref(),
        }
    }

    /// `host<name at addr>`.
    pub fn describe(&self) -> String {
        match self.0.lock() {
            Ok(host) => format!("host<{} at {}>", host.name(), self.0.addr),
            Err(_) => format!("host<at {}>", self.0.addr),
        }
    }
}

impl UserData for HostHandle {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("addr", |_, this| Ok(this.0.addr.to_string()));
        fields.add_field_method_get("name", |_, this| Ok(this.0.lock()?.name().to_string()));
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("info", |lua, this, ()| {
            let report = this.0.call(|host| host.host_info())?;
            host_table(lua, &report, &this.0.addr)
        });
        methods.add_method("vms", |_, this, ()| {
            let vms = this.0.call(|host| host.list_vms())?;
            Ok(vms.iter().map(|info| this.vm(info)).collect::<Vec<_>>())
        });
        methods.add_method("vm", |_, this, name: Value| {
            let name = match name {
                Value::String(s) => s.to_str()?.to_string(),
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "host:vm: name must be a string, got {}",
                        a_type_name(&other)
                    )))
                }
            };
            let info = this.0.call(|host| host.find_vm(&name))?;
            Ok(this.vm(&info))
        });
        methods.add_method("policies", |lua, this, ()| {
            let statuses = this.0.call(|host| host.policies())?;
            json_to_lua(lua, &statuses, 0)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.describe()));
    }
}

/// The table `hv.host()` gives, for a remote host, with its `name` and `addr`.
fn host_table(lua: &Lua, report: &HostReport, addr: &str) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("name", report.name.as_str())?;
    t.set("addr", addr)?;
    t.set("cpus", report.cpus)?;
    t.set("memory_total", report.memory_total)?;
    t.set("memory_available", report.memory_available)?;
    t.set("memory_reserve", report.memory_reserve)?;
    t.set("vms_resident", report.vms_resident)?;
    t.set("process_rss", report.process_rss)?;
    t.set("process_cpu_seconds", report.process_cpu_seconds)?;
    crate::host::set_kvm_fields(lua, &t, &report.kvm)?;
    Ok(t)
}

/// A host's JSON as Lua values: objects and arrays become tables, `null` nil.
pub(crate) fn json_to_lua(
    lua: &Lua,
    value: &serde_json::Value,
    depth: usize,
) -> mlua::Result<Value> {
    use serde_json::Value as Json;
    if depth > MAX_JSON_DEPTH {
        return Err(mlua::Error::runtime(format!(
            "the host's answer nests more than {MAX_JSON_DEPTH} levels deep"
        )));
    }
    Ok(match value {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match n.as_i64() {
            Some(i) => Value::Integer(i),
            None => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(lua.create_string(s)?),
        Json::Array(items) => {
            let t = lua.create_table_with_capacity(items.len(), 0)?;
            for (i, item) in items.iter().enumerate() {
                t.raw_set(i + 1, json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
        Json::Object(entries) => {
            let t = lua.create_table_with_capacity(0, entries.len())?;
            for (key, item) in entries {
                t.raw_set(key.as_str(), json_to_lua(lua, item, depth + 1)?)?;
            }
            Value::Table(t)
        }
    })
}

/// The Lua handle on a VM of a remote host.
#[derive(Clone)]
pub struct RemoteVmHandle {
    connection: Connection,
    vm: VmRef,
}

impl RemoteVmHandle {
    fn info(&self) -> mlua::Result<VmInfo> {
        self.connection.call(|host| host.vm_info(&self.vm))
    }

    /// `vm<name #id state, 1 vcpu, 128M on addr>`.
    pub fn describe(&self) -> String {
        let info = self.connection.lock().and_then(|mut host| {
            host.vm_info(&self.vm)
                .map_err(|e| mlua::Error::runtime(error_chain(&e)))
        });
        match info {
            Ok(info) => format!(
                "vm<{} #{} {}, {} vcpu{}, {} on {}>",
                info.name,
                info.id,
                info.state,
                info.vcpus,
                if info.vcpus == 1 { "" } else { "s" },
                format_size(info.memory_size),
                self.connection.addr
            ),
            Err(e) => format!(
                "vm<{} #{} on {}: {}>",
                self.vm.name,
                self.vm.id,
                self.connection.addr,
                crate::script::message_without_traceback(&e)
            ),
        }
    }
}

impl RemoteVmHandle {
    pub(crate) fn name(&self) -> &str {
        &self.vm.name
    }

    fn agent_report(&self) -> mlua::Result<AgentReport> {
        self.connection.call(|host| host.agent(&self.vm))
    }

    pub(crate) fn kvp_list(&self, guest: bool) -> mlua::Result<Vec<(String, String)>> {
        self.connection.call(|host| host.kvp_list(&self.vm, guest))
    }

    pub(crate) fn kvp_set(&self, key: &str, value: &str) -> mlua::Result<()> {
        self.connection
            .call(|host| host.kvp_host_set(&self.vm, key, value))
    }

    pub(crate) fn kvp_delete(&self, key: &str) -> mlua::Result<bool> {
        self.connection
            .call(|host| host.kvp_host_delete(&self.vm, key))
    }

    pub(crate) fn kvp_wait(
        &self,
        lua: &Lua,
        key: &str,
        value: Option<&str>,
        timeout: Duration,
    ) -> mlua::Result<String> {
        let cancel = crate::interrupt::canceller(lua);
        self.connection
            .call(|host| host.wait_for_guest_kvp(&self.vm, key, value, timeout, &cancel))
    }
}

impl UserData for RemoteVmHandle {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("id", |_, this| Ok(this.info()?.id));
        fields.add_field_method_get("name", |_, this| Ok(this.info()?.name));
        fields.add_field_method_get("state", |_, this| Ok(this.info()?.state));
        fields.add_field_method_get("vcpus", |_, this| Ok(this.info()?.vcpus));
        fields.add_field_method_get("memory_size", |_, this| Ok(this.info()?.memory_size));
        fields.add_field_method_get("boot_time_ms", |_, this| Ok(this.info()?.boot_time_ms));
        fields.add_field_method_get("run_time_ms", |_, this| Ok(this.info()?.run_time_ms));
        fields.add_field_method_get("exit_code", |_, this| Ok(this.info()?.exit_code));
        fields.add_field_method_get("crash_reason", |_, this| Ok(this.info()?.crash_reason));
        fields.add_field_method_get("console_offset", |_, this| Ok(this.info()?.console_offset));
        fields.add_field_method_get("console_error", |_, this| Ok(this.info()?.console_error));
        fields.add_field_method_get("memory_resident", |_, this| {
            Ok(this.info()?.memory_resident)
        });
        fields.add_field_method_get("memory", |_, this| {
            this.info()?;
            Ok(RemoteVmMemory(this.clone()))
        });
        fields.add_field_method_get("host", |_, this| Ok(HostHandle(this.connection.clone())));
        fields.add_field_method_get("health", |lua, this| {
            crate::agent::health_table(lua, this.agent_report()?.health)
        });
        fields.add_field_method_get("agent", |lua, this| {
            let report = this.agent_report()?;
            match report.stats {
                Some(stats) => Ok(Some(crate::agent::stats_table(lua, &stats, report.agent)?)),
                None => Ok(None),
            }
        });
        fields.add_field_method_get("kvp", |_, this| {
            Ok(crate::agent::VmKvp(crate::agent::KvpTarget::Remote(
                this.clone(),
            )))
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("start", |_, this, ()| {
            this.connection.call(|host| host.start(&this.vm))
        });
        methods.add_method("pause", |_, this, ()| {
            this.connection.call(|host| host.pause(&this.vm))
        });
        methods.add_method("resume", |_, this, ()| {
            this.connection.call(|host| host.resume(&this.vm))
        });
        methods.add_method("stop", |_, this, ()| {
            this.connection.call(|host| host.stop(&this.vm))
        });
        methods.add_method("send", |_, this, text: Value| {
            let text = crate::vm::send_argument(text)?;
            this.connection
                .call(|host| host.send(&this.vm, &text.as_bytes()))
        });
        methods.add_method("console", |_, this, ()| {
            this.connection.call(|host| host.console(&this.vm))
        });
        methods.add_method("wait", |lua, this, opts: Value| {
            let (timeout, _) = crate::vm::wait_timeout(lua, "wait", opts, &[])?;
            let cancel = crate::interrupt::canceller(lua);
            this.connection
                .call(|host| host.wait(&this.vm, timeout, &cancel))
        });
        methods.add_method(
            "wait_for_console",
            |lua, this, (pattern, opts): (Value, Value)| {
                let (pattern, after, timeout) =
                    crate::vm::wait_for_console_arguments(lua, pattern, opts)?;
                let cancel = crate::interrupt::canceller(lua);
                this.connection
                    .call(|host| host.wait_for_console(&this.vm, &pattern, after, timeout, &cancel))
            },
        );
        methods.add_method("time_drift_ms", |_, this, ()| {
            Ok(this.agent_report()?.drift_ms)
        });
        methods.add_method("exec", |lua, this, (command, opts): (Value, Value)| {
            let (command, timeout) = crate::agent::exec_arguments(lua, command, opts)?;
            let result = this
                .connection
                .call(|host| host.exec(&this.vm, &command, timeout))?;
            crate::agent::exec_table(lua, &result)
        });
        methods.add_method("shutdown", |lua, this, opts: Value| {
            let timeout = crate::agent::shutdown_timeout(lua, opts)?;
            let report = this
                .connection
                .call(|host| host.shutdown(&this.vm, timeout))?;
            crate::agent::shutdown_table(lua, &report)
        });
        methods.add_method("migrate", |lua, this, (addr, opts): (Value, Value)| {
            this.migrate(lua, addr, opts)
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.describe()));
        methods.add_meta_method(MetaMethod::Eq, |_, this, other: AnyUserData| {
            Ok(other
                .borrow::<RemoteVmHandle>()
                .map(|o| o.vm.id == this.vm.id && o.connection.addr == this.connection.addr)
                .unwrap_or(false))
        });
    }
}

impl RemoteVmHandle {
    /// `vm:migrate(addr, { key_file, max_downtime_ms, timeout, auto_converge,
    /// on_progress })` of a remote VM: the options of a local one (one parser), run by
    /// the VM's host. `on_progress` runs here, with the progress the host streams while
    /// the migration runs. An error in it cannot cancel the migration (the host runs
    /// it): `on_progress` is not called again, and once the host answers the error is
    /// raised with how the migration ended.
    fn migrate(&self, lua: &Lua, addr: Value, opts: Value) -> mlua::Result<Value> {
        let (addr, arguments) = crate::migration::migrate_arguments(lua, addr, opts)?;
        let defaults = MigrateOptions::default();
        let options = MigrateOptions {
            key_file: arguments.key_file,
            max_downtime: arguments.max_downtime.unwrap_or(defaults.max_downtime),
            timeout: arguments.timeout.unwrap_or(defaults.timeout),
            auto_converge: arguments.auto_converge,
        };
        let on_progress = arguments.on_progress;
        let mut callback_error: Option<mlua::Error> = None;
        let mut progress = |p: &MigrationProgress| {
            let Some(f) = &on_progress else { return };
            if callback_error.is_some() {
                return;
            }
            let called = self.connection.in_callback(|| {
                crate::migration::progress_table(lua, p).and_then(|t| f.call::<()>(t))
            });
            if let Err(e) = called {
                callback_error = Some(e);
            }
        };
        let wants_progress: Option<&mut dyn FnMut(&MigrationProgress)> = match on_progress {
            Some(_) => Some(&mut progress),
            None => None,
        };
        let result = self
            .connection
            .call(|host| host.migrate(&self.vm, &addr, &options, wants_progress));
        if let Some(e) = callback_error {
            let ended = match &result {
                Ok(_) => "it succeeded".to_string(),
                Err(e) => format!("it failed: {}", crate::script::message_without_traceback(e)),
            };
            return Err(mlua::Error::runtime(format!(
                "vm:migrate: on_progress failed: {}; the host runs the migration, which \
                 cannot be cancelled from here, so it went on, and {ended}",
                crate::script::message_without_traceback(&e)
            )));
        }
        json_to_lua(lua, &result?, 0)
    }
}

/// `vm.memory` of a remote VM.
pub struct RemoteVmMemory(RemoteVmHandle);

impl RemoteVmMemory {
    fn report(&self) -> mlua::Result<luvisor_runtime::remote::protocol::MemoryReport> {
        let vm = &self.0;
        vm.connection.call(|host| host.memory(&vm.vm))
    }
}

impl UserData for RemoteVmMemory {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("size", |_, this| Ok(this.report()?.size));
        fields.add_field_method_get("target", |_, this| Ok(this.report()?.target));
        fields.add_field_method_get("resident", |_, this| Ok(this.report()?.resident));
        fields.add_field_method_get("held", |_, this| Ok(this.report()?.held));
        fields.add_field_method_get("stats_period", |_, this| {
            Ok(this.report()?.stats_period_ms as f64 / 1000.0)
        });
        fields.add_field_method_get("min", |_, this| Ok(this.report()?.min));
        fields.add_field_method_get("max", |_, this| Ok(this.report()?.max));
        fields.add_field_method_get("startup", |_, this| Ok(this.report()?.startup));
        fields.add_field_method_get("buffer", |_, this| Ok(this.report()?.buffer));
        fields.add_field_method_get("weight", |_, this| Ok(this.report()?.weight));
        fields.add_field_method_get("stats", |lua, this| {
            let Some((stats, age_ms)) = this.report()?.stats else {
                return Ok(Value::Nil);
            };
            let t = lua.create_table()?;
            for (name, value) in stats.fields() {
                if let Some(value) = value {
                    t.set(name, value)?;
                }
            }
            t.set("age_ms", age_ms)?;
            Ok(Value::Table(t))
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("set_target", |lua, this, (target, opts): (Value, Value)| {
            let (target, reason) = crate::memory::target_arguments(lua, target, opts)?;
            let vm = &this.0;
            vm.connection
                .call(|host| host.set_memory_target(&vm.vm, target, &reason))
        });
        methods.add_method("set_stats_period", |_, this, seconds: Value| {
            let period = crate::memory::stats_period_argument(seconds)?;
            let vm = &this.0;
            vm.connection
                .call(|host| host.set_memory_stats_period(&vm.vm, period))
        });
        methods.add_method("read", |lua, this, (gpa, len): (Value, Value)| {
            let (gpa, len) = crate::memory::read_arguments(gpa, len)?;
            let vm = &this.0;
            let bytes = vm
                .connection
                .call(|host| host.read_memory(&vm.vm, gpa, len))?;
            lua.create_string(&bytes)
        });
        methods.add_method("write", |_, this, (gpa, bytes): (Value, Value)| {
            let (gpa, bytes) = crate::memory::write_arguments(gpa, bytes)?;
            let vm = &this.0;
            vm.connection
                .call(|host| host.write_memory(&vm.vm, gpa, &bytes.as_bytes()))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_becomes_lua_values() {
        let lua = Lua::new();
        let json = serde_json::json!({
            "name": "default", "running": true, "ticks": 3, "last_tick_ms": 1.5,
            "last_error": null, "decisions": [{ "vm": "a", "target": 1 }]
        });
        let value = json_to_lua(&lua, &json, 0).unwrap();
        lua.globals().set("status", value).unwrap();
        let ok: bool = lua
            .load(
                "return status.name == 'default' and status.running and status.ticks == 3 \
                 and math.type(status.ticks) == 'integer' and status.last_tick_ms == 1.5 \
                 and status.last_error == nil and status.decisions[1].vm == 'a' \
                 and #status.decisions == 1",
            )
            .eval()
            .unwrap();
        assert!(ok);
        let mut deep = serde_json::json!(1);
        for _ in 0..=MAX_JSON_DEPTH {
            deep = serde_json::json!([deep]);
        }
        assert!(json_to_lua(&lua, &deep, 0).is_err());
    }

    #[test]
    fn remote_policy_statuses_look_like_local_ones() {
        use crate::policy::{
            Decision, MigrateDecision, MigrationRecord, PolicyStatus, PoolDecision,
        };
        let status = PolicyStatus {
            name: Some("default".into()),
            file: "policies/default.lua".into(),
            description: None,
            generation: 2,
            running: true,
            interval_ms: 1000,
            ticks: 5,
            failures: 1,
            last_tick_ms: Some(0.5),
            last_error: Some("boom".into()),
            last_decisions: vec![Decision {
                vm: "a".into(),
                asked: 1 << 30,
                target: 1 << 29,
                clamped: true,
                previous: 1 << 28,
                reason: "grow".into(),
            }],
            last_decisions_tick: 4,
            last_migrate_decisions: vec![MigrateDecision {
                vm: "a".into(),
                host: "b".into(),
                reason: "pressure".into(),
                refused: Some("cooling down".into()),
            }],
            last_migrate_decisions_tick: 3,
            last_pool_decisions: vec![PoolDecision {
                pool: "ci".into(),
                asked: 40,
                target: 16,
                clamped: true,
                previous: 2,
                reason: "busy".into(),
            }],
            last_pool_decisions_tick: 4,
            migrations: vec![MigrationRecord {
                id: 1,
                policy: "default".into(),
                vm: "a".into(),
                host: "b".into(),
                addr: "127.0.0.1:7002".into(),
                reason: "pressure".into(),
                state: "succeeded",
                started_ms: 100,
                ended_ms: Some(900),
                report: Some(serde_json::json!({ "downtime_ms": 12, "rounds": 3 })),
                error: None,
            }],
        };
        let lua = Lua::new();
        let local = crate::policy::status_table(&lua, &status).unwrap();
        let remote = json_to_lua(&lua, &crate::policy::status_json(&status), 0).unwrap();
        let display = |v: Value| crate::display::format_value(&v, 4);
        assert_eq!(display(Value::Table(local)), display(remote));
    }

    /// Set by the test script's `progress_seen()`; the stand-in host's migration waits
    /// for it before it answers.
    struct Flag(std::sync::Mutex<bool>, std::sync::Condvar);

    impl Flag {
        fn reset(&self) {
            *self.0.lock().unwrap() = false;
        }
        fn set(&self) {
            *self.0.lock().unwrap() = true;
            self.1.notify_all();
        }
        /// Waits for `set`; the bound only keeps a broken client from hanging the test.
        fn wait(&self) {
            let seen = self.0.lock().unwrap();
            let _ = self
                .1
                .wait_timeout_while(seen, Duration::from_secs(60), |seen| !*seen)
                .unwrap();
        }
    }

    static PROGRESS_SEEN: Flag = Flag(std::sync::Mutex::new(false), std::sync::Condvar::new());

    /// A host whose migrations are a stand-in (no KVM): it streams three passes of
    /// progress and answers a real report's JSON, if `auto_converge` came through.
    fn host_with_a_migration_stand_in(dir: &std::path::Path) -> (String, std::path::PathBuf) {
        use luvisor_runtime::migration::{MigrationReport, PeerKey};
        use luvisor_runtime::remote::{control_handler, test_listener, MigrateHook};
        use std::os::unix::fs::PermissionsExt;
        let key_path = dir.join("key");
        std::fs::write(&key_path, b"a key for the remote migrate test").unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let registry = Arc::new(Registry::new());
        let mut config = luvisor_runtime::VmConfig::new(
            "web",
            luvisor_runtime::GuestSpec::Builtin {
                cmdline: "hello".into(),
            },
        );
        config.memory = 16 << 20;
        registry.create(config).unwrap();
        let migrate: MigrateHook = Arc::new(|_, params, progress| {
            if !params.auto_converge {
                return Err("auto_converge did not come through".into());
            }
            PROGRESS_SEEN.reset();
            for iteration in 0..3 {
                progress(&MigrationProgress {
                    iteration,
                    remaining_bytes: 4096,
                    sent_bytes: 8192,
                    mbps: 900.0,
                    throttle: 0.2,
                    final_pass: iteration == 2,
                });
            }
            // The answer waits until the script's on_progress has seen the report it
            // waits for: the client skips reports that arrive together with the answer,
            // and this keeps the test from depending on how the two are delivered.
            PROGRESS_SEEN.wait();
            Ok(MigrationReport {
                downtime: Duration::from_millis(3),
                total: Duration::from_millis(300),
                bytes_sent: 1 << 20,
                iterations: 3,
                pages_sent: 256,
                zero_pages: 10,
                final_pages: 2,
                throttle: 0.2,
                mbps: 900.0,
                destination_build: Duration::from_micros(900),
            }
            .to_json())
        });
        let hooks = ControlHooks {
            policies: None,
            migrate: Some(migrate),
        };
        let addr = test_listener::spawn(
            PeerKey::from_file(&key_path).unwrap(),
            control_handler(registry, hooks),
        )
        .unwrap();
        (addr, key_path)
    }

    #[test]
    fn remote_migrate_takes_the_local_options_and_answers_like_a_local_one() {
        let dir =
            std::env::temp_dir().join(format!("luvisor-remote-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (addr, key) = host_with_a_migration_stand_in(&dir);
        let lua = crate::new_user_state(Arc::new(Registry::new())).unwrap();
        // The fields of a local report and of local progress, as this crate makes them.
        let report = luvisor_runtime::migration::MigrationReport {
            downtime: Duration::ZERO,
            total: Duration::ZERO,
            bytes_sent: 0,
            iterations: 0,
            pages_sent: 0,
            zero_pages: 0,
            final_pages: 0,
            throttle: 0.0,
            mbps: 0.0,
            destination_build: Duration::ZERO,
        };
        lua.globals()
            .set(
                "local_report",
                json_to_lua(&lua, &report.to_json(), 0).unwrap(),
            )
            .unwrap();
        let progress = MigrationProgress {
            iteration: 0,
            remaining_bytes: 0,
            sent_bytes: 0,
            mbps: 0.0,
            throttle: 0.0,
            final_pass: false,
        };
        lua.globals()
            .set(
                "progress_seen",
                lua.create_function(|_, ()| {
                    PROGRESS_SEEN.set();
                    Ok(())
                })
                .unwrap(),
            )
            .unwrap();
        lua.globals()
            .set(
                "local_progress",
                crate::migration::progress_table(&lua, &progress).unwrap(),
            )
            .unwrap();
        let script = r#"
            local addr, key = ...
            local function keys(t)
              local names = {}
              for name in pairs(t) do names[#names + 1] = name end
              table.sort(names)
              return table.concat(names, " ")
            end
            local host = hv.connect(addr, { key_file = key })
            local vm = host:vm("web")
            local calls, finals, fields = 0, 0, nil
            local r = vm:migrate("10.0.0.2:7001", { key_file = "KEY", max_downtime_ms = 50,
              timeout = 60, auto_converge = true,
              on_progress = function(p)
                calls = calls + 1
                if p.final then finals = finals + 1; progress_seen() end
                fields = keys(p)
                assert(p.mbps == 900 and p.remaining_bytes == 4096 and p.throttle == 0.2)
              end })
            assert(calls >= 1 and finals == 1, calls .. " calls, " .. finals .. " final")
            assert(fields == keys(local_progress), fields)
            assert(keys(r) == keys(local_report), keys(r))
            assert(r.destination_build_ms == 0.9 and r.mbps == 900 and r.throttle == 0.2)

            -- The same checks as a local migrate.
            local ok, err = pcall(vm.migrate, vm, "x:1", { on_progress = 3 })
            assert(not ok and err:find("vm:migrate: option 'on_progress' must be a function", 1, true), err)
            ok, err = pcall(vm.migrate, vm, "x:1", { max_downtime_ms = 0 })
            assert(not ok and err:find("option 'max_downtime_ms' must be an integer", 1, true), err)
            ok, err = pcall(vm.migrate, vm, 7001, {})
            assert(not ok and err:find("vm:migrate: the address must be a string", 1, true), err)

            -- No auto_converge: the stand-in refuses, as the host's message.
            ok, err = pcall(vm.migrate, vm, "x:1", {})
            assert(not ok and err:find("host " .. addr .. ": auto_converge did not come through", 1, true), err)

            -- on_progress cannot use the connection its migration holds; its error is
            -- raised once the host answered, with how the migration ended.
            ok, err = pcall(vm.migrate, vm, "x:1", { auto_converge = true,
              on_progress = function(p) progress_seen(); return vm.state end })
            assert(not ok, "on_progress's error is raised")
            assert(err:find("vm:migrate: on_progress failed: the connection to host " .. addr
                            .. " is busy with the migration", 1, true), err)
            assert(err:find("it went on, and it succeeded", 1, true), err)
            -- The connection is free again.
            assert(vm.state == "created")
            return "ok"
        "#;
        let result: String = lua
            .load(script)
            .call((addr, key.to_str().unwrap().to_string()))
            .unwrap_or_else(|e| panic!("{}", crate::script::error_message(&e)));
        assert_eq!(result, "ok");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn connect_checks_its_arguments() {
        let lua = crate::new_user_state(Arc::new(Registry::new())).unwrap();
        for (code, expected) in [
            ("hv.connect(7001)", "hv.connect: addr must be a string"),
            ("hv.connect('127.0.0.1:1')", "option 'key_file' is required"),
            (
                "hv.connect('127.0.0.1:1', { key = 'x' })",
                "unknown option 'key'; valid options are: key_file, timeout",
            ),
            (
                "hv.connect('127.0.0.1:1', { key_file = 'k', timeout = 0 })",
                "must be more than 0 seconds",
            ),
            (
                "hv.connect('127.0.0.1:1', { key_file = '/nonexistent/key' })",
                "hv.connect: cannot open a control connection to host 127.0.0.1:1: cannot read key file /nonexistent/key",
            ),
        ] {
            let err = lua.load(code).exec().unwrap_err();
            let message = crate::script::error_message(&err);
            assert!(message.contains(expected), "{code}: {message}");
        }
    }
}
