-- Snapshot and restore figures:
--   1. restore to running (hv.restore returns with the vCPUs running) at 128M, 512M, 2G;
--   2. full and diff snapshot time (the VM's pause) and memory file size against the
--      memory the guest dirtied;
--   3. COUNT VMs restored from one snapshot: total time and the process's RSS.
-- Files go into a temporary directory, removed at the end.
--
--   luvisor run bench/snapshot.lua [COUNT]
local count = tonumber(arg[1]) or 100
local dir = os.tmpname()
os.remove(dir)
assert(os.execute(("mkdir -p %q"):format(dir)))

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

local function allocated_kib(path)
  local p = io.popen(("du -k --apparent-size=no %q 2>/dev/null || du -k %q"):format(path, path))
  local out = p:read("a") ; p:close()
  return tonumber(out:match("^(%d+)")) or -1
end

print("restore to running (median of 10), and the snapshot each came from:")
for _, size in ipairs{ "128M", "512M", "2G" } do
  local vm = hv.vm{ name = "size-" .. size, memory = size,
                    guest = hv.guest.builtin{ cmdline = "touch 16; count 100" } }
  vm:start()
  vm:wait_for_console("count 1", { timeout = 30 })
  local snap = dir .. "/size-" .. size
  local r = vm:snapshot(snap, { stop = true, disks = "shared" })
  vm:destroy()
  local times = {}
  for i = 1, 10 do
    local t0 = hv.now()
    local copy = hv.restore(snap, { name = "copy-" .. i })
    times[#times + 1] = (hv.now() - t0) * 1000
    copy:wait_for_console("count", { timeout = 30 })
    copy:destroy()
  end
  print(("  %5s: restore %.2f ms (min %.2f); snapshot paused the VM %.1f ms, memory file %d KiB on disk"):format(
    size, median(times), math.min(table.unpack(times)), r.paused_ms, allocated_kib(snap .. "/memory")))
end

print("snapshot time and size against memory dirtied (512M VM):")
local vm = hv.vm{ name = "dirty", memory = "512M", guest = hv.guest.builtin{ cmdline = "listen" } }
vm:start()
vm:wait_for_console("listening", { timeout = 10 })
local base = vm:snapshot(dir .. "/dirty-base", { disks = "shared" })
print(("  full, nothing touched:  paused %.1f ms, %d KiB written"):format(base.paused_ms, base.memory_bytes // 1024))
local last = dir .. "/dirty-base"
for i, mib in ipairs{ 1, 16, 64, 256 } do
  local from = vm.console_offset
  vm:send(("touch %d\n"):format(mib))
  vm:wait_for_console("touched", { timeout = 60, after = from })
  local name = dir .. "/dirty-diff-" .. i
  local d = vm:snapshot(name, { base = last, disks = "shared" })
  local f = vm:snapshot(dir .. "/dirty-full-" .. i, { disks = "shared" })
  last = dir .. "/dirty-full-" .. i
  print(("  dirtied %3d MiB: diff paused %6.1f ms, %7d KiB (%d KiB on disk); full paused %6.1f ms, %7d KiB"):format(
    mib, d.paused_ms, d.memory_bytes // 1024, allocated_kib(name .. "/memory"), f.paused_ms, f.memory_bytes // 1024))
end
vm:destroy()

print(("%d VMs restored from one snapshot:"):format(count))
local src = hv.vm{ name = "src", memory = "128M", guest = hv.guest.builtin{ cmdline = "touch 32; count 100" } }
src:start()
src:wait_for_console("count 1", { timeout = 30 })
src:snapshot(dir .. "/many", { stop = true, disks = "shared" })
src:destroy()
local rss0 = hv.host().process_rss
local t0 = hv.now()
local vms = {}
for i = 1, count do
  vms[i] = hv.restore(dir .. "/many", { name = "many-" .. i })
end
local took = hv.now() - t0
for i = 1, count do vms[i]:wait_for_console("count", { timeout = 60 }) end
local rss = hv.host().process_rss - rss0
print(("  restored in %.1f ms total (%.2f ms each); process RSS grew %.1f MiB (%.2f MiB per VM; each guest had touched 32 MiB)"):format(
  took * 1000, took * 1000 / count, rss / 1048576, rss / 1048576 / count))
for i = 1, count do vms[i]:destroy() end
assert(os.execute(("rm -rf %q"):format(dir)))
