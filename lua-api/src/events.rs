//! `hv.on(event, fn)` and `hv.off(id)`: Lua handlers for events about VMs.
//!
//! Events are raised on a VM's own threads (the heartbeat, on its event thread) and
//! only queued there (`luvisor_runtime::events`). Lua runs only on the thread that owns
//! the state, so handlers run at **safe points**, where the script waits anyway:
//! `hv.sleep`, the waiting methods (`vm:wait`, `vm:wait_for_console`, `vm:exec`,
//! `vm:shutdown`, `vm.kvp.guest:wait`), `hv.handle_events()`, and `luvisor serve`'s loop. A
//! handler that raises an error ends the call that was waiting with that error. Events
//! raised while a handler runs are handled after it returns (handlers do not nest).
//!
//! Under `luvisor test`, a handler belongs to the cleanup scope it was registered in (a
//! test, or the file's top level): it is removed when that scope closes, so it never
//! fires in a later test. Once no handler is left, the subscription goes too, with the
//! events it queued.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use luvisor_runtime::events::{Subscription, VmEvent, VmEventKind};
use luvisor_runtime::Registry;
use mlua::{Function, Lua, RegistryKey, Table, Value};

use crate::namespace::{Context, Namespace};
use crate::options::a_type_name;
use crate::vm::VmHandle;

/// One state's handlers and its subscription to the registry's events. The state's app
/// data holds it behind an `Rc`, so that a cleanup closer (which must not call into Lua)
/// can remove a handler.
type SharedHooks = Rc<RefCell<Hooks>>;

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

impl Hooks {
    /// Removes the handler `id` (dropping its registry key, which does not call into
    /// Lua); whether there was one. Without handlers, the subscription and the events it
    /// queued go too: a handler added later hears only of what happens after it.
    fn remove(&mut self, id: i64) -> bool {
        let before = self.handlers.len();
        self.handlers.retain(|h| h.id != id);
        if self.handlers.is_empty() {
            self.subscription = None;
            self.pending.clear();
        }
        before != self.handlers.len()
    }
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
    let hooks: SharedHooks = Rc::new(RefCell::new(Hooks {
        registry: context.registry.clone(),
        subscription: None,
        handlers: Vec::new(),
        next_id: 1,
        pending: Vec::new(),
        dispatching: false,
    }));
    lua.set_app_data(hooks);
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
            Ok(with_hooks(lua, |hooks| hooks.remove(id)).unwrap_or(false))
        })?,
    )?;
    hv.set(
        "handle_events",
        lua.create_function(|lua, ()| dispatch(lua))?,
    )
}

fn shared_hooks(lua: &Lua) -> Option<SharedHooks> {
    lua.app_data_ref::<SharedHooks>().map(|hooks| hooks.clone())
}

fn with_hooks<R>(lua: &Lua, f: impl FnOnce(&mut Hooks) -> R) -> Option<R> {
    let hooks = shared_hooks(lua)?;
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
    let id = with_hooks(lua, |hooks| {
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
    })?;
    // Under `luvisor test`, the handler goes when the test (or file) that added it ends.
    if let Some(hooks) = shared_hooks(lua) {
        let hooks = Rc::downgrade(&hooks);
        crate::cleanup::register(lua, format!("hv.on handler {id} ({name})"), move || {
            let Some(hooks) = hooks.upgrade() else {
                return Ok(());
            };
            let mut hooks = hooks
                .try_borrow_mut()
                .map_err(|_| "the event hooks are in use".to_string())?;
            hooks.remove(id);
            Ok(())
        });
    }
    Ok(id)
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
        // Unless a handler removed the last handler (and the subscription with it).
        if !rest.is_empty() && hooks.subscription.is_some() {
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

#[cfg(test)]
mod tests {
    use super::*;

    use luvisor_runtime::events::VmEvent;

    fn lost(registry: &Registry) {
        registry.events().publish(VmEvent {
            kind: VmEventKind::HeartbeatLost,
            vm: luvisor_runtime::VmId(1),
            name: "gone".into(),
        });
    }

    fn handlers(lua: &Lua) -> usize {
        with_hooks(lua, |hooks| hooks.handlers.len()).unwrap()
    }

    /// `luvisor test` opens a scope per test: a handler added in a test does not fire in
    /// the next one.
    #[test]
    fn a_handler_goes_when_the_cleanup_scope_it_was_added_in_closes() {
        let registry = Arc::new(Registry::new());
        let lua = crate::new_user_state_with_limits(registry.clone(), Default::default()).unwrap();
        crate::cleanup::install(&lua, registry.clone());
        crate::cleanup::open_scope(&lua, "file").unwrap();
        let kept: i64 = lua
            .load("fired = {} return hv.on('heartbeat_lost', function(vm) fired[#fired + 1] = 'file' end)")
            .eval()
            .unwrap();
        crate::cleanup::open_scope(&lua, "test").unwrap();
        let stale: i64 = lua
            .load("return hv.on('heartbeat_lost', function(vm) error('stale') end)")
            .eval()
            .unwrap();
        assert_eq!(handlers(&lua), 2);
        let report = crate::cleanup::close_scope(&lua).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(handlers(&lua), 1);
        // The next test: only the file's handler hears the event.
        crate::cleanup::open_scope(&lua, "next test").unwrap();
        lost(&registry);
        lua.load("hv.handle_events()").exec().unwrap();
        let fired: Vec<String> = lua.load("return fired").eval().unwrap();
        assert_eq!(fired, ["file"]);
        let off: (bool, bool) = lua
            .load(format!("return hv.off({stale}), hv.off({kept})"))
            .eval()
            .unwrap();
        assert_eq!(off, (false, true));
        crate::cleanup::close_scope(&lua).unwrap();
        crate::cleanup::close_scope(&lua).unwrap();
        // No handler is left, and neither is the subscription or what it had queued.
        lost(&registry);
        assert!(with_hooks(&lua, |hooks| hooks.subscription.is_none()).unwrap());
    }

    /// Without cleanup scopes (`luvisor run`), handlers stay until hv.off.
    #[test]
    fn without_scopes_a_handler_stays() {
        let registry = Arc::new(Registry::new());
        let lua = crate::new_user_state_with_limits(registry.clone(), Default::default()).unwrap();
        lua.load("n = 0 hv.on('heartbeat_lost', function() n = n + 1 end)")
            .exec()
            .unwrap();
        lost(&registry);
        lua.load("hv.handle_events()").exec().unwrap();
        assert_eq!(lua.load("return n").eval::<i64>().unwrap(), 1);
    }
}
