-- start -> ready latency of the built-in guest over many VMs, one after another.
--   luvisor run bench/boot_latency.lua [COUNT]
local count = tonumber(arg[1]) or 200
local times = {}
for i = 1, count do
  local vm = hv.vm{ name = "latency-" .. i, memory = "32M", guest = hv.guest.builtin{ cmdline = "exit 0" } }
  vm:start()
  assert(vm:wait{ timeout = 30 } == 0)
  times[#times + 1] = vm.boot_time_ms
  vm:destroy()
end
table.sort(times)
local function pct(p) return times[math.max(1, math.ceil(#times * p))] end
print(string.format("start->ready over %d VMs: median %.3f ms, p99 %.3f ms (min %.3f, max %.3f)",
  count, pct(0.5), pct(0.99), times[1], times[#times]))

-- The same with a pause between starts, as when a lab provisions VMs one by one: the
-- next VM's KVM VM and memory slots are then ready before it starts (see
-- runtime/src/vstate/prepared.rs).
local spaced = {}
for i = 1, math.min(count, 50) do
  hv.sleep(0.02)
  local vm = hv.vm{ name = "spaced-" .. i, memory = "32M", guest = hv.guest.builtin{ cmdline = "exit 0" } }
  vm:start()
  assert(vm:wait{ timeout = 30 } == 0)
  spaced[#spaced + 1] = vm.boot_time_ms
  vm:destroy()
end
table.sort(spaced)
local function spct(p) return spaced[math.max(1, math.ceil(#spaced * p))] end
print(string.format("start->ready with 20 ms between starts, over %d VMs: median %.3f ms, p99 %.3f ms",
  #spaced, spct(0.5), spct(0.99)))
