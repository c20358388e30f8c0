-- Every bad input raises a Lua error that names the argument and what is accepted,
-- and changes nothing.

local function fails(text, f, ...)
  local args = table.pack(...)
  return assert.error_contains(function() return f(table.unpack(args, 1, args.n)) end, text)
end

local guest = hv.guest.builtin{ cmdline = "exit 0" }

describe("constructors refuse bad options", function()
  after_each(function()
    assert.equal(0, #hv.vms(), "failed constructors must not leave VMs behind")
  end)

  it("lists the valid options for an unknown one", function()
    local err = fails("unknown option 'memroy'", hv.vm, { name = "a", memroy = "64M", guest = guest })
    assert.contains("valid options are: name, vcpus, memory, guest, console, disks", err)
    fails("unknown option 'cmd'", hv.guest.builtin, { cmd = "hello" })
    fails("expected an options table", hv.vm, "demo")
  end)

  it("checks sizes", function()
    local err = fails("option 'memory' must be a size", hv.vm, { name = "a", memory = "12Q", guest = guest })
    assert.contains('"12Q"', err)
    assert.contains('"128M"', err)
    fails("option 'memory' must be a size", hv.vm, { name = "a", memory = -5, guest = guest })
    -- A table is dynamic memory's knobs, which need at least startup.
    fails("option 'startup' is required", hv.vm, { name = "a", memory = {}, guest = guest })
    fails("memory = 1000 bytes is invalid", hv.vm, { name = "a", memory = 1000, guest = guest })
    fails("memory = 1099511627776 bytes is invalid", hv.vm, { name = "a", memory = "1T", guest = guest })
  end)

  it("checks vCPUs", function()
    fails("option 'vcpus' must be an integer from 1 to 8, got 0", hv.vm, { name = "a", vcpus = 0, guest = guest })
    fails("option 'vcpus' must be an integer from 1 to 8, got 9", hv.vm, { name = "a", vcpus = 9, guest = guest })
    fails("option 'vcpus' must be an integer from 1 to 8, got 1.5", hv.vm, { name = "a", vcpus = 1.5, guest = guest })
    fails("option 'vcpus' must be an integer from 1 to 8, got \"two\"", hv.vm, { name = "a", vcpus = "two", guest = guest })
  end)

  it("names required options and expected types in English", function()
    fails("option 'name' is required", hv.vm, { guest = guest })
    fails("option 'guest' is required", hv.vm, { name = "a" })
    fails("option 'guest' must be a guest", hv.vm, { name = "a", guest = "hello" })
    fails("option 'name' must be a string", hv.vm, { name = 42, guest = guest })
    fails("option 'name' must be a string, got an integer", hv.vm, { name = 42, guest = guest })
    fails("option 'cmdline' must be a string, got a table", hv.guest.builtin, { cmdline = {} })
  end)

  it("accepts 63G of memory and refuses one page more, stating the same limit", function()
    local big = hv.vm{ name = "big", memory = "63G", guest = guest }
    assert.equal(63 * 1024 * 1024 * 1024, big.memory_size)
    big:destroy()
    fails("memory = 67645739008 bytes is invalid: give a multiple of 4K between 4M and 63G",
          hv.vm, { name = "a", memory = 63 * 1024 * 1024 * 1024 + 4096, guest = guest })
  end)

  -- No NUL bytes, and at most 3072 bytes with the entries the VM adds for its disks and its agent channel
  -- (checked by hv.vm{}, not only at start).
  it("checks the command line", function()
    fails("hv.guest.builtin: option 'cmdline' has a NUL byte at offset 1; give text without NUL bytes",
          hv.guest.builtin, { cmdline = "a\0b" })
    local disks = {}
    for i = 1, 16 do disks[i] = hv.disk.create{ path = "cmdline-" .. i .. ".img", size = "1M" } end
    local long = hv.guest.builtin{ cmdline = "exit 0;" .. string.rep(" ", 3000 - 7) }
    hv.vm{ name = "long", memory = "16M", guest = long }:destroy() -- fits alone
    fails("hv.vm: the guest command line is 3607 bytes (607 of them for the virtio_mmio.device entries the VM adds for its 16 disks and agent channel); the limit is 3072",
          hv.vm, { name = "long", memory = "16M", guest = long, disks = disks })
  end)

  it("refuses a console fifo with no reader at once (it used to block forever)", function()
    assert(os.execute("mkfifo console.fifo"))
    fails("console fifo console.fifo has no reader", hv.vm,
          { name = "a", memory = "16M", guest = guest, console = "console.fifo" })
  end)
end)

describe("a VM refuses misuse", function()
  -- It idles, so it is still running when a test starts it a second time.
  local idle = hv.guest.builtin{ cmdline = "idle" }
  local a
  before_each(function()
    a = hv.vm{ name = "a", memory = "16M", guest = idle }
  end)

  it("refuses a duplicate name", function()
    fails("a vm named 'a' already exists", hv.vm, { name = "a", guest = guest })
    assert.equal(1, #hv.vms())
  end)

  it("checks waits and their options", function()
    fails("never started", a.wait, a, { timeout = 1 })
    fails("vm:wait: option 'timeout' must be a number of seconds >= 0, got -1", a.wait, a, { timeout = -1 })
    fails("vm:wait: unknown option 'timout'", a.wait, a, { timout = 1 })
    fails("vm:wait_for_console: pattern must be a string", a.wait_for_console, a, 42)
    fails("hv.sleep: seconds must be a number >= 0", hv.sleep, "soon")
  end)

  it("refuses lifecycle calls its state does not allow", function()
    fails("cannot pause vm 'a': it is created", a.pause, a)
    fails("cannot resume vm 'a': it is created", a.resume, a)
    a:start()
    fails("cannot start vm 'a': it is running", a.start, a)
    a:stop()
    fails("cannot pause vm 'a': it is stopped", a.pause, a)
  end)

  it("gives the same error for every use of a stale handle", function()
    a:start()
    a:stop()
    a:destroy()
    for _, field in ipairs{ "id", "name", "state", "vcpus", "memory_size", "memory_resident",
                            "boot_time_ms", "run_time_ms", "exit_code", "crash_reason",
                            "console_offset", "console_error" } do
      local err = fails("vm 'a' no longer exists", function() return a[field] end)
      assert(not err:find("no longer exists.*no longer exists"), err)
    end
    for _, call in ipairs{
      { "start" }, { "pause" }, { "resume" }, { "stop" }, { "destroy" }, { "console" },
      { "wait", { timeout = 1 } }, { "wait_for_console", "x", { timeout = 1 } },
    } do
      local method = a[call[1]] -- methods resolve the VM when called, not when looked up
      fails("vm 'a' no longer exists", method, a, table.unpack(call, 2))
    end
    assert.contains("destroyed", tostring(a))
    assert.equal(0, #hv.vms())
  end)

  it("frees a destroyed VM's name", function()
    a:destroy()
    local again = hv.vm{ name = "a", memory = "16M", guest = guest }
    assert.equal("created", again.state)
  end)
end)
