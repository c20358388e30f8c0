//! `hv.host()` and `hv.sleep()`.

use luvisor_runtime::host::HostInfo;
use luvisor_runtime::remote::protocol::KvmReport;
use mlua::{Lua, Table, Value};

use crate::namespace::{Context, Namespace};
use crate::options::seconds_value;

/// Registers `hv.host`, `hv.now` and `hv.sleep`.
pub const NAMESPACE: Namespace = Namespace {
    name: "host",
    register,
};

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    let registry = context.registry.clone();
    hv.set(
        "host",
        lua.create_function(move |lua, opts: Value| {
            // `hv.host{ memory_reserve = "1G" }` sets the reserve, then reports.
            if !matches!(opts, Value::Nil) {
                let opts =
                    crate::options::Options::from_value(lua, "hv.host", opts, &["memory_reserve"])?;
                if let Some(reserve) = opts.size("memory_reserve")? {
                    luvisor_runtime::host::set_memory_reserve(reserve);
                }
            }
            let t = host_table(lua)?;
            t.set("memory_reserve", luvisor_runtime::host::memory_reserve())?;
            t.set("vms_resident", registry.vms_resident())?;
            Ok(t)
        })?,
    )?;
    // Seconds on a monotonic clock (for timing in scripts; os.clock() is CPU time).
    let epoch = std::time::Instant::now();
    hv.set(
        "now",
        lua.create_function(move |_, ()| Ok(epoch.elapsed().as_secs_f64()))?,
    )?;
    hv.set(
        "sleep",
        lua.create_function(|lua, secs: Value| {
            let duration = seconds_value(&secs)
                .map_err(|got| {
                    mlua::Error::runtime(format!(
                        "hv.sleep: seconds must be a number >= 0, got {got}"
                    ))
                })?
                .ok_or_else(|| {
                    mlua::Error::runtime("hv.sleep: seconds must be a number >= 0, got nil")
                })?;
            // Sleep in slices so an interrupt of this state (Ctrl-C in the REPL) ends the
            // sleep early.
            let deadline = luvisor_runtime::vstate::vcpu::deadline_after(duration);
            loop {
                let now = std::time::Instant::now();
                if now >= deadline {
                    return Ok(());
                }
                if crate::interrupt::take(lua) {
                    return Err(crate::interrupt::error());
                }
                // A safe point: handlers of queued events run here.
                crate::events::dispatch(lua)?;
                std::thread::sleep((deadline - now).min(std::time::Duration::from_millis(50)));
            }
        })?,
    )
}

/// Sets `t.kvm = { api, backend, max_vcpus, irqchip, irqfd, ioeventfd, dirty_log }`, or
/// `t.kvm = false` with `t.kvm_error` when /dev/kvm could not be opened: the same table
/// for `hv.host()` and a remote `host:info()`.
pub(crate) fn set_kvm_fields(
    lua: &Lua,
    t: &Table,
    kvm: &Result<KvmReport, String>,
) -> mlua::Result<()> {
    match kvm {
        Ok(k) => {
            let kt = lua.create_table()?;
            kt.set("api", k.api)?;
            kt.set("backend", k.backend.as_str())?;
            kt.set("max_vcpus", k.max_vcpus)?;
            kt.set("irqchip", k.irqchip)?;
            kt.set("irqfd", k.irqfd)?;
            kt.set("ioeventfd", k.ioeventfd)?;
            kt.set("dirty_log", k.dirty_log)?;
            t.set("kvm", kt)?;
        }
        Err(e) => {
            t.set("kvm", false)?;
            t.set("kvm_error", e.as_str())?;
        }
    }
    Ok(())
}

/// `{ cpus, memory_total, memory_available, kvm = { api, backend, ... } }`. The `kvm`
/// field is `false` with `kvm_error` set when /dev/kvm cannot be opened.
fn host_table(lua: &Lua) -> mlua::Result<Table> {
    let info = HostInfo::query();
    let t = lua.create_table()?;
    t.set("cpus", info.cpus)?;
    t.set("memory_total", info.memory_total)?;
    t.set("memory_available", info.memory_available)?;
    // This luvisor process: resident memory and CPU time used so far (for benchmarks).
    t.set("process_rss", luvisor_runtime::host::process_rss())?;
    t.set(
        "process_cpu_seconds",
        luvisor_runtime::host::process_cpu_seconds(),
    )?;
    set_kvm_fields(lua, &t, &KvmReport::query())?;
    Ok(t)
}

/// An error and its sources, joined with ": ".
pub use luvisor_runtime::error_chain;
