-- Host CPU used by idle VMs: the guest waits on the idle port, so its vCPU thread
-- sleeps instead of spinning.
--   luvisor run bench/idle_cpu.lua [COUNT] [SECONDS]
local count = tonumber(arg[1]) or 50
local seconds = tonumber(arg[2]) or 5

local function measure(label, cmdline)
  local vms = {}
  for i = 1, count do
    local vm = hv.vm{ name = label .. "-" .. i, memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; " .. cmdline } }
    vm:start()
    vms[i] = vm
  end
  for _, vm in ipairs(vms) do vm:wait_for_console("hello from luvisor guest", { timeout = 30 }) end
  local cpu0 = hv.host().process_cpu_seconds
  hv.sleep(seconds)
  local cpu1 = hv.host().process_cpu_seconds
  for _, vm in ipairs(vms) do vm:destroy() end
  return (cpu1 - cpu0) / seconds * 100
end

print(string.format("host CPU with %d idle VMs (no deadline) over %ds: %.2f%% of one core",
  count, seconds, measure("idle", "idle")))
print(string.format("host CPU with %d VMs waking every 100 ms (count 100) over %ds: %.2f%% of one core",
  count, seconds, measure("timer", "count 100")))
