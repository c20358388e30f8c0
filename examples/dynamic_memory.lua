-- Dynamic memory: three VMs with different memory demand, balanced by the shipped policy
-- (policies/dynamic_memory.lua), watched so that saving an edit to it changes what this
-- table shows within a second. Each line: the guest's demand (what it uses, from its
-- balloon statistics), the balloon target the policy set, what the guest has now, and
-- what the VM really takes on the host.
--
--   cargo run --release -- run examples/dynamic_memory.lua [SECONDS]
--
-- Try it: while it runs, change STEP_UP or the buffer handling in
-- policies/dynamic_memory.lua and save.
local hv = require "hv"

local seconds = tonumber(arg[1]) or 12
local here = arg[0]:match("^(.*)/[^/]*$") or "."
local policies = here .. "/../policies"
local MiB = 1024 * 1024

local function vm(name, startup, cmdline)
  local v = hv.vm{
    name = name,
    memory = { startup = startup, min = "32M", max = "512M", buffer = 20, weight = 5000 },
    guest = hv.guest.builtin{ cmdline = cmdline },
  }
  v:start()
  return v
end

local vms = {
  -- Needs more and more: 32M, then 300M after 3 s.
  vm("grower", "64M", "mem-demand 32M@0,300M@3000"),
  -- Boots big and does nothing: the policy shrinks it towards its min.
  vm("idler", "384M", "idle"),
  -- A peak in the middle.
  vm("spiky", "128M", "mem-demand 48M@0,200M@4000,24M@8000"),
}

hv.policy.watch(policies)

local function mib(bytes) return bytes and ("%6.0f"):format(bytes / MiB) or "     -" end

print(("%-8s %8s %8s %8s %8s   (MiB)"):format("vm", "demand", "target", "size", "resident"))
local started = hv.now()
while hv.now() - started < seconds do
  hv.sleep(1)
  for _, v in ipairs(vms) do
    local m = v.memory
    local stats = m.stats
    local demand = stats and stats.total and stats.available and (stats.total - stats.available)
    print(("%-8s %8s %8s %8s %8s"):format(v.name, mib(demand), mib(m.target), mib(m.size), mib(m.resident)))
  end
  print(("%.0f s  host: %d MiB resident in VMs"):format(hv.now() - started, hv.host().vms_resident // MiB))
end

local status = hv.policy.status("dynamic-memory")
print(("policy %s generation %d: %d ticks, %d failures%s"):format(status.name, status.generation,
  status.ticks, status.failures, status.last_error and (", last error: " .. status.last_error) or ""))
for _, v in ipairs(vms) do v:destroy() end
hv.policy.unload("dynamic-memory")
