-- Dynamic memory through vm.memory, as a script sees it: the balloon holds the guest
-- down to its target from boot, follows set_target, and the guest's statistics arrive.

local M = 1024 * 1024

-- Waits (polling) until f() is true; gives up after about 20 s.
local function wait_until(what, f)
  for _ = 1, 2000 do
    if f() then return end
    hv.sleep(0.01)
  end
  error("never happened: " .. what)
end

local vm = hv.vm{ name = "dyn", memory = { startup = "64M", min = "32M", max = "256M" },
                  guest = hv.guest.builtin{ cmdline = "idle" } }
assert(vm.memory.max == 256 * M and vm.memory.min == 32 * M and vm.memory.startup == 64 * M)
assert(vm.memory.target == 64 * M)
assert(vm.memory.held == 0, "nothing is held before the guest runs")
assert(vm.memory.stats_period == 1)
vm:start()

-- At boot the balloon takes the guest from 256M down to 64M.
wait_until("the balloon holds 192M", function() return vm.memory.held == 192 * M end)
assert(vm.memory.size == 64 * M)

-- The guest follows a new target, up and down; targets outside [min, max] are clamped.
local applied, clamped = vm.memory:set_target("128M", { reason = "test" })
assert(applied == 128 * M and not clamped)
wait_until("128M", function() return vm.memory.size == 128 * M end)
applied, clamped = vm.memory:set_target("1G")
assert(applied == 256 * M and clamped)
wait_until("256M", function() return vm.memory.held == 0 end)
vm.memory:set_target("64M")
wait_until("64M again", function() return vm.memory.size == 64 * M end)

-- Statistics: every period; a faster period brings them sooner.
vm.memory:set_stats_period(0.1)
assert(math.abs(vm.memory.stats_period - 0.1) < 1e-9)
wait_until("statistics", function()
  local s = vm.memory.stats
  return s ~= nil and s.total == 64 * M
end)
local s = vm.memory.stats
assert(s.free > 0 and s.available == s.free and s.age_ms >= 0, "free memory is reported")
assert(not pcall(vm.memory.set_stats_period, vm.memory, 0.001), "too short a period")
assert(not pcall(vm.memory.set_stats_period, vm.memory, -1), "a negative period")
local ok, err = pcall(vm.memory.set_stats_period, vm.memory, "soon")
assert(not ok and tostring(err):find("non-negative number", 1, true), tostring(err))
vm.memory:set_stats_period(0)

vm:destroy()
