-- The VMM's own resident memory per running VM, not counting guest memory the guest
-- (or the loader) touched.
--   luvisor run bench/vmm_overhead.lua [COUNT]
local count = tonumber(arg[1]) or 50
hv.sleep(0.1)
local before = hv.host().process_rss
local vms = {}
for i = 1, count do
  local vm = hv.vm{ name = "overhead-" .. i, memory = "128M", guest = hv.guest.builtin{ cmdline = "hello; idle" } }
  vm:start()
  vms[i] = vm
end
local guest_resident = 0
for _, vm in ipairs(vms) do
  vm:wait_for_console("hello from luvisor guest", { timeout = 30 })
end
hv.sleep(0.1)
local after = hv.host().process_rss
for _, vm in ipairs(vms) do guest_resident = guest_resident + vm.memory_resident end
local per_vm = (after - before - guest_resident) / count
print(string.format("VMM overhead with %d running VMs: %.1f KiB per VM (process RSS +%.1f MiB, of which guest-touched memory %.1f MiB = %.1f KiB per VM)",
  count, per_vm / 1024, (after - before) / 1048576, guest_resident / 1048576, guest_resident / count / 1024))
for _, vm in ipairs(vms) do vm:stop() end
