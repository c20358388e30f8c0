//! `hv.pool`: warm pools of ready VMs, restored from a snapshot of a booted template.
//!
//! ```lua
//! hv.pool.define{ name = "t", min = 1, max = 16, ready = "console:hello from luvisor guest",
//!                 template = { memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; idle" } } }
//! -- define returned once `min` VMs were ready: this claim is warm
//! local vm, how = hv.pool.claim("t", { timeout = 5 })   -- how: "warm" or "cold"
//! vm:destroy()                                          -- the pool counts it returned
//! ```
//!
//! The pools themselves live in the runtime ([`luvisor_runtime::pool`]), per registry,
//! so that policies (`ctx.pools`, `ctx:pool_target`) and every Lua state of the process
//! see the same ones. A `Pool` handle holds only the name; a removed pool's handle raises
//! "no pool named ...". Pools are removed when the process ends (`luvisor run` and
//! `serve` call [`luvisor_runtime::pool::shutdown`]).

use std::path::PathBuf;
use std::sync::Arc;

use luvisor_runtime::pool::{pools, Pool, PoolSpec, PoolStatus, DEFAULT_WINDOW};
use luvisor_runtime::Registry;
use mlua::{Lua, MetaMethod, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{describe, size_value, Options};
use crate::vm::{VmHandle, DEFAULT_WAIT};

const DEFINE_OPTIONS: &[&str] = &[
    "name", "template", "ready", "min", "max", "window", "dir", "timeout",
];

/// The Lua handle on a pool: its name.
#[derive(Clone)]
pub struct PoolHandle {
    name: String,
    registry: Arc<Registry>,
}

impl PoolHandle {
    fn resolve(&self) -> mlua::Result<Arc<Pool>> {
        pools(&self.registry)
            .get(&self.name)
            .map_err(|e| mlua::Error::runtime(error_chain(&e)))
    }
}

fn pool_name(function: &str, value: Value) -> mlua::Result<String> {
    match value {
        Value::String(s) => Ok(s.to_str()?.to_string()),
        Value::UserData(ud) => match ud.borrow::<PoolHandle>() {
            Ok(p) => Ok(p.name.clone()),
            Err(_) => Err(mlua::Error::runtime(format!(
                "{function}: the pool must be a pool name or a pool, got a userdata"
            ))),
        },
        other => Err(mlua::Error::runtime(format!(
            "{function}: the pool must be a pool name or a pool, got {}",
            describe(&other)
        ))),
    }
}

/// `{ name, min, max, target, target_reason, ready, claimed, restoring, claims,
/// claims_window, window_s, returned, memory, last_error, last_restore_ms, dir,
/// ready_vms, claimed_vms }`.
fn status_table(lua: &Lua, status: &PoolStatus) -> mlua::Result<Table> {
    let s = &status.snapshot;
    let t = lua.create_table()?;
    t.set("name", s.name.as_str())?;
    t.set("min", s.min)?;
    t.set("max", s.max)?;
    t.set("target", s.target)?;
    t.set("target_reason", status.target_reason.as_str())?;
    t.set("ready", s.ready)?;
    t.set("claimed", s.claimed)?;
    t.set("restoring", s.restoring)?;
    t.set("claims", s.claims)?;
    t.set("claims_window", s.claims_window)?;
    t.set("window_s", s.window_ms as f64 / 1000.0)?;
    t.set("returned", s.returned)?;
    t.set("memory", s.memory)?;
    t.set("last_error", status.last_error.as_deref())?;
    t.set(
        "last_restore_ms",
        status.last_restore.map(|d| d.as_secs_f64() * 1000.0),
    )?;
    t.set("dir", status.dir.display().to_string())?;
    t.set("ready_vms", status.ready_vms.clone())?;
    t.set("claimed_vms", status.claimed_vms.clone())?;
    Ok(t)
}

/// `hv.pool.claim(pool, { timeout })` and `pool:claim{ timeout }`: the VM and "warm" or
/// "cold".
fn claim(
    lua: &Lua,
    registry: &Arc<Registry>,
    name: &str,
    opts: Value,
) -> mlua::Result<(VmHandle, &'static str)> {
    let opts = Options::from_value(lua, "hv.pool.claim", opts, &["timeout"])?;
    let timeout = opts.seconds("timeout")?.unwrap_or(DEFAULT_WAIT);
    let pool = pools(registry)
        .get(name)
        .map_err(|e| mlua::Error::runtime(format!("hv.pool.claim: {}", error_chain(&e))))?;
    let cancel = crate::interrupt::canceller(lua);
    let (vm, kind) = pool
        .claim(timeout, &cancel)
        .map_err(|e| mlua::Error::runtime(format!("hv.pool.claim: {}", error_chain(&e))))?;
    // Under `luvisor test`, a claimed VM goes when the test that claimed it ends (the pool
    // then counts it returned), warm or cold: a warm one was restored before the test
    // started, so the scope's sweep of the VMs made in it would not see it.
    let (for_cleanup, id) = (registry.clone(), vm.id());
    crate::cleanup::register(
        lua,
        format!("vm '{}' claimed from pool '{name}'", vm.name()),
        move || {
            for_cleanup.destroy(id);
            Ok(())
        },
    );
    Ok((VmHandle::new(&vm, registry.clone()), kind.as_str()))
}

/// `hv.pool.set_target(pool, n, reason)`: the target applied and whether it was clamped.
fn set_target(pool: &Pool, n: Value, reason: Value) -> mlua::Result<(u64, bool)> {
    let n = match size_value(&n) {
        Ok(Some(n)) => n,
        _ => {
            return Err(mlua::Error::runtime(format!(
                "hv.pool.set_target: n must be a whole number of ready VMs >= 0, got {}",
                describe(&n)
            )))
        }
    };
    let reason = match reason {
        Value::Nil => "set by a script".to_string(),
        Value::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "hv.pool.set_target: reason must be a string, got {}",
                describe(&other)
            )))
        }
    };
    let applied = pool.set_target(n, &reason);
    Ok((applied.target, applied.clamped))
}

impl UserData for PoolHandle {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("name", |_, this| {
            this.resolve()?;
            Ok(this.name.clone())
        });
        fields.add_field_method_get("dir", |_, this| {
            Ok(this.resolve()?.dir().display().to_string())
        });
        for field in [
            "min", "max", "target", "ready", "claimed", "claims", "returned",
        ] {
            fields.add_field_method_get(field, move |_, this| {
                let s = this.resolve()?.snapshot();
                Ok(match field {
                    "min" => s.min,
                    "max" => s.max,
                    "target" => s.target,
                    "ready" => s.ready,
                    "claimed" => s.claimed,
                    "claims" => s.claims,
                    _ => s.returned,
                })
            });
        }
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("claim", |lua, this, opts: Value| {
            claim(lua, &this.registry, &this.name, opts)
        });
        methods.add_method("status", |lua, this, ()| {
            status_table(lua, &this.resolve()?.status())
        });
        methods.add_method("set_target", |_, this, (n, reason): (Value, Value)| {
            set_target(&*this.resolve()?, n, reason)
        });
        methods.add_method("remove", |_, this, ()| {
            pools(&this.registry)
                .remove(&this.name)
                .map_err(|e| mlua::Error::runtime(format!("pool:remove: {}", error_chain(&e))))
        });
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            Ok(match pools(&this.registry).get(&this.name) {
                Ok(pool) => {
                    let s = pool.snapshot();
                    format!(
                        "pool<{} {} ready, {} claimed, target {}>",
                        this.name, s.ready, s.claimed, s.target
                    )
                }
                Err(_) => format!("pool<{} removed>", this.name),
            })
        });
    }
}

/// Registers `hv.pool`.
pub const NAMESPACE: Namespace = Namespace {
    name: "pool",
    register,
};

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let pool = lua.create_table()?;
    let registry = context.registry.clone();
    pool.set(
        "define",
        lua.create_function(move |lua, opts: Value| define(lua, &registry, opts))?,
    )?;
    let registry = context.registry.clone();
    pool.set(
        "claim",
        lua.create_function(move |lua, (name, opts): (Value, Value)| {
            let name = pool_name("hv.pool.claim", name)?;
            claim(lua, &registry, &name, opts)
        })?,
    )?;
    let registry = context.registry.clone();
    pool.set(
        "status",
        lua.create_function(move |lua, name: Value| {
            let all = pools(&registry);
            match name {
                Value::Nil => {
                    let list = lua.create_table()?;
                    for (i, pool) in all.list().iter().enumerate() {
                        list.raw_set(i + 1, status_table(lua, &pool.status())?)?;
                    }
                    Ok(Value::Table(list))
                }
                other => {
                    let name = pool_name("hv.pool.status", other)?;
                    match all.get(&name) {
                        Ok(pool) => Ok(Value::Table(status_table(lua, &pool.status())?)),
                        Err(_) => Ok(Value::Nil),
                    }
                }
            }
        })?,
    )?;
    let registry = context.registry.clone();
    pool.set(
        "set_target",
        lua.create_function(move |_, (name, n, reason): (Value, Value, Value)| {
            let name = pool_name("hv.pool.set_target", name)?;
            let pool = pools(&registry).get(&name).map_err(|e| {
                mlua::Error::runtime(format!("hv.pool.set_target: {}", error_chain(&e)))
            })?;
            set_target(&pool, n, reason)
        })?,
    )?;
    let registry = context.registry.clone();
    pool.set(
        "remove",
        lua.create_function(move |_, name: Value| {
            let name = pool_name("hv.pool.remove", name)?;
            pools(&registry)
                .remove(&name)
                .map_err(|e| mlua::Error::runtime(format!("hv.pool.remove: {}", error_chain(&e))))
        })?,
    )?;
    hv.set("pool", pool)
}

/// `hv.pool.define{ name, template, ready, min, max, window, dir, timeout }`.
fn define(lua: &Lua, registry: &Arc<Registry>, opts: Value) -> mlua::Result<PoolHandle> {
    const F: &str = "hv.pool.define";
    let opts = Options::from_value(lua, F, opts, DEFINE_OPTIONS)?;
    let name = opts
        .string("name")?
        .ok_or_else(|| opts.error("option 'name' is required: its VMs are NAME-1, NAME-2, ..."))?;
    let template = crate::lab::template_option(lua, F, opts.raw("template")?)?;
    let readiness = crate::lab::readiness_option(&opts)?;
    let limit = luvisor_runtime::pool::MAX_POOL_VMS as i64;
    let min = opts.integer("min", 0, limit)?.unwrap_or(1) as usize;
    let max = opts.integer("max", 1, limit)?.unwrap_or(16) as usize;
    let window = opts.seconds("window")?.unwrap_or(DEFAULT_WINDOW);
    let ready_timeout = opts.seconds("timeout")?.unwrap_or(DEFAULT_WAIT);
    let dir = opts.string("dir")?.map(PathBuf::from);
    crate::lab::hold_ctrl_c(lua);
    let cancel = crate::interrupt::canceller(lua);
    let pool = pools(registry)
        .define(
            PoolSpec {
                name,
                template,
                readiness,
                min,
                max,
                window,
                dir,
                ready_timeout,
            },
            &cancel,
        )
        .map_err(|e| opts.error(error_chain(&e)))?;
    // Under `luvisor test`, the pool (its VMs, snapshot and overlays) goes when the test
    // that defined it ends. One removed by hand already is not an error.
    let (for_cleanup, name) = (registry.clone(), pool.name().to_string());
    crate::cleanup::register(lua, format!("pool '{name}'"), move || {
        let pools = pools(&for_cleanup);
        if pools.get(&name).is_err() {
            return Ok(());
        }
        pools.remove(&name).map_err(|e| error_chain(&e))
    });
    Ok(PoolHandle {
        name: pool.name().to_string(),
        registry: registry.clone(),
    })
}
