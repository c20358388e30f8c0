//! `luvisor repl`: an interactive Lua prompt with the `hv` module. Ctrl-C at the prompt
//! drops the current input; while a chunk runs, it interrupts the chunk.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use luvisor_lua::display::format_value;
use luvisor_runtime::Registry;
use mlua::{Lua, MultiValue, Value};
use rustyline::error::ReadlineError;
use rustyline::DefaultEditor;

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

/// Evaluates `source` as an expression first (so `1 + 1` prints 2), then as statements.
fn eval(lua: &Lua, source: &str) -> Eval {
    let as_expression = lua
        .load(format!("return {source}"))
        .set_name("=stdin")
        .into_function();
    let function = match as_expression {
        Ok(f) => f,
        Err(_) => match lua.load(source).set_name("=stdin").into_function() {
            Ok(f) => f,
            Err(mlua::Error::SyntaxError {
                incomplete_input: true,
                ..
            }) => return Eval::Incomplete,
            Err(e) => return Eval::Error(e.to_string()),
        },
    };
    match function.call::<MultiValue>(()) {
        Ok(values) => Eval::Values(values),
        Err(e) => Eval::Error(e.to_string()),
    }
}

extern "C" fn on_sigint(_: libc::c_int) {
    luvisor_lua::interrupt::request();
}

/// Ctrl-C outside the line editor (while a chunk runs) interrupts the chunk instead of
/// killing the process. The editor reads Ctrl-C as a key, so it never sees this.
fn install_sigint_handler() {
    // SAFETY: a zeroed sigaction with a handler that only stores to an atomic, which is
    // async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigint as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(libc::SIGINT, &action, std::ptr::null_mut());
    }
}

pub fn run(registry: Arc<Registry>) -> ExitCode {
    let lua = match luvisor_lua::new_user_state(registry).and_then(|lua| {
        luvisor_lua::interrupt::install_hook(&lua)?;
        Ok(lua)
    }) {
        Ok(lua) => lua,
        Err(e) => {
            eprintln!("luvisor: cannot set up Lua: {e}");
            return ExitCode::FAILURE;
        }
    };
    install_sigint_handler();
    let mut editor = match DefaultEditor::new() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("luvisor: cannot start the line editor: {e}");
            return ExitCode::FAILURE;
        }
    };
    let history = history_path();
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    println!(
        "luvisor {} repl: Lua 5.4 with the `hv` module. Ctrl-D exits and stops every VM.",
        env!("CARGO_PKG_VERSION")
    );
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
                luvisor_lua::interrupt::take(); // a stale Ctrl-C must not hit this chunk
                match eval(&lua, &buffer) {
                    Eval::Incomplete => continue,
                    Eval::Values(values) => {
                        if !values.is_empty() {
                            let shown: Vec<String> =
                                values.iter().map(|v: &Value| format_value(v, 2)).collect();
                            println!("{}", shown.join("\t"));
                        }
                    }
                    Eval::Error(message) => eprintln!("error: {message}"),
                }
                let _ = editor.add_history_entry(buffer.as_str());
                buffer.clear();
            }
            Err(ReadlineError::Interrupted) => {
                // Ctrl-C: drop what was typed so far and start over.
                buffer.clear();
            }
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("luvisor: cannot read input: {e}");
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
    ExitCode::SUCCESS
}
