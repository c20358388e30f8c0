//! `luvisor repl` (and `luvisor run -i`): an interactive Lua prompt with the `hv` module.
//! Ctrl-C at the prompt drops the current input; while a chunk runs, it interrupts the
//! chunk. Tab completes global names and the fields and methods of `a.b.c.` / `a.b:`.
//!
//! When standard input is not a terminal (input piped in), lines are read without
//! editing, nothing goes into the history file, and an error in any chunk makes the exit
//! code 1 once the input ends, so `luvisor repl < file` can be used in scripts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use luvisor_lua::display::format_value;
use luvisor_runtime::Registry;
use mlua::{Function, Lua, MultiValue, ObjectLike, Table, Value};
use rustyline::completion::Completer;
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, Helper};

const PROMPT: &str = "hv> ";
const CONTINUE_PROMPT: &str = "..> ";

/// Where the history lives: `$XDG_STATE_HOME/luvisor/history`, else
/// `~/.local/state/luvisor/history`.
fn history_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(base.join("luvisor").join("history"))
}

/// What evaluating a chunk gave.
enum Eval {
    Values(MultiValue),
    Incomplete,
    Error(String),
}

/// Compiles `source` as an expression first (so `1 + 1` prints 2), then as statements.
fn compile(lua: &Lua, source: &str) -> Result<Function, Eval> {
    let as_expression = lua
        .load(format!("return {source}"))
        .set_name("=stdin")
        .into_function();
    match as_expression {
        Ok(f) => Ok(f),
        Err(_) => match lua.load(source).set_name("=stdin").into_function() {
            Ok(f) => Ok(f),
            Err(mlua::Error::SyntaxError {
                incomplete_input: true,
                ..
            }) => Err(Eval::Incomplete),
            Err(e) => Err(Eval::Error(luvisor_lua::script::error_message(&e))),
        },
    }
}

fn eval(lua: &Lua, source: &str) -> Eval {
    match compile(lua, source) {
        Ok(function) => match luvisor_lua::script::call_traced(lua, function, ()) {
            Ok(values) => Eval::Values(values),
            Err(message) => Eval::Error(message),
        },
        Err(other) => other,
    }
}

/// The syntax error of a chunk that was still incomplete when the input ended.
fn incomplete_error(lua: &Lua, source: &str) -> String {
    match lua.load(source).set_name("=stdin").into_function() {
        Ok(_) => "the input ended inside a chunk".to_string(),
        Err(e) => luvisor_lua::script::error_message(&e),
    }
}

extern "C" fn on_sigint(_: libc::c_int) {
    luvisor_lua::interrupt::ctrl_c_pressed();
}

/// Ctrl-C outside the line editor (while a chunk runs) interrupts the chunk instead of
/// killing the process: it interrupts every Lua state made with `interrupt_on_ctrl_c`
/// (the prompt's state), and no other. The editor reads Ctrl-C as a key, so it never
/// sees this.
fn install_sigint_handler() {
    // SAFETY: a zeroed sigaction with a handler that only adds to an atomic, which is
    // async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

/// `luvisor repl`: a fresh Lua state with `hv`, then the prompt. With `connect`
/// (address, key file), the global `host` is first bound to `hv.connect` on that host.
pub fn run(registry: Arc<Registry>, connect: Option<(&str, &Path)>) -> ExitCode {
    let lua = match luvisor_lua::new_user_state(registry) {
        Ok(lua) => lua,
        Err(e) => {
            eprintln!("luvisor: cannot set up Lua: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some((addr, key_file)) = connect {
        match connect_host(&lua, addr, key_file) {
            Ok(name) => println!(
                "connected to luvisor host {name} at {addr}: it is the global `host` \
                 (host:vms(), host:vm(name), host:info(), host:policies()); `hv` is this machine's."
            ),
            Err(message) => {
                eprintln!("luvisor: {message}");
                return ExitCode::FAILURE;
            }
        }
    }
    interact(&lua)
}

/// Sets the global `host` to `hv.connect(addr, { key_file })`; returns the host's name.
fn connect_host(lua: &Lua, addr: &str, key_file: &Path) -> Result<String, String> {
    let connected = (|| -> mlua::Result<String> {
        let hv: Table = lua.globals().get("hv")?;
        let connect: Function = hv.get("connect")?;
        let opts = lua.create_table()?;
        opts.set("key_file", key_file.to_string_lossy().as_ref())?;
        let host: Value = connect.call((addr, opts))?;
        let name: String = match &host {
            Value::UserData(ud) => ud.get("name")?,
            _ => String::new(),
        };
        lua.globals().set("host", host)?;
        Ok(name)
    })();
    connected.map_err(|e| luvisor_lua::script::error_message(&e))
}

/// The prompt on an existing Lua state (`luvisor run -i` keeps the script's globals). The
/// state must take Ctrl-C (`luvisor_lua::new_user_state` makes such states).
pub fn interact(lua: &Lua) -> ExitCode {
    let takes_ctrl_c = luvisor_lua::interrupt::limits(lua).is_some_and(|l| l.interrupt_on_ctrl_c);
    if !takes_ctrl_c {
        eprintln!("luvisor: cannot set up Lua: the prompt's Lua state does not take Ctrl-C");
        return ExitCode::FAILURE;
    }
    install_sigint_handler();
    let terminal = std::io::stdin().is_terminal();
    let helper = match LuaHelper::new(lua) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("luvisor: cannot set up completion: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut editor = match Editor::<LuaHelper, DefaultHistory>::with_helper(helper) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("luvisor: cannot start the line editor: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Only what a person typed belongs in the history, not a piped-in file.
    let history = if terminal { history_path() } else { None };
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    println!(
        "luvisor {} repl: Lua 5.4 with the `hv` module. Ctrl-D exits and stops every VM.",
        env!("CARGO_PKG_VERSION")
    );
    let mut failed = false;
    let mut buffer = String::new();
    loop {
        let prompt = if buffer.is_empty() {
            PROMPT
        } else {
            CONTINUE_PROMPT
        };
        match editor.readline(prompt) {
            Ok(line) => {
                if !buffer.is_empty() {
                    buffer.push('\n');
                }
                buffer.push_str(&line);
                luvisor_lua::interrupt::clear(lua); // a stale Ctrl-C must not hit this chunk
                match eval(lua, &buffer) {
                    Eval::Incomplete => continue,
                    Eval::Values(values) => {
                        if !values.is_empty() {
                            let shown: Vec<String> =
                                values.iter().map(|v: &Value| format_value(v, 2)).collect();
                            println!("{}", shown.join("\t"));
                        }
                    }
                    Eval::Error(message) => {
                        eprintln!("error: {message}");
                        failed = true;
                    }
                }
                if history.is_some() {
                    let _ = editor.add_history_entry(buffer.as_str());
                }
                buffer.clear();
            }
            Err(ReadlineError::Interrupted) => {
                // Ctrl-C: drop what was typed so far and start over.
                buffer.clear();
            }
            Err(ReadlineError::Eof) => {
                if !buffer.is_empty() {
                    eprintln!("error: {}", incomplete_error(lua, &buffer));
                    failed = true;
                }
                break;
            }
            Err(e) => {
                eprintln!("luvisor: cannot read input: {e}");
                failed = true;
                break;
            }
        }
    }
    if let Some(path) = &history {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = editor.save_history(path);
    }
    if failed && !terminal {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Tab completion for the line editor.
pub struct LuaHelper {
    lua: Lua,
    /// `userdata_members(ud) -> fields, methods` (see [`USERDATA_MEMBERS`]).
    userdata_members: Function,
}

/// Lists the field and method names of an mlua userdata. mlua keeps them out of reach of
/// scripts: the metatable is protected and `__index` is a closure over two tables,
/// `field_getters` and `methods` (a table `__index` holds methods directly). The debug
/// library reads them without calling anything.
const USERDATA_MEMBERS: &str = r#"
local getmetatable, getupvalue = debug.getmetatable, debug.getupvalue
local type, pairs, rawget = type, pairs, rawget
local function keys(t, into)
    for k in pairs(t) do
        if type(k) == "string" then
            into[#into + 1] = k
        end
    end
end
return function(ud)
    local fields, methods = {}, {}
    local mt = getmetatable(ud)
    local index = mt and rawget(mt, "__index")
    if type(index) == "table" then
        keys(index, methods)
    elseif type(index) == "function" then
        for i = 1, 255 do
            local name, value = getupvalue(index, i)
            if name == nil then
                break
            end
            if type(value) == "table" then
                if name == "field_getters" then
                    keys(value, fields)
                elseif name == "methods" or name == "__index" then
                    keys(value, methods)
                end
            end
        end
    end
    return fields, methods
end
"#;

const KEYWORDS: &[&str] = &[
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while",
];

/// How far `__index` tables are followed (they may form chains, or loops).
const MAX_INDEX_DEPTH: usize = 8;

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !KEYWORDS.contains(&s)
}

/// What the text before the cursor asks to complete: `a.b.c:par` is path `[a, b, c]`,
/// separator `:` and partial name `par`.
#[derive(Debug, PartialEq)]
struct Target<'a> {
    path: Vec<&'a str>,
    separator: Option<char>,
    partial: &'a str,
}

fn target(before_cursor: &str) -> Option<Target<'_>> {
    // Byte index just past the last character that cannot be part of a name path (that
    // character may be several bytes long, as in `"é`).
    let start = before_cursor
        .char_indices()
        .rev()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == ':'))
        .map_or(0, |(i, c)| i + c.len_utf8());
    let preceding = before_cursor[..start].trim_end();
    // After `]` or `)` the value comes from an index or a call, which is never evaluated;
    // inside a string literal there is nothing to complete.
    if preceding.ends_with([']', ')']) || preceding.ends_with(['"', '\'']) {
        return None;
    }
    let quotes = |q: char| before_cursor[..start].matches(q).count();
    if quotes('"') % 2 == 1 || quotes('\'') % 2 == 1 {
        return None;
    }
    let text = &before_cursor[start..];
    let (path_text, separator, partial) = match text.rfind(['.', ':']) {
        Some(i) => (&text[..i], Some(text[i..].chars().next()?), &text[i + 1..]),
        None => ("", None, text),
    };
    if !(partial.is_empty() || is_identifier(partial) || KEYWORDS.iter().any(|k| k == &partial)) {
        return None;
    }
    let path: Vec<&str> = if separator.is_some() {
        path_text.split('.').collect()
    } else {
        Vec::new()
    };
    if path.iter().any(|segment| !is_identifier(segment)) {
        return None;
    }
    Some(Target {
        path,
        separator,
        partial,
    })
}

impl LuaHelper {
    pub fn new(lua: &Lua) -> mlua::Result<LuaHelper> {
        let userdata_members = lua
            .load(USERDATA_MEMBERS)
            .set_name("=[luvisor completion]")
            .call(())?;
        Ok(LuaHelper {
            lua: lua.clone(),
            userdata_members,
        })
    }

    /// The value of a name path. Tables are read raw (following `__index` tables, never
    /// functions), userdata fields through their getters; nothing is called otherwise.
    fn resolve(&self, path: &[&str]) -> Option<Value> {
        let mut value = Value::Table(self.lua.globals());
        for segment in path {
            value = match value {
                Value::Table(t) => table_lookup(&t, segment)?,
                Value::UserData(ud) => ud.get::<Value>(*segment).ok()?,
                _ => return None,
            };
            if value.is_nil() {
                return None;
            }
        }
        Some(value)
    }

    /// Names reachable with `.` (every field) or `:` (only methods) on `value`.
    fn members(&self, value: &Value, methods_only: bool) -> Vec<String> {
        let mut names = Vec::new();
        match value {
            Value::Table(t) => table_keys(t, methods_only, &mut names),
            Value::UserData(ud) => {
                if let Ok((fields, methods)) = self
                    .userdata_members
                    .call::<(Vec<String>, Vec<String>)>(ud.clone())
                {
                    if !methods_only {
                        names.extend(fields);
                    }
                    names.extend(methods);
                }
            }
            Value::String(_) if methods_only => {
                if let Ok(string) = self.lua.globals().get::<Table>("string") {
                    table_keys(&string, true, &mut names);
                }
            }
            _ => {}
        }
        names
    }

    /// The completions for the text before the cursor: where the replaced word starts,
    /// and the candidates for it, sorted.
    pub fn candidates(&self, before_cursor: &str) -> (usize, Vec<String>) {
        let Some(target) = target(before_cursor) else {
            return (before_cursor.len(), Vec::new());
        };
        let start = before_cursor.len() - target.partial.len();
        let mut names = match target.separator {
            None => {
                let mut names = Vec::new();
                table_keys(&self.lua.globals(), false, &mut names);
                names.extend(KEYWORDS.iter().map(|k| k.to_string()));
                names
            }
            Some(separator) => match self.resolve(&target.path) {
                Some(value) => self.members(&value, separator == ':'),
                None => Vec::new(),
            },
        };
        // Metamethods and other `__` names only when asked for.
        let hide_private = !target.partial.starts_with("__");
        names.retain(|n| {
            n.starts_with(target.partial)
                && (is_identifier(n)
                    || (target.separator.is_none() && KEYWORDS.contains(&n.as_str())))
                && !(hide_private && n.starts_with("__"))
        });
        names.sort();
        names.dedup();
        (start, names)
    }
}

/// `t[key]` without metamethod calls: raw, then through `__index` tables.
fn table_lookup(t: &Table, key: &str) -> Option<Value> {
    let mut current = t.clone();
    for _ in 0..MAX_INDEX_DEPTH {
        let value: Value = current.raw_get(key).ok()?;
        if !value.is_nil() {
            return Some(value);
        }
        current = match current.metatable()?.raw_get::<Value>("__index").ok()? {
            Value::Table(next) => next,
            _ => return None,
        };
    }
    None
}

/// The string keys of `t` and of its `__index` tables; with `methods_only`, those whose
/// value is a function.
fn table_keys(t: &Table, methods_only: bool, into: &mut Vec<String>) {
    let mut current = t.clone();
    for _ in 0..MAX_INDEX_DEPTH {
        for (key, value) in current.pairs::<Value, Value>().flatten() {
            if let Value::String(key) = key {
                if !methods_only || value.is_function() {
                    into.push(key.to_string_lossy());
                }
            }
        }
        current = match current
            .metatable()
            .and_then(|mt| mt.raw_get::<Value>("__index").ok())
        {
            Some(Value::Table(next)) => next,
            _ => return,
        };
    }
}

impl Completer for LuaHelper {
    type Candidate = String;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<String>)> {
        Ok(self.candidates(&line[..pos]))
    }
}

impl Hinter for LuaHelper {
    type Hint = String;
}
impl Highlighter for LuaHelper {}
impl Validator for LuaHelper {}
impl Helper for LuaHelper {}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper() -> LuaHelper {
        let lua = luvisor_lua::new_user_state(Arc::new(Registry::new())).unwrap();
        LuaHelper::new(&lua).unwrap()
    }

    /// Completes `line` with the cursor at its end through the rustyline completer.
    fn complete(helper: &LuaHelper, line: &str) -> (usize, Vec<String>) {
        let history = DefaultHistory::new();
        let context = Context::new(&history);
        helper.complete(line, line.len(), &context).unwrap()
    }

    #[test]
    fn parses_the_word_before_the_cursor() {
        assert_eq!(
            target("x = vm:wa"),
            Some(Target {
                path: vec!["vm"],
                separator: Some(':'),
                partial: "wa"
            })
        );
        assert_eq!(
            target("hv.disk."),
            Some(Target {
                path: vec!["hv", "disk"],
                separator: Some('.'),
                partial: ""
            })
        );
        assert_eq!(
            target("pri"),
            Some(Target {
                path: vec![],
                separator: None,
                partial: "pri"
            })
        );
        // Calls, indexing, strings and malformed paths are not evaluated.
        assert_eq!(target("f().x"), None);
        assert_eq!(target("t[1].x"), None);
        assert_eq!(target("print(\"hv.di"), None);
        assert_eq!(target("a:b.c"), None);
        assert_eq!(target("1.5"), None);
        // Multi-byte characters before the word never split a character.
        assert_eq!(target("x = \"é"), None);
        assert_eq!(
            target("é = hv.ve"),
            Some(Target {
                path: vec!["hv"],
                separator: Some('.'),
                partial: "ve"
            })
        );
        assert_eq!(
            target("«vm:st"),
            Some(Target {
                path: vec!["vm"],
                separator: Some(':'),
                partial: "st"
            })
        );
    }

    #[test]
    fn completes_hv_names() {
        let h = helper();
        let (start, names) = complete(&h, "hv.disk.");
        assert_eq!(start, "hv.disk.".len());
        assert_eq!(names, ["create", "open", "overlay"]);
        let (start, names) = complete(&h, "local d = hv.di");
        assert_eq!(start, "local d = hv.".len());
        assert_eq!(names, ["disk"]);
        let (_, names) = complete(&h, "h");
        assert!(names.contains(&"hv".to_string()), "{names:?}");
        let (_, names) = complete(&h, "ret");
        assert_eq!(names, ["return"]);
        let (_, names) = complete(&h, "hv.");
        for expected in ["vm", "vms", "disk", "guest", "host", "sleep", "version"] {
            assert!(names.contains(&expected.to_string()), "{names:?}");
        }
        // Whatever a namespace registers completes, including namespaces added later.
        let context = luvisor_lua::namespace::Context {
            registry: Arc::new(Registry::new()),
        };
        for namespace in luvisor_lua::NAMESPACES {
            let entries = h.lua.create_table().unwrap();
            (namespace.register)(&h.lua, &entries, &context).unwrap();
            for key in entries.pairs::<String, Value>().map(|pair| pair.unwrap().0) {
                assert!(
                    names.contains(&key),
                    "{}: {key} in {names:?}",
                    namespace.name
                );
            }
        }
    }

    #[test]
    fn completes_fields_and_methods_of_userdata() {
        let h = helper();
        // Creating a VM only records its configuration; nothing runs.
        h.lua
            .load("vm = hv.vm{ name = 'c', memory = '16M', guest = hv.guest.builtin{ cmdline = 'exit 0' } }")
            .exec()
            .unwrap();
        let (start, names) = complete(&h, "vm:wa");
        assert_eq!(start, "vm:".len());
        assert_eq!(names, ["wait", "wait_for_console"]);
        // `:` offers methods only; `.` fields too.
        let (_, names) = complete(&h, "vm:");
        assert!(names.contains(&"start".to_string()), "{names:?}");
        assert!(!names.contains(&"state".to_string()), "{names:?}");
        let (_, names) = complete(&h, "vm.st");
        assert_eq!(names, ["start", "state", "stop"]);
        // A string's methods come from the string table.
        let (_, names) = complete(&h, "vm.name:up");
        assert_eq!(names, ["upper"]);
    }

    #[test]
    fn completes_tables_without_calling_anything() {
        let h = helper();
        h.lua
            .load(
                "calls = 0\n\
                 t = setmetatable({ alpha = 1, apply = function() end }, { __index = function() calls = calls + 1 end })\n\
                 u = setmetatable({}, { __index = t })",
            )
            .exec()
            .unwrap();
        let (_, names) = complete(&h, "t.a");
        assert_eq!(names, ["alpha", "apply"]);
        let (_, names) = complete(&h, "t:a");
        assert_eq!(names, ["apply"]);
        let (_, names) = complete(&h, "u.al");
        assert_eq!(names, ["alpha"]);
        let (_, names) = complete(&h, "t.missing.x");
        assert!(names.is_empty());
        assert_eq!(h.lua.globals().get::<i64>("calls").unwrap(), 0);
    }
}
