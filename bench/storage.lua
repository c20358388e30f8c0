-- virtio-blk throughput and IOPS measured inside the built-in guest.
--   luvisor run bench/storage.lua IMAGE [SECONDS] [PATTERN]
-- PATTERN is one of the four below (e.g. "rand read 4"); without it, all four run.
-- Prints one "blk-bench MODE OP SIZE: X MiB/s, N IOPS" line per pattern.
local image = assert(arg[1], "usage: storage.lua IMAGE [SECONDS] [PATTERN]")
local seconds = tonumber(arg[2]) or 3
local patterns = { "seq read 64", "seq write 64", "rand read 4", "rand write 4" }
if arg[3] then
  patterns = { arg[3] }
end
for i, pattern in ipairs(patterns) do
  local disk = hv.disk.open(image)
  local vm = hv.vm{ name = "bench-" .. i, memory = "64M", disks = { disk },
                    guest = hv.guest.builtin{ cmdline = "blk-bench " .. pattern .. " " .. seconds } }
  vm:start()
  assert(vm:wait{ timeout = seconds + 60 } == 0, vm:console())
  io.write(vm:console())
  vm:destroy()
end
