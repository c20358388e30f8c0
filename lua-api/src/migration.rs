//! Live migration from Lua: `vm:migrate(addr, opts)`, and `hv.migration`:
//! `listen(addr, { key_file })` (a script that receives VMs) and `on_arrival(fn)` (the
//! handler `luvisor serve` calls for each VM that arrives).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use luvisor_runtime::migration::{
    spawn_server, Arrival, MigrateOptions, MigrationProgress, MigrationReport, PeerKey,
    ServerHandle, ServerHandlers,
};
use luvisor_runtime::{Registry, Vm};
use mlua::{Function, Lua, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{a_type_name, Options};
use crate::vm::VmHandle;

/// The Lua registry key of the `on_arrival` handler.
const ARRIVAL_HANDLER: &str = "luvisor.migration.on_arrival";

/// Registers `hv.migration`.
pub const NAMESPACE: Namespace = Namespace {
    name: "migration",
    register,
};

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let migration = lua.create_table()?;
    migration.set(
        "on_arrival",
        lua.create_function(|lua, handler: Value| match handler {
            Value::Function(f) => lua.set_named_registry_value(ARRIVAL_HANDLER, f),
            Value::Nil => lua.unset_named_registry_value(ARRIVAL_HANDLER),
            other => Err(mlua::Error::runtime(format!(
                "hv.migration.on_arrival: expected a function (or nil to remove it), got {}",
                a_type_name(&other)
            ))),
        })?,
    )?;
    let registry = context.registry.clone();
    migration.set(
        "listen",
        lua.create_function(move |lua, (addr, opts): (Value, Value)| {
            listen(lua, &registry, addr, opts)
        })?,
    )?;
    hv.set("migration", migration)
}

fn key_option(opts: &Options) -> mlua::Result<PeerKey> {
    let path = opts.string("key_file")?.ok_or_else(|| {
        opts.error(
            "option 'key_file' is required: the pre-shared key both hosts hold (a file only \
             its owner can read, e.g. made with `head -c 32 /dev/urandom > KEY; chmod 600 KEY`)",
        )
    })?;
    PeerKey::from_file(&PathBuf::from(path)).map_err(|e| opts.error(error_chain(&e)))
}

fn address_argument(function: &str, value: Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_str()?.to_string()),
        other => Err(mlua::Error::runtime(format!(
            "{function}: the address must be a string such as \"127.0.0.1:7001\", got {}",
            a_type_name(&other)
        ))),
    }
}

/// The options of `vm:migrate`, local or remote: one parser, so that both accept the
/// same options with the same checks and messages.
pub(crate) struct MigrateArguments {
    /// Keeps the option table, for errors about its values.
    pub opts: Options,
    pub key_file: Option<String>,
    pub max_downtime: Option<Duration>,
    pub timeout: Option<Duration>,
    pub auto_converge: bool,
    pub on_progress: Option<Function>,
}

/// Reads `vm:migrate`'s `addr` and `{ key_file, max_downtime_ms, timeout,
/// auto_converge, on_progress }`.
pub(crate) fn migrate_arguments(
    lua: &Lua,
    addr: Value,
    opts: Value,
) -> mlua::Result<(String, MigrateArguments)> {
    const F: &str = "vm:migrate";
    let addr = address_argument(F, addr)?;
    let opts = Options::from_value(
        lua,
        F,
        opts,
        &[
            "key_file",
            "max_downtime_ms",
            "timeout",
            "auto_converge",
            "on_progress",
        ],
    )?;
    let key_file = opts.string("key_file")?;
    let max_downtime = opts
        .integer("max_downtime_ms", 1, 3_600_000)?
        .map(|ms| Duration::from_millis(ms as u64));
    let timeout = opts.seconds("timeout")?;
    let auto_converge = opts.boolean("auto_converge")?.unwrap_or(false);
    let on_progress = match opts.raw("on_progress")? {
        Value::Nil => None,
        Value::Function(f) => Some(f),
        other => {
            return Err(opts.error(format!(
                "option 'on_progress' must be a function, got {}",
                a_type_name(&other)
            )))
        }
    };
    Ok((
        addr,
        MigrateArguments {
            opts,
            key_file,
            max_downtime,
            timeout,
            auto_converge,
            on_progress,
        },
    ))
}

/// `vm:migrate(addr, { key_file, max_downtime_ms, timeout, auto_converge, on_progress })`.
pub fn migrate(lua: &Lua, vm: &Vm, addr: Value, opts: Value) -> mlua::Result<Value> {
    const F: &str = "vm:migrate";
    let (addr, arguments) = migrate_arguments(lua, addr, opts)?;
    let mut options = MigrateOptions::new(key_option(&arguments.opts)?);
    if let Some(max_downtime) = arguments.max_downtime {
        options.max_downtime = max_downtime;
    }
    if let Some(timeout) = arguments.timeout {
        options.timeout = timeout;
    }
    options.auto_converge = arguments.auto_converge;
    let on_progress = arguments.on_progress;
    // Ctrl-C, or an error in on_progress, cancels the migration (before the hand-over).
    let failed = Arc::new(AtomicBool::new(false));
    let interrupted = crate::interrupt::canceller(lua);
    let cancel_failed = failed.clone();
    let interrupted = Arc::new(Mutex::new(interrupted));
    options.cancel = Some(Arc::new(move || {
        cancel_failed.load(Ordering::SeqCst)
            || (interrupted.lock().unwrap_or_else(|p| p.into_inner()))()
    }));
    let mut callback_error: Option<mlua::Error> = None;
    let mut progress = |p: &MigrationProgress| {
        let Some(f) = &on_progress else { return };
        if callback_error.is_some() {
            return;
        }
        let result = progress_table(lua, p).and_then(|t| f.call::<()>(t));
        if let Err(e) = result {
            callback_error = Some(e);
            failed.store(true, Ordering::SeqCst);
        }
    };
    let result = vm.migrate(&addr, &options, &mut progress);
    if let Some(e) = callback_error {
        return Err(mlua::Error::runtime(format!(
            "{F}: on_progress failed, so the migration was cancelled: {e}"
        )));
    }
    let report = result.map_err(|e| mlua::Error::runtime(error_chain(&e)))?;
    report_value(lua, &report)
}

/// What `on_progress` gets, for local and remote migrations alike.
pub(crate) fn progress_table(lua: &Lua, p: &MigrationProgress) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("iteration", p.iteration)?;
    t.set("remaining_bytes", p.remaining_bytes)?;
    t.set("sent_bytes", p.sent_bytes)?;
    t.set("mbps", p.mbps)?;
    t.set("throttle", p.throttle)?;
    t.set("final", p.final_pass)?;
    Ok(t)
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The table `vm:migrate` returns: [`MigrationReport::to_json`] as Lua, the same
/// conversion a remote migration's report and a policy migration's status go through.
fn report_value(lua: &Lua, r: &MigrationReport) -> mlua::Result<Value> {
    crate::remote::json_to_lua(lua, &r.to_json(), 0)
}

/// What `listener:wait_arrival` and the `on_arrival` handler get besides the VM.
pub fn arrival_table(lua: &Lua, arrival: &Arrival) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("from", arrival.peer.as_str())?;
    t.set("bytes_received", arrival.bytes_received)?;
    t.set("total_ms", millis(arrival.total))?;
    t.set("build_ms", millis(arrival.build))?;
    Ok(t)
}

/// Calls the handler a script set with `hv.migration.on_arrival`, if any, with the VM's
/// handle and [`arrival_table`]. `luvisor serve` calls it for every VM that arrives.
pub fn run_arrival_handler(
    lua: &Lua,
    registry: &Arc<Registry>,
    arrival: &Arrival,
) -> Result<(), String> {
    let handler: Option<Function> = lua
        .named_registry_value::<Option<Function>>(ARRIVAL_HANDLER)
        .map_err(|e| e.to_string())?;
    let Some(handler) = handler else {
        return Ok(());
    };
    let vm = VmHandle::new(&arrival.vm, registry.clone());
    let info = arrival_table(lua, arrival).map_err(|e| e.to_string())?;
    crate::script::call_traced(lua, handler, (vm, info)).map(drop)
}

/// `hv.migration.listen(addr, { key_file })`: receives VMs in this process.
fn listen(lua: &Lua, registry: &Arc<Registry>, addr: Value, opts: Value) -> mlua::Result<Listener> {
    const F: &str = "hv.migration.listen";
    let addr = address_argument(F, addr)?;
    let opts = Options::from_value(lua, F, opts, &["key_file"])?;
    let key = key_option(&opts)?;
    let listener = std::net::TcpListener::bind(&addr)
        .map_err(|e| mlua::Error::runtime(format!("{F}: cannot listen on {addr}: {e}")))?;
    let server = spawn_server(listener, key, registry.clone(), ServerHandlers::default())
        .map_err(|e| mlua::Error::runtime(format!("{F}: cannot start the server: {e}")))?;
    let arrivals = server.arrivals();
    Ok(Listener {
        inner: Arc::new(Mutex::new(ListenerInner {
            server: Some(server),
            arrivals,
        })),
        registry: registry.clone(),
    })
}

struct ListenerInner {
    server: Option<ServerHandle>,
    arrivals: Receiver<Arrival>,
}

/// The Lua handle on a listener.
#[derive(Clone)]
pub struct Listener {
    inner: Arc<Mutex<ListenerInner>>,
    registry: Arc<Registry>,
}

impl Listener {
    fn lock(&self) -> std::sync::MutexGuard<'_, ListenerInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl UserData for Listener {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("address", |_, this| {
            Ok(this
                .lock()
                .server
                .as_ref()
                .map(|s| s.local_addr().to_string()))
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("wait_arrival", |lua, this, opts: Value| {
            const F: &str = "listener:wait_arrival";
            let opts = Options::from_value(lua, F, opts, &["timeout"])?;
            let timeout = opts.seconds("timeout")?.unwrap_or(crate::vm::DEFAULT_WAIT);
            let deadline = Instant::now().checked_add(timeout);
            let cancel = crate::interrupt::canceller(lua);
            loop {
                if this.lock().server.is_none() {
                    return Err(mlua::Error::runtime(format!("{F}: the listener is closed")));
                }
                let step = match deadline {
                    Some(d) => d
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(100)),
                    None => Duration::from_millis(100),
                };
                let received = this.lock().arrivals.recv_timeout(step);
                match received {
                    Ok(arrival) => {
                        let vm = VmHandle::new(&arrival.vm, this.registry.clone());
                        return Ok((vm, arrival_table(lua, &arrival)?));
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        return Err(mlua::Error::runtime(format!("{F}: the listener is closed")))
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if cancel() {
                    return Err(mlua::Error::runtime(format!("{F}: interrupted")));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(mlua::Error::runtime(format!(
                        "{F}: no VM arrived within {timeout:?}"
                    )));
                }
            }
        });
        methods.add_method("close", |_, this, ()| {
            let server = this.lock().server.take();
            drop(server);
            Ok(())
        });
        methods.add_meta_method(mlua::MetaMethod::ToString, |_, this, ()| {
            Ok(match this.lock().server.as_ref() {
                Some(s) => format!("listener<{}>", s.local_addr()),
                None => "listener<closed>".to_string(),
            })
        });
    }
}
