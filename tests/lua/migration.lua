-- vm:migrate and hv.migration: bad input is refused with a clear error and changes
-- nothing; a failed migration leaves the VM running. (Real migrations between hosts
-- are in tests/migration.rs and examples/migration.lua.)
local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error matching " .. pattern)
  assert(tostring(err):find(pattern, 1, true), tostring(err))
  return err
end

local key = "peer.key"
local f = assert(io.open(key, "wb"))
f:write("0123456789abcdef0123456789abcdef")
f:close()
assert(os.execute("chmod 600 " .. key))

local vm = hv.vm{ name = "stay", memory = "32M", guest = hv.guest.builtin{ cmdline = "dirty 4 10; listen" } }
fails("cannot migrate vm 'stay': it is created", vm.migrate, vm, "127.0.0.1:1", { key_file = key })
vm:start()
vm:wait_for_console("dirty: pass")

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
assert(err:find("cannot reach", 1, true), err)
assert(vm.state == "running")

-- A listener in this process: migrating to it is refused (the VM is here already).
fails("hv.migration.on_arrival: expected a function", hv.migration.on_arrival, 42)
hv.migration.on_arrival(function() end)
hv.migration.on_arrival(nil)
fails("option 'key_file' is required", hv.migration.listen, "127.0.0.1:0")
fails("cannot listen on 256.0.0.1:0", hv.migration.listen, "256.0.0.1:0", { key_file = key })
local here = hv.migration.listen("127.0.0.1:0", { key_file = key })
assert(type(here.address) == "string" and here.address:match("^127%.0%.0%.1:%d+$"), tostring(here.address))
assert(tostring(here):find("listener<127.0.0.1:", 1, true))
local progress = 0
err = fails("is on this host already", vm.migrate, vm, here.address, {
  key_file = key,
  on_progress = function() progress = progress + 1 end,
})
assert(err:find("it goes on running here", 1, true), err)
assert(progress == 0, "no pass starts before the destination accepts")
assert(vm.state == "running")

fails("wait_arrival: no VM arrived", here.wait_arrival, here, { timeout = 0.05 })
here:close()
assert(here.address == nil)
fails("the listener is closed", here.wait_arrival, here, { timeout = 1 })

-- The guest's memory is intact and it still runs.
vm:send("dirty-verify\n")
local line = vm:wait_for_console("dirty-verify:")
assert(line:find("dirty-verify: ok", 1, true), line)
vm:stop()
os.remove(key)
print("migration: ok")
