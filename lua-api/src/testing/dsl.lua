-- The test DSL of `luvisor test`: describe/it/pending/before_each/after_each and the
-- `assert` table. Loaded into each test file's state before the file runs; see
-- lua-api/src/testing/dsl.rs for what the Rust side does with the API returned below.
local support = ...
local compare, show, write, cancelled = support.compare, support.show, support.write, support.cancelled
local PRELUDE = support.chunk_name
-- luvisor's own Lua helpers (the pcall and xpcall wrappers of lua-api/src/script.rs).
local HELPERS = "=[luvisor]"

local error, type, tostring, select, pairs, ipairs = error, type, tostring, select, pairs, ipairs
local getmetatable, setmetatable, rawget = getmetatable, setmetatable, rawget
local xpcall, pcall = xpcall, pcall
local find, format, concat, sort = string.find, string.format, table.concat, table.sort
local getinfo, traceback = debug.getinfo, debug.traceback

-- Metatables that mark what a test raised: an assertion of the `assert` table, and a
-- test that declared itself pending.
local FAILURE, PENDING = {}, {}

local function where(source, line)
  if not source then return "?" end
  local name = source:sub(1, 1) == "@" and source:sub(2) or source
  return name .. ":" .. tostring(line)
end

FAILURE.__name = "luvisor.failure"
FAILURE.__tostring = function(f)
  local text = (f.stack and f.stack[1] or "?") .. ": " .. tostring(f.message)
  if f.diff then text = text .. "\n" .. f.diff end
  return text
end
PENDING.__tostring = function(p) return "pending: " .. tostring(p.reason) end

-- The Lua frames from `level` outwards that belong to the test, innermost first: every
-- frame that is not C and not this prelude, up to where the prelude called the test.
local function stack_from(level)
  local frames = {}
  level = level + 1
  while true do
    local info = getinfo(level, "Sl")
    if not info then break end
    if info.source == PRELUDE then
      if #frames > 0 then break end
    elseif info.what ~= "C" and info.source ~= HELPERS then
      frames[#frames + 1] = where(info.source, info.currentline)
      if #frames == 8 then break end
    end
    level = level + 1
  end
  return frames
end

-- Output of `print`, captured per test by the Rust side.
print = function(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  write(concat(parts, "\t") .. "\n")
end

os.exit = function(code)
  error("os.exit(" .. tostring(code) .. ") called in a test file; the test runner does not exit for a test", 2)
end

---------------------------------------------------------------------------------------
-- Assertions.

-- The value the plain `assert(v, message)` raised last, so the message handler can tell
-- an assertion from any other error.
local raised_by_assert

-- Raises an assertion failure located where the test called the assertion: the first
-- frame outside this prelude.
local function fail(fields)
  fields.kind = "assertion"
  fields.stack = stack_from(1)
  error(setmetatable(fields, FAILURE), 0)
end

local function failure_message(given, default)
  if given ~= nil then return tostring(given) end
  return default
end

local function error_text(e)
  if type(e) == "string" then return e end
  if getmetatable(e) == FAILURE then return tostring(e.message) end
  return tostring(e)
end

local A = {}

function A.equal(expected, actual, message)
  local d = compare(expected, actual)
  if d == nil then return actual end
  local diff = d.diff
  if message ~= nil then diff = d.summary .. (diff and ("\n" .. diff) or "") end
  fail({ message = failure_message(message, d.summary), diff = diff,
         expected = d.expected, actual = d.actual })
end

function A.not_equal(unexpected, actual, message)
  if compare(unexpected, actual) ~= nil then return actual end
  fail({ message = failure_message(message, "expected a value other than " .. show(unexpected)),
         actual = show(actual) })
end

function A.truthy(value, message)
  if value then return value end
  fail({ message = failure_message(message, "expected a truthy value, got " .. show(value)),
         actual = show(value) })
end

function A.falsy(value, message)
  if not value then return value end
  fail({ message = failure_message(message, "expected false or nil, got " .. show(value)),
         actual = show(value) })
end

local function check_callable(name, fn)
  local t = type(fn)
  if t == "function" then return end
  local mt = getmetatable(fn)
  if mt and rawget(mt, "__call") then return end
  error(name .. ": expected a function to call, got " .. show(fn), 3)
end

local function check_pattern(name, pattern)
  if type(pattern) ~= "string" then
    error(name .. ": the pattern must be a string, got " .. show(pattern), 3)
  end
  local ok, err = pcall(find, "", pattern)
  if not ok then error(name .. ": bad pattern " .. show(pattern) .. ": " .. tostring(err), 3) end
end

-- Calls fn; fails unless it raises an error. Returns the error's message.
local function raises(name, fn, message)
  check_callable(name, fn)
  local ok, e = pcall(fn)
  if ok then
    fail({ message = failure_message(message, "expected an error, but the function returned") })
  end
  return error_text(e)
end

function A.error(fn, pattern, message)
  if pattern ~= nil then check_pattern("assert.error", pattern) end
  local text = raises("assert.error", fn, message)
  if pattern ~= nil and not find(text, pattern) then
    fail({ message = failure_message(message, "the error does not match the pattern " .. show(pattern)),
           diff = "pattern: " .. show(pattern) .. "\nerror:   " .. show(text),
           expected = show(pattern), actual = show(text) })
  end
  return text
end

function A.error_contains(fn, text, message)
  if type(text) ~= "string" then
    error("assert.error_contains: the text must be a string, got " .. show(text), 2)
  end
  local got = raises("assert.error_contains", fn, message)
  if not find(got, text, 1, true) then
    fail({ message = failure_message(message, "the error does not contain " .. show(text)),
           diff = "text:  " .. show(text) .. "\nerror: " .. show(got),
           expected = show(text), actual = show(got) })
  end
  return got
end

function A.match(pattern, s, message)
  check_pattern("assert.match", pattern)
  if type(s) ~= "string" then
    fail({ message = failure_message(message, "expected a string matching " .. show(pattern) .. ", got " .. show(s)),
           expected = show(pattern), actual = show(s) })
  end
  if find(s, pattern) then return s end
  fail({ message = failure_message(message, "the string does not match the pattern " .. show(pattern)),
         diff = "pattern: " .. show(pattern) .. "\nstring:  " .. show(s),
         expected = show(pattern), actual = show(s) })
end

function A.contains(text, s, message)
  if type(text) ~= "string" then
    error("assert.contains: the text must be a string, got " .. show(text), 2)
  end
  if type(s) == "string" and find(s, text, 1, true) then return s end
  fail({ message = failure_message(message, "expected a string containing " .. show(text) .. ", got " .. show(s)),
         diff = "text:   " .. show(text) .. "\nstring: " .. show(s),
         expected = show(text), actual = show(s) })
end

function A.fail(message)
  fail({ message = failure_message(message, "failed") })
end

function A.is_true(value, message)
  if value == true then return value end
  fail({ message = failure_message(message, "expected true, got " .. show(value)),
         actual = show(value) })
end

function A.is_false(value, message)
  if value == false then return value end
  fail({ message = failure_message(message, "expected false, got " .. show(value)),
         actual = show(value) })
end

function A.is_nil(value, message)
  if value == nil then return value end
  fail({ message = failure_message(message, "expected nil, got " .. show(value)),
         actual = show(value) })
end

function A.is_not_nil(value, message)
  if value ~= nil then return value end
  fail({ message = failure_message(message, "expected a value, got nil"), actual = "nil" })
end

function A.has_no_error(fn, message)
  check_callable("assert.has_no_error", fn)
  local ok, e = pcall(fn)
  if ok then return end
  fail({ message = failure_message(message, "expected no error, got " .. show(error_text(e))),
         actual = show(error_text(e)) })
end

-- The names busted users reach for first, as the same assertions (busted's `same` is a
-- deep comparison, which is what `equal` does here).
A.same, A.equals = A.equal, A.equal
A.has_error, A.errors = A.error, A.error
A.are = { equal = A.equal, same = A.equal }
A.are_not = { equal = A.not_equal, same = A.not_equal }
A.is = { ["true"] = A.is_true, ["false"] = A.is_false, ["nil"] = A.is_nil,
         truthy = A.truthy, falsy = A.falsy }
A.is_not = { ["nil"] = A.is_not_nil }
A.has = { error = A.error }
A.has_no = { error = A.has_no_error }

local names = {}
for name in pairs(A) do names[#names + 1] = name end
sort(names)
local assertion_list = concat(names, ", ")

assert = setmetatable(A, {
  -- The plain `assert(v, message, ...)` of Lua, unchanged.
  __call = function(_, v, message, ...)
    if v then return v, message, ... end
    if message == nil then message = "assertion failed!" end
    raised_by_assert = message
    error(message, 0)
  end,
  __index = function(_, key)
    error("assert." .. tostring(key) .. " is not an assertion; there are: " .. assertion_list, 2)
  end,
})

---------------------------------------------------------------------------------------
-- Collecting tests.

local root = { before = {}, after = {} }
local current = root
local tests = {}
local used = false
local running = false

local function check_name(fname, name)
  if type(name) ~= "string" then
    error(fname .. ": the name must be a string, got " .. show(name), 3)
  end
end

local function check_fn(fname, fn)
  if type(fn) ~= "function" then
    error(fname .. ": expected a function, got " .. show(fn), 3)
  end
end

local function not_in_test(fname)
  if running then
    error(fname .. ": cannot be called while a test runs; call it at the top level of the file or inside describe", 3)
  end
end

local function add_test(name, fn, is_pending, reason)
  local info = getinfo(3, "Sl")
  tests[#tests + 1] = { name = name, node = current, fn = fn, pending = is_pending, reason = reason,
                        source = info and info.source, line = info and info.currentline }
end

function describe(name, fn)
  not_in_test("describe")
  check_name("describe", name)
  check_fn("describe", fn)
  used = true
  local outer = current
  current = { name = name, parent = outer, before = {}, after = {} }
  fn()
  current = outer
end

function it(name, fn)
  not_in_test("it")
  check_name("it", name)
  if fn ~= nil then check_fn("it", fn) end
  used = true
  add_test(name, fn, fn == nil, fn == nil and "no test function" or nil)
end

function pending(name, reason)
  if running then
    -- Inside a test: the test stops here and counts as pending.
    error(setmetatable({ reason = name }, PENDING), 0)
  end
  check_name("pending", name)
  if reason ~= nil and type(reason) ~= "string" then
    error("pending: the reason must be a string, got " .. show(reason), 2)
  end
  used = true
  add_test(name, nil, true, reason)
end

function before_each(fn)
  not_in_test("before_each")
  check_fn("before_each", fn)
  used = true
  current.before[#current.before + 1] = fn
end

function after_each(fn)
  not_in_test("after_each")
  check_fn("after_each", fn)
  used = true
  current.after[#current.after + 1] = fn
end

---------------------------------------------------------------------------------------
-- Running.

-- The message handler: turns whatever was raised into a failure table.
local function on_error(e)
  local mt = getmetatable(e)
  if mt == PENDING then return { pending = true, reason = e.reason } end
  local f
  if mt == FAILURE then
    f = { kind = e.kind, message = e.message, diff = e.diff, expected = e.expected,
          actual = e.actual, stack = e.stack }
  else
    local message
    if type(e) == "string" or type(e) == "number" then
      message = tostring(e)
    elseif mt and mt.__tostring then
      message = tostring(e)
    else
      message = "(error object is a " .. type(e) .. " value)"
    end
    local kind = "error"
    if raised_by_assert ~= nil and e == raised_by_assert then kind = "assertion" end
    if message == "interrupted" and cancelled() then kind = "interrupted" end
    f = { kind = kind, message = message, stack = stack_from(1) }
  end
  raised_by_assert = nil
  f.traceback = traceback("", 2)
  return f
end

local function protect(fn, phase)
  local ok, f = xpcall(fn, on_error)
  if ok then return nil end
  if type(f) ~= "table" then
    -- The handler itself failed (e.g. stopped by a cancel).
    f = { kind = cancelled() and "interrupted" or "error", message = tostring(f) }
  end
  f.phase = phase
  return f
end

local function chain(node)
  local list = {}
  while node do
    table.insert(list, 1, node)
    node = node.parent
  end
  return list
end

local api = {}

api.protect = protect

function api.used() return used end

function api.tests()
  local list = {}
  for i, t in ipairs(tests) do
    local parts = {}
    for _, node in ipairs(chain(t.node)) do
      if node.name then parts[#parts + 1] = node.name end
    end
    parts[#parts + 1] = t.name
    list[i] = { name = concat(parts, " "), pending = t.pending, reason = t.reason,
                source = t.source, line = t.line }
  end
  return list
end

function api.matches(name, pattern)
  return find(name, pattern) ~= nil
end

-- Runs test i: the before_each hooks outer to inner, the test, then the after_each
-- hooks inner to outer (of every level whose before_each hooks started), even when the
-- test failed. Returns nil, a failure (the first one; later ones in `also`), or
-- { pending = true }.
function api.run(i)
  local t = tests[i]
  local nodes = chain(t.node)
  local failure, entered = nil, 0
  running = true
  raised_by_assert = nil
  for k, node in ipairs(nodes) do
    entered = k
    for _, hook in ipairs(node.before) do
      failure = protect(hook, "before_each")
      if failure then break end
    end
    if failure then break end
  end
  if not failure then failure = protect(t.fn) end
  if not cancelled() then
    for k = entered, 1, -1 do
      for _, hook in ipairs(nodes[k].after) do
        local f = protect(hook, "after_each")
        if f and not f.pending then
          if not failure or failure.pending then
            failure = f
          else
            failure.also = failure.also or {}
            failure.also[#failure.also + 1] = "after_each: " .. (f.stack and f.stack[1] or "?") .. ": " .. tostring(f.message)
          end
        end
      end
    end
  end
  running = false
  return failure
end

return api
