-- scripts/lab.lua on a lab of listening guests: commands on every VM at once, results by
-- VM name, one error naming every VM that failed, waiting until VMs are ready. (exec_all,
-- check_all and kvp_all go through the agent channel: tests/lua/lab_agent.lua.)

local repo = arg[0]:match("^(.*)/tests/lua/[^/]*$") or "."
package.path = repo .. "/scripts/?.lua;" .. package.path
local labs = require "lab"

local lab <close> = hv.lab{
  name = "h", count = 4, ready = "console:listening",
  template = { memory = "32M", guest = hv.guest.builtin{ cmdline = "listen" } },
}
lab:start{ progress = false }

-- Every VM computes; each line is the same (the guest's xorshift of 1000 rounds).
local lines = labs.console_all(lab, "compute 1000", "compute ")
local first
for i = 1, 4 do
  local line = lines["h-" .. i]
  assert(line and line:match("^compute %x+$"), tostring(line))
  first = first or line
  assert(line == first, line)
end
assert(labs.summary(lines):match("^h%-1  compute %x+\nh%-2  "), labs.summary(lines))

-- A command that fails on every VM: one error that names them all.
local ok, err = pcall(labs.console_all, lab:vms(), "nope", "never printed", { timeout = 0.2 })
assert(not ok)
assert(err:find('"nope" failed on 4 VM(s):', 1, true), err)
for i = 1, 4 do assert(err:find("h-" .. i .. ": ", 1, true), err) end

-- VMs started by hand: wait until all are ready.
local a = hv.vm{ name = "a", memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; idle" } }
local b = hv.vm{ name = "b", memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; idle" } }
a:start(); b:start()
labs.wait_ready({ a, b }, "console:hello from luvisor guest", { timeout = 10 })
ok, err = pcall(labs.wait_ready, { a, b }, "never printed", { timeout = 0.1 })
assert(not ok and err:find("waiting for never printed failed on 2 VM(s)", 1, true), err)
a:destroy(); b:destroy()
print("lab helpers: ok")
