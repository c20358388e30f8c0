-- The VM lifecycle through the hv module, as a user script sees it.

local vm = hv.vm{ name = "life", vcpus = 2, memory = "64M",
                  guest = hv.guest.builtin{ cmdline = "hello; count 20" } }
assert(vm.state == "created")
assert(vm.name == "life" and vm.vcpus == 2 and vm.memory_size == 64 * 1024 * 1024)
assert(vm.boot_time_ms == nil)
vm:start()
assert(vm.state == "running")
local line, offset = vm:wait_for_console("hello from luvisor guest", { timeout = 10 })
assert(line == "hello from luvisor guest", line)
assert(offset > 0)
assert(vm.boot_time_ms > 0, "boot time is recorded once the guest is ready")

-- Pause: the counter stops; resume: it goes on.
vm:wait_for_console("count 2", { timeout = 10 })
vm:pause()
assert(vm.state == "paused")
local function counts() return select(2, vm:console():gsub("count ", "")) end
local frozen = counts()
hv.sleep(0.2)
assert(counts() == frozen, "the counter advanced while paused")
vm:resume()
assert(vm.state == "running")
vm:wait_for_console("count " .. (frozen + 2), { timeout = 10 })

-- A timeout says what was awaited and what was seen.
local ok, err = pcall(vm.wait_for_console, vm, "never printed", { timeout = 0.1 })
assert(not ok and tostring(err):find('timed out after 100ms waiting for console output "never printed"', 1, true), tostring(err))
assert(tostring(err):find("last console line", 1, true), tostring(err))
ok, err = pcall(vm.wait, vm, { timeout = 0.05 })
assert(not ok and tostring(err):find("waiting for the guest to end", 1, true), tostring(err))

vm:stop()
vm:stop() -- idempotent
assert(vm.state == "stopped")
assert(vm:console():find("hello from luvisor guest", 1, true))
local code, state, reason = vm:wait{ timeout = 1 }
assert(code == nil and state == "stopped" and reason == "stopped by the host", tostring(reason))

-- Exit codes and crashes.
local e = hv.vm{ name = "e", memory = "64M", guest = hv.guest.builtin{ cmdline = "exit 3" } }
e:start()
assert(e:wait{ timeout = 10 } == 3)
assert(e.exit_code == 3 and e.state == "stopped")

local c = hv.vm{ name = "c", memory = "64M", guest = hv.guest.builtin{ cmdline = "fault" } }
c:start()
code, state, reason = c:wait{ timeout = 10 }
assert(code == nil and state == "crashed", state)
assert(c.crash_reason:find("rip=0x", 1, true), c.crash_reason)
print("crash reason: " .. c.crash_reason)

-- A VM that ended reports why when someone waits for its console.
ok, err = pcall(e.wait_for_console, e, "never", { timeout = 5 })
assert(not ok and tostring(err):find("exit code 3", 1, true), tostring(err))

-- hv.vms() lists handles; tostring is readable.
local names = {}
for _, h in ipairs(hv.vms()) do names[#names + 1] = h.name end
assert(table.concat(names, ",") == "life,e,c", table.concat(names, ","))
assert(tostring(e):match("^vm<e #%d+ stopped, 1 vcpu, 64M>$"), tostring(e))
assert(hv.vms()[2] == e, "handles to the same VM compare equal")

-- Console output can be teed to a file (appended, written line by line).
local teed = hv.vm{ name = "teed", memory = "16M", console = "console.log",
                    guest = hv.guest.builtin{ cmdline = "hello; count 1 2" } }
teed:start()
assert(teed:wait{ timeout = 10 } == 0)
local f = assert(io.open("console.log", "rb"))
local logged = f:read("a")
f:close()
assert(logged == "hello from luvisor guest\r\ncount 1\r\ncount 2\r\n", string.format("%q", logged))
assert(teed:console() == "hello from luvisor guest\ncount 1\ncount 2\n")

-- A console file that cannot be written: the guest goes on, the error is reported.
local full = hv.vm{ name = "full", memory = "16M", console = "/dev/full",
                    guest = hv.guest.builtin{ cmdline = "hello; exit 0" } }
assert(full.console_error == nil)
full:start()
assert(full:wait{ timeout = 10 } == 0)
assert(full:console() == "hello from luvisor guest\n")
assert(full.console_error:find("writing console file /dev/full failed: No space left on device", 1, true),
       full.console_error)
assert(teed.console_error == nil)

-- wait_for_console returns whole lines: `count ` is on the console before its number.
local counter = hv.vm{ name = "lines", memory = "16M", guest = hv.guest.builtin{ cmdline = "count 1 100" } }
counter:start()
local after = 0
for n = 1, 100 do
  line, after = counter:wait_for_console("count ", { timeout = 10, after = after })
  assert(line == "count " .. n, string.format("match %d returned %q", n, line))
end
assert(counter:wait{ timeout = 10 } == 0)

-- Exit codes are unsigned 32-bit values.
local max = hv.vm{ name = "max", memory = "16M", guest = hv.guest.builtin{ cmdline = "exit 4294967295" } }
max:start()
code, state = max:wait{ timeout = 10 }
assert(code == 4294967295 and state == "stopped", tostring(code))
assert(max.exit_code == 4294967295, tostring(max.exit_code))
ok, err = pcall(max.wait_for_console, max, "never", { timeout = 5 })
assert(not ok and tostring(err):find("(exit code 4294967295)", 1, true), tostring(err))

-- hv.host()
local host = hv.host()
assert(host.cpus >= 1 and host.memory_total > 0 and host.memory_available > 0)
assert(host.kvm.api == 12)
assert(host.kvm.backend == "pvm" or host.kvm.backend == "hardware" or host.kvm.backend == "unknown")
print("lifecycle: ok")
