-- start -> ready latency of the built-in guest over many VMs, one after another.
--   luvisor run bench/boot_latency.lua [COUNT]
local count = tonumber(arg[1]) or 200

-- Starts `n` VMs one after another, `gap` seconds apart; returns sorted boot times (ms).
local function boot_times(label, n, gap)
  local times = {}
  for i = 1, n do
    if gap > 0 then hv.sleep(gap) end
    local vm = hv.vm{ name = label .. "-" .. i, memory = "32M", guest = hv.guest.builtin{ cmdline = "exit 0" } }
    vm:start()
    assert(vm:wait{ timeout = 30 } == 0)
    times[#times + 1] = vm.boot_time_ms
    vm:destroy()
  end
  table.sort(times)
  return times
end

local function pct(times, p) return times[math.max(1, math.ceil(#times * p))] end

local times = boot_times("latency", count, 0)
print(string.format("start->ready over %d VMs: median %.3f ms, p99 %.3f ms (min %.3f, max %.3f)",
  count, pct(times, 0.5), pct(times, 0.99), times[1], times[#times]))

-- The same with a pause between starts, as when a lab provisions VMs one by one: the
-- next VM's KVM VM and memory slots are then ready before it starts (see
-- runtime/src/vstate/prepared.rs).
local spaced = boot_times("spaced", math.min(count, 50), 0.02)
print(string.format("start->ready with 20 ms between starts, over %d VMs: median %.3f ms, p99 %.3f ms",
  #spaced, pct(spaced, 0.5), pct(spaced, 0.99)))
