//! `hv.on(event, fn)` and `hv.off(id)`: Lua handlers for events about VMs.
//!
//! Events are raised on a VM's own threads (the heartbeat, on its event thread) and
//! only queued there (`luvisor_runtime::events`). Lua runs only on the thread that owns
//! the state, so handlers run at **safe points**, where the script waits anyway:
//! `hv.sleep`, the waiting methods (`vm:wait`, `vm:wait_for_console`, `vm:exec`,
//! `vm:shutdown`, `vm.kvp.guest:wait`), `hv.handle_events()`, and `luvisor serve`'s loop. A
//! handler that raises an error ends the call that was waiting with that error. Events
//! raised while a handler runs are handled after it returns (handlers do not nest).

use std::cell::RefCell;
use std::sync::Arc;

use luvisor_runtime::events::{Subscription, VmEvent, VmEventKind};
use luvisor_runtime::Registry;
use mlua::{Function, Lua, RegistryKey, Table, Value};

use crate::namespace::{Context, Namespace};
use crate::options::a_type_name;
use crate::vm::VmHandle;

/// One state's handlers and its subscription to the registry's events.
struct Hooks {
    registry: Arc<Registry>,
    subscription: Option<Arc<Subscription>>,
    handlers: Vec<Handler>,
    next_id: i64,
    /// Events taken from the subscription and not handled yet (a handler failed).
    pending: Vec<VmEvent>,
    /// A handler runs now: events wait for it to return.
    dispatching: bool,
}

struct Handler {
    id: i64,
    kind: VmEventKind,
    function: RegistryKey,
}

/// Registers `hv.on`, `hv.off` and `hv.handle_events`.
pub const NAMESPACE: Namespace = Namespace {
    name: "events",
    register,
};

fn known() -> String {
    VmEventKind::ALL
        .iter()
        .map(|k| format!("\"{}\"", k.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn register(lua: &Lua, hv: &Table, context: &Context) -> mlua::Result<()> {
    lua.set_app_data(RefCell::new(Hooks {
        registry: context.registry.clone(),
        subscription: None,
        handlers: Vec::new(),
        next_id: 1,
        pending: Vec::new(),
        dispatching: false,
    }));
    hv.set(
        "on",
        lua.create_function(|lua, (name, function): (Value, Value)| on(lua, name, function))?,
    )?;
    hv.set(
        "off",
        lua.create_function(|lua, id: Value| {
            let Value::Integer(id) = id else {
                return Err(mlua::Error::runtime(format!(
                    "hv.off: give the id hv.on returned, got {}",
                    a_type_name(&id)
                )));
            };
            let removed = with_hooks(lua, |hooks| {
                let before = hooks.handlers.len();
                hooks.handlers.retain(|h| h.id != id);
                before != hooks.handlers.len()
            });
            Ok(removed.unwrap_or(false))
        })?,
    )?;
    hv.set(
        "handle_events",
        lua.create_function(|lua, ()| dispatch(lua))?,
    )
}

fn with_hooks<R>(lua: &Lua, f: impl FnOnce(&mut Hooks) -> R) -> Option<R> {
    let hooks = lua.app_data_ref::<RefCell<Hooks>>()?;
    let mut hooks = hooks.try_borrow_mut().ok()?;
    Some(f(&mut hooks))
}

/// `hv.on(name, fn)`: adds a handler; returns its id for `hv.off`.
fn on(lua: &Lua, name: Value, function: Value) -> mlua::Result<i64> {
    let name = match name {
        Value::String(s) => s.to_str()?.to_string(),
        other => {
            return Err(mlua::Error::runtime(format!(
                "hv.on: the event name must be a string (one of {}), got {}",
                known(),
                a_type_name(&other)
            )))
        }
    };
    let kind = VmEventKind::from_name(&name).ok_or_else(|| {
        mlua::Error::runtime(format!(
            "hv.on: unknown event {name:?}; known events are {}",
            known()
        ))
    })?;
    let Value::Function(function) = function else {
        return Err(mlua::Error::runtime(format!(
            "hv.on: the handler must be a function(vm), got {}",
            a_type_name(&function)
        )));
    };
    let key = lua.create_registry_value(function)?;
    with_hooks(lua, |hooks| {
        if hooks.subscription.is_none() {
            hooks.subscription = Some(hooks.registry.events().subscribe());
        }
        let id = hooks.next_id;
        hooks.next_id += 1;
        hooks.handlers.push(Handler {
            id,
            kind,
            function: key,
        });
        id
    })
    .ok_or_else(|| {
        mlua::Error::runtime("hv.on: the event hooks are not available in this Lua state")
    })
}

/// Runs the handlers of every event queued so far (a safe point). Returns the first
/// error a handler raised; the events after it are still handled at the next safe point.
pub fn dispatch(lua: &Lua) -> mlua::Result<()> {
    let taken = with_hooks(lua, |hooks| {
        if hooks.dispatching {
            return None;
        }
        let mut events = std::mem::take(&mut hooks.pending);
        events.extend(hooks.subscription.as_ref()?.take_all());
        if events.is_empty() {
            return None;
        }
        hooks.dispatching = true;
        Some((events, hooks.registry.clone()))
    })
    .flatten();
    let Some((events, registry)) = taken else {
        return Ok(());
    };
    let mut events = events.into_iter();
    let result = run_handlers(lua, &mut events, &registry);
    // Whatever a failing handler left undone is handled at the next safe point.
    let rest: Vec<VmEvent> = events.collect();
    with_hooks(lua, |hooks| {
        hooks.dispatching = false;
        if !rest.is_empty() {
            hooks.pending.extend(rest);
        }
    });
    result
}

fn run_handlers(
    lua: &Lua,
    events: &mut impl Iterator<Item = VmEvent>,
    registry: &Arc<Registry>,
) -> mlua::Result<()> {
    for event in events.by_ref() {
        let functions: Vec<Function> = with_hooks(lua, |hooks| {
            hooks
                .handlers
                .iter()
                .filter(|h| h.kind == event.kind)
                .filter_map(|h| lua.registry_value::<Function>(&h.function).ok())
                .collect()
        })
        .unwrap_or_default();
        for f in functions {
            let vm = VmHandle::from_parts(event.vm, &event.name, registry.clone());
            f.call::<()>(vm)?;
        }
    }
    Ok(())
}

/// A wait's poll function for the runtime's `*_cancellable` calls: true on an
/// interrupt (Ctrl-C) or when a handler failed; runs the handlers of queued events in
/// between. Use [`SafePoint::finish`] on the wait's result.
pub struct SafePoint<'lua> {
    lua: &'lua Lua,
    interrupted: Box<dyn Fn() -> bool + 'lua>,
    error: RefCell<Option<mlua::Error>>,
}

impl<'lua> SafePoint<'lua> {
    pub fn new(lua: &'lua Lua) -> SafePoint<'lua> {
        SafePoint {
            lua,
            interrupted: Box::new(crate::interrupt::canceller(lua)),
            error: RefCell::new(None),
        }
    }

    /// What the runtime polls.
    pub fn poll(&self) -> bool {
        if (self.interrupted)() {
            return true;
        }
        if let Err(e) = dispatch(self.lua) {
            *self.error.borrow_mut() = Some(e);
            return true;
        }
        false
    }

    /// The wait's result, or the error a handler raised during it.
    pub fn finish<T, E: std::error::Error>(self, result: Result<T, E>) -> mlua::Result<T> {
        if let Some(e) = self.error.into_inner() {
            return Err(e);
        }
        result.map_err(|e| mlua::Error::runtime(crate::host::error_chain(&e)))
    }
}
