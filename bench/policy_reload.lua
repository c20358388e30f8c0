-- Reload latency: from saving a policy file (written, then renamed over the old one, as
-- editors do) in a watched directory to the new version's first decision applied to a
-- VM. It includes the watch's 200 ms debounce, loading the new version into a fresh
-- sandbox, its shadow run, and its first tick.
--
--   luvisor run bench/policy_reload.lua [EDITS]
local edits = tonumber(arg[1]) or 20
local M = 1024 * 1024
local dir = os.tmpname()
os.remove(dir)
assert(os.execute(("mkdir -p %q"):format(dir)))

local vms = {}
for i = 1, 10 do
  vms[i] = hv.vm{ name = "reload" .. i, memory = { startup = "512M", min = "128M", max = "1G" },
                  guest = hv.guest.builtin{ cmdline = "idle" } }
end

local function save(mib)
  local f = assert(io.open(dir .. "/p.lua.tmp", "w"))
  f:write(([[
return { name = "p", interval_ms = 1000, tick = function(ctx)
  for _, vm in ipairs(ctx.vms) do ctx:set_memory_target(vm, %d * 1024 * 1024, "bench") end
end }
]]):format(mib))
  f:close()
  assert(os.rename(dir .. "/p.lua.tmp", dir .. "/p.lua"))
end

local function wait_for(mib)
  local deadline = hv.now() + 30
  while vms[#vms].memory.target ~= mib * M do
    assert(hv.now() < deadline, "the edit was not applied")
    hv.sleep(0.0005)
  end
end

save(300)
hv.policy.watch(dir)
wait_for(300)
local latencies = {}
for i = 1, edits do
  local mib = 300 + i
  local saved = hv.now()
  save(mib)
  wait_for(mib)
  latencies[i] = (hv.now() - saved) * 1000
  -- Interval ticks (1 s) never decide this: only the new version's first tick does.
end
table.sort(latencies)
print(("reload latency (save -> first applied decision) over %d edits: median %.1f ms, "
  .. "min %.1f, max %.1f (of which debounce 200 ms)"):format(edits,
  latencies[(edits + 1) // 2], latencies[1], latencies[edits]))
hv.policy.unload("p")
os.execute(("rm -rf %q"):format(dir))
