//! Interrupting running Lua code (Ctrl-C in the REPL).
//!
//! A signal handler calls [`request`]; Lua code notices within a few thousand
//! instructions through a hook, and `hv.sleep` and waits on VMs within 50 ms.

use std::sync::atomic::{AtomicBool, Ordering};

use mlua::{HookTriggers, Lua, VmState};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks the running chunk to stop. Async-signal-safe: one atomic store.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Takes a pending request, if any.
pub fn take() -> bool {
    REQUESTED.swap(false, Ordering::SeqCst)
}

/// The error an interrupted chunk raises.
pub fn error() -> mlua::Error {
    mlua::Error::runtime("interrupted")
}

/// Makes Lua code in `lua` check for requests every 10,000 instructions.
pub fn install_hook(lua: &Lua) -> mlua::Result<()> {
    let triggers = HookTriggers {
        every_nth_instruction: Some(10_000),
        ..HookTriggers::new()
    };
    lua.set_hook(triggers, |_, _| {
        if take() {
            Err(error())
        } else {
            Ok(VmState::Continue)
        }
    })
}
