//! luvisor-lua: the `hv` Lua module.
//!
//! Each namespace of `hv` lives in its own module, which exports a [`Namespace`] value that
//! registers it; [`NAMESPACES`] is the one list of them. Adding a namespace is adding a
//! module and a line to that list:
//!
//! - [`vm`] has `hv.vm{}`, `hv.vms()` and the `Vm` handle's fields and methods;
//! - [`guest`] has `hv.guest.builtin{}`;
//! - [`disk`] has `hv.disk.create{}`, `hv.disk.open()`, `hv.disk.overlay{}` and the `Disk` object;
//! - [`host`] has `hv.host()`, `hv.now()` and `hv.sleep()`;
//! - [`snapshot`] has `hv.restore()` (and `vm:snapshot()`, which the `Vm` handle calls);
//! - [`migration`] has `hv.migration.listen/on_arrival` (and `vm:migrate()`);
//! - [`lab`] has `hv.lab{}` and the `Lab` handle;
//! - [`pool`] has `hv.pool.define/claim/status/set_target/remove` and the `Pool` handle;
//! - [`policy`] has `hv.policy.load/unload/status/watch/record` and the policy engine;
//! - [`remote`] has `hv.connect()`, the remote host and remote VM handles, and the
//!   control handler `luvisor serve` hands control connections to;
//! - [`events`] has `hv.on()`, `hv.off()` and `hv.handle_events()`, and runs event handlers
//!   at safe points;
//! - [`agent`] has the agent channel's side of the `Vm` handle (`vm.health`, `vm.kvp`,
//!   `vm:exec()`, `vm:shutdown{}`);
//! - `hv.version` is registered here.
//!
//! The other modules serve them all:
//!
//! - [`interrupt`] stops a Lua state's running code: Ctrl-C, [`interrupt::Interrupter`]
//!   requests and instruction budgets, each per state ([`StateLimits`]);
//! - [`script`] runs scripts the way `luvisor run` does and makes errors raised from Rust
//!   reach scripts as plain messages;
//! - [`display`] gives readable forms of values for the REPL;
//! - [`options`] reads strict option tables;
//! - [`cleanup`] keeps per-state cleanup scopes: what an `hv` object registers there is
//!   released when the scope (a test of `luvisor test`) ends;
//! - [`testing`] is `luvisor test`: the test DSL, the runner and its reports.
//!
//! Lua objects are handles: a `Vm` holds an id and resolves it in the runtime's
//! [`Registry`] on every call, so a destroyed VM raises "vm 'x' no longer exists" and
//! Lua never holds a borrow into the runtime.

pub mod agent;
pub mod cleanup;
pub mod disk;
pub mod display;
pub mod events;
pub mod guest;
pub mod host;
pub mod interrupt;
pub mod lab;
pub mod memory;
pub mod migration;
pub mod namespace;
pub mod options;
pub mod policy;
pub mod pool;
pub mod remote;
pub mod script;
pub mod snapshot;
pub mod testing;
pub mod vm;

use std::sync::Arc;

use luvisor_runtime::Registry;
use mlua::{Lua, Table};

pub use interrupt::StateLimits;
use namespace::{Context, Namespace};

/// `hv.version`: luvisor's version.
const VERSION: Namespace = Namespace {
    name: "version",
    register: |_, entries, _| entries.set("version", env!("CARGO_PKG_VERSION")),
};

/// Every namespace of `hv`, in the order they register.
pub const NAMESPACES: &[Namespace] = &[
    vm::NAMESPACE,
    guest::NAMESPACE,
    disk::NAMESPACE,
    host::NAMESPACE,
    snapshot::NAMESPACE,
    migration::NAMESPACE,
    lab::NAMESPACE,
    pool::NAMESPACE,
    policy::NAMESPACE,
    remote::NAMESPACE,
    events::NAMESPACE,
    VERSION,
];

/// Creates the `hv` table, registers every namespace of [`NAMESPACES`], and makes it
/// available both as the global `hv` and as `require "hv"`.
pub fn register(lua: &Lua, registry: Arc<Registry>) -> mlua::Result<Table> {
    let hv = lua.create_table()?;
    namespace::register_all(lua, &hv, NAMESPACES, &Context { registry })?;
    lua.globals().set("hv", hv.clone())?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("hv", hv.clone())?;
    Ok(hv)
}

/// A Lua state for user scripts and the REPL, which Ctrl-C interrupts
/// ([`StateLimits::FOREGROUND`]); see [`new_user_state_with_limits`].
pub fn new_user_state(registry: Arc<Registry>) -> mlua::Result<Lua> {
    new_user_state_with_limits(registry, StateLimits::FOREGROUND)
}

/// A Lua state for user scripts: the full standard library (scripts are trusted like any
/// `lua` script; policies get a sandboxed state of their own) plus `hv`, with its own
/// interrupt flag and instruction budget as `limits` say (see [`interrupt`]).
pub fn new_user_state_with_limits(
    registry: Arc<Registry>,
    limits: StateLimits,
) -> mlua::Result<Lua> {
    // SAFETY: `unsafe_new` only adds the `debug` library, which user scripts may use
    // like in the stock interpreter; nothing here hands Lua raw pointers.
    let lua = unsafe { Lua::unsafe_new() };
    interrupt::install(&lua, limits)?;
    register(&lua, registry.clone())?;
    script::install_exit(&lua, registry)?;
    script::install_error_values(&lua)?;
    Ok(lua)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hv_has_every_namespace_and_is_required_as_hv() {
        let lua = new_user_state(Arc::new(Registry::new())).unwrap();
        for name in [
            "vm", "vms", "guest", "disk", "host", "now", "sleep", "version", "policy", "connect",
            "hosts", "lab", "pool",
        ] {
            let present: bool = lua.load(format!("return hv.{name} ~= nil")).eval().unwrap();
            assert!(present, "hv.{name}");
        }
        let same: bool = lua.load("return require('hv') == hv").eval().unwrap();
        assert!(same);
    }
}
