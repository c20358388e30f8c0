//! Running a Lua script file the way `luvisor run` does.
//!
//! The script gets `arg` as in the stock `lua` interpreter (`arg[0]` is the script,
//! `arg[1..]` its arguments, which are also passed as `...`). Errors come back with a
//! traceback. `os.exit` stops every VM before the process exits, so no vCPU thread or
//! guest memory outlives the script.

use std::path::Path;
use std::sync::Arc;

use luvisor_runtime::Registry;
use mlua::{Lua, Value};

/// Replaces `os.exit` with one that stops all VMs first.
pub fn install_exit(lua: &Lua, registry: Arc<Registry>) -> mlua::Result<()> {
    let os: mlua::Table = lua.globals().get("os")?;
    os.set(
        "exit",
        lua.create_function(move |_, code: Value| -> mlua::Result<()> {
            let code = match code {
                Value::Nil | Value::Boolean(true) => 0,
                Value::Boolean(false) => 1,
                Value::Integer(n) => n as i32,
                Value::Number(n) => n as i32,
                other => {
                    return Err(mlua::Error::runtime(format!(
                        "os.exit: code must be an integer or a boolean, got a {}",
                        other.type_name()
                    )))
                }
            };
            registry.stop_all();
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            std::process::exit(code);
        })?,
    )
}

/// Runs `path` with `args` (`-` reads the script from standard input, as `lua` does). On
/// failure returns the error message with a traceback.
pub fn run_file(lua: &Lua, path: &Path, args: &[String]) -> Result<(), String> {
    let source = if path == Path::new("-") {
        let mut source = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut source)
            .map_err(|e| format!("cannot read the script from standard input: {e}"))?;
        source
    } else {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
    };
    let arg = lua.create_table().map_err(|e| e.to_string())?;
    arg.raw_set(0, path.display().to_string())
        .map_err(|e| e.to_string())?;
    for (i, a) in args.iter().enumerate() {
        arg.raw_set(i + 1, a.as_str()).map_err(|e| e.to_string())?;
    }
    lua.globals().set("arg", arg).map_err(|e| e.to_string())?;
    // Skip a "#!" first line, as `lua` does.
    let source = if source.starts_with(b"#!") {
        let end = source
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(source.len());
        let mut s = b"--".to_vec();
        s.extend_from_slice(&source[2..end]);
        s.extend_from_slice(&source[end..]);
        s
    } else {
        source
    };
    let name = if path == Path::new("-") {
        "=stdin".to_string()
    } else {
        format!("@{}", path.display())
    };
    let chunk = lua
        .load(source)
        .set_name(name)
        .into_function()
        .map_err(|e| e.to_string())?;
    call_with_traceback(lua, chunk, args)
}

/// Calls `f(args...)` under `xpcall` with `debug.traceback` as the message handler.
pub fn call_with_traceback(lua: &Lua, f: mlua::Function, args: &[String]) -> Result<(), String> {
    let runner: mlua::Function = lua
        .load(
            r#"
            local f, args = ...
            return xpcall(f, function(e)
                return debug.traceback(tostring(e), 2)
            end, table.unpack(args, 1, args.n))
            "#,
        )
        .set_name("=luvisor")
        .into_function()
        .map_err(|e| e.to_string())?;
    let list = lua.create_table().map_err(|e| e.to_string())?;
    for (i, a) in args.iter().enumerate() {
        list.raw_set(i + 1, a.as_str()).map_err(|e| e.to_string())?;
    }
    list.raw_set("n", args.len()).map_err(|e| e.to_string())?;
    let (ok, message): (bool, Value) = runner.call((f, list)).map_err(|e| e.to_string())?;
    if ok {
        Ok(())
    } else {
        Err(match message {
            Value::String(s) => s.to_string_lossy(),
            other => format!("{other:?}"),
        })
    }
}
