-- Storage: one base disk, three copy-on-write overlays, three VMs writing to their own
-- overlay and reading the shared base through it.
--
--   cargo run --release -- run examples/storage.lua
--
-- Files go to a temporary location and are removed at the end.
local prefix = os.tmpname()
os.remove(prefix)
local files = {}
local function path(name)
  files[#files + 1] = prefix .. "-" .. name
  return files[#files]
end

-- A sparse 256 MiB base image; a first VM writes 1000 sectors (seed 1) into it.
local base = hv.disk.create{ path = path("base.img"), size = "256M" }
local seeder = hv.vm{ name = "seeder", memory = "64M", disks = { base },
                      guest = hv.guest.builtin{ cmdline = "blk-write 0 1000 1; blk-flush" } }
seeder:start()
assert(seeder:wait{ timeout = 30 } == 0, seeder:console())
print(string.format("base: %s, %d writes, %d KiB written", tostring(base), base:stats().writes,
  base:stats().bytes_written // 1024))

-- Three overlays, each in its own VM. Every VM writes its own data over part of the base,
-- flushes, and verifies both its own sectors and the base's.
local vms, overlays = {}, {}
for i = 1, 3 do
  local t0 = hv.now()
  overlays[i] = hv.disk.overlay{ base = base, path = path("vm" .. i .. ".qcow2") }
  local created_ms = (hv.now() - t0) * 1000
  local seed = 100 + i
  local cmdline = string.format(
    "blk-info; blk-write 500 200 %d; blk-flush; blk-verify 500 200 %d; blk-verify 0 500 1; blk-verify 700 300 1",
    seed, seed)
  vms[i] = hv.vm{ name = "lab-" .. i, memory = "64M", disks = { overlays[i] },
                  guest = hv.guest.builtin{ cmdline = cmdline } }
  vms[i]:start()
  print(string.format("overlay %d: %s (created in %.2f ms)", i, tostring(overlays[i]), created_ms))
end

for i, vm in ipairs(vms) do
  assert(vm:wait{ timeout = 30 } == 0, vm:console())
  local _, mismatches = vm:console():gsub(": 0 mismatches", "")
  assert(mismatches == 3, vm:console())
  local s = overlays[i]:stats()
  print(string.format("%s: verified; stats reads=%d writes=%d flushes=%d bytes_read=%d bytes_written=%d errors=%d",
    vm.name, s.reads, s.writes, s.flushes, s.bytes_read, s.bytes_written, s.errors))
end

-- The base never saw the overlays' writes.
local check = hv.vm{ name = "check", memory = "64M", disks = { hv.disk.open(base.path, { readonly = true }) },
                     guest = hv.guest.builtin{ cmdline = "blk-verify 0 1000 1" } }
check:start()
assert(check:wait{ timeout = 30 } == 0)
print("base after the lab: " .. check:console():gsub("\n$", ""))

for _, f in ipairs(files) do os.remove(f) end
