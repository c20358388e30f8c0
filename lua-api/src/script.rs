//! Running Lua code the way `luvisor run` and the REPL do, and what errors look like to
//! scripts.
//!
//! The script gets `arg` as in the stock `lua` interpreter (`arg[0]` is the script,
//! `arg[1..]` its arguments, which are also passed as `...`). An error that ends a chunk
//! comes back as its message followed by one traceback. `os.exit` stops every VM (and
//! removes labs and pools with their files) before the process exits, so no vCPU thread,
//! guest memory or overlay outlives the script.
//!
//! # Error values
//!
//! mlua raises the error a Rust callback returns (every `hv.*` function and method) as a
//! userdata that wraps the error together with a traceback taken when it was raised;
//! its `tostring` is `runtime error: <message>` followed by that traceback. A script that
//! catches it with `pcall` would see the traceback inside the message, and the traceback
//! printed when a script dies would appear twice. [`install_error_values`] therefore
//! converts such a value into its plain message at every place where Lua code can see an
//! error value: `pcall`, `xpcall` (before the message handler runs), `coroutine.resume`
//! and `coroutine.close` (`coroutine.wrap` re-raises the value, which then reaches one of
//! those). Errors raised by Lua code (`error("x")`, error tables) pass through unchanged.

use std::path::Path;
use std::sync::Arc;

use luvisor_runtime::Registry;
use mlua::{Function, IntoLuaMulti, Lua, MultiValue, Value, Variadic};

/// Registry key of the function that runs a chunk under `xpcall` with a traceback.
const TRACED_CALL: &str = "luvisor.traced_call";

/// Name of the chunk that holds luvisor's own Lua helpers; tracebacks drop its frames.
const HELPER_CHUNK: &str = "=[luvisor]";

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
            // Labs and pools remove their overlay files; exit skips their destructors.
            luvisor_runtime::pool::shutdown(&registry);
            luvisor_runtime::lab::destroy_all();
            registry.stop_all();
            use std::io::Write;
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().flush();
            std::process::exit(code);
        })?,
    )
}

/// The message of an mlua error as a script should see it: the message a callback gave,
/// without mlua's "runtime error: " prefix or the traceback it stored.
pub fn error_message(error: &mlua::Error) -> String {
    match error {
        mlua::Error::RuntimeError(message) => message.clone(),
        mlua::Error::SyntaxError { message, .. } => message.clone(),
        mlua::Error::CallbackError { cause, .. } => error_message(cause),
        mlua::Error::WithContext { context, cause } => {
            format!("{context}: {}", error_message(cause))
        }
        mlua::Error::BadArgument {
            to,
            pos,
            name,
            cause,
        } => {
            let mut text = match name {
                Some(name) => format!("bad argument '{name}'"),
                None => format!("bad argument #{pos}"),
            };
            if let Some(to) = to {
                text.push_str(&format!(" to '{to}'"));
            }
            format!("{text}: {}", error_message(cause))
        }
        other => other.to_string(),
    }
}

/// The message of an error raised by Lua code that Rust called (`Function::call`), as a
/// script should see it: mlua appends the traceback of a string error to the message
/// itself, which is dropped here. A message without one is returned whole.
pub fn message_without_traceback(error: &mlua::Error) -> String {
    let message = error_message(error);
    match message.find("\nstack traceback:") {
        Some(at) => message[..at].to_string(),
        None => message,
    }
}

/// A Lua error value as scripts should see it: a wrapped Rust error becomes its message
/// (a string); every other value is returned unchanged.
fn plain_error_value(lua: &Lua, value: Value) -> mlua::Result<Value> {
    match value {
        Value::Error(error) => Ok(Value::String(lua.create_string(error_message(&error))?)),
        other => Ok(other),
    }
}

/// Makes every place where Lua code sees an error value see the plain message of an error
/// raised from Rust (see the module documentation), and stores the runner that
/// [`call_traced`] uses.
pub fn install_error_values(lua: &Lua) -> mlua::Result<()> {
    let plain = lua.create_function(|lua, value: Value| plain_error_value(lua, value))?;
    let traced_call: Function = lua
        .load(
            r#"
            local plain = ...
            local raw_pcall, raw_xpcall = pcall, xpcall
            local resume, close = coroutine.resume, coroutine.close
            local traceback = debug and debug.traceback
            local type, tostring, getmetatable = type, tostring, getmetatable

            -- Passes results through, turning the error value of a failure into its message.
            local function plain_failure(ok, ...)
                if ok then
                    return ok, ...
                end
                return false, plain((...))
            end

            pcall = function(f, ...)
                return plain_failure(raw_pcall(f, ...))
            end
            xpcall = function(f, handler, ...)
                return raw_xpcall(f, function(e)
                    return handler(plain(e))
                end, ...)
            end
            coroutine.resume = function(co, ...)
                return plain_failure(resume(co, ...))
            end
            coroutine.close = function(co)
                return plain_failure(close(co))
            end

            -- The message handler for chunks luvisor runs: the message, as the stock `lua`
            -- makes it, and one traceback from where the error was raised.
            local function handler(e)
                e = plain(e)
                if type(e) ~= "string" then
                    local mt = getmetatable(e)
                    if mt and mt.__tostring then
                        e = tostring(e)
                    else
                        e = "(error object is a " .. type(e) .. " value)"
                    end
                end
                if traceback then
                    return traceback(e, 2)
                end
                return e
            end
            return function(f, ...)
                return raw_xpcall(f, handler, ...)
            end
            "#,
        )
        .set_name(HELPER_CHUNK)
        .call(plain)?;
    lua.set_named_registry_value(TRACED_CALL, traced_call)
}

/// Drops the frames of luvisor's own runner from the end of a traceback: the helper
/// chunk's function and the `xpcall` it made. They are the same for every error and say
/// nothing about the script.
fn trim_runner_frames(message: &str) -> String {
    let helper_prefix = format!("\t{}:", &HELPER_CHUNK[1..]);
    let mut lines: Vec<&str> = message.lines().collect();
    let mut trimmed = false;
    while lines.len() > 1 && lines.last().is_some_and(|l| l.starts_with(&helper_prefix)) {
        lines.pop();
        trimmed = true;
    }
    if trimmed
        && lines
            .last()
            .is_some_and(|l| l.starts_with("\t[C]: in ") && l.contains("xpcall'"))
    {
        lines.pop();
    }
    if lines.last() == Some(&"stack traceback:") {
        lines.pop();
    }
    lines.join("\n")
}

/// Calls `f(args...)` under `xpcall`. Returns what `f` returned, or the error message
/// followed by one traceback from where it was raised.
pub fn call_traced(lua: &Lua, f: Function, args: impl IntoLuaMulti) -> Result<MultiValue, String> {
    let runner: Function = lua
        .named_registry_value::<Option<Function>>(TRACED_CALL)
        .ok()
        .flatten()
        .ok_or("this Lua state has no luvisor error handling (install_error_values)")?;
    let mut all = args.into_lua_multi(lua).map_err(|e| e.to_string())?;
    all.push_front(Value::Function(f));
    let mut results: MultiValue = runner.call(all).map_err(|e| error_message(&e))?;
    let ok = matches!(results.pop_front(), Some(Value::Boolean(true)));
    if ok {
        return Ok(results);
    }
    Err(match results.pop_front() {
        Some(Value::String(s)) => trim_runner_frames(&s.to_string_lossy()),
        Some(Value::Error(e)) => error_message(&e),
        other => format!("{other:?}"),
    })
}

/// Reads a script file, or standard input for `-`, as a function. A `#!` first line is
/// skipped, as `lua` does.
pub fn load_script(lua: &Lua, path: &Path) -> Result<Function, String> {
    let source = if path == Path::new("-") {
        let mut source = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut source)
            .map_err(|e| format!("cannot read the script from standard input: {e}"))?;
        source
    } else {
        std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
    };
    let name = if path == Path::new("-") {
        "=stdin".to_string()
    } else {
        format!("@{}", path.display())
    };
    load_source(lua, source, &name)
}

/// Compiles a script's `source` as a function named `chunk_name` (`@path` for a file). A
/// `#!` first line is skipped, as `lua` does.
pub fn load_source(lua: &Lua, source: Vec<u8>, chunk_name: &str) -> Result<Function, String> {
    // Turn "#!..." into a comment so line numbers stay right.
    let source = if source.starts_with(b"#!") {
        let mut s = b"--".to_vec();
        s.extend_from_slice(&source[2..]);
        s
    } else {
        source
    };
    lua.load(source)
        .set_name(chunk_name)
        .into_function()
        .map_err(|e| error_message(&e))
}

/// Sets the global `arg` as `lua` does: `arg[0]` is the script, `arg[1..]` its arguments,
/// and `arg[-1]` the interpreter: the `luvisor` executable (so a script can start another
/// luvisor, e.g. a migration peer). Without a script (only `-e` code) `arg` holds only
/// `arg[-1]`.
pub fn set_arg(lua: &Lua, script: Option<&Path>, args: &[String]) -> Result<(), String> {
    let arg = lua.create_table().map_err(|e| e.to_string())?;
    if let Ok(exe) = std::env::current_exe() {
        arg.raw_set(-1, exe.display().to_string())
            .map_err(|e| e.to_string())?;
    }
    if let Some(script) = script {
        arg.raw_set(0, script.display().to_string())
            .map_err(|e| e.to_string())?;
    }
    for (i, a) in args.iter().enumerate() {
        arg.raw_set(i + 1, a.as_str()).map_err(|e| e.to_string())?;
    }
    lua.globals().set("arg", arg).map_err(|e| e.to_string())
}

/// Runs `path` with `args` (`-` reads the script from standard input, as `lua` does). On
/// failure returns the error message with a traceback.
pub fn run_file(lua: &Lua, path: &Path, args: &[String]) -> Result<(), String> {
    let chunk = load_script(lua, path)?;
    set_arg(lua, Some(path), args)?;
    call_traced(lua, chunk, Variadic::from_iter(args.iter().cloned())).map(|_| ())
}

/// Runs `code` given on the command line (`luvisor run -e`), named `(command line)` in
/// messages as `lua -e` does.
pub fn run_code(lua: &Lua, code: &str) -> Result<(), String> {
    let chunk = lua
        .load(code)
        .set_name("=(command line)")
        .into_function()
        .map_err(|e| error_message(&e))?;
    call_traced(lua, chunk, ()).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Lua {
        // Without Ctrl-C: the interrupt tests press it in this process.
        crate::new_user_state_with_limits(Arc::new(Registry::new()), crate::StateLimits::default())
            .unwrap()
    }

    fn eval<T: mlua::FromLuaMulti>(lua: &Lua, code: &str) -> T {
        lua.load(code).eval().unwrap()
    }

    #[test]
    fn caught_errors_from_rust_are_plain_messages() {
        let lua = state();
        let (kind, message): (String, String) = eval(
            &lua,
            "local ok, e = pcall(hv.disk.open, '/nonexistent/x.img') return type(e), e",
        );
        assert_eq!(kind, "string");
        assert_eq!(
            message,
            "hv.disk.open: disk image /nonexistent/x.img does not exist"
        );
        // The message handler of xpcall sees the same string.
        let message: String = eval(
            &lua,
            "return select(2, xpcall(hv.sleep, function(e) return type(e) .. ': ' .. e end, -1))",
        );
        assert_eq!(
            message,
            "string: hv.sleep: seconds must be a number >= 0, got -1"
        );
        // So do coroutines, also through coroutine.wrap.
        let (resumed, wrapped): (String, String) = eval(
            &lua,
            "local co = coroutine.create(function() hv.sleep(-1) end)\n\
             local _, a = coroutine.resume(co)\n\
             local _, b = pcall(coroutine.wrap(function() hv.sleep(-2) end))\n\
             return a, b",
        );
        assert_eq!(resumed, "hv.sleep: seconds must be a number >= 0, got -1");
        assert_eq!(wrapped, "hv.sleep: seconds must be a number >= 0, got -2");
        // Errors raised by Lua code pass unchanged, error objects included.
        let (message, same): (String, bool) = eval(
            &lua,
            "local _, m = pcall(error, 'plain', 0)\n\
             local t = {}\n\
             local _, o = pcall(error, t)\n\
             return m, o == t",
        );
        assert_eq!(message, "plain");
        assert!(same);
        // pcall still returns every value of a success.
        let n: i64 = eval(
            &lua,
            "return select('#', pcall(function() return 1, nil, 3 end))",
        );
        assert_eq!(n, 4);
    }

    #[test]
    fn an_uncaught_error_has_its_message_and_one_traceback() {
        let lua = state();
        let chunk = lua
            .load("local x = 1\nhv.disk.open('/nonexistent/y.img')\n")
            .set_name("=test")
            .into_function()
            .unwrap();
        let message = call_traced(&lua, chunk, ()).unwrap_err();
        assert!(
            message.starts_with(
                "hv.disk.open: disk image /nonexistent/y.img does not exist\nstack traceback:\n"
            ),
            "{message}"
        );
        assert_eq!(message.matches("stack traceback:").count(), 1, "{message}");
        assert!(message.contains("test:2: in main chunk"), "{message}");
        assert!(!message.contains("runtime error"), "{message}");
        // luvisor's own runner is not part of the script's traceback.
        assert!(!message.contains("xpcall"), "{message}");
        assert!(!message.contains("[luvisor]"), "{message}");
    }

    #[test]
    fn error_objects_are_described_like_lua_does() {
        let lua = state();
        let f: Function = lua.load("error({})").into_function().unwrap();
        let message = call_traced(&lua, f, ()).unwrap_err();
        assert!(
            message.starts_with("(error object is a table value)\n"),
            "{message}"
        );
        let f: Function = lua
            .load("error(setmetatable({}, { __tostring = function() return 'custom' end }))")
            .into_function()
            .unwrap();
        let message = call_traced(&lua, f, ()).unwrap_err();
        assert!(message.starts_with("custom\n"), "{message}");
    }

    #[test]
    fn results_come_back() {
        let lua = state();
        let f: Function = lua.load("return ...").into_function().unwrap();
        let values = call_traced(&lua, f, ("a", 2)).unwrap();
        assert_eq!(values.len(), 2);
    }
}
