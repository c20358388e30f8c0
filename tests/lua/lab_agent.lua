-- A lab of 8 VMs from one base, ready when each guest's agent publishes ready; checks in
-- every VM through exec; KVP; the scripts/lab.lua helpers that use the agent; graceful
-- shutdown; a warm pool whose readiness is the agent's and whose claimed VMs exec.

local repo = arg[0]:match("^(.*)/tests/lua/[^/]*$") or "."
package.path = repo .. "/scripts/?.lua;" .. package.path
local labs = require "lab"

local function read(path, n)
  local f = assert(io.open(path, "rb"))
  local data = f:read(n)
  f:close()
  return data
end

hv.disk.create{ path = "base.img", size = "4M" }
local zeros = string.rep("\0", 100 * 512)

-- No `ready`: the default is "kvp:ready", which a built-in guest that serves the agent
-- channel (an empty command line) publishes.
local lab = hv.lab{
  name = "ag", count = 8,
  template = { memory = "32M", disks = { { base = "base.img" } }, guest = hv.guest.builtin{} },
}
assert(lab.ready == "kvp:ready", lab.ready)
lab:start{ parallel = 4, progress = false }

-- Each VM writes a pattern of its own through exec and reads it back.
lab:each(function(vm)
  local seed = tonumber(vm.name:match("(%d+)$"))
  local w = vm:exec("blk-write 0 100 " .. seed, { timeout = 10 })
  assert(w.code == 0, vm.name .. ": " .. w.stdout)
  local v = vm:exec("blk-verify 0 100 " .. seed, { timeout = 10 })
  assert(v.code == 0 and v.stdout:find(": 0 mismatches", 1, true), vm.name .. ": " .. v.stdout)
  assert(vm:exec("compute 1000").code == 0)
end)
assert(read("base.img", #zeros) == zeros, "the base was written")

-- KVP: every guest published ready, and a boot id of its own.
local ready = labs.kvp_all(lab, "ready")
local boot_ids, seen = labs.kvp_all(lab, "boot_id"), {}
for i = 1, 8 do
  local name = "ag-" .. i
  assert(ready[name] == "1", name .. " ready=" .. tostring(ready[name]))
  local id = boot_ids[name]
  assert(id and not seen[id], name .. " boot_id " .. tostring(id))
  seen[id] = true
end

-- The helpers: results by VM, and one error naming every VM that failed.
local results = labs.check_all(lab, "compute 1000", { timeout = 10 })
assert(results["ag-8"].code == 0 and results["ag-8"].stdout:find("compute ", 1, true))
local ok, err = pcall(labs.check_all, lab, "no-such-command", { timeout = 10 })
assert(not ok and err:find("failed on 8 VM(s)", 1, true), err)
for i = 1, 8 do assert(err:find("ag-" .. i .. ": ", 1, true), err) end

-- Graceful shutdown: the guests end on their own, none needs the hard stop.
local ended = lab:shutdown{ timeout = 5 }
assert(#ended == 8)
for _, e in ipairs(ended) do
  assert(e.outcome ~= "stopped by the host", e.name .. " was stopped hard: " .. e.outcome)
end
lab:destroy()
assert(#hv.vms() == 0)

-- A warm pool made ready by the agent: claimed VMs run commands through exec.
local pool = hv.pool.define{
  name = "agp", min = 2, max = 4,
  template = { memory = "32M", disks = { { base = "base.img" } }, guest = hv.guest.builtin{} },
}
local vm, how = pool:claim{ timeout = 5 }
assert(how == "warm", how) -- define returned once its min VMs were ready
local r = vm:exec("blk-write 0 8 5; blk-verify 0 8 5", { timeout = 10 })
assert(r.code == 0 and r.stdout:find(": 0 mismatches", 1, true), r.stdout)
assert(vm.kvp.guest:get("ready") == "1")
vm:destroy()
pool:remove()
assert(read("base.img", #zeros) == zeros, "the base was written")
print("lab agent: ok")
