//! `vm.memory`: a VM's dynamic memory (size, balloon target, resident, guest stats) and
//! guest-physical access for harnesses; and the `memory = { ... }` table of `hv.vm{}`.

use luvisor_runtime::vm::dynamic_memory::{MemoryKnobs, DEFAULT_BUFFER_PERCENT, DEFAULT_WEIGHT};
use mlua::{Lua, Table, UserData, UserDataFields, UserDataMethods, Value};

use crate::host::error_chain;
use crate::options::{a_type_name, size_value, Options};
use crate::vm::VmHandle;

/// Most bytes `vm.memory:read` returns at once.
const MAX_READ: u64 = 64 << 20;

/// Reads `memory = { startup, min, max, buffer, weight }` of `hv.vm{}`: `startup` is
/// required; `max` and `min` default to `startup`.
pub fn knobs_option(lua: &Lua, table: Table) -> mlua::Result<MemoryKnobs> {
    let opts = Options::from_value(
        lua,
        "hv.vm: memory",
        Value::Table(table),
        &["startup", "min", "max", "buffer", "weight"],
    )?;
    let startup = opts.size("startup")?.ok_or_else(|| {
        opts.error("option 'startup' is required: the memory the guest boots with, e.g. \"256M\"")
    })?;
    Ok(MemoryKnobs {
        startup,
        min: opts.size("min")?.unwrap_or(startup),
        max: opts.size("max")?.unwrap_or(startup),
        buffer_percent: opts
            .integer("buffer", 0, u32::MAX as i64)?
            .map_or(DEFAULT_BUFFER_PERCENT, |b| b as u32),
        weight: opts
            .integer("weight", 0, u32::MAX as i64)?
            .map_or(DEFAULT_WEIGHT, |w| w as u32),
    })
}

/// The `vm.memory` object. Like the VM handle, it resolves the VM on every use.
pub struct VmMemory(pub VmHandle);

fn lua_err(e: impl std::error::Error) -> mlua::Error {
    mlua::Error::runtime(error_chain(&e))
}

impl UserData for VmMemory {
    fn add_fields<F: UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("size", |_, this| Ok(this.0.resolve()?.memory_size()));
        fields.add_field_method_get("target", |_, this| Ok(this.0.resolve()?.memory_target()));
        fields.add_field_method_get("resident", |_, this| {
            Ok(this.0.resolve()?.memory_resident())
        });
        fields.add_field_method_get("held", |_, this| {
            Ok(this.0.resolve()?.balloon_status().held_bytes())
        });
        fields.add_field_method_get("stats_period", |_, this| {
            Ok(this.0.resolve()?.memory_stats_period().as_secs_f64())
        });
        fields.add_field_method_get("min", |_, this| Ok(this.0.resolve()?.memory_knobs().min));
        fields.add_field_method_get("max", |_, this| Ok(this.0.resolve()?.memory_knobs().max));
        fields.add_field_method_get("startup", |_, this| {
            Ok(this.0.resolve()?.memory_knobs().startup)
        });
        fields.add_field_method_get("buffer", |_, this| {
            Ok(this.0.resolve()?.memory_knobs().buffer_percent)
        });
        fields.add_field_method_get("weight", |_, this| {
            Ok(this.0.resolve()?.memory_knobs().weight)
        });
        fields.add_field_method_get("stats", |lua, this| {
            let Some(stats) = this.0.resolve()?.memory_stats() else {
                return Ok(Value::Nil);
            };
            let t = lua.create_table()?;
            for (name, value) in stats.fields() {
                if let Some(value) = value {
                    t.set(name, value)?;
                }
            }
            t.set("age_ms", stats.age.as_secs_f64() * 1000.0)?;
            Ok(Value::Table(t))
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_method("set_target", |lua, this, (target, opts): (Value, Value)| {
            let vm = this.0.resolve()?;
            let (target, reason) = target_arguments(lua, target, opts)?;
            let applied = vm.set_memory_target(target, &reason).map_err(lua_err)?;
            Ok((applied.applied, applied.clamped))
        });
        methods.add_method("set_stats_period", |_, this, seconds: Value| {
            let vm = this.0.resolve()?;
            vm.set_memory_stats_period(stats_period_argument(seconds)?)
                .map_err(lua_err)
        });
        methods.add_method("read", |lua, this, (gpa, len): (Value, Value)| {
            let vm = this.0.resolve()?;
            let (gpa, len) = read_arguments(gpa, len)?;
            let mut buf = vec![0u8; len as usize];
            vm.read_memory(gpa, &mut buf).map_err(lua_err)?;
            lua.create_string(&buf)
        });
        methods.add_method("write", |_, this, (gpa, bytes): (Value, Value)| {
            let vm = this.0.resolve()?;
            let (gpa, bytes) = write_arguments(gpa, bytes)?;
            vm.write_memory(gpa, &bytes.as_bytes()).map_err(lua_err)
        });
    }
}

/// `vm.memory:set_target(target, { reason })`'s arguments: the target in bytes and the
/// reason (default "script"). Shared with remote VM handles.
pub(crate) fn target_arguments(
    lua: &Lua,
    target: Value,
    opts: Value,
) -> mlua::Result<(u64, String)> {
    let target = size_value(&target)
        .map_err(|got| {
            mlua::Error::runtime(format!(
                "vm.memory:set_target: target must be a size (bytes, or \"384M\"), got {got}"
            ))
        })?
        .ok_or_else(|| mlua::Error::runtime("vm.memory:set_target: target is required"))?;
    let opts = Options::from_value(lua, "vm.memory:set_target", opts, &["reason"])?;
    let reason = opts.string("reason")?.unwrap_or_else(|| "script".into());
    Ok((target, reason))
}

/// `vm.memory:set_stats_period(seconds)`'s argument.
pub(crate) fn stats_period_argument(seconds: Value) -> mlua::Result<std::time::Duration> {
    let seconds = match seconds {
        Value::Integer(i) if i >= 0 => i as f64,
        Value::Number(f) if f >= 0.0 && f.is_finite() => f,
        other => {
            return Err(mlua::Error::runtime(format!(
                "vm.memory:set_stats_period: seconds must be a non-negative number, got {}",
                crate::options::describe(&other)
            )))
        }
    };
    std::time::Duration::try_from_secs_f64(seconds).map_err(|_| {
        mlua::Error::runtime(format!(
            "vm.memory:set_stats_period: {seconds} seconds is out of range"
        ))
    })
}

/// `vm.memory:read(gpa, len)`'s arguments; `len` is at most [`MAX_READ`].
pub(crate) fn read_arguments(gpa: Value, len: Value) -> mlua::Result<(u64, u64)> {
    let gpa = address("vm.memory:read", "gpa", &gpa)?;
    let len = address("vm.memory:read", "len", &len)?;
    if len > MAX_READ {
        return Err(mlua::Error::runtime(format!(
            "vm.memory:read: len {len} is more than {MAX_READ} bytes at once"
        )));
    }
    Ok((gpa, len))
}

/// `vm.memory:write(gpa, bytes)`'s arguments.
pub(crate) fn write_arguments(gpa: Value, bytes: Value) -> mlua::Result<(u64, mlua::LuaString)> {
    let gpa = address("vm.memory:write", "gpa", &gpa)?;
    let Value::String(bytes) = bytes else {
        return Err(mlua::Error::runtime(format!(
            "vm.memory:write: bytes must be a string, got {}",
            a_type_name(&bytes)
        )));
    };
    Ok((gpa, bytes))
}

/// A non-negative integer argument.
fn address(function: &str, name: &str, value: &Value) -> mlua::Result<u64> {
    match value {
        Value::Integer(i) if *i >= 0 => Ok(*i as u64),
        Value::Number(f) if *f >= 0.0 && f.fract() == 0.0 && *f < 2f64.powi(63) => Ok(*f as u64),
        other => Err(mlua::Error::runtime(format!(
            "{function}: {name} must be a non-negative integer, got {}",
            crate::options::describe(other)
        ))),
    }
}
