-- A lab: eight VMs from one base image, each disk a copy-on-write overlay of it, brought
-- up four at a time until each guest's agent says it is ready; checks in every VM through
-- exec; what the guests published (KVP); then a graceful shutdown. The lab's VMs and
-- overlays are gone when `lab` goes out of scope (<close>), whatever happens.
--
--   luvisor run examples/lab.lua

-- scripts/ sits next to examples/, wherever this is run from.
local examples = arg and arg[0] and arg[0]:match("^(.*)/[^/]*$") or "."
package.path = examples .. "/../scripts/?.lua;" .. package.path
local labs = require "lab"

-- The base image goes in a scratch directory, removed at the end (and on error).
local dir = os.tmpname()
os.remove(dir)
assert(os.execute("mkdir -p " .. dir))
local scratch <close> = setmetatable({}, { __close = function() os.execute("rm -rf " .. dir) end })
local base = dir .. "/base.img"
hv.disk.create{ path = base, size = "16M" }

local lab <close> = hv.lab{
  name = "ci",
  dir = dir,                          -- where the overlays go
  count = 8,                          -- ci-1 .. ci-8
  ready = "kvp:ready",                -- the guest's agent publishes ready = "1"
  template = {
    memory = "64M",
    disks = { { base = base } },       -- each VM writes its own overlay
    guest = hv.guest.builtin{},        -- an empty command line: serve the agent channel
  },
}
local report = lab:start{ parallel = 4 } -- a progress bar on a terminal
print(string.format("%d VMs ready in %.0f ms", #lab, report.elapsed_ms))

-- Checks in every VM: each writes a pattern of its own to its disk and reads it back.
lab:each(function(vm)
  local seed = tonumber(vm.name:match("(%d+)$"))
  local written = vm:exec("blk-write 0 100 " .. seed, { timeout = 10 })
  assert(written.code == 0, vm.name .. ": " .. written.stdout)
  local verified = vm:exec("blk-verify 0 100 " .. seed, { timeout = 10 })
  assert(verified.stdout:find(": 0 mismatches", 1, true), vm.name .. ": " .. verified.stdout)
end)
-- The same command everywhere, results by VM; one error would name every VM that failed.
print(labs.summary(labs.check_all(lab, "compute 1000")))

-- What each guest published over the agent channel.
local boot_ids = labs.kvp_all(lab, "boot_id")
for _, vm in ipairs(lab:vms()) do
  local kvp = vm.kvp.guest
  print(string.format("%s  ready=%s  boot_id=%s  uptime=%s", vm.name, kvp:get("ready"),
                      boot_ids[vm.name], tostring(kvp:get("uptime_ms"))))
end

-- Ask every guest to shut down, waiting up to 5 s each (a hard stop after that).
for _, ended in ipairs(lab:shutdown{ timeout = 5 }) do
  print(ended.name, ended.how, ended.outcome)
end
