-- Dynamic memory through vm.memory, as a script sees it: the balloon holds the guest
-- down to its target from boot, follows set_target, and the guest's statistics arrive.

local M = 1024 * 1024

-- Waits (polling) until f() is true; gives up after about 20 s.
local function wait_until(what, f)
  for _ = 1, 2000 do
    if f() then return end
    hv.sleep(0.01)
  end
  error("never happened: " .. what, 2)
end

local function dynamic_vm()
  return hv.vm{ name = "dyn", memory = { startup = "64M", min = "32M", max = "256M" },
                guest = hv.guest.builtin{ cmdline = "idle" } }
end

describe("vm.memory", function()
  it("holds the guest down to its target from boot and follows set_target", function()
    local vm = dynamic_vm()
    assert.equal({ max = 256 * M, min = 32 * M, startup = 64 * M, target = 64 * M },
                 { max = vm.memory.max, min = vm.memory.min, startup = vm.memory.startup,
                   target = vm.memory.target })
    assert.equal(0, vm.memory.held, "nothing is held before the guest runs")
    assert.equal(1, vm.memory.stats_period)
    vm:start()

    -- At boot the balloon takes the guest from 256M down to 64M.
    wait_until("the balloon holds 192M", function() return vm.memory.held == 192 * M end)
    assert.equal(64 * M, vm.memory.size)

    -- The guest follows a new target, up and down; targets outside [min, max] are clamped.
    local applied, clamped = vm.memory:set_target("128M", { reason = "test" })
    assert.equal({ 128 * M, false }, { applied, clamped })
    wait_until("128M", function() return vm.memory.size == 128 * M end)
    applied, clamped = vm.memory:set_target("1G")
    assert.equal({ 256 * M, true }, { applied, clamped })
    wait_until("256M", function() return vm.memory.held == 0 end)
    vm.memory:set_target("64M")
    wait_until("64M again", function() return vm.memory.size == 64 * M end)
  end)

  it("reports the guest's statistics every period, sooner with a faster period", function()
    local vm = dynamic_vm()
    vm:start()
    wait_until("the balloon holds 192M", function() return vm.memory.held == 192 * M end)
    vm.memory:set_stats_period(0.1)
    assert(math.abs(vm.memory.stats_period - 0.1) < 1e-9, vm.memory.stats_period)
    wait_until("statistics", function()
      local s = vm.memory.stats
      return s ~= nil and s.total == 64 * M
    end)
    local s = vm.memory.stats
    assert(s.free > 0 and s.available == s.free and s.age_ms >= 0, "free memory is reported")
    assert.error(function() vm.memory:set_stats_period(0.001) end, nil, "too short a period")
    assert.error(function() vm.memory:set_stats_period(-1) end, nil, "a negative period")
    assert.error_contains(function() vm.memory:set_stats_period("soon") end, "non-negative number")
    vm.memory:set_stats_period(0)
    vm:destroy()
  end)
end)
