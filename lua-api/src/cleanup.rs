//! Cleanup scopes, per Lua state: what a test made is released when the test ends.
//!
//! `luvisor test` opens a scope around every test (and one around each file). Anything an
//! `hv` object makes that must not outlive the test registers a *closer* into the
//! innermost open scope with [`register`]. When the scope closes ([`close_scope`]):
//!
//! 1. its closers run, newest first (so a lab registered after its overlays is destroyed
//!    before they are removed);
//! 2. then every VM of the state's [`Registry`] created while the scope was open is
//!    destroyed, whatever made it (`hv.vm`, `hv.restore`, an arrival, a cold pool claim):
//!    registry ids are never reused and only grow, so these are the VMs whose id is above
//!    the highest id the registry held when the scope opened. A VM a live pool holds and
//!    has not handed out (a ready VM its filler restored in the background) is the pool's,
//!    not the scope's, and is left alone; a claimed one is released by the closer
//!    `hv.pool.claim` registers, whenever it was restored.
//!
//! A state without cleanup (`luvisor run`, the REPL, policies) has no scope: [`register`]
//! does nothing there and returns `None`, so `hv` code calls it unconditionally. A closer
//! must therefore be safe to never run, and safe to run after the object was released by
//! hand (e.g. `lab:destroy()` then the scope's closer): make it idempotent, or
//! [`dismiss`] it when the object is released.
//!
//! ```ignore
//! // In a constructor of an `hv` object, e.g. hv.lab{}:
//! let lab = Arc::new(Lab::start(...)?);
//! let held = lab.clone();
//! let id = luvisor_lua::cleanup::register(lua, format!("lab '{}'", lab.name()), move || {
//!     held.destroy().map_err(|e| e.to_string())   // idempotent
//! });
//! // and in lab:destroy(), optionally: if let Some(id) = id { cleanup::dismiss(lua, id); }
//! ```
//!
//! Closers run on the thread that closes the scope, which is the thread running the Lua
//! state; they must not call into that Lua state. A closer that fails or panics is
//! reported in the scope's [`ScopeReport`]; the others still run.

use std::cell::{Cell, RefCell};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use luvisor_runtime::{Registry, Vm, VmId};
use mlua::Lua;

/// Identifies a registered closer, for [`dismiss`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloserId(u64);

type CloseFn = Box<dyn FnOnce() -> Result<(), String>>;

struct Closer {
    id: u64,
    what: String,
    close: CloseFn,
}

struct Scope {
    name: String,
    closers: Vec<Closer>,
    /// The highest VM id in the registry when the scope opened; `None` when it was empty
    /// (then every VM is newer).
    vm_baseline: Option<VmId>,
}

/// A Lua state's stack of open scopes (its app data).
struct Scopes {
    registry: Arc<Registry>,
    stack: RefCell<Vec<Scope>>,
    next_id: Cell<u64>,
}

/// What closing a scope did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScopeReport {
    /// The scope's name, as given to [`open_scope`].
    pub name: String,
    /// How many closers ran (failed ones included).
    pub closers_run: usize,
    /// The names of the VMs destroyed because they were created in the scope.
    pub vms_destroyed: Vec<String>,
    /// One message per closer that failed or panicked: "closing WHAT: REASON".
    pub errors: Vec<String>,
}

/// Errors of the scope calls.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CleanupError {
    #[error("this Lua state has no cleanup scopes (cleanup::install was not called)")]
    NotInstalled,
    #[error("no cleanup scope is open")]
    NoScope,
}

/// Gives `lua` cleanup scopes for the VMs of `registry` (the registry its `hv` uses).
/// No scope is open yet.
pub fn install(lua: &Lua, registry: Arc<Registry>) {
    lua.set_app_data(Scopes {
        registry,
        stack: RefCell::new(Vec::new()),
        next_id: Cell::new(1),
    });
}

/// Opens a scope named `name` (for messages) inside the current one.
pub fn open_scope(lua: &Lua, name: &str) -> Result<(), CleanupError> {
    let scopes = lua
        .app_data_ref::<Scopes>()
        .ok_or(CleanupError::NotInstalled)?;
    let vm_baseline = scopes.registry.list().last().map(|vm| vm.id());
    scopes.stack.borrow_mut().push(Scope {
        name: name.to_string(),
        closers: Vec::new(),
        vm_baseline,
    });
    Ok(())
}

/// Closes the innermost scope: runs its closers newest first, then destroys the VMs
/// created since it opened. Never calls into Lua.
pub fn close_scope(lua: &Lua) -> Result<ScopeReport, CleanupError> {
    let (scope, registry) = {
        let scopes = lua
            .app_data_ref::<Scopes>()
            .ok_or(CleanupError::NotInstalled)?;
        let scope = scopes
            .stack
            .borrow_mut()
            .pop()
            .ok_or(CleanupError::NoScope)?;
        (scope, scopes.registry.clone())
    };
    // The app data borrow is released: a closer may register into the enclosing scope.
    let mut report = ScopeReport {
        name: scope.name,
        ..ScopeReport::default()
    };
    for closer in scope.closers.into_iter().rev() {
        report.closers_run += 1;
        match catch_unwind(AssertUnwindSafe(closer.close)) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => report
                .errors
                .push(format!("closing {}: {reason}", closer.what)),
            Err(_) => report
                .errors
                .push(format!("closing {}: the closer panicked", closer.what)),
        }
    }
    for vm in registry.list() {
        if swept(scope.vm_baseline, &registry, &vm) {
            report.vms_destroyed.push(vm.name().to_string());
            registry.destroy(vm.id());
        }
    }
    Ok(report)
}

/// Whether closing a scope opened at `baseline` destroys `vm`: it was created since, and
/// it is not a VM a live pool holds for later claims.
fn swept(baseline: Option<VmId>, registry: &Arc<Registry>, vm: &Vm) -> bool {
    baseline.is_none_or(|baseline| vm.id() > baseline)
        && !luvisor_runtime::pool::holds_unclaimed(registry, vm)
}

/// Whether the VM `id` was created while the innermost scope was open, so that closing
/// it destroys the VM. False without an open scope.
pub fn made_in_scope(lua: &Lua, id: VmId) -> bool {
    let Some(scopes) = lua.app_data_ref::<Scopes>() else {
        return false;
    };
    let Some(vm) = scopes.registry.get(id) else {
        return false;
    };
    let stack = scopes.stack.borrow();
    stack
        .last()
        .is_some_and(|scope| swept(scope.vm_baseline, &scopes.registry, &vm))
}

/// How many scopes are open in `lua` (0 without cleanup).
pub fn depth(lua: &Lua) -> usize {
    lua.app_data_ref::<Scopes>()
        .map_or(0, |s| s.stack.borrow().len())
}

/// Registers `close` into the innermost open scope; `what` names the object in error
/// messages ("lab 'ci'", "overlay x.qcow2"). Returns `None`, and drops `close` unrun,
/// when `lua` has no open scope.
pub fn register(
    lua: &Lua,
    what: impl Into<String>,
    close: impl FnOnce() -> Result<(), String> + 'static,
) -> Option<CloserId> {
    let scopes = lua.app_data_ref::<Scopes>()?;
    let mut stack = scopes.stack.borrow_mut();
    let scope = stack.last_mut()?;
    let id = scopes.next_id.get();
    scopes.next_id.set(id + 1);
    scope.closers.push(Closer {
        id,
        what: what.into(),
        close: Box::new(close),
    });
    Some(CloserId(id))
}

/// Removes a closer without running it (its object was released by hand). False when
/// it is not registered in any open scope (it ran already, or its scope closed).
pub fn dismiss(lua: &Lua, id: CloserId) -> bool {
    let Some(scopes) = lua.app_data_ref::<Scopes>() else {
        return false;
    };
    let mut stack = scopes.stack.borrow_mut();
    for scope in stack.iter_mut() {
        if let Some(at) = scope.closers.iter().position(|c| c.id == id.0) {
            scope.closers.remove(at);
            return true;
        }
    }
    false
}

/// Registers the removal of the file at `path` (made absolute now, so a later change of
/// directory does not matter). A file already gone is not an error.
pub fn remove_file_on_close(lua: &Lua, path: &std::path::Path) -> Option<CloserId> {
    if depth(lua) == 0 {
        return None;
    }
    let path: PathBuf = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let what = format!("file {}", path.display());
    register(lua, what, move || match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::rc::Rc;

    use luvisor_runtime::{GuestSpec, VmConfig};

    fn state() -> (Lua, Arc<Registry>) {
        let registry = Arc::new(Registry::new());
        let lua = Lua::new();
        install(&lua, registry.clone());
        (lua, registry)
    }

    fn create(registry: &Registry, name: &str) {
        let mut config = VmConfig::new(
            name,
            GuestSpec::Builtin {
                cmdline: "idle".into(),
            },
        );
        config.memory = 16 << 20;
        registry.create(config).unwrap();
    }

    fn names(registry: &Registry) -> Vec<String> {
        registry
            .list()
            .iter()
            .map(|vm| vm.name().to_string())
            .collect()
    }

    #[test]
    fn closers_run_newest_first_and_only_for_their_scope() {
        let (lua, _) = state();
        let log = Rc::new(RefCell::new(Vec::new()));
        open_scope(&lua, "file").unwrap();
        let l = log.clone();
        register(&lua, "outer", move || {
            l.borrow_mut().push("outer");
            Ok(())
        })
        .unwrap();
        open_scope(&lua, "test").unwrap();
        for name in ["first", "second"] {
            let l = log.clone();
            register(&lua, name, move || {
                l.borrow_mut().push(name);
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(depth(&lua), 2);
        let report = close_scope(&lua).unwrap();
        assert_eq!(report.name, "test");
        assert_eq!(report.closers_run, 2);
        assert_eq!(*log.borrow(), ["second", "first"]);
        close_scope(&lua).unwrap();
        assert_eq!(*log.borrow(), ["second", "first", "outer"]);
        assert_eq!(close_scope(&lua), Err(CleanupError::NoScope));
    }

    #[test]
    fn failures_and_panics_are_reported_and_the_rest_still_runs() {
        let (lua, _) = state();
        let ran = Rc::new(Cell::new(false));
        open_scope(&lua, "test").unwrap();
        let r = ran.clone();
        register(&lua, "last to run", move || {
            r.set(true);
            Ok(())
        });
        register(&lua, "a panicking closer", || panic!("boom"));
        register(&lua, "lab 'ci'", || Err("vm ci-3 did not stop".into()));
        let report = close_scope(&lua).unwrap();
        assert!(ran.get());
        assert_eq!(
            report.errors,
            [
                "closing lab 'ci': vm ci-3 did not stop",
                "closing a panicking closer: the closer panicked"
            ]
        );
    }

    #[test]
    fn a_dismissed_closer_does_not_run() {
        let (lua, _) = state();
        open_scope(&lua, "test").unwrap();
        let id = register(&lua, "never", || panic!("dismissed closers must not run")).unwrap();
        assert!(dismiss(&lua, id));
        assert!(!dismiss(&lua, id));
        assert_eq!(close_scope(&lua).unwrap().closers_run, 0);
    }

    #[test]
    fn without_a_scope_nothing_is_registered() {
        let plain = Lua::new();
        assert!(register(&plain, "x", || panic!("not registered")).is_none());
        assert_eq!(open_scope(&plain, "x"), Err(CleanupError::NotInstalled));
        let (lua, _) = state();
        assert!(register(&lua, "x", || panic!("not registered")).is_none());
        assert!(remove_file_on_close(&lua, std::path::Path::new("x")).is_none());
    }

    #[test]
    fn only_the_vms_made_in_the_scope_are_destroyed() {
        let (lua, registry) = state();
        open_scope(&lua, "file").unwrap();
        create(&registry, "kept");
        create(&registry, "gone-before");
        registry.destroy(registry.find("gone-before").unwrap().id());
        open_scope(&lua, "test").unwrap();
        create(&registry, "made-in-test");
        create(&registry, "also-made-in-test");
        assert!(made_in_scope(
            &lua,
            registry.find("made-in-test").unwrap().id()
        ));
        assert!(!made_in_scope(&lua, registry.find("kept").unwrap().id()));
        let report = close_scope(&lua).unwrap();
        assert_eq!(report.vms_destroyed, ["made-in-test", "also-made-in-test"]);
        assert_eq!(names(&registry), ["kept"]);
        let report = close_scope(&lua).unwrap();
        assert_eq!(report.vms_destroyed, ["kept"]);
        assert!(registry.list().is_empty());
    }

    #[test]
    fn files_registered_for_removal_are_removed_once() {
        let (lua, _) = state();
        let dir = std::env::temp_dir().join(format!("luvisor-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kept = dir.join("kept");
        let removed = dir.join("removed");
        let already_gone = dir.join("already-gone");
        std::fs::write(&kept, "x").unwrap();
        open_scope(&lua, "test").unwrap();
        std::fs::write(&removed, "x").unwrap();
        std::fs::write(&already_gone, "x").unwrap();
        remove_file_on_close(&lua, &removed).unwrap();
        remove_file_on_close(&lua, &already_gone).unwrap();
        std::fs::remove_file(&already_gone).unwrap();
        let report = close_scope(&lua).unwrap();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(kept.exists() && !removed.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
