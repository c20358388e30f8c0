//! luvisor-lua: the `hv` Lua module.
//!
//! Each namespace lives in its own module with a `register` function; [`register`] is
//! the one list that installs them all, so there is a single place to look:
//!
//! - [`vm`] has `hv.vm{}`, `hv.vms()` and the `Vm` handle's fields and methods;
//! - [`guest`] has `hv.guest.builtin{}`;
//! - [`disk`] has `hv.disk.create{}`, `hv.disk.open()`, `hv.disk.overlay{}` and the `Disk` object;
//! - [`host`] has `hv.host()` and `hv.sleep()`;
//! - [`script`] runs scripts the way `luvisor run` does and makes errors raised from Rust
//!   reach scripts as plain messages;
//! - [`display`] gives readable forms of values for the REPL.
//!
//! Lua objects are handles: a `Vm` holds an id and resolves it in the runtime's
//! [`Registry`] on every call, so a destroyed VM raises "vm 'x' no longer exists" and
//! Lua never holds a borrow into the runtime.

pub mod disk;
pub mod display;
pub mod guest;
pub mod host;
pub mod interrupt;
pub mod options;
pub mod script;
pub mod vm;

use std::sync::Arc;

use luvisor_runtime::Registry;
use mlua::{Lua, Table};

/// Creates the `hv` table, registers every namespace, and makes it available both as
/// the global `hv` and as `require "hv"`.
pub fn register(lua: &Lua, registry: Arc<Registry>) -> mlua::Result<Table> {
    let hv = lua.create_table()?;
    vm::register(lua, &hv, registry.clone())?;
    guest::register(lua, &hv)?;
    disk::register(lua, &hv)?;
    host::register(lua, &hv)?;
    hv.set("version", env!("CARGO_PKG_VERSION"))?;
    lua.globals().set("hv", hv.clone())?;
    let loaded: Table = lua.globals().get::<Table>("package")?.get("loaded")?;
    loaded.set("hv", hv.clone())?;
    Ok(hv)
}

/// A Lua state for user scripts and the REPL: the full standard library (scripts are
/// trusted like any `lua` script; policies get a sandboxed state of their own) plus `hv`.
pub fn new_user_state(registry: Arc<Registry>) -> mlua::Result<Lua> {
    // SAFETY: `unsafe_new` only adds the `debug` library, which user scripts may use
    // like in the stock interpreter; nothing here hands Lua raw pointers.
    let lua = unsafe { Lua::unsafe_new() };
    register(&lua, registry.clone())?;
    script::install_exit(&lua, registry)?;
    script::install_error_values(&lua)?;
    Ok(lua)
}
