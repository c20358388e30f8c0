-- Live migration figures: downtime, total time and bytes sent against memory size
-- (128M, 512M, 1G, half of it filled by the guest) at three dirty rates (none, a 64 MiB
-- region rewritten at 100 MiB/s, and at 1000 MiB/s), to a `luvisor serve --listen`
-- child on loopback. The goals: downtime <= 10 ms, total <= 1.5 x memory / loopback
-- bandwidth; the loopback bandwidth comes from bench/migration.sh (argument 1, bytes
-- per second), which measures it in the same run.
--
--   luvisor run bench/migration.lua [LOOPBACK_BYTES_PER_S] [ROUNDS]
local loopback = tonumber(arg[1])
local rounds = tonumber(arg[2]) or 3
local luvisor = arg[-1]
local dir = os.tmpname()
os.remove(dir)
assert(os.execute(("mkdir -p %q"):format(dir)))
local key = dir .. "/peer.key"
do
  local random = assert(io.open("/dev/urandom", "rb"))
  local f = assert(io.open(key, "wb"))
  f:write(random:read(32)); f:close(); random:close()
  assert(os.execute(("chmod 600 %q"):format(key)))
end

-- The destination drops every VM that arrives once it runs.
local config = dir .. "/destination.lua"
do
  local f = assert(io.open(config, "w"))
  f:write([[hv.migration.on_arrival(function(vm) vm:destroy() end)]])
  f:close()
end
local log = dir .. "/destination.log"
local pid = io.popen(("%q serve %q --listen 127.0.0.1:0 --key-file %q > %q 2>&1 & echo $!"):format(
  luvisor, config, key, log)):read("l")
local addr
for _ = 1, 500 do
  local f = io.open(log)
  local text = f and f:read("a") or ""
  if f then f:close() end
  addr = text:match("listening on (%S+)")
  if addr then break end
  hv.sleep(0.02)
end
assert(addr, "the destination did not start")

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

local rates = {
  { name = "idle", cmd = "listen" },
  { name = "100 MiB/s", cmd = "dirty 64 100; listen" },
  { name = "1000 MiB/s", cmd = "dirty 64 1000; listen" },
}
if loopback then
  print(("loopback bandwidth: %.0f MiB/s"):format(loopback / 2^20))
end
print(("%-6s %-11s %12s %12s %12s %11s %6s %10s"):format(
  "memory", "dirty rate", "downtime ms", "total ms", "goal ms", "sent MiB", "passes", "MiB/s"))
for _, size in ipairs{ "128M", "512M", "1G" } do
  local bytes = ({ ["128M"] = 128, ["512M"] = 512, ["1G"] = 1024 })[size] * 2^20
  for _, rate in ipairs(rates) do
    local downtime, total, sent, passes, speed = {}, {}, {}, {}, {}
    for round = 1, rounds do
      local vm = hv.vm{ name = ("m-%s-%d"):format(size, round), memory = size,
        guest = hv.guest.builtin{ cmdline = ("touch %d; %s"):format(bytes // 2^21, rate.cmd) } }
      vm:start()
      vm:wait_for_console("touched", { timeout = 60 })
      if rate.cmd ~= "listen" then vm:wait_for_console("dirty: pass", { timeout = 60 }) end
      local r = vm:migrate(addr, { key_file = key, max_downtime_ms = 5, timeout = 120,
                                  auto_converge = true })
      downtime[#downtime + 1] = r.downtime_ms
      total[#total + 1] = r.total_ms
      sent[#sent + 1] = r.bytes_sent / 2^20
      passes[#passes + 1] = r.iterations
      speed[#speed + 1] = r.mbps * 1e6 / 8 / 2^20
      vm:destroy()
    end
    local goal = loopback and ("%.0f"):format(1.5 * bytes / loopback * 1000) or "-"
    print(("%-6s %-11s %12.2f %12.1f %12s %11.1f %6d %10.0f"):format(size, rate.name,
      median(downtime), median(total), goal, median(sent), median(passes), median(speed)))
  end
end
print(("(medians of %d; the guest filled half its memory; max_downtime_ms = 5, auto_converge on)"):format(rounds))
os.execute("kill " .. pid)
os.execute(("rm -rf %q"):format(dir))
