//! The Rust side of the test DSL (`dsl.lua`): loading it into a test file's state,
//! capturing `print`, and reading what it collected and what a test raised.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mlua::{Function, Lua, Table, Value};

use super::{Failure, FailureKind};

/// The chunk name of the DSL's own code: failure locations and tracebacks skip it.
pub(crate) const CHUNK_NAME: &str = "=[luvisor test]";

/// At most this much `print` output is kept per test.
const OUTPUT_LIMIT: usize = 1 << 20;

/// `print` output since the last [`take_output`] (app data of a test state).
struct Output(RefCell<String>);

/// A test as collected: its full name ("describe … it"), whether it is pending, and
/// where `it` was called.
#[derive(Debug, Clone)]
pub(crate) struct Collected {
    pub name: String,
    pub pending: Option<String>,
    pub location: Option<String>,
}

/// What running a test (or a file's top level) gave.
#[derive(Debug)]
pub(crate) enum Ran {
    Passed,
    Failed(Failure),
    Pending(Option<String>),
}

/// The DSL loaded into one state.
pub(crate) struct Dsl {
    api: Table,
}

/// Loads the DSL into `lua`: the globals `describe`, `it`, `pending`, `before_each`,
/// `after_each`, the `assert` table, a capturing `print`, and an `os.exit` that fails.
/// `cancelled` tells failures apart that a cancelled run caused.
pub(crate) fn install(lua: &Lua, cancelled: Arc<AtomicBool>) -> mlua::Result<Dsl> {
    lua.set_app_data(Output(RefCell::new(String::new())));
    let support = lua.create_table()?;
    support.set(
        "compare",
        lua.create_function(
            |lua, (expected, actual): (Value, Value)| match super::diff::compare(
                lua, &expected, &actual,
            )? {
                None => Ok(Value::Nil),
                Some(d) => {
                    let t = lua.create_table()?;
                    t.set("summary", d.summary)?;
                    t.set("diff", d.diff)?;
                    t.set("expected", d.expected)?;
                    t.set("actual", d.actual)?;
                    Ok(Value::Table(t))
                }
            },
        )?,
    )?;
    support.set(
        "show",
        lua.create_function(|lua, value: Value| super::diff::show(lua, &value))?,
    )?;
    support.set(
        "write",
        lua.create_function(|lua, text: mlua::LuaString| {
            if let Some(output) = lua.app_data_ref::<Output>() {
                let mut output = output.0.borrow_mut();
                if output.len() < OUTPUT_LIMIT {
                    output.push_str(&text.to_string_lossy());
                    if output.len() >= OUTPUT_LIMIT {
                        output.push_str("\n[output cut at 1 MiB]\n");
                    }
                }
            }
            Ok(())
        })?,
    )?;
    support.set(
        "cancelled",
        lua.create_function(move |_, ()| Ok(cancelled.load(Ordering::SeqCst)))?,
    )?;
    support.set("chunk_name", CHUNK_NAME)?;
    let api: Table = lua
        .load(include_str!("dsl.lua"))
        .set_name(CHUNK_NAME)
        .call(support)?;
    Ok(Dsl { api })
}

/// Takes the `print` output captured since the last call.
pub(crate) fn take_output(lua: &Lua) -> String {
    lua.app_data_ref::<Output>()
        .map(|o| std::mem::take(&mut *o.0.borrow_mut()))
        .unwrap_or_default()
}

impl Dsl {
    /// Calls `f` under the DSL's message handler.
    pub(crate) fn protect(&self, f: Function) -> Ran {
        let result = self
            .api
            .get::<Function>("protect")
            .and_then(|protect| protect.call::<Value>(f));
        ran(result)
    }

    /// Whether the file called any of the DSL's functions.
    pub(crate) fn used(&self) -> mlua::Result<bool> {
        self.api.get::<Function>("used")?.call(())
    }

    /// The tests collected, in order.
    pub(crate) fn tests(&self) -> mlua::Result<Vec<Collected>> {
        let list: Table = self.api.get::<Function>("tests")?.call(())?;
        let mut tests = Vec::new();
        for t in list.sequence_values::<Table>() {
            let t = t?;
            let pending: bool = t.get::<Option<bool>>("pending")?.unwrap_or(false);
            let source: Option<String> = t.get("source")?;
            let line: Option<i64> = t.get("line")?;
            tests.push(Collected {
                name: t.get("name")?,
                pending: pending.then(|| {
                    t.get::<Option<String>>("reason")
                        .ok()
                        .flatten()
                        .unwrap_or_default()
                }),
                location: source
                    .zip(line)
                    .map(|(s, l)| format!("{}:{l}", s.strip_prefix('@').unwrap_or(&s))),
            });
        }
        Ok(tests)
    }

    /// Runs test `index` (0-based) with its hooks.
    pub(crate) fn run(&self, index: usize) -> Ran {
        let result = self
            .api
            .get::<Function>("run")
            .and_then(|run| run.call::<Value>(index + 1));
        ran(result)
    }

    /// Whether `name` matches the Lua pattern `pattern`.
    pub(crate) fn matches(&self, name: &str, pattern: &str) -> mlua::Result<bool> {
        self.api.get::<Function>("matches")?.call((name, pattern))
    }
}

/// Reads what `protect` or `run` returned: nothing, a failure table or a pending mark.
/// An error out of the call itself (the DSL's own code stopped by a cancel) is an
/// interruption.
fn ran(result: mlua::Result<Value>) -> Ran {
    match result {
        Ok(Value::Nil) => Ran::Passed,
        Ok(Value::Table(t)) => {
            if t.get::<Option<bool>>("pending").ok().flatten() == Some(true) {
                return Ran::Pending(t.get::<Option<String>>("reason").ok().flatten());
            }
            Ran::Failed(failure_from(&t))
        }
        Ok(other) => Ran::Failed(Failure::new(
            FailureKind::Error,
            format!("the test runner got a {} from a test", other.type_name()),
        )),
        Err(e) => {
            let message = crate::script::error_message(&e);
            let kind = if message.contains("interrupted") {
                FailureKind::Interrupted
            } else {
                FailureKind::Error
            };
            Ran::Failed(Failure::new(kind, message))
        }
    }
}

fn failure_from(t: &Table) -> Failure {
    let text = |key: &str| t.get::<Option<String>>(key).ok().flatten();
    let kind = match text("kind").as_deref() {
        Some("assertion") => FailureKind::Assertion,
        Some("interrupted") => FailureKind::Interrupted,
        _ => FailureKind::Error,
    };
    let list = |key: &str| -> Vec<String> {
        t.get::<Option<Table>>(key)
            .ok()
            .flatten()
            .map(|l| {
                l.sequence_values::<String>()
                    .filter_map(Result::ok)
                    .collect()
            })
            .unwrap_or_default()
    };
    let stack = list("stack");
    Failure {
        kind,
        message: text("message").unwrap_or_else(|| "(no message)".into()),
        location: stack.first().cloned(),
        stack,
        diff: text("diff"),
        expected: text("expected"),
        actual: text("actual"),
        traceback: text("traceback").and_then(|t| trim_traceback(&t)),
        phase: text("phase"),
        also: list("also"),
    }
}

/// The traceback without the runner's frames (the DSL's chunk, luvisor's helper chunk
/// and the `xpcall`s they make); `None` when nothing of the test is left.
fn trim_traceback(traceback: &str) -> Option<String> {
    let dsl = format!("\t{}:", &CHUNK_NAME[1..]);
    let lines: Vec<&str> = traceback
        .trim_start_matches('\n')
        .lines()
        .filter(|l| {
            let runner_frame = l.starts_with(&dsl)
                || l.starts_with("\t[luvisor]:")
                || (l.starts_with("\t[C]: in ") && l.contains("xpcall"));
            !runner_frame
        })
        .collect();
    if lines.len() <= 1 {
        return None;
    }
    Some(lines.join("\n"))
}
