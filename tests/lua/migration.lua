-- vm:migrate and hv.migration: bad input is refused with a clear error and changes
-- nothing; a failed migration leaves the VM running. (Real migrations between hosts
-- are in tests/migration.rs and examples/migration.lua.)
local function fails(text, f, ...)
  local args = table.pack(...)
  return assert.error_contains(function() return f(table.unpack(args, 1, args.n)) end, text)
end

local key = "peer.key"
local f = assert(io.open(key, "wb"))
f:write("0123456789abcdef0123456789abcdef")
f:close()
assert(os.execute("chmod 600 " .. key))

local guest = hv.guest.builtin{ cmdline = "dirty 4 10; listen" }

local function running_vm()
  local vm = hv.vm{ name = "stay", memory = "32M", guest = guest }
  vm:start()
  vm:wait_for_console("dirty: pass")
  return vm
end

-- The guest's memory is intact and it still runs.
local function check_memory(vm)
  vm:send("dirty-verify\n")
  local line = vm:wait_for_console("dirty-verify:")
  assert.contains("dirty-verify: ok", line)
  vm:stop()
end

describe("vm:migrate", function()
  it("refuses a VM that does not run", function()
    local vm = hv.vm{ name = "stay", memory = "32M", guest = guest }
    fails("cannot migrate vm 'stay': it is created", vm.migrate, vm, "127.0.0.1:1", { key_file = key })
  end)

  it("refuses bad options and keeps the VM running when nobody listens", function()
    local vm = running_vm()
    fails("option 'key_file' is required", vm.migrate, vm, "127.0.0.1:1")
    fails("option 'key_file' is required", vm.migrate, vm, "127.0.0.1:1", {})
    assert(os.execute("chmod 644 " .. key))
    fails("chmod 600", vm.migrate, vm, "127.0.0.1:1", { key_file = key })
    assert(os.execute("chmod 600 " .. key))
    fails("cannot read key file", vm.migrate, vm, "127.0.0.1:1", { key_file = "/nonexistent/key" })
    fails("unknown option 'speed'", vm.migrate, vm, "127.0.0.1:1", { key_file = key, speed = 1 })
    fails("option 'max_downtime_ms' must be an integer", vm.migrate, vm, "127.0.0.1:1", { key_file = key, max_downtime_ms = 0 })
    fails("option 'timeout' must be a number of seconds", vm.migrate, vm, "127.0.0.1:1", { key_file = key, timeout = -1 })
    fails("option 'on_progress' must be a function", vm.migrate, vm, "127.0.0.1:1", { key_file = key, on_progress = 3 })
    fails("the address must be a string", vm.migrate, vm, 7001, { key_file = key })

    -- Nobody listens there: the VM goes on.
    local err = fails("cannot migrate vm 'stay' to 127.0.0.1:1 (it goes on running here)",
      vm.migrate, vm, "127.0.0.1:1", { key_file = key, timeout = 5 })
    assert.contains("cannot reach", err)
    assert.equal("running", vm.state)
    check_memory(vm)
  end)

  it("refuses a listener of this process, where the VM is already", function()
    local vm = running_vm()
    fails("hv.migration.on_arrival: expected a function", hv.migration.on_arrival, 42)
    hv.migration.on_arrival(function() end)
    hv.migration.on_arrival(nil)
    fails("option 'key_file' is required", hv.migration.listen, "127.0.0.1:0")
    fails("cannot listen on 256.0.0.1:0", hv.migration.listen, "256.0.0.1:0", { key_file = key })
    local here = hv.migration.listen("127.0.0.1:0", { key_file = key })
    assert.match("^127%.0%.0%.1:%d+$", here.address)
    assert.contains("listener<127.0.0.1:", tostring(here))
    local progress = 0
    local err = fails("is on this host already", vm.migrate, vm, here.address, {
      key_file = key,
      on_progress = function() progress = progress + 1 end,
    })
    assert.contains("it goes on running here", err)
    assert.equal(0, progress, "no pass starts before the destination accepts")
    assert.equal("running", vm.state)

    fails("wait_arrival: no VM arrived", here.wait_arrival, here, { timeout = 0.05 })
    here:close()
    assert.equal(nil, here.address)
    fails("the listener is closed", here.wait_arrival, here, { timeout = 1 })
    check_memory(vm)
  end)
end)
