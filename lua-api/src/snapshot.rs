//! `vm:snapshot(path, opts)` and `hv.restore(path, opts)`.

use std::path::PathBuf;
use std::sync::Arc;

use luvisor_runtime::vm::{SnapshotOptions, SnapshotReport};
use luvisor_runtime::{Registry, Vm};
use mlua::{Lua, Table, Value};

use crate::host::error_chain;
use crate::namespace::{Context, Namespace};
use crate::options::{a_type_name, Options};
use crate::vm::VmHandle;

/// Registers `hv.restore`.
pub const NAMESPACE: Namespace = Namespace {
    name: "snapshot",
    register,
};

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let registry = context.registry.clone();
    hv.set(
        "restore",
        lua.create_function(move |lua, (path, opts): (Value, Value)| {
            restore(lua, &registry, path, opts)
        })?,
    )
}

fn path_argument(function: &str, value: Value) -> mlua::Result<PathBuf> {
    match value {
        Value::String(s) => Ok(PathBuf::from(s.to_str()?.to_string())),
        other => Err(mlua::Error::runtime(format!(
            "{function}: path must be a string naming the snapshot directory, got {}",
            a_type_name(&other)
        ))),
    }
}

/// `vm:snapshot(path, { stop = false, base = PATH, disks = "frozen" | "shared" })`.
pub fn snapshot(lua: &Lua, vm: &Vm, path: Value, opts: Value) -> mlua::Result<Table> {
    const F: &str = "vm:snapshot";
    let dir = path_argument(F, path)?;
    let opts = Options::from_value(lua, F, opts, &["stop", "base", "disks"])?;
    let shared_disks = match opts.string("disks")?.as_deref() {
        None | Some("frozen") => false,
        Some("shared") => true,
        Some(other) => {
            return Err(opts.error(format!(
                "option 'disks' must be \"frozen\" (the default: disks become read-only and \
                 the VM goes on in new overlays) or \"shared\", got {other:?}"
            )))
        }
    };
    let options = SnapshotOptions {
        stop: opts.boolean("stop")?.unwrap_or(false),
        base: opts.string("base")?.map(PathBuf::from),
        shared_disks,
    };
    let report = vm
        .snapshot(&dir, &options)
        .map_err(|e| mlua::Error::runtime(error_chain(&e)))?;
    // Under `luvisor test`, the overlays a VM made in this test goes on in are removed
    // with it when the test ends. (Not those of a VM from outside the test: it keeps
    // running on them.)
    if crate::cleanup::made_in_scope(lua, vm.id()) {
        for (_, path) in &report.new_overlays {
            crate::cleanup::remove_file_on_close(lua, path);
        }
    }
    report_table(lua, &report)
}

fn report_table(lua: &Lua, report: &SnapshotReport) -> mlua::Result<Table> {
    let t = lua.create_table()?;
    t.set("path", report.path.display().to_string())?;
    t.set("diff", report.diff)?;
    t.set("memory_bytes", report.memory_bytes)?;
    t.set("memory_pages", report.memory_pages)?;
    t.set("state_bytes", report.state_bytes)?;
    t.set("paused_ms", report.paused_for.as_secs_f64() * 1000.0)?;
    let overlays = lua.create_table()?;
    for (disk, path) in &report.new_overlays {
        overlays.set(disk + 1, path.display().to_string())?;
    }
    t.set("overlays", overlays)?;
    Ok(t)
}

/// `hv.restore(path, { name = "..." })`.
fn restore(
    lua: &Lua,
    registry: &Arc<Registry>,
    path: Value,
    opts: Value,
) -> mlua::Result<VmHandle> {
    const F: &str = "hv.restore";
    let dir = path_argument(F, path)?;
    let opts = Options::from_value(lua, F, opts, &["name"])?;
    let name = opts.string("name")?;
    let (vm, overlays) = registry
        .restore_with_overlays(&dir, name.as_deref())
        .map_err(|e| mlua::Error::runtime(error_chain(&e)))?;
    // Under `luvisor test`, the restored VM and its overlays go when the test ends.
    for path in &overlays {
        crate::cleanup::remove_file_on_close(lua, path);
    }
    Ok(VmHandle::new(&vm, registry.clone()))
}
