-- Snapshot a working VM, restore several copies from it, and watch each go on from
-- where the original was. The disk, the snapshot and the overlays go into a temporary
-- directory, removed at the end.
--
--   cargo run --release -- run examples/snapshot.lua
--
local hv = require "hv"

local dir = os.tmpname()
os.remove(dir)
assert(os.execute(("mkdir -p %q"):format(dir)))

local function last_count(vm)
  local n
  for c in vm:console():gmatch("count (%d+)") do n = tonumber(c) end
  return n
end

local snap = dir .. "/snapshot"
local disk = hv.disk.create{ path = dir .. "/disk.img", size = "8M" }
local vm = hv.vm{
  name = "original",
  memory = "64M",
  disks = { disk },
  guest = hv.guest.builtin{ cmdline = "blk-write 0 128 42; count 50" },
}
vm:start()
vm:wait_for_console("count 10", { timeout = 10 })

local r = vm:snapshot(snap)
print(("snapshot %s: %d KiB of memory, VM paused for %.2f ms; the original went on counting at %d")
  :format(snap, r.memory_bytes // 1024, r.paused_ms, last_count(vm)))
print("the original now writes to " .. r.overlays[1])

local copies = {}
for i = 1, 3 do
  local t0 = hv.now()
  copies[i] = hv.restore(snap, { name = "copy-" .. i })
  print(("restored copy-%d in %.2f ms"):format(i, (hv.now() - t0) * 1000))
end
for i, copy in ipairs(copies) do
  copy:wait_for_console("count 13", { timeout = 10 })
  print(("copy-%d counts on from the snapshot: count %d (its first line was %q)")
    :format(i, last_count(copy), copy:console():match("[^\n]+")))
end

-- Each copy wrote to its own overlay on the frozen disk.
for _, copy in ipairs(copies) do
  copy:destroy()
end
vm:destroy()
os.execute(("ls %q"):format(dir))
assert(os.execute(("rm -rf %q"):format(dir)))
