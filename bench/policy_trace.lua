-- Writes a made-up policy trace (the format of `luvisor serve --record`) for
-- `luvisor policy simulate`: a host and COUNT VMs whose guests report memory statistics
-- that drift tick by tick, the host running short of memory in the second half.
--
--   luvisor run bench/policy_trace.lua OUT [COUNT] [TICKS]
local out = assert(arg[1], "usage: policy_trace.lua OUT [COUNT] [TICKS]")
local count = tonumber(arg[2]) or 200
local ticks = tonumber(arg[3]) or 100
local M = 1024 * 1024
math.randomseed(42)

local vms = {}
for i = 1, count do
  vms[i] = {
    name = ("vm%03d"):format(i),
    min = 256 * M, max = 4096 * M, startup = 1024 * M,
    target = 1024 * M,
    used = (200 + math.random(600)) * M,
    weight = (i % 4 + 1) * 2000,
  }
end

local f = assert(io.open(out, "w"))
f:write('{"type":"header","format":"luvisor-policy-trace","version":1,"luvisor":"bench"}\n')
for t = 1, ticks do
  local parts, resident = {}, 0
  for i, vm in ipairs(vms) do
    -- Demand drifts; a few VMs jump.
    vm.used = math.max(64 * M, math.min(3500 * M, vm.used + (math.random(41) - 21) * M))
    if math.random(50) == 1 then vm.used = math.min(3500 * M, vm.used + 512 * M) end
    local total = vm.target
    local available = math.max(0, total - vm.used)
    resident = resident + math.min(total, vm.used)
    parts[i] = ('{"name":"%s","state":"running","memory":{"size":%d,"target":%d,"resident":%d,'
      .. '"min":%d,"max":%d,"startup":%d,"buffer":20,"weight":%d,"stats":{"total":%d,'
      .. '"available":%d,"free":%d,"caches":%d,"major_faults":%d,"minor_faults":%d,'
      .. '"swap_in":0,"swap_out":0,"age_ms":%d}}}')
      :format(vm.name, vm.target, vm.target, math.min(total, vm.used), vm.min, vm.max,
              vm.startup, vm.weight, total, available, available // 2, available // 2,
              t, t * 100, math.random(1000))
  end
  -- Enough for everyone at first; short in the second half.
  local host_total = t <= ticks // 2 and count * 4096 * M or count * 700 * M
  f:write(('{"type":"sample","input":{"now_ms":%d,"host":{"memory_total":%d,'
    .. '"memory_available":%d,"memory_reserve":%d,"vms_resident":%d},"vms":[%s]}}\n')
    :format(t * 500, host_total, math.max(0, host_total - resident), 512 * M, resident,
            table.concat(parts, ",")))
  -- What a live run would have applied next: the targets follow demand + 20%, as the
  -- default policy sets them while the host has enough (short, it would give less: then
  -- most VMs get a decision every tick).
  for _, vm in ipairs(vms) do
    vm.target = math.max(vm.min, math.min(vm.max, math.floor(vm.used * 1.2) // 4096 * 4096))
  end
end
f:close()
print(("wrote %d ticks of %d VMs to %s"):format(ticks, count, out))
