//! How a namespace of `hv` registers itself.
//!
//! Each module that adds to `hv` exports one [`Namespace`] value, and
//! [`crate::NAMESPACES`] lists them. A namespace sets its entries on a table of its own;
//! [`register_all`] then copies them into `hv` and refuses an entry that two namespaces
//! both set, so one namespace can never silently replace another's function.

use std::sync::Arc;

use luvisor_runtime::Registry;
use mlua::{Lua, Table, Value};

/// What a namespace may need when it registers.
#[derive(Clone)]
pub struct Context {
    /// The VMs of this process.
    pub registry: Arc<Registry>,
}

/// One namespace of `hv`.
#[derive(Clone, Copy)]
pub struct Namespace {
    /// The namespace's name in messages, usually its module's: "vm", "disk".
    pub name: &'static str,
    /// Sets the namespace's entries on `entries`, a fresh table whose keys become keys of
    /// `hv` (`entries.disk = { ... }` becomes `hv.disk`).
    pub register: fn(lua: &Lua, entries: &Table, context: &Context) -> mlua::Result<()>,
}

/// Registers each of `namespaces` into `hv`, in order. Fails, naming both namespaces,
/// when one sets an entry that is already in `hv`.
pub fn register_all(
    lua: &Lua,
    hv: &Table,
    namespaces: &[Namespace],
    context: &Context,
) -> mlua::Result<()> {
    // Which namespace set each entry, for the message about a clash.
    let mut owners: Vec<(String, &'static str)> = Vec::new();
    for namespace in namespaces {
        let entries = lua.create_table()?;
        (namespace.register)(lua, &entries, context).map_err(|e| {
            mlua::Error::runtime(format!(
                "cannot register the hv namespace '{}': {}",
                namespace.name,
                crate::script::error_message(&e)
            ))
        })?;
        for pair in entries.pairs::<Value, Value>() {
            let (key, value) = pair?;
            let key_text = match &key {
                Value::String(s) => s.to_string_lossy(),
                other => format!("{other:?}"),
            };
            if !hv.raw_get::<Value>(key.clone())?.is_nil() {
                let owner = owners
                    .iter()
                    .find(|(k, _)| *k == key_text)
                    .map_or("luvisor", |(_, owner)| owner);
                return Err(mlua::Error::runtime(format!(
                    "the hv namespace '{}' sets hv.{key_text}, which '{owner}' already set",
                    namespace.name
                )));
            }
            hv.raw_set(key, value)?;
            owners.push((key_text, namespace.name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context() -> Context {
        Context {
            registry: Arc::new(Registry::new()),
        }
    }

    const FIRST: Namespace = Namespace {
        name: "first",
        register: |_, entries, _| entries.set("shared", 1),
    };
    const SECOND: Namespace = Namespace {
        name: "second",
        register: |_, entries, _| {
            entries.set("other", 2)?;
            entries.set("shared", 2)
        },
    };
    const BROKEN: Namespace = Namespace {
        name: "broken",
        register: |_, _, _| Err(mlua::Error::runtime("no luck")),
    };

    #[test]
    fn entries_of_each_namespace_land_in_hv() {
        let lua = Lua::new();
        let hv = lua.create_table().unwrap();
        register_all(&lua, &hv, &[FIRST], &context()).unwrap();
        assert_eq!(hv.get::<i64>("shared").unwrap(), 1);
    }

    #[test]
    fn two_namespaces_cannot_set_the_same_entry() {
        let lua = Lua::new();
        let hv = lua.create_table().unwrap();
        let error = register_all(&lua, &hv, &[FIRST, SECOND], &context()).unwrap_err();
        assert_eq!(
            crate::script::error_message(&error),
            "the hv namespace 'second' sets hv.shared, which 'first' already set"
        );
        // The first namespace's entry was not replaced.
        assert_eq!(hv.get::<i64>("shared").unwrap(), 1);
    }

    #[test]
    fn a_failing_namespace_is_named() {
        let lua = Lua::new();
        let hv = lua.create_table().unwrap();
        let error = register_all(&lua, &hv, &[BROKEN], &context()).unwrap_err();
        assert_eq!(
            crate::script::error_message(&error),
            "cannot register the hv namespace 'broken': no luck"
        );
    }
}
