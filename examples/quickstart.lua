-- Quickstart: boot the built-in guest, watch it work, pause and resume it, stop it; then
-- run a command in a guest through its agent channel, read what it published, shut it down.
--
--   cargo run --release -- run examples/quickstart.lua
--
local hv = require "hv"

local vm = hv.vm{
  name = "demo",
  vcpus = 1,
  memory = "128M",
  guest = hv.guest.builtin{ cmdline = "hello; count 100" },
}
vm:start()

local line = vm:wait_for_console("hello from luvisor guest", { timeout = 5 })
print("guest says:  " .. line)
print(string.format("vm %s is %s with %d vcpu and %d MiB, booted in %.2f ms",
  vm.name, vm.state, vm.vcpus, vm.memory_size // (1024 * 1024), vm.boot_time_ms))

-- The guest prints "count N" every 100 ms of its own running time.
local _, seen = vm:wait_for_console("count 3", { timeout = 5 })
vm:pause()
print("paused:      " .. vm.state .. " after " .. select(2, vm:console():gsub("count", "")) .. " counts")
hv.sleep(0.3)   -- no guest time passes while paused
vm:resume()
print("resumed:     " .. vm.state)
print("guest says:  " .. vm:wait_for_console("count 5", { timeout = 5, after = seen }))

vm:stop()       -- hard stop: vCPUs gone, guest memory freed; the record stays
print("stopped:     " .. vm.state)
print("console:\n" .. vm:console())
vm:destroy()

-- A guest that ends by itself reports its exit code.
local e = hv.vm{ name = "e", memory = "64M", guest = hv.guest.builtin{ cmdline = "exit 3" } }
e:start()
print("exit code:   " .. e:wait{ timeout = 5 })

-- Integration services: a guest with an empty command line serves its agent channel.
local a = hv.vm{ name = "agent", memory = "64M", guest = hv.guest.builtin{} }
a:start()
local r = a:exec("compute 1000", { timeout = 5 })
print("exec:        code " .. r.code .. ", " .. r.stdout:gsub("\n$", ""))
print("guest keys:  ready = " .. a.kvp.guest:wait("ready", { timeout = 5 }) ..
      ", boot_id = " .. a.kvp.guest:get("boot_id"))
print("health:      " .. a.health.state)
print("shutdown:    " .. a:shutdown{ timeout = 5 }.how)

local host = hv.host()
print(string.format("host: %d cpus, KVM api %d, backend %s", host.cpus, host.kvm.api, host.kvm.backend))
