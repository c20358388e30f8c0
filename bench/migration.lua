-- Live migration figures: downtime, total time and bytes sent against memory size
-- (128M, 512M, 1G, half of it filled by the guest) at three dirty rates (none, a 64 MiB
-- region rewritten at 100 MiB/s, and at 1000 MiB/s), to a `luvisor serve --listen`
-- child on loopback. The goals: downtime <= 10 ms, total <= 1.5 x memory / loopback
-- bandwidth; the loopback bandwidth comes from bench/migration.sh (argument 1, bytes
-- per second), which measures it in the same run.
--
-- With GUEST_ELF (the built-in guest's image, from `luvisor guest-elf`), each round also
-- migrates the same guest with the same command line under QEMU (bench/qemu_migration.py:
-- two qemu-system-x86_64 -M microvm on loopback, downtime-limit = our max_downtime_ms,
-- auto-converge on), checks it on arrival (dirty-verify, or hello when idle), and a
-- second table compares the two.
--
--   luvisor run bench/migration.lua [LOOPBACK_BYTES_PER_S] [ROUNDS] [GUEST_ELF]
local loopback = tonumber(arg[1])
local rounds = tonumber(arg[2]) or 3
local guest_elf = arg[3]
local qemu_driver = (arg[0]:match("^(.*)/[^/]*$") or ".") .. "/qemu_migration.py"
local max_downtime_ms = 5
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
  { name = "idle", cmd = "listen", verify = "hello", expect = "hello from luvisor guest" },
  { name = "100 MiB/s", cmd = "dirty 64 100; listen", verify = "dirty-verify", expect = "dirty-verify: " },
  { name = "1000 MiB/s", cmd = "dirty 64 1000; listen", verify = "dirty-verify", expect = "dirty-verify: " },
}

-- One migration under QEMU: its fields (numbers, and verify), or nil and the error.
local function qemu_migrate(size, cmdline, rate)
  local waits = { "touched", rate.cmd == "listen" and "listening" or "dirty: pass" }
  local command = ("python3 %q --elf %q --memory %s --cmdline %q --downtime-ms %d --auto-converge" ..
    " --wait %q --wait %q --verify %q --expect %q 2>&1"):format(qemu_driver, guest_elf, size,
    cmdline, max_downtime_ms, waits[1], waits[2], rate.verify, rate.expect)
  local out = io.popen(command):read("a")
  local fields = {}
  for key, value in out:gmatch("([%w_]+)=(%S+)") do
    fields[key] = tonumber(value) or value
  end
  if not fields.stop_to_run_ms then
    return nil, out:match("error=(.-)%s*$") or out:match("^%s*(.-)%s*$")
  end
  fields.verify = out:match('verify="(.-)"') or "?"
  if not fields.verify:find("ok", 1, true) and not fields.verify:find("hello", 1, true) then
    return nil, "the guest failed its check at the destination: " .. fields.verify
  end
  return fields
end
local comparison = {}
if loopback then
  print(("loopback bandwidth: %.0f MiB/s"):format(loopback / 2^20))
end
print(("%-6s %-11s %12s %12s %12s %11s %6s %10s"):format(
  "memory", "dirty rate", "downtime ms", "total ms", "goal ms", "sent MiB", "passes", "MiB/s"))
for _, size in ipairs{ "128M", "512M", "1G" } do
  local bytes = ({ ["128M"] = 128, ["512M"] = 512, ["1G"] = 1024 })[size] * 2^20
  for _, rate in ipairs(rates) do
    local downtime, total, sent, passes, speed = {}, {}, {}, {}, {}
    local qemu = { downtime_ms = {}, stop_to_run_ms = {}, total_ms = {}, bytes = {}, syncs = {} }
    local qemu_error
    local cmdline = ("touch %d; %s"):format(bytes // 2^21, rate.cmd)
    for round = 1, rounds do
      local vm = hv.vm{ name = ("m-%s-%d"):format(size, round), memory = size,
        guest = hv.guest.builtin{ cmdline = cmdline } }
      vm:start()
      vm:wait_for_console("touched", { timeout = 60 })
      if rate.cmd ~= "listen" then vm:wait_for_console("dirty: pass", { timeout = 60 }) end
      local r = vm:migrate(addr, { key_file = key, max_downtime_ms = max_downtime_ms, timeout = 120,
                                  auto_converge = true })
      downtime[#downtime + 1] = r.downtime_ms
      total[#total + 1] = r.total_ms
      sent[#sent + 1] = r.bytes_sent / 2^20
      passes[#passes + 1] = r.iterations
      speed[#speed + 1] = r.mbps * 1e6 / 8 / 2^20
      vm:destroy()
      -- The same migration under QEMU, right after ours (interleaved, so that both see
      -- the same machine).
      if guest_elf and not qemu_error then
        local fields, err = qemu_migrate(size, cmdline, rate)
        if fields then
          for k, list in pairs(qemu) do list[#list + 1] = fields[k] end
        else
          qemu_error = err
        end
      end
    end
    if guest_elf then
      comparison[#comparison + 1] = qemu_error and { size = size, rate = rate.name, error = qemu_error }
        or { size = size, rate = rate.name, downtime = median(downtime), total = median(total),
             qemu_downtime = median(qemu.downtime_ms), qemu_stop = median(qemu.stop_to_run_ms),
             qemu_total = median(qemu.total_ms), qemu_sent = median(qemu.bytes) / 2^20,
             qemu_syncs = median(qemu.syncs) }
    end
    local goal = loopback and ("%.0f"):format(1.5 * bytes / loopback * 1000) or "-"
    print(("%-6s %-11s %12.2f %12.1f %12s %11.1f %6d %10.0f"):format(size, rate.name,
      median(downtime), median(total), goal, median(sent), median(passes), median(speed)))
  end
end
print(("(medians of %d; the guest filled half its memory; max_downtime_ms = %d, auto_converge on)"):format(
  rounds, max_downtime_ms))

if guest_elf then
  print()
  print("the same migrations under QEMU (qemu-system-x86_64 -M microvm, KVM, loopback TCP):")
  print(("%-6s %-11s %9s %9s %10s %10s %10s %9s %6s %8s %8s %8s"):format("memory", "dirty rate",
    "luv down", "luv total", "qemu own", "qemu down", "qemu total", "qemu MiB", "syncs",
    "down x", "own x", "total x"))
  for _, row in ipairs(comparison) do
    if row.error then
      print(("%-6s %-11s QEMU failed: %s"):format(row.size, row.rate, row.error))
    else
      print(("%-6s %-11s %9.2f %9.1f %10d %10.2f %10d %9.1f %6d %7.1fx %7.1fx %7.1fx"):format(
        row.size, row.rate, row.downtime, row.total, row.qemu_downtime, row.qemu_stop, row.qemu_total,
        row.qemu_sent, row.qemu_syncs, row.qemu_stop / row.downtime, row.qemu_downtime / row.downtime,
        row.qemu_total / row.total))
    end
  end
  print(("(ms, medians of %d; QEMU: downtime-limit %d ms, no bandwidth cap, auto-converge on. \"qemu down\":"):format(
    rounds, max_downtime_ms))
  print(" the source starts stopping -> the destination runs, from QEMU's run-state trace, as \"luv down\";")
  print(" \"qemu own\": QEMU's own downtime, whole ms, until the source sent the last byte; ratios QEMU / luvisor)")
end
os.execute("kill " .. pid)
os.execute(("rm -rf %q"):format(dir))
