-- Helpers for labs (hv.lab) and sets of VMs: run a command on every VM and collect what
-- it said, check that every VM passes, wait until every VM is ready, read a key every
-- guest published. See scripts/README.md.
--
--   package.path = "scripts/?.lua;" .. package.path   -- or wherever this file lives
--   local labs = require "lab"
--   local results = labs.exec_all(lab, "compute 1000")    -- through the agent (vm:exec)
--   labs.check_all(lab, "blk-verify 0 100 7")             -- errors naming each failed VM
--
-- Every function takes a lab, or a list of VMs (hv.vms(), lab:vms()). Results are tables
-- keyed by VM name; failures are reported all together, each with its VM.

local M = {}

-- The VMs of a lab or a list, in order.
local function vms_of(set)
  if type(set) == "userdata" and set.vms then return set:vms() end
  if type(set) == "table" then return set end
  error("expected a lab or a list of VMs, got " .. type(set), 3)
end

-- A sorted list of "name: message" lines for the failures in `failed` (name -> message).
local function failure_lines(failed)
  local lines = {}
  for name, message in pairs(failed) do lines[#lines + 1] = name .. ": " .. message end
  table.sort(lines)
  return lines
end

local function raise_if_failed(what, failed)
  local lines = failure_lines(failed)
  if #lines > 0 then
    error(string.format("%s failed on %d VM(s):\n  %s", what, #lines,
                        table.concat(lines, "\n  ")), 3)
  end
end

-- Runs `command` on every VM through the agent channel (vm:exec) and collects
-- { code, stdout } by VM name. A VM whose exec raised an error (it timed out, the agent
-- is not there) gets { error = message }. opts: { timeout = 10 }.
function M.exec_all(set, command, opts)
  local timeout = opts and opts.timeout or 10
  local results = {}
  for _, vm in ipairs(vms_of(set)) do
    local ok, r = pcall(vm.exec, vm, command, { timeout = timeout })
    if ok then
      results[vm.name] = { code = r.code, stdout = r.stdout }
    else
      results[vm.name] = { error = tostring(r) }
    end
  end
  return results
end

-- Runs `command` on every VM (exec_all) and raises one error listing every VM where it
-- did not exit 0, with its code and last line of output. Returns the results.
function M.check_all(set, command, opts)
  local results = M.exec_all(set, command, opts)
  local failed = {}
  for name, r in pairs(results) do
    if r.error then
      failed[name] = r.error
    elseif r.code ~= 0 then
      local last = (r.stdout or ""):match("([^\n]*)\n*$") or ""
      failed[name] = string.format("exit code %d: %s", r.code, last)
    end
  end
  raise_if_failed(string.format("%q", command), failed)
  return results
end

-- For guests that read commands from their console (the built-in guest's `listen`):
-- sends `line` to every VM at once, then waits on each for a console line holding
-- `pattern` (plain text) printed after the send. Returns the lines by VM name; raises one
-- error naming every VM that did not print it. opts: { timeout = 10 }.
function M.console_all(set, line, pattern, opts)
  local timeout = opts and opts.timeout or 10
  local vms, from = vms_of(set), {}
  for _, vm in ipairs(vms) do
    from[vm.name] = vm.console_offset
    vm:send(line:sub(-1) == "\n" and line or line .. "\n")
  end
  local lines, failed = {}, {}
  for _, vm in ipairs(vms) do
    local ok, got = pcall(vm.wait_for_console, vm, pattern,
                          { after = from[vm.name], timeout = timeout })
    if ok then lines[vm.name] = got else failed[vm.name] = tostring(got) end
  end
  raise_if_failed(string.format("%q", line), failed)
  return lines
end

-- Waits until every VM (already started) is ready: its console shows `ready` (plain
-- text), or for "kvp:KEY" its guest published KEY. Raises one error naming every VM that
-- was not ready within opts.timeout (default 30 s) seconds of the call.
function M.wait_ready(set, ready, opts)
  local deadline = hv.now() + (opts and opts.timeout or 30)
  local key = ready:match("^kvp:(.+)$")
  local pattern = ready:match("^console:(.+)$") or ready
  local failed = {}
  for _, vm in ipairs(vms_of(set)) do
    local left = math.max(deadline - hv.now(), 0)
    local ok, err
    if key then
      ok, err = pcall(function()
        while vm.kvp.guest:get(key) == nil do
          if hv.now() >= deadline then error("not published within the timeout") end
          hv.sleep(0.01)
        end
      end)
    else
      ok, err = pcall(vm.wait_for_console, vm, pattern, { timeout = left })
    end
    if not ok then failed[vm.name] = tostring(err) end
  end
  raise_if_failed("waiting for " .. ready, failed)
end

-- What every guest published for `key` over the agent channel, by VM name (a VM that
-- published nothing is missing from the table).
function M.kvp_all(set, key)
  local values = {}
  for _, vm in ipairs(vms_of(set)) do values[vm.name] = vm.kvp.guest:get(key) end
  return values
end

-- One line per VM, sorted by name: "ci-1  0  <first line of stdout>" for exec results,
-- or the value itself for other tables.
function M.summary(results)
  local names = {}
  for name in pairs(results) do names[#names + 1] = name end
  table.sort(names)
  local lines = {}
  for _, name in ipairs(names) do
    local r = results[name]
    local text
    if type(r) == "table" and r.error then
      text = "error: " .. r.error
    elseif type(r) == "table" then
      text = string.format("%s  %s", tostring(r.code), ((r.stdout or ""):match("^[^\n]*")))
    else
      text = tostring(r)
    end
    lines[#lines + 1] = name .. "  " .. text
  end
  return table.concat(lines, "\n")
end

return M
