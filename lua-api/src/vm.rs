//! `hv.vm{}`, `hv.vms()` and the `Vm` handle.
//!
//! A `Vm` userdata holds only the VM's id and name. Every field read and method call
//! resolves the id in the registry again; once the VM is destroyed the handle raises
//! "vm 'x' no longer exists".

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use luvisor_runtime::size::format_size;
use luvisor_runtime::vm::{describe_outcome, MAX_VCPUS};
use luvisor_runtime::{Registry, Vm, VmConfig, VmId, VmOutcome};
use mlua::{AnyUserData, Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::guest::Guest;
use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{a_type_name, Options};

/// Waits without a `timeout` option give up after this long, so a forgotten timeout
/// cannot hang a test run forever. `timeout = math.huge` waits without limit.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

const VM_OPTIONS: &[&str] = &[
    "name", "vcpus", "memory", "guest", "console", "disks", "agent",
];

/// The Lua handle on a VM.
#[derive(Clone)]
pub struct VmHandle {
    pub id: VmId,
    pub name: String,
    registry: Arc<Registry>,
}

impl VmHandle {
    pub fn new(vm: &Vm, registry: Arc<Registry>) -> VmHandle {
        VmHandle {
            id: vm.id(),
            name: vm.name().to_string(),
            registry,
        }
    }

    /// A handle on VM `id` named `name` (an event's VM, which may be gone by now).
    pub fn from_parts(id: VmId, name: &str, registry: Arc<Registry>) -> VmHandle {
        VmHandle {
            id,
            name: name.to_string(),
            registry,
        }
    }

    /// The live VM, or the error every stale handle raises.
    pub fn resolve(&self) -> mlua::Result<Arc<Vm>> {
        self.registry
            .get(self.id)
            .ok_or_else(|| mlua::Error::runtime(format!("vm '{}' no longer exists", self.name)))
    }

    /// One line for `tostring` and the REPL: `vm<demo #1 running, 1 vcpu, 128M>`.
    pub fn describe(&self) -> String {
        match self.registry.get(self.id) {
            Some(vm) => format!(
                "vm<{} #{} {}, {} vcpu{}, {}>",
                vm.name(),
                self.id.0,
                vm.state(),
                vm.config().vcpus,
                if vm.config().vcpus == 1 { "" } else { "s" },
                format_size(vm.config().memory)
            ),
            None => format!("vm<{} #{} destroyed>", self.name, self.id.0),
        }
    }
}

fn lua_err(e: impl std::error::Error) -> mlua::Error {
    mlua::Error::runtime(error_chain(&e))
}

/// Reads `{ timeout = seconds }` for method `method`.
pub(crate) fn wait_timeout(
    lua: &Lua,
    method: &str,
    opts: Value,
    extra: &[&str],
) -> mlua::Result<(Duration, Options)> {
    let mut valid = vec!["timeout"];
    valid.extend_from_slice(extra);
    let opts = Options::from_value(lua, &format!("vm:{method}"), opts, &valid)?;
    Ok((opts.seconds("timeout")?.unwrap_or(DEFAULT_WAIT), opts))
}

impl UserData for VmHandle {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        // Even `id` and `name` resolve the VM: a destroyed VM's handle answers nothing
        // but "no longer exists", so a script cannot mistake it for a live one.
        fields.add_field_method_get("id", |_, this| Ok(this.resolve()?.id().0));
        fields.add_field_method_get("name", |_, this| Ok(this.resolve()?.name().to_string()));
        fields.add_field_method_get("state", |_, this| Ok(this.resolve()?.state().as_str()));
        fields.add_field_method_get("vcpus", |_, this| Ok(this.resolve()?.config().vcpus));
        fields.add_field_method_get("memory_size", |_, this| Ok(this.resolve()?.config().memory));
        fields.add_field_method_get("boot_time_ms", |_, this| {
            Ok(this
                .resolve()?
                .boot_time()
                .map(|d| d.as_secs_f64() * 1000.0))
        });
        fields.add_field_method_get("run_time_ms", |_, this| {
            Ok(this.resolve()?.run_time().as_secs_f64() * 1000.0)
        });
        fields.add_field_method_get("exit_code", |_, this| {
            Ok(match this.resolve()?.outcome() {
                Some(VmOutcome::Exited(code)) => Some(code),
                _ => None,
            })
        });
        fields.add_field_method_get("crash_reason", |_, this| {
            Ok(match this.resolve()?.outcome() {
                Some(VmOutcome::Crashed(reason)) => Some(reason),
                _ => None,
            })
        });
        fields.add_field_method_get("memory", |_, this| {
            this.resolve()?;
            Ok(crate::memory::VmMemory(this.clone()))
        });
        fields.add_field_method_get("memory_resident", |_, this| {
            Ok(this.resolve()?.memory_resident())
        });
        fields.add_field_method_get("console_offset", |_, this| {
            Ok(this.resolve()?.console().total())
        });
        fields.add_field_method_get("console_error", |_, this| {
            Ok(this.resolve()?.console().tee_error())
        });
        fields.add_field_method_get("health", |lua, this| {
            crate::agent::health_table(lua, this.resolve()?.health())
        });
        fields.add_field_method_get("agent", |lua, this| {
            let vm = this.resolve()?;
            match vm.agent_stats() {
                Some(stats) => Ok(Some(crate::agent::stats_table(
                    lua,
                    &stats,
                    vm.agent_name(),
                )?)),
                None => Ok(None),
            }
        });
        fields.add_field_method_get("kvp", |_, this| {
            this.resolve()?;
            Ok(crate::agent::VmKvp(crate::agent::KvpTarget::Local(
                this.clone(),
            )))
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("start", |_, this, ()| {
            this.resolve()?.start().map_err(lua_err)
        });
        methods.add_method("pause", |_, this, ()| {
            this.resolve()?.pause().map_err(lua_err)
        });
        methods.add_method("resume", |_, this, ()| {
            this.resolve()?.resume().map_err(lua_err)
        });
        methods.add_method("stop", |_, this, ()| {
            this.resolve()?.stop();
            Ok(())
        });
        methods.add_method("destroy", |_, this, ()| {
            this.resolve()?;
            this.registry.destroy(this.id);
            Ok(())
        });
        methods.add_method("send", |_, this, text: Value| {
            let vm = this.resolve()?;
            vm.send_input(&send_argument(text)?.as_bytes())
                .map_err(lua_err)
        });
        methods.add_method("snapshot", |lua, this, (path, opts): (Value, Value)| {
            let vm = this.resolve()?;
            crate::snapshot::snapshot(lua, &vm, path, opts)
        });
        methods.add_method("migrate", |lua, this, (addr, opts): (Value, Value)| {
            let vm = this.resolve()?;
            crate::migration::migrate(lua, &vm, addr, opts)
        });
        methods.add_method("console", |_, this, ()| {
            Ok(this.resolve()?.console().text())
        });
        methods.add_method("time_drift_ms", |_, this, ()| {
            Ok(this.resolve()?.time_drift_ms())
        });
        methods.add_method("exec", |lua, this, (command, opts): (Value, Value)| {
            let vm = this.resolve()?;
            crate::agent::exec(lua, &vm, command, opts)
        });
        methods.add_method("shutdown", |lua, this, opts: Value| {
            let vm = this.resolve()?;
            crate::agent::shutdown(lua, &vm, opts)
        });
        methods.add_method("wait", |lua, this, opts: Value| {
            let vm = this.resolve()?;
            let (timeout, _) = wait_timeout(lua, "wait", opts, &[])?;
            let safe = crate::events::SafePoint::new(lua);
            let waited = vm.wait_cancellable(timeout, &|| safe.poll());
            let outcome = safe.finish(waited)?;
            let state = vm.state().as_str();
            Ok(match outcome {
                VmOutcome::Exited(code) => (Some(code), state, None),
                other => (None, state, Some(describe_outcome(Some(&other)))),
            })
        });
        methods.add_method(
            "wait_for_console",
            |lua, this, (pattern, opts): (Value, Value)| {
                let vm = this.resolve()?;
                let (pattern, after, timeout) = wait_for_console_arguments(lua, pattern, opts)?;
                let safe = crate::events::SafePoint::new(lua);
                let waited =
                    vm.wait_for_console_cancellable(&pattern, after, timeout, &|| safe.poll());
                let (line, end) = safe.finish(waited)?;
                Ok((line, end))
            },
        );
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| Ok(this.describe()));
        methods.add_meta_method(MetaMethod::Eq, |_, this, other: AnyUserData| {
            Ok(other
                .borrow::<VmHandle>()
                .map(|o| o.id == this.id)
                .unwrap_or(false))
        });
    }
}

/// `vm:send(text)`'s argument. Shared with remote VM handles.
pub(crate) fn send_argument(text: Value) -> mlua::Result<mlua::LuaString> {
    match text {
        Value::String(text) => Ok(text),
        other => Err(mlua::Error::runtime(format!(
            "vm:send: text must be a string (bytes for the guest's serial console), got {}",
            a_type_name(&other)
        ))),
    }
}

/// `vm:wait_for_console(pattern, { timeout, after })`'s arguments: the pattern, the
/// offset to search from and the timeout. Shared with remote VM handles.
pub(crate) fn wait_for_console_arguments(
    lua: &Lua,
    pattern: Value,
    opts: Value,
) -> mlua::Result<(String, u64, Duration)> {
    let pattern = match pattern {
        Value::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(mlua::Error::runtime(format!(
            "vm:wait_for_console: pattern must be a string (plain text, not a Lua pattern), got {}",
            a_type_name(&other)
        )))
        }
    };
    let (timeout, opts) = wait_timeout(lua, "wait_for_console", opts, &["after"])?;
    let after = opts.integer("after", 0, i64::MAX)?.unwrap_or(0) as u64;
    Ok((pattern, after, timeout))
}

/// Registers `hv.vm` and `hv.vms`.
pub const NAMESPACE: Namespace = Namespace {
    name: "vm",
    register,
};

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let registry = context.registry.clone();
    let reg = registry.clone();
    hv.set(
        "vm",
        lua.create_function(move |lua, opts: Value| create_vm(lua, opts, &reg))?,
    )?;
    let reg = registry;
    hv.set(
        "vms",
        lua.create_function(move |_, ()| {
            Ok(reg
                .list()
                .iter()
                .map(|vm| VmHandle::new(vm, reg.clone()))
                .collect::<Vec<_>>())
        })?,
    )
}

fn create_vm(lua: &Lua, opts: Value, registry: &Arc<Registry>) -> mlua::Result<VmHandle> {
    let opts = Options::from_value(lua, "hv.vm", opts, VM_OPTIONS)?;
    let name = opts.string("name")?.ok_or_else(|| {
        opts.error("option 'name' is required: a unique string such as \"web-1\"")
    })?;
    let mut config = machine_config(lua, &opts, name)?;
    config.console_file = opts.string("console")?.map(PathBuf::from);
    config.disks = crate::disk::disks_option(&opts)?;
    let vm = registry
        .create(config)
        .map_err(|e| opts.error(error_chain(&e)))?;
    Ok(VmHandle::new(&vm, registry.clone()))
}

/// The machine part of a VM's options (`guest`, `vcpus`, `memory`, `agent`) as a configuration
/// named `name`, without console or disks: what `hv.vm{}` and the templates of
/// `hv.lab{}` and `hv.pool.define{}` share.
pub(crate) fn machine_config(lua: &Lua, opts: &Options, name: String) -> mlua::Result<VmConfig> {
    let guest = match opts.raw("guest")? {
        Value::UserData(ud) => ud.borrow::<Guest>().map(|g| g.0.clone()).map_err(|_| {
            opts.error("option 'guest' must be a guest such as hv.guest.builtin{ cmdline = \"hello\" }")
        })?,
        Value::Nil => {
            return Err(opts.error("option 'guest' is required, e.g. guest = hv.guest.builtin{ cmdline = \"hello\" }"))
        }
        other => {
            return Err(opts.error(format!(
                "option 'guest' must be a guest such as hv.guest.builtin{{ cmdline = \"hello\" }}, got {}",
                a_type_name(&other)
            )))
        }
    };
    let mut config = VmConfig::new(name, guest);
    if let Some(vcpus) = opts.integer("vcpus", 1, MAX_VCPUS as i64)? {
        config.vcpus = vcpus as u8;
    }
    match opts.raw("memory")? {
        Value::Table(table) => {
            let knobs = crate::memory::knobs_option(lua, table)?;
            config.memory = knobs.max;
            config.dynamic_memory = Some(knobs);
        }
        _ => {
            if let Some(memory) = opts.size("memory")? {
                config.memory = memory;
            }
        }
    }
    if let Some(agent) = opts.boolean("agent")? {
        config.agent = agent;
    }
    Ok(config)
}
