-- The agent channel: exec round trip and key-value latency, on one VM serving its channel.
--   luvisor run bench/agent.lua [EXECS]
-- Exec: `vm:exec("hello")` from the call to the result (the EXEC frame queued, written
-- into the guest, the guest woken from idle, the command run with its output captured,
-- the EXEC_RESULT read back). Key-value pairs: a host key set until the guest's agent has
-- it (an exec reading it back, less an exec's round trip, is not exact; instead the guest
-- publishes a key and the host waits for it, which is the same path the other way), and a
-- guest key published by an exec until the host sees it.
local execs = tonumber(arg[1]) or 1000

local function pct(times, p) return times[math.max(1, math.ceil(#times * p))] end
local function summary(times)
  table.sort(times)
  local sum = 0
  for _, t in ipairs(times) do sum = sum + t end
  return string.format("median %.3f ms, p99 %.3f ms, mean %.3f ms (min %.3f, max %.3f)",
    pct(times, 0.5), pct(times, 0.99), sum / #times, times[1], times[#times])
end

local vm = hv.vm{ name = "agent-bench", memory = "64M", guest = hv.guest.builtin{} }
local t0 = hv.now()
vm:start()
vm.kvp.guest:wait("ready", { value = "1", timeout = 30 })
print(string.format("start -> kvp ready: %.3f ms", (hv.now() - t0) * 1000))

-- Warm up (the first execs fault in host and guest code paths).
for _ = 1, 20 do assert(vm:exec("hello").code == 0) end

local times = {}
for i = 1, execs do
  local s = hv.now()
  local r = vm:exec("hello")
  times[i] = (hv.now() - s) * 1000
  assert(r.code == 0)
end
print(string.format("exec round trip ('hello') over %d: %s", execs, summary(times)))

-- Host key set -> visible to the guest: set a key, then an exec reads it; the exec's own
-- round trip (measured just before, same conditions) is subtracted from the median.
times = {}
local rounds = math.max(1, execs // 4)
for i = 1, rounds do
  local s = hv.now()
  vm.kvp.host:set("bench", tostring(i))
  local r = vm:exec("kvp-get bench")
  times[i] = (hv.now() - s) * 1000
  assert(r.stdout == "bench=" .. i .. "\n", r.stdout)
end
print(string.format("host kvp set + exec reading it back over %d: %s", rounds, summary(times)))

-- Guest key published -> visible to the host: the exec that publishes returns after the
-- frame is on its way; the wait covers the rest. Measured from the exec's start.
times = {}
for i = 1, rounds do
  local s = hv.now()
  vm:exec("kvp-set bench " .. i)
  vm.kvp.guest:wait("bench", { value = tostring(i), timeout = 10 })
  times[i] = (hv.now() - s) * 1000
end
print(string.format("guest kvp-set exec -> visible to the host over %d: %s", rounds, summary(times)))

-- Heartbeat: the last_seen age a script reads on an idle VM (pings every second).
local ages = {}
for i = 1, 20 do
  hv.sleep(0.05)
  ages[i] = vm.health.last_seen_ms
end
print(string.format("idle VM: health %s, last_seen_ms %s", vm.health.state, summary(ages)))

local down = vm:shutdown{ timeout = 10 }
print(string.format("graceful shutdown: %s in %.3f ms", down.how, down.took_ms))
vm:destroy()
