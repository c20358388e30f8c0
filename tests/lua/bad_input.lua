-- Every bad input raises a Lua error that names the argument and what is accepted,
-- and changes nothing.

local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "'")
  err = tostring(err)
  assert(err:find(pattern, 1, true), "error '" .. err .. "' does not mention '" .. pattern .. "'")
  return err
end

local guest = hv.guest.builtin{ cmdline = "exit 0" }

-- Unknown option keys list the valid ones.
local err = fails("unknown option 'memroy'", hv.vm, { name = "a", memroy = "64M", guest = guest })
assert(err:find("valid options are: name, vcpus, memory, guest, console, disks", 1, true), err)
fails("unknown option 'cmd'", hv.guest.builtin, { cmd = "hello" })
fails("expected an options table", hv.vm, "demo")

-- Sizes.
err = fails("option 'memory' must be a size", hv.vm, { name = "a", memory = "12Q", guest = guest })
assert(err:find('"12Q"', 1, true) and err:find('"128M"', 1, true), err)
fails("option 'memory' must be a size", hv.vm, { name = "a", memory = -5, guest = guest })
-- A table is dynamic memory's knobs, which need at least startup.
fails("option 'startup' is required", hv.vm, { name = "a", memory = {}, guest = guest })
fails("memory = 1000 bytes is invalid", hv.vm, { name = "a", memory = 1000, guest = guest })
fails("memory = 1099511627776 bytes is invalid", hv.vm, { name = "a", memory = "1T", guest = guest })

-- vCPUs.
fails("option 'vcpus' must be an integer from 1 to 8, got 0", hv.vm, { name = "a", vcpus = 0, guest = guest })
fails("option 'vcpus' must be an integer from 1 to 8, got 9", hv.vm, { name = "a", vcpus = 9, guest = guest })
fails("option 'vcpus' must be an integer from 1 to 8, got 1.5", hv.vm, { name = "a", vcpus = 1.5, guest = guest })
fails("option 'vcpus' must be an integer from 1 to 8, got \"two\"", hv.vm, { name = "a", vcpus = "two", guest = guest })

-- Required options and their types.
fails("option 'name' is required", hv.vm, { guest = guest })
fails("option 'guest' is required", hv.vm, { name = "a" })
fails("option 'guest' must be a guest", hv.vm, { name = "a", guest = "hello" })
fails("option 'name' must be a string", hv.vm, { name = 42, guest = guest })

-- Type errors read as English.
fails("option 'name' must be a string, got an integer", hv.vm, { name = 42, guest = guest })
fails("option 'cmdline' must be a string, got a table", hv.guest.builtin, { cmdline = {} })

-- The memory limit: 63G is accepted, one page more is refused, stating the same limit.
local big = hv.vm{ name = "big", memory = "63G", guest = guest }
assert(big.memory_size == 63 * 1024 * 1024 * 1024)
big:destroy()
fails("memory = 67645739008 bytes is invalid: give a multiple of 4K between 4M and 63G",
      hv.vm, { name = "a", memory = 63 * 1024 * 1024 * 1024 + 4096, guest = guest })

-- The command line: no NUL bytes, and at most 3072 bytes with the entries the VM adds
-- for its disks and its agent channel (checked by hv.vm{}, not only at start).
fails("hv.guest.builtin: option 'cmdline' has a NUL byte at offset 1; give text without NUL bytes",
      hv.guest.builtin, { cmdline = "a\0b" })
local disks = {}
for i = 1, 16 do disks[i] = hv.disk.create{ path = "cmdline-" .. i .. ".img", size = "1M" } end
local long = hv.guest.builtin{ cmdline = "exit 0;" .. string.rep(" ", 3000 - 7) }
hv.vm{ name = "long", memory = "16M", guest = long }:destroy() -- fits alone
fails("hv.vm: the guest command line is 3607 bytes (607 of them for the virtio_mmio.device entries the VM adds for its 16 disks and agent channel); the limit is 3072",
      hv.vm, { name = "long", memory = "16M", guest = long, disks = disks })

-- A console fifo with no reader is refused at once (it used to block forever).
assert(os.execute("mkfifo console.fifo"))
fails("console fifo console.fifo has no reader", hv.vm,
      { name = "a", memory = "16M", guest = guest, console = "console.fifo" })

-- None of the failures above created a VM.
assert(#hv.vms() == 0, "failed constructors must not leave VMs behind")

-- Duplicate names.
-- It idles, so it is still running when the test starts it a second time.
local a = hv.vm{ name = "a", memory = "16M", guest = hv.guest.builtin{ cmdline = "idle" } }
fails("a vm named 'a' already exists", hv.vm, { name = "a", guest = guest })
assert(#hv.vms() == 1)

-- Waits and their options.
fails("never started", a.wait, a, { timeout = 1 })
fails("vm:wait: option 'timeout' must be a number of seconds >= 0, got -1", a.wait, a, { timeout = -1 })
fails("vm:wait: unknown option 'timout'", a.wait, a, { timout = 1 })
fails("vm:wait_for_console: pattern must be a string", a.wait_for_console, a, 42)
fails("hv.sleep: seconds must be a number >= 0", hv.sleep, "soon")

-- Lifecycle misuse.
fails("cannot pause vm 'a': it is created", a.pause, a)
fails("cannot resume vm 'a': it is created", a.resume, a)
a:start()
fails("cannot start vm 'a': it is running", a.start, a)
a:stop()
fails("cannot pause vm 'a': it is stopped", a.pause, a)

-- Stale handles: every field and every method gives the same error.
a:destroy()
for _, field in ipairs{ "id", "name", "state", "vcpus", "memory_size", "memory_resident",
                        "boot_time_ms", "run_time_ms", "exit_code", "crash_reason",
                        "console_offset", "console_error" } do
  err = fails("vm 'a' no longer exists", function() return a[field] end)
  assert(not err:find("no longer exists.*no longer exists"), err)
end
for _, call in ipairs{
  { "start" }, { "pause" }, { "resume" }, { "stop" }, { "destroy" }, { "console" },
  { "wait", { timeout = 1 } }, { "wait_for_console", "x", { timeout = 1 } },
} do
  local method = a[call[1]] -- methods resolve the VM when called, not when looked up
  fails("vm 'a' no longer exists", method, a, table.unpack(call, 2))
end
assert(tostring(a):find("destroyed", 1, true), tostring(a))
assert(#hv.vms() == 0)

-- The name is free again.
local again = hv.vm{ name = "a", memory = "16M", guest = guest }
assert(again.state == "created")
print("bad input: ok")
