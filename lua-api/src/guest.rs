//! `hv.guest`: what runs inside a VM.
//!
//! `hv.guest.builtin{ cmdline = "hello; count 100" }` selects the embedded CPL3 test
//! guest (see `guest/README.md` for its commands).

use luvisor_runtime::boot::builtin::MAX_CMDLINE;
use luvisor_runtime::GuestSpec;
use mlua::{Lua, MetaMethod, Table, UserData, UserDataMethods, Value};

use crate::namespace::{Context, Namespace};
use crate::options::Options;

/// A guest description, passed to `hv.vm{ guest = ... }`.
#[derive(Clone, Debug)]
pub struct Guest(pub GuestSpec);

impl UserData for Guest {
    fn add_fields<F: mlua::UserDataFields<Self>>(fields: &mut F) {
        fields.add_field_method_get("kind", |_, _| Ok("builtin"));
        fields.add_field_method_get("cmdline", |_, this| {
            let GuestSpec::Builtin { cmdline } = &this.0;
            Ok(cmdline.clone())
        });
    }

    fn add_methods<M: UserDataMethods<Self>>(methods: &mut M) {
        methods.add_meta_method(MetaMethod::ToString, |_, this, ()| {
            let GuestSpec::Builtin { cmdline } = &this.0;
            Ok(format!("guest<builtin {cmdline:?}>"))
        });
    }
}

/// Registers `hv.guest`.
pub const NAMESPACE: Namespace = Namespace {
    name: "guest",
    register,
};

fn register(lua: &Lua, hv: &Table, _: &Context) -> mlua::Result<()> {
    let guest = lua.create_table()?;
    guest.set(
        "builtin",
        lua.create_function(|lua, opts: Value| {
            let opts = Options::from_value(lua, "hv.guest.builtin", opts, &["cmdline"])?;
            let cmdline = opts.string("cmdline")?.unwrap_or_default();
            // The guest reads its command line as text; a NUL would cut it short there.
            if let Some(at) = cmdline.bytes().position(|b| b == 0) {
                return Err(opts.error(format!(
                    "option 'cmdline' has a NUL byte at offset {at}; give text without NUL bytes"
                )));
            }
            if cmdline.len() > MAX_CMDLINE {
                return Err(opts.error(format!(
                    "option 'cmdline' is {} bytes; the built-in guest accepts at most {MAX_CMDLINE}",
                    cmdline.len()
                )));
            }
            Ok(Guest(GuestSpec::Builtin { cmdline }))
        })?,
    )?;
    hv.set("guest", guest)
}
