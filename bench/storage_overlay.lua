-- The copy-on-write path: the guest fills a fresh qcow2 overlay of BASE, so every 64 KiB
-- cluster is allocated on first write. No flush: this measures the allocation path, not
-- the host disk.
--   luvisor run bench/storage_overlay.lua BASE OVERLAY
-- Prints "guest fill: <MiB> MiB in <seconds> s, <MiB/s> MiB/s".
local base, path = assert(arg[1], "usage: storage_overlay.lua BASE OVERLAY"), assert(arg[2])
local disk = hv.disk.overlay{ base = base, path = path }
local sectors = disk.size // 512
local vm = hv.vm{ name = "fill", memory = "64M", disks = { disk },
                  guest = hv.guest.builtin{ cmdline = string.format("blk-fill 0 %d 7", sectors) } }
local t0 = hv.now()
vm:start()
assert(vm:wait{ timeout = 600 } == 0, vm:console())
local seconds = hv.now() - t0
local mib = disk.size / 1048576
print(string.format("guest fill: %d MiB in %.3f s, %.1f MiB/s", mib, seconds, mib / seconds))
