//! The Lua state a policy runs in: its own state per policy and per version, with only
//! what a policy needs.
//!
//! - Libraries: `string`, `table`, `math`, `utf8`, `coroutine`, and from `os` only
//!   `time`, `clock`, `date` and `difftime`. No `io`, no `debug`, no `package`; no
//!   `dofile`, `loadfile` or `string.dump`. `load` takes text only (a binary chunk is
//!   refused: Lua does not check bytecode). `collectgarbage` only counts and collects.
//! - `require "a.b"` loads `a/b.lua` from the policies directory (the policy file's
//!   folder), and nothing else: names are dotted words, and a file that resolves outside
//!   the directory (through a link) is refused.
//! - `print` goes to the log (target `luvisor::policy`, info), naming the policy file.
//! - An instruction budget per run ([`crate::interrupt`], reset before each tick) and a
//!   memory limit for the whole state (mlua's allocator): an endless loop or a table bomb
//!   fails that run with a clear error, and the host goes on.

use std::path::{Path, PathBuf};

use mlua::chunk::ChunkMode;
use mlua::{Function, Lua, LuaOptions, StdLib, Table, Value, Variadic};

use crate::interrupt::{self, StateLimits};

/// Default instruction budget of one tick (or of loading the file).
pub const DEFAULT_INSTRUCTION_BUDGET: u64 = 20_000_000;
/// Default memory limit of one policy's Lua state.
pub const DEFAULT_MEMORY_LIMIT: usize = 64 << 20;
/// The largest policy file or module `require` reads.
pub const MAX_SOURCE: u64 = 1 << 20;

/// What a policy's state may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Lua VM instructions per tick.
    pub instruction_budget: u64,
    /// Bytes of memory for the whole Lua state.
    pub memory_limit: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            instruction_budget: DEFAULT_INSTRUCTION_BUDGET,
            memory_limit: DEFAULT_MEMORY_LIMIT,
        }
    }
}

/// Helpers made before any policy code runs; policy code cannot reach their upvalues.
pub(crate) struct Prelude {
    /// `make_builder(set_memory_target, mean, max, min, migrate, held, improves,
    /// migration_cost, pool_target)` returns the function that builds a tick's read-only `ctx` from the
    /// flat values of [`crate::policy::context::build`].
    pub make_builder: Function,
    /// Lua's own `xpcall`, before `install_error_values` wraps it.
    pub xpcall: Function,
}

/// The trusted Lua part of the sandbox: the `ctx` builder.
///
/// Every table of `ctx` is read-only through a proxy: an empty table whose metatable
/// reads from the real table (`__index`), refuses writes (`__newindex`), and hides itself
/// (`__metatable`). `#` and `pairs` go through `__len` and `__pairs`, Rust functions that
/// find the real table through the proxy's metatable; `ipairs` works through `__index`.
///
/// The builder gets the snapshot as one flat list of values (cheaper to hand over than
/// tables built from Rust) and keeps its tables from tick to tick: each tick it writes
/// the new values into the same tables (a VM's tables stay while the VM does), so a tick
/// allocates almost nothing. A policy that keeps a `ctx` table past its tick therefore
/// sees the next tick's values in it.
const PRELUDE: &str = r#"
local setmetatable, next, type, len, pairs_of, xpcall = setmetatable, next, type, ...
local function read_only()
    error("the policy context is read-only: ctx and its tables cannot be changed", 2)
end
local function ro(t)
    return setmetatable({}, {
        __index = t, __newindex = read_only, __len = len, __pairs = pairs_of,
        __metatable = "read-only",
    })
end
-- A ctx method that takes a VM: an entry of ctx.vms is passed on as its name, which is
-- cheaper to read here than from Rust.
local function by_name(method)
    return function(self, vm, ...)
        if type(vm) == "table" then
            local name = vm.name
            if name ~= nil then vm = name end
        end
        return method(self, vm, ...)
    end
end
-- The layout of the values is context::build's.
local function make_builder(set_memory_target, mean, max, min, migrate, held, improves,
                            migration_cost, pool_target)
    set_memory_target, mean = by_name(set_memory_target), by_name(mean)
    max, min = by_name(max), by_name(min)
    migrate, migration_cost = by_name(migrate), by_name(migration_cost)
    pool_target = by_name(pool_target)
    local host = {}
    local vms = {}
    local hosts = {}
    local migrations = {}
    local pools = {}
    local ctx = {
        host = ro(host), vms = ro(vms), hosts = ro(hosts), migrations = ro(migrations),
        pools = ro(pools),
        set_memory_target = set_memory_target, mean = mean, max = max, min = min,
        migrate = migrate, held = held, improves = improves, migration_cost = migration_cost,
        pool_target = pool_target,
    }
    local ctx_proxy = ro(ctx)
    local cache, count, round = {}, 0, 0
    local host_cache, host_count = {}, 0
    local pool, running_count = {}, 0
    local pool_cache, pool_count = {}, 0
    return function(...)
        local a = { ... }
        host.memory_total, host.memory_available = a[1], a[2]
        host.memory_reserve, host.vms_resident = a[3], a[4]
        ctx.now_ms, ctx.tick, ctx.interval_ms = a[5], a[6], a[7]
        round = round + 1
        local n, i, fresh = a[8], 9, false
        for k = 1, n do
            local name = a[i]
            local e = cache[name]
            if not e then
                local vm, memory, stats = { name = name }, {}, {}
                e = { vm = vm, memory = memory, stats = stats, stats_proxy = ro(stats),
                      proxy = ro(vm) }
                vm.memory = ro(memory)
                cache[name] = e
                fresh = true
            end
            e.round = round
            e.vm.state = a[i + 1]
            local m = e.memory
            m.size, m.target, m.resident = a[i + 2], a[i + 3], a[i + 4]
            m.min, m.max, m.startup = a[i + 5], a[i + 6], a[i + 7]
            m.buffer, m.weight = a[i + 8], a[i + 9]
            if a[i + 10] then
                local s = e.stats
                s.swap_in, s.swap_out = a[i + 11], a[i + 12]
                s.major_faults, s.minor_faults = a[i + 13], a[i + 14]
                s.free, s.total, s.available = a[i + 15], a[i + 16], a[i + 17]
                s.caches, s.hugetlb_allocations = a[i + 18], a[i + 19]
                s.hugetlb_failures, s.age_ms = a[i + 20], a[i + 21]
                m.stats = e.stats_proxy
            else
                m.stats = nil
            end
            vms[k] = e.proxy
            i = i + 22
        end
        for k = n + 1, count do vms[k] = nil end
        -- A VM left (or one left and another came): forget the ones gone.
        if fresh or n ~= count then
            for name, e in next, cache do
                if e.round ~= round then cache[name] = nil end
            end
        end
        count = n
        -- Peer hosts, cached by name like the VMs.
        local h = a[i]
        i = i + 1
        fresh = false
        for k = 1, h do
            local name = a[i]
            local e = host_cache[name]
            if not e then
                local t = { name = name }
                e = { t = t, proxy = ro(t) }
                host_cache[name] = e
                fresh = true
            end
            e.round = round
            local t = e.t
            t.addr, t.reachable = a[i + 1], a[i + 2]
            t.memory_total, t.memory_available, t.memory_reserve = a[i + 3], a[i + 4], a[i + 5]
            t.vms, t.vms_resident, t.age_ms, t.error = a[i + 6], a[i + 7], a[i + 8], a[i + 9]
            hosts[k] = e.proxy
            i = i + 10
        end
        for k = h + 1, host_count do hosts[k] = nil end
        if fresh or h ~= host_count then
            for name, e in next, host_cache do
                if e.round ~= round then host_cache[name] = nil end
            end
        end
        host_count = h
        -- Running migrations, in tables reused by position.
        local r = a[i]
        i = i + 1
        for k = 1, r do
            local e = pool[k]
            if not e then
                local t = {}
                e = { t = t, proxy = ro(t) }
                pool[k] = e
            end
            local t = e.t
            t.vm, t.host, t.started_ms = a[i], a[i + 1], a[i + 2]
            migrations[k] = e.proxy
            i = i + 3
        end
        for k = r + 1, running_count do migrations[k] = nil end
        running_count = r
        -- Warm pools, cached by name like the VMs.
        local p = a[i]
        i = i + 1
        fresh = false
        for k = 1, p do
            local name = a[i]
            local e = pool_cache[name]
            if not e then
                local t = { name = name }
                e = { t = t, proxy = ro(t) }
                pool_cache[name] = e
                fresh = true
            end
            e.round = round
            local t = e.t
            t.min, t.max, t.target, t.ready = a[i + 1], a[i + 2], a[i + 3], a[i + 4]
            t.claimed, t.restoring, t.claims = a[i + 5], a[i + 6], a[i + 7]
            t.claims_window, t.window_s = a[i + 8], a[i + 9] / 1000
            t.returned, t.memory = a[i + 10], a[i + 11]
            pools[k] = e.proxy
            i = i + 12
        end
        for k = p + 1, pool_count do pools[k] = nil end
        if fresh or p ~= pool_count then
            for name, e in next, pool_cache do
                if e.round ~= round then pool_cache[name] = nil end
            end
        end
        pool_count = p
        return ctx_proxy
    end
end
return make_builder, xpcall
"#;

/// The restricted globals, set up in Lua: what is removed, and the text-only `load`.
const RESTRICT: &str = r##"
local raw_load, select, error = load, select, error
load = function(chunk, name, mode, ...)
    if mode ~= nil and mode ~= "t" then
        error("load: policies may load text chunks only (mode 't'), not " .. tostring(mode), 2)
    end
    if select("#", ...) > 0 then
        return raw_load(chunk, name, "t", ...)
    end
    return raw_load(chunk, name, "t")
end
dofile, loadfile = nil, nil
-- rawset would slip a value into a ctx proxy (which reads through to the real table).
local raw_rawset, getmetatable = rawset, getmetatable
rawset = function(t, k, v)
    if getmetatable(t) == "read-only" then
        error("the policy context is read-only: ctx and its tables cannot be changed", 2)
    end
    return raw_rawset(t, k, v)
end
string.dump = nil
local raw_collect = collectgarbage
collectgarbage = function(option, ...)
    if option == nil or option == "collect" or option == "count" or option == "step" then
        return raw_collect(option, ...)
    end
    error("collectgarbage: policies may only 'collect', 'count' or 'step', not '"
        .. tostring(option) .. "'", 2)
end
local os_time, os_clock, os_date, os_difftime = os.time, os.clock, os.date, os.difftime
os = { time = os_time, clock = os_clock, date = os_date, difftime = os_difftime }
"##;

/// A fresh sandboxed state for the policy file `file` (as the user named it, for
/// messages), whose `require` reads from `dir`. Returns it with its prelude.
pub(crate) fn new_state(file: &str, dir: &Path, limits: Limits) -> mlua::Result<(Lua, Prelude)> {
    let libs = StdLib::COROUTINE
        | StdLib::TABLE
        | StdLib::STRING
        | StdLib::UTF8
        | StdLib::MATH
        | StdLib::OS;
    let lua = Lua::new_with(libs, LuaOptions::new())?;
    interrupt::install(
        &lua,
        StateLimits {
            interrupt_on_ctrl_c: false,
            instruction_budget: Some(limits.instruction_budget),
        },
    )?;
    let (len, pairs) = proxy_functions(&lua)?;
    let (make_builder, xpcall): (Function, Function) = lua
        .load(PRELUDE)
        .set_name("=[policy prelude]")
        .call((len, pairs, lua.globals().get::<Function>("xpcall")?))?;
    lua.load(RESTRICT).set_name("=[policy sandbox]").exec()?;
    crate::script::install_error_values(&lua)?;
    install_print(&lua, file)?;
    install_require(&lua, dir)?;
    // Set last: the libraries and helpers above are not the policy's to pay for.
    lua.set_memory_limit(limits.used_now(&lua))?;
    Ok((
        lua,
        Prelude {
            make_builder,
            xpcall,
        },
    ))
}

/// `__len` and `__pairs` of `ctx`'s proxies: they reach the real table through the
/// proxy's metatable, which Rust reads without regard to `__metatable`.
fn proxy_functions(lua: &Lua) -> mlua::Result<(Function, Function)> {
    fn real(proxy: &Table) -> mlua::Result<Table> {
        proxy
            .metatable()
            .ok_or_else(|| mlua::Error::runtime("not a ctx table"))?
            .raw_get("__index")
    }
    let len = lua.create_function(|_, proxy: Table| Ok(real(&proxy)?.raw_len()))?;
    let next: Function = lua.globals().get("next")?;
    let pairs =
        lua.create_function(move |_, proxy: Table| Ok((next.clone(), real(&proxy)?, Value::Nil)))?;
    Ok((len, pairs))
}

impl Limits {
    /// The allocator limit for a state that uses `lua.used_memory()` already: the
    /// policy's limit comes on top of the sandbox's own few hundred KiB.
    fn used_now(&self, lua: &Lua) -> usize {
        lua.used_memory().saturating_add(self.memory_limit)
    }
}

/// `print(...)`: the values as `print` writes them, tab-separated, logged at info.
fn install_print(lua: &Lua, file: &str) -> mlua::Result<()> {
    let file = file.to_string();
    let tostring: Function = lua.globals().get("tostring")?;
    let print = lua.create_function(move |_, args: Variadic<Value>| {
        let mut line = String::new();
        for (i, value) in args.into_iter().enumerate() {
            if i > 0 {
                line.push('\t');
            }
            let text: mlua::LuaString = tostring.call(value)?;
            line.push_str(&text.to_string_lossy());
        }
        tracing::info!(target: "luvisor::policy", policy = file.as_str(), "{line}");
        Ok(())
    })?;
    lua.globals().set("print", print)
}

/// Whether `name` is a module name `require` accepts: dotted words of letters, digits,
/// `_` and `-`.
fn valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
}

/// Where module `name` lives in `dir`, or why it cannot be loaded.
fn module_path(dir: &Path, name: &str) -> Result<PathBuf, String> {
    if !valid_module_name(name) {
        return Err(format!(
            "require '{name}': policies may only require modules of their own directory \
             {}, named with dotted words (require \"lib.util\" loads lib/util.lua)",
            dir.display()
        ));
    }
    let relative: PathBuf = name.split('.').collect::<PathBuf>().with_extension("lua");
    let path = dir.join(&relative);
    let real = path.canonicalize().map_err(|e| {
        format!(
            "require '{name}': no module {} in the policies directory ({e})",
            path.display()
        )
    })?;
    let real_dir = dir
        .canonicalize()
        .map_err(|e| format!("require '{name}': {}: {e}", dir.display()))?;
    if !real.starts_with(&real_dir) {
        return Err(format!(
            "require '{name}': {} leads outside the policies directory {}",
            path.display(),
            dir.display()
        ));
    }
    Ok(path)
}

/// `require(name)`: a module of the policies directory, loaded once per state.
fn install_require(lua: &Lua, dir: &Path) -> mlua::Result<()> {
    let loaded: Table = lua.create_table()?;
    let dir = dir.to_path_buf();
    let require = lua.create_function(move |lua, name: Value| {
        let name = match name {
            Value::String(s) => s.to_str()?.to_string(),
            other => {
                return Err(mlua::Error::runtime(format!(
                    "require: the module name must be a string, got {}",
                    crate::options::describe(&other)
                )))
            }
        };
        match loaded.raw_get::<Value>(name.as_str())? {
            Value::Nil => {}
            Value::LightUserData(_) => {
                return Err(mlua::Error::runtime(format!(
                    "require '{name}': the module requires itself (a loop of requires)"
                )))
            }
            value => return Ok(value),
        }
        let path = module_path(&dir, &name).map_err(mlua::Error::runtime)?;
        let source = read_source(&path).map_err(mlua::Error::runtime)?;
        // A marker while the module runs, so a loop of requires is an error, not a hang.
        loaded.raw_set(
            name.as_str(),
            Value::LightUserData(mlua::LightUserData(std::ptr::null_mut())),
        )?;
        let chunk = lua
            .load(source)
            .set_name(format!("@{}", path.display()))
            .set_mode(ChunkMode::Text)
            .into_function();
        let result = chunk.and_then(|f| f.call::<Value>(name.as_str()));
        match result {
            Ok(value) => {
                let value = if value.is_nil() {
                    Value::Boolean(true)
                } else {
                    value
                };
                loaded.raw_set(name.as_str(), value.clone())?;
                Ok(value)
            }
            Err(e) => {
                loaded.raw_set(name.as_str(), Value::Nil)?;
                Err(e)
            }
        }
    })?;
    lua.globals().set("require", require)
}

/// Reads a policy file or module, refusing one over [`MAX_SOURCE`].
pub fn read_source(path: &Path) -> Result<String, String> {
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if metadata.len() > MAX_SOURCE {
        return Err(format!(
            "{} is {} bytes; policy files and modules may have at most {MAX_SOURCE}",
            path.display(),
            metadata.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(dir: &Path) -> Lua {
        new_state("test.lua", dir, Limits::default()).unwrap().0
    }

    fn run(lua: &Lua, code: &str) -> Result<(), String> {
        lua.load(code)
            .exec()
            .map_err(|e| crate::script::error_message(&e))
    }

    #[test]
    fn escapes_fail() {
        let dir = std::env::temp_dir().join(format!("luvisor-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("lib")).unwrap();
        std::fs::write(
            dir.join("lib/util.lua"),
            "return { twice = function(x) return 2 * x end }",
        )
        .unwrap();
        std::fs::write(dir.join("outside.lua"), "return 1").unwrap();
        let lua = state(&dir.join("lib"));
        for (code, needle) in [
            ("io.open('/etc/passwd')", "global 'io'"),
            ("os.execute('true')", "field 'execute'"),
            ("os.exit(3)", "field 'exit'"),
            ("os.remove('/tmp/x')", "field 'remove'"),
            ("os.getenv('HOME')", "field 'getenv'"),
            ("debug.getinfo(1)", "global 'debug'"),
            ("package.loadlib('x', 'y')", "global 'package'"),
            ("dofile('/etc/passwd')", "global 'dofile'"),
            ("loadfile('/etc/passwd')", "global 'loadfile'"),
            ("string.dump(print)", "field 'dump'"),
            ("load('\\27Lua', 'x', 'b')", "text chunks only"),
            ("collectgarbage('stop')", "may only"),
            ("require('../outside')", "dotted words"),
            ("require('/etc/passwd')", "dotted words"),
            ("require('nothing')", "no module"),
        ] {
            let error = run(&lua, code).unwrap_err();
            assert!(error.contains(needle), "{code}: {error}");
        }
        // A binary chunk given to load in text mode is refused by Lua itself.
        let (f, message): (Value, String) =
            lua.load("return load('\\27LuaT\\0', 'x')").eval().unwrap();
        assert!(f.is_nil());
        assert!(message.contains("binary chunk"), "{message}");
        // What policies may use still works.
        run(&lua, "assert(load('return 1 + 1')() == 2)").unwrap();
        run(&lua, "assert(os.time() > 0 and os.clock() >= 0)").unwrap();
        run(
            &lua,
            "assert(string.format('%d', 3) == '3' and math.max(1, 2) == 2)",
        )
        .unwrap();
        let lua = state(&dir);
        run(&lua, "assert(require('lib.util').twice(21) == 42)").unwrap();
        run(&lua, "assert(require('lib.util') == require('lib.util'))").unwrap();
        // A link out of the directory is refused.
        let inner = dir.join("inner");
        std::fs::create_dir_all(&inner).unwrap();
        let _ = std::fs::remove_file(inner.join("escape.lua"));
        std::os::unix::fs::symlink(dir.join("outside.lua"), inner.join("escape.lua")).unwrap();
        let lua = state(&inner);
        let error = run(&lua, "require('escape')").unwrap_err();
        assert!(error.contains("outside the policies directory"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn endless_loops_and_memory_bombs_are_stopped() {
        let dir = std::env::temp_dir();
        let limits = Limits {
            instruction_budget: 100_000,
            memory_limit: 4 << 20,
        };
        let (lua, _) = new_state("bomb.lua", &dir, limits).unwrap();
        let error = run(&lua, "while true do end").unwrap_err();
        assert_eq!(error, "instruction budget of 100000 exceeded");
        interrupt::reset_budget(&lua).unwrap();
        let error = run(&lua, "local s = 'x' while true do s = s .. s end").unwrap_err();
        assert!(error.contains("memory"), "{error}");
        interrupt::reset_budget(&lua).unwrap();
        let error = run(
            &lua,
            "local t = {} for i = 1, 1e9 do t[i] = string.rep('x', 1000) .. i end",
        )
        .unwrap_err();
        assert!(error.contains("memory"), "{error}");
        // The state is still usable.
        lua.gc_collect().unwrap();
        interrupt::reset_budget(&lua).unwrap();
        run(&lua, "local t = {} for i = 1, 100 do t[i] = i end").unwrap();
    }
}
