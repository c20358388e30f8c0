-- Lab and warm pool figures:
--   1. lab bring-up to ready (hv.lab made, then lab:start until every VM is ready) for
--      8, 32 and 64 VMs of 32M, each with a disk overlay of one base, at parallel 4 and 8;
--   2. hv.pool.claim latency from a warm pool (a ready VM is there: each claim waits for
--      the refill first) and from a cold one (min = 0: every claim restores a VM).
-- Readiness is the console ("hello from luvisor guest"); pass `kvp` as the first argument
-- to use the agent's "kvp:ready" instead. Files go into a
-- temporary directory, removed at the end.
--
--   luvisor run bench/lab.lua [kvp] [CLAIMS]
local use_kvp = arg[1] == "kvp"
local claims = tonumber(use_kvp and arg[2] or arg[1]) or 200
local dir = os.tmpname()
os.remove(dir)
assert(os.execute(("mkdir -p %q"):format(dir)))

local ready = use_kvp and "kvp:ready" or "console:hello from luvisor guest"
local guest = use_kvp and hv.guest.builtin{} or hv.guest.builtin{ cmdline = "hello; idle" }
local template = { memory = "32M", guest = guest, disks = { { base = dir .. "/base.img" } } }
hv.disk.create{ path = dir .. "/base.img", size = "16M" }

local host = hv.host()
local need = 64 * 32 * 1024 * 1024
print(("host: %d CPUs, %d MiB available (the 64-VM lab may touch at most %d MiB of guest memory)"):format(
  host.cpus, host.memory_available // (1024 * 1024), need // (1024 * 1024)))
assert(host.memory_available > need + host.memory_reserve, "not enough memory for 64 VMs of 32M")

local function quantiles(t)
  table.sort(t)
  local at = function(q) return t[math.max(1, math.ceil(#t * q))] end
  return at(0.5), at(0.99), t[#t]
end

print("lab bring-up to ready (median of 3):")
for _, count in ipairs{ 8, 32, 64 } do
  for _, parallel in ipairs{ 4, 8 } do
    local totals, starts, slowest = {}, {}, {}
    for round = 1, 3 do
      local t0 = hv.now()
      local lab = hv.lab{ name = ("b%d-%d-%d"):format(count, parallel, round), count = count,
                          ready = ready, template = template, dir = dir .. "/labs" }
      local report = lab:start{ parallel = parallel, progress = false }
      totals[#totals + 1] = (hv.now() - t0) * 1000
      starts[#starts + 1] = report.elapsed_ms
      local worst = 0
      for _, vm in ipairs(report.vms) do worst = math.max(worst, vm.ready_ms) end
      slowest[#slowest + 1] = worst
      lab:destroy()
    end
    local total = quantiles(totals)
    local start = quantiles(starts)
    local worst = quantiles(slowest)
    print(("  %2d VMs, parallel %d: %7.1f ms to ready (start %7.1f ms, slowest VM %5.1f ms), %.2f ms per VM"):format(
      count, parallel, total, start, worst, total / count))
  end
end

print(("hv.pool.claim latency over %d claims:"):format(claims))
local warm = hv.pool.define{ name = "warm", template = template, ready = ready, min = 4, max = 8,
                             dir = dir .. "/warm" }
local latencies, kinds = {}, {}
for i = 1, claims do
  local deadline = hv.now() + 30
  while warm.ready < warm.target do
    assert(hv.now() < deadline, "the warm pool did not refill")
    hv.sleep(0.001)
  end
  local t0 = hv.now()
  local vm, how = warm:claim{ timeout = 5 }
  latencies[#latencies + 1] = (hv.now() - t0) * 1000
  kinds[how] = (kinds[how] or 0) + 1
  vm:destroy()
end
local median, p99, max = quantiles(latencies)
print(("  warm: median %.3f ms, p99 %.3f ms, max %.3f ms (%d warm, %d cold)"):format(
  median, p99, max, kinds.warm or 0, kinds.cold or 0))
print(("        a refill (restore) took %.2f ms"):format(warm:status().last_restore_ms))
warm:remove()

local cold = hv.pool.define{ name = "cold", template = template, ready = ready, min = 0, max = 1,
                             dir = dir .. "/cold" }
latencies, kinds = {}, {}
for i = 1, claims do
  local t0 = hv.now()
  local vm, how = cold:claim{ timeout = 5 }
  latencies[#latencies + 1] = (hv.now() - t0) * 1000
  kinds[how] = (kinds[how] or 0) + 1
  vm:destroy()
end
median, p99, max = quantiles(latencies)
print(("  cold: median %.3f ms, p99 %.3f ms, max %.3f ms (%d warm, %d cold)"):format(
  median, p99, max, kinds.warm or 0, kinds.cold or 0))
cold:remove()

os.execute(("rm -rf %q"):format(dir))
