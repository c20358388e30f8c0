-- Live migration on one machine: a second host runs as a child process
-- (`luvisor serve --listen`), a VM that keeps rewriting its memory moves there, checks
-- its memory on arrival, and comes back, still counting.
--
--   luvisor run examples/migration.lua
local luvisor = arg[-1]   -- the luvisor binary running this script

-- Both hosts hold the same key, in a file only its owner can read.
local key = "peer.key"
do
  local random = assert(io.open("/dev/urandom", "rb"))
  local f = assert(io.open(key, "wb"))
  f:write(random:read(32))
  f:close()
  random:close()
  assert(os.execute("chmod 600 " .. key))
end

-- This script is a host too: VMs can come back to it.
local home = hv.migration.listen("127.0.0.1:0", { key_file = key })

-- The other host: each VM that arrives verifies its memory, goes on dirtying it, and
-- is sent back to us.
local f = assert(io.open("destination.lua", "w"))
f:write([[
hv.migration.on_arrival(function(vm, info)
  print(("there: %s arrived from %s, %.1f MB in %.0f ms"):format(
    vm.name, info.from, info.bytes_received / 1e6, info.total_ms))
  vm:send("dirty-verify\n")
  print("there: " .. vm:wait_for_console("dirty-verify:"))
  vm:send("dirty 16 40\n")
  local r = vm:migrate(os.getenv("HOME_ADDR"), { key_file = "peer.key" })
  print(("there: sent it back, downtime %.1f ms"):format(r.downtime_ms))
  io.stdout:flush()
end)
]])
f:close()
local pid = io.popen(("HOME_ADDR=%s %q serve destination.lua --listen 127.0.0.1:0 --key-file %s > destination.log 2>&1 & echo $!")
  :format(home.address, luvisor, key)):read("l")
local function stop_destination()
  -- SIGTERM: it stops its VMs and exits; wait until it has.
  os.execute(("kill %s; while kill -0 %s 2>/dev/null; do sleep 0.05; done"):format(pid, pid))
end
local there
for _ = 1, 500 do
  local log = io.open("destination.log")
  there = log and log:read("a"):match("listening on (%S+)")
  if log then log:close() end
  if there then break end
  hv.sleep(0.02)
end
if not there then stop_destination(); error("the destination host did not start") end
print("destination host listening on " .. there)

-- A VM that rewrites 16 MiB of its memory at 40 MiB/s, then takes commands.
local vm = hv.vm{ name = "traveller", memory = "128M",
                  guest = hv.guest.builtin{ cmdline = "dirty 16 40; listen" } }
vm:start()
print("here: " .. vm:wait_for_console("dirty: pass"))

local ok, r = pcall(vm.migrate, vm, there, {
  key_file = key,
  max_downtime_ms = 20,
  on_progress = function(p)
    print(("here: pass %d, %d KiB to send, %.0f Mbit/s%s"):format(
      p.iteration, p.remaining_bytes // 1024, p.mbps, p.final and " (paused)" or ""))
  end,
})
if not ok then stop_destination(); error(r) end
print(("here: migrated in %.0f ms, downtime %.1f ms, %.1f MB sent in %d passes; vm is %s"):format(
  r.total_ms, r.downtime_ms, r.bytes_sent / 1e6, r.iterations, vm.state))

-- It comes back: a new handle (the migrated record gave way to it).
local ok2, back = pcall(home.wait_arrival, home, { timeout = 30 })
if not ok2 then stop_destination(); print(io.open("destination.log"):read("a")); error(back) end
back:send("dirty-verify\n")
local line = back:wait_for_console("dirty-verify:")
print("here again: " .. line)
assert(line:find("dirty-verify: ok", 1, true), line)

stop_destination()
home:close()
back:stop()
io.write(io.open("destination.log"):read("a"))
os.remove("destination.log")
os.remove("destination.lua")
os.remove(key)
