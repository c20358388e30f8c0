//! One loaded version of a policy: its sandboxed Lua state, the table its file returned,
//! and running its `tick` against an input.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, Table, Value};

use super::context::{self, Decision, History, Methods, PoolDecision, Scope, TickInput, TickScope};
use super::migrate::MigrateDecision;
use super::sandbox::{self, Limits};
use crate::interrupt;

/// Keys a policy table may have.
const POLICY_KEYS: &[&str] = &["name", "interval_ms", "tick", "description"];
/// `interval_ms` when the policy does not say.
pub const DEFAULT_INTERVAL_MS: u64 = 1000;
/// Allowed `interval_ms`.
pub const INTERVAL_RANGE: std::ops::RangeInclusive<u64> = 10..=3_600_000;

/// A loaded, validated policy version.
pub struct Instance {
    lua: Lua,
    /// The policy file as the user named it (`policies/dynamic_memory.lua`).
    pub file: String,
    pub name: String,
    pub interval_ms: u64,
    pub description: Option<String>,
    limits: Limits,
    tick: Function,
    /// Lua's own `xpcall`.
    xpcall: Function,
    /// Builds a tick's `ctx` (see `context::build`).
    builder: Function,
    scope: Scope,
    handler: Function,
}

/// What one run of `tick` gave.
#[derive(Debug, Clone, PartialEq)]
pub struct TickResult {
    /// The checked and clamped intents; empty when the tick failed.
    pub decisions: Vec<Decision>,
    /// The migrate intents with the guards' verdicts; empty when the tick failed.
    pub migrations: Vec<MigrateDecision>,
    /// The warm pool targets, clamped; empty when the tick failed.
    pub pools: Vec<PoolDecision>,
    /// Why the tick failed, naming the file and line where Lua can tell.
    pub error: Option<String>,
    /// Building `ctx` and running `tick`.
    pub duration: Duration,
}

/// Whether `message` already starts with a `file:line:` position.
fn has_position(message: &str) -> bool {
    let Some((head, _)) = message.split_once(": ") else {
        return false;
    };
    match head.rsplit_once(':') {
        Some((file, line)) => {
            !file.is_empty() && !line.is_empty() && line.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// The message handler ticks and the file's chunk run under: the error's plain message,
/// with the file and line of the innermost policy code in front when the message has no
/// position (errors raised by `ctx` methods, budgets).
fn message_handler(lua: &Lua, file: String) -> mlua::Result<Function> {
    lua.create_function(move |lua, error: Value| {
        let message = match &error {
            Value::Error(e) => crate::script::error_message(e),
            Value::String(s) => s.to_string_lossy(),
            Value::Nil => "nil".to_string(),
            other => format!("(error object is a {} value)", other.type_name()),
        };
        if has_position(&message) {
            return Ok(message);
        }
        let position = (1..64).find_map(|level| {
            lua.inspect_stack(level, |frame| {
                let source = frame.source();
                let line = frame.current_line()?;
                let is_file = source.source.as_deref()?.starts_with('@');
                let short = source.short_src.as_deref()?;
                is_file.then(|| format!("{short}:{line}"))
            })?
        });
        Ok(match position {
            Some(position) => format!("{position}: {message}"),
            None => format!("{file}: {message}"),
        })
    })
}

/// Plain text for an error that reached Rust without the handler (memory errors skip
/// it), with the file in front when it has no position.
fn fallback_message(file: &str, limits: Limits, error: &mlua::Error) -> String {
    let message = match error {
        mlua::Error::MemoryError(_) => format!(
            "not enough memory: the policy's memory limit is {}",
            luvisor_runtime::size::format_size(limits.memory_limit as u64)
        ),
        other => crate::script::error_message(other),
    };
    if has_position(&message) {
        message
    } else {
        format!("{file}: {message}")
    }
}

/// Turns the handler's result (`false, message`) into text.
fn failure_text(file: &str, limits: Limits, value: Value) -> String {
    match value {
        Value::String(s) => {
            let text = s.to_string_lossy();
            if text == "not enough memory" {
                fallback_message(file, limits, &mlua::Error::MemoryError(text))
            } else {
                text
            }
        }
        other => format!("{file}: (error object is a {} value)", other.type_name()),
    }
}

fn field_error(file: &str, message: impl std::fmt::Display) -> String {
    format!("{file}: {message}")
}

impl Instance {
    /// Loads `source` (the contents of `file`) into a fresh sandbox whose `require` reads
    /// `dir`, runs the chunk under the budget, and checks the table it returns.
    pub fn load(file: &str, dir: &Path, source: &str, limits: Limits) -> Result<Instance, String> {
        let (lua, prelude) = sandbox::new_state(file, dir, limits)
            .map_err(|e| field_error(file, format!("cannot set up the sandbox: {e}")))?;
        let handler = message_handler(&lua, file.to_string())
            .map_err(|e| fallback_message(file, limits, &e))?;
        let chunk = lua
            .load(source)
            .set_name(format!("@{file}"))
            .set_mode(ChunkMode::Text)
            .into_function()
            .map_err(|e| fallback_message(file, limits, &e))?;
        let (ok, value): (bool, Value) = prelude
            .xpcall
            .call((chunk, handler.clone()))
            .map_err(|e| fallback_message(file, limits, &e))?;
        if !ok {
            return Err(failure_text(file, limits, value));
        }
        let Value::Table(table) = value else {
            return Err(field_error(
                file,
                format!(
                    "the file must return a policy table {{ name = ..., interval_ms = ..., \
                     tick = function(ctx) ... end }}, got {}",
                    crate::options::describe(&value)
                ),
            ));
        };
        let (name, interval_ms, tick, description) =
            check_table(file, &table).map_err(|e| field_error(file, e))?;
        let scope: Scope = Rc::new(RefCell::new(TickScope::default()));
        let builder: Function = Methods::new(&lua, &scope)
            .and_then(|methods| prelude.make_builder.call(methods.functions()))
            .map_err(|e| fallback_message(file, limits, &e))?;
        Ok(Instance {
            lua,
            file: file.to_string(),
            name,
            interval_ms,
            description,
            limits,
            tick,
            xpcall: prelude.xpcall,
            builder,
            scope,
            handler,
        })
    }

    /// Runs `tick` once against `input` with `history` (which already holds `input`), and
    /// hands the history back. A failed tick has no decisions.
    pub fn run(&self, input: &Rc<TickInput>, tick: u64, history: History) -> (TickResult, History) {
        let started = Instant::now();
        let outcome = self.run_inner(input, tick, history);
        let (intents, history) = self.scope.borrow_mut().end();
        let error = outcome.err();
        if error.is_some() {
            // Free what a failed tick (a table bomb, say) left behind.
            let _ = self.lua.gc_collect();
        }
        let (decisions, migrations, pools) = if error.is_some() {
            (Vec::new(), Vec::new(), Vec::new())
        } else {
            (intents.decisions, intents.migrations, intents.pools)
        };
        let result = TickResult {
            decisions,
            migrations,
            pools,
            error,
            duration: started.elapsed(),
        };
        (result, history)
    }

    fn run_inner(&self, input: &Rc<TickInput>, tick: u64, history: History) -> Result<(), String> {
        let fail = |e: mlua::Error| fallback_message(&self.file, self.limits, &e);
        interrupt::reset_budget(&self.lua).map_err(fail)?;
        self.scope.borrow_mut().begin(input.clone(), tick, history);
        let ctx = context::build(&self.lua, input, tick, self.interval_ms, &self.builder)
            .map_err(fail)?;
        let (ok, value): (bool, Value) = self
            .xpcall
            .call((self.tick.clone(), self.handler.clone(), ctx))
            .map_err(fail)?;
        if ok {
            Ok(())
        } else {
            Err(failure_text(&self.file, self.limits, value))
        }
    }

    /// Bytes the policy's Lua state uses now.
    pub fn used_memory(&self) -> usize {
        self.lua.used_memory()
    }

    /// A handle that stops this state's running tick from another thread.
    pub fn interrupter(&self) -> Option<interrupt::Interrupter> {
        interrupt::interrupter(&self.lua)
    }
}

/// Checks the policy table: its keys, and the type and range of each.
fn check_table(
    file: &str,
    table: &Table,
) -> Result<(String, u64, Function, Option<String>), String> {
    let _ = file;
    for pair in table.pairs::<Value, Value>() {
        let (key, _) = pair.map_err(|e| e.to_string())?;
        let known = matches!(&key, Value::String(s) if POLICY_KEYS.iter().any(|k| s.as_bytes() == k.as_bytes()));
        if !known {
            return Err(format!(
                "the policy table has an unknown key {}; its keys are {}",
                crate::options::describe(&key),
                POLICY_KEYS.join(", ")
            ));
        }
    }
    let name = match table.raw_get::<Value>("name").map_err(|e| e.to_string())? {
        Value::String(s) => {
            let name = s.to_string_lossy();
            let valid = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(format!(
                    "the policy name {name:?} must be 1 to 64 letters, digits, '_', '.' or '-'"
                ));
            }
            name
        }
        other => {
            return Err(format!(
                "the policy table needs a name (a string), got {}",
                crate::options::describe(&other)
            ))
        }
    };
    let interval_ms = match table
        .raw_get::<Value>("interval_ms")
        .map_err(|e| e.to_string())?
    {
        Value::Nil => DEFAULT_INTERVAL_MS,
        Value::Integer(i) if i >= 0 && INTERVAL_RANGE.contains(&(i as u64)) => i as u64,
        Value::Number(f)
            if f.fract() == 0.0 && f >= 0.0 && INTERVAL_RANGE.contains(&(f as u64)) =>
        {
            f as u64
        }
        other => {
            return Err(format!(
                "interval_ms must be a whole number of milliseconds from {} to {}, got {}",
                INTERVAL_RANGE.start(),
                INTERVAL_RANGE.end(),
                crate::options::describe(&other)
            ))
        }
    };
    let tick = match table.raw_get::<Value>("tick").map_err(|e| e.to_string())? {
        Value::Function(f) => f,
        other => {
            return Err(format!(
                "the policy table needs tick = function(ctx) ... end, got {}",
                crate::options::describe(&other)
            ))
        }
    };
    let description = match table
        .raw_get::<Value>("description")
        .map_err(|e| e.to_string())?
    {
        Value::Nil => None,
        Value::String(s) => Some(s.to_string_lossy()),
        other => {
            return Err(format!(
                "description must be a string, got {}",
                crate::options::describe(&other)
            ))
        }
    };
    Ok((name, interval_ms, tick, description))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(source: &str) -> Result<Instance, String> {
        Instance::load(
            "policies/t.lua",
            &std::env::temp_dir(),
            source,
            Limits::default(),
        )
    }

    fn tick(instance: &Instance) -> TickResult {
        let input = Rc::new(TickInput::sample());
        let mut history = History::default();
        history.push(&input);
        instance.run(&input, 1, history).0
    }

    #[test]
    fn a_policy_sets_targets_with_reasons_and_rust_clamps_them() {
        let p = load(
            r#"
            return { name = "grow", interval_ms = 100, tick = function(ctx)
                for _, vm in ipairs(ctx.vms) do
                    ctx:set_memory_target(vm, vm.memory.target + 100 * 1024 * 1024, "grow " .. vm.name)
                end
                ctx:set_memory_target("busy", "64G", "too much")
            end }
            "#,
        )
        .unwrap();
        assert_eq!((p.name.as_str(), p.interval_ms), ("grow", 100));
        let result = tick(&p);
        assert_eq!(result.error, None);
        let d = &result.decisions;
        assert_eq!(d.len(), 3);
        // The last intent for a VM counts; it is clamped to max.
        assert_eq!(d[0].vm, "busy");
        assert_eq!(
            (d[0].target, d[0].clamped, d[0].reason.as_str()),
            (4096 << 20, true, "too much")
        );
        assert_eq!(
            (d[1].vm.as_str(), d[1].target, d[1].clamped),
            ("quiet", 2148 << 20, false)
        );
        assert_eq!(d[1].previous, 2048 << 20);
    }

    #[test]
    fn errors_name_the_file_and_line() {
        let error = load("return {\n name = 'x',\n tick = function(ctx) end\n")
            .err()
            .unwrap();
        assert!(error.starts_with("policies/t.lua:4:"), "{error}");
        let error = load("local x = nil\nreturn x.y").err().unwrap();
        assert!(error.starts_with("policies/t.lua:2:"), "{error}");
        let error = load("return { name = 'x', tick = 3 }").err().unwrap();
        assert_eq!(
            error,
            "policies/t.lua: the policy table needs tick = function(ctx) ... end, got 3"
        );
        let error = load("return { name = 'x', tik = function() end }")
            .err()
            .unwrap();
        assert!(error.contains("unknown key \"tik\""), "{error}");
        let error = load("return { name = 'x', interval_ms = 1, tick = function() end }")
            .err()
            .unwrap();
        assert!(error.contains("interval_ms"), "{error}");
        let p = load(
            "return { name = 'x', tick = function(ctx)\n\
             ctx:set_memory_target('nope', 1, 'why')\nend }",
        )
        .unwrap();
        let error = tick(&p).error.unwrap();
        assert_eq!(
            error,
            "policies/t.lua:2: ctx:set_memory_target: no vm named 'nope'"
        );
        let p =
            load("return { name = 'x', tick = function(ctx)\n\n ctx.host.memory_total = 1 end }")
                .unwrap();
        let error = tick(&p).error.unwrap();
        assert!(
            error.starts_with("policies/t.lua:3: the policy context is read-only"),
            "{error}"
        );
    }

    #[test]
    fn a_failed_tick_decides_nothing_and_the_state_goes_on() {
        let p = Instance::load(
            "policies/t.lua",
            &std::env::temp_dir(),
            r#"
            local calls = 0
            return { name = "x", tick = function(ctx)
                calls = calls + 1
                ctx:set_memory_target("busy", "512M", "before the failure")
                if calls == 1 then while true do end end
                if calls == 2 then local t = {} for i = 1, 1e9 do t[i] = string.rep("x", 1000) .. i end end
                ctx:set_memory_target("quiet", "512M", "call " .. calls)
            end }
            "#,
            Limits {
                instruction_budget: 200_000,
                memory_limit: 8 << 20,
            },
        )
        .unwrap();
        let first = tick(&p);
        assert!(first.decisions.is_empty());
        let error = first.error.unwrap();
        assert!(
            error.starts_with("policies/t.lua:6: instruction budget of 200000 exceeded"),
            "{error}"
        );
        let second = tick(&p);
        assert!(second.decisions.is_empty());
        let error = second.error.unwrap();
        assert!(error.contains("not enough memory"), "{error}");
        let third = tick(&p);
        assert_eq!(third.error, None);
        assert_eq!(third.decisions.len(), 2);
        assert_eq!(third.decisions[1].reason, "call 3");
    }

    #[test]
    fn ctx_follows_vms_that_come_and_go_and_stays_read_only() {
        let p = load(
            r#"
            return { name = "names", tick = function(ctx)
                local names = {}
                for i, vm in ipairs(ctx.vms) do
                    names[i] = vm.name .. "=" .. vm.memory.target .. (vm.memory.stats and "+" or "")
                end
                assert(#ctx.vms == #names)
                assert(not pcall(rawset, ctx.vms[1].memory, "target", 0))
                assert(not pcall(setmetatable, ctx.host, nil))
                assert(getmetatable(ctx) == "read-only")
                local n = 0
                for k, v in pairs(ctx.vms[1].memory) do n = n + 1 end
                assert(n == 9 or n == 8, n)
                ctx:set_memory_target(ctx.vms[1], "1G", table.concat(names, " "))
            end }
            "#,
        )
        .unwrap();
        let mut input = TickInput::sample();
        let mut reasons = Vec::new();
        for round in 0..4 {
            match round {
                1 => {
                    input.vms.remove(0);
                }
                2 => {
                    let mut vm = input.vms[0].clone();
                    vm.name = "new".into();
                    vm.memory.stats = None;
                    vm.memory.target = 300 << 20;
                    input.vms.push(vm);
                }
                3 => {
                    input.vms[0].memory.stats = None;
                    input.vms.swap(0, 2);
                }
                _ => {}
            }
            let shared = Rc::new(input.clone());
            let mut history = History::default();
            history.push(&shared);
            let (result, _) = p.run(&shared, round, history);
            assert_eq!(result.error, None);
            reasons.push(result.decisions[0].reason.clone());
        }
        assert_eq!(
            reasons,
            [
                "busy=1073741824+ quiet=2147483648+ booting=1073741824",
                "quiet=2147483648+ booting=1073741824",
                "quiet=2147483648+ booting=1073741824 new=314572800",
                "new=314572800 booting=1073741824 quiet=2147483648",
            ]
        );
    }

    #[test]
    fn windowed_helpers_read_the_history() {
        let p = load(
            r#"
            return { name = "w", tick = function(ctx)
                local busy = ctx.vms[1]
                assert(#ctx.vms == 3 and busy.name == "busy")
                local n = 0
                for k in pairs(ctx.host) do n = n + 1 end
                assert(n == 4)
                ctx:set_memory_target(busy, math.floor(ctx:mean(busy, "available", 3)), "mean")
                ctx:set_memory_target("quiet", ctx:max("quiet", "target"), "max")
                assert(ctx:mean("booting", "available") == nil)
                assert(ctx:min("booting", "size") == 1024 * 1024 * 1024)
            end }
            "#,
        )
        .unwrap();
        let mut input = TickInput::sample();
        let mut history = History::default();
        for available in [100u64, 200, 300, 400] {
            input.vms[0].memory.stats.as_mut().unwrap().stats.available = Some(available << 20);
            history.push(&input);
        }
        let (result, _) = p.run(&Rc::new(input), 4, history);
        assert_eq!(result.error, None);
        // The mean of the last three samples: 200M, 300M and 400M.
        assert_eq!(result.decisions[0].asked, 300 << 20);
        assert_eq!(result.decisions[1].asked, 2048 << 20);
    }
}
