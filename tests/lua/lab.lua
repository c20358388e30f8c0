-- hv.lab: eight VMs from one base, each writing its own overlay while the base stays as
-- it was; the handle's API; bad options; fail-fast bring-up naming the VM (crash, exit,
-- timeout) that leaves no VM, overlay, directory or thread behind; <close> and garbage
-- collection destroy a lab. Console readiness only (the agent's "kvp:ready" is tested in
-- lab_agent.lua). Runs in a scratch directory.

local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error containing " .. pattern)
  assert(tostring(err):find(pattern, 1, true), "unexpected error: " .. tostring(err))
  return err
end

local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function read(path, n)
  local f = assert(io.open(path, "rb"))
  local data = f:read(n)
  f:close()
  return data
end

-- This process's thread names (the lab's bring-up threads are lab-NAME-K, a VM's
-- vcpu-NAME-I and events-NAME, cut to 15 characters by the kernel).
local pid = read("/proc/self/stat", 64):match("^(%d+)")
local function threads()
  local p = assert(io.popen("cat /proc/" .. pid .. "/task/*/comm"))
  local names = p:read("a")
  p:close()
  return names
end
local function no_threads_of(prefix)
  for name in threads():gmatch("[^\n]+") do
    for _, kind in ipairs({ "lab-", "vcpu-", "events-" }) do
      assert(not name:find(kind .. prefix, 1, true), "a thread is left: " .. name)
    end
  end
end

local function no_vms()
  local left = hv.vms()
  assert(#left == 0, "VMs are left: " .. tostring(left[1]))
end

-- The base: 4M of zeros, never written through the overlays.
hv.disk.create{ path = "base.img", size = "4M" }
local zeros = string.rep("\0", 64 * 512)
assert(read("base.img", #zeros) == zeros)

-- Eight VMs, each writing sectors 0-63 of its disk before it is ready.
local template = {
  memory = "32M",
  disks = { { base = "base.img" } },
  guest = hv.guest.builtin{ cmdline = "hello; blk-write 0 64 7; listen" },
}
local lab = hv.lab{ name = "ci", template = template, count = 8, ready = "console:listening",
                    dir = "labs/ci" }
assert(tostring(lab) == "lab<ci 8 VMs, created>", tostring(lab))
assert(#lab == 8 and lab.count == 8 and lab.name == "ci" and lab.state == "created")
assert(lab.ready == "console:listening" and lab.dir == "labs/ci", lab.ready)
local overlays = lab:overlays()
assert(#overlays == 8)
for i, path in ipairs(overlays) do
  assert(path == "labs/ci/ci-" .. i .. ".disk0.qcow2", path)
  assert(exists(path), path .. " exists once the lab is made")
end
assert(#hv.vms() == 8 and hv.vms()[1].state == "created")

local report = lab:start{ parallel = 4, progress = false }
assert(lab.state == "ready")
assert(report.elapsed_ms > 0 and #report.vms == 8 and report.vms[3].name == "ci-3")
for _, vm in ipairs(report.vms) do assert(vm.ready_ms > 0, vm.name) end
fails("cannot start lab 'ci': it is ready", lab.start, lab)

-- Each VM writes a pattern of its own into its overlay, then every VM checks both its
-- own pattern and the one it wrote at boot: the overlays are separate.
local names = lab:each(function(vm)
  local seed = tonumber(vm.name:match("(%d+)$")) + 100
  local from = vm.console_offset
  vm:send("blk-write 64 16 " .. seed .. "; blk-verify 64 16 " .. seed .. "; blk-verify 0 64 7\n")
  local own = vm:wait_for_console("blk-verify 64 16:", { after = from, timeout = 20 })
  assert(own:find(": 0 mismatches", 1, true), vm.name .. ": " .. own)
  local boot = vm:wait_for_console("blk-verify 0 64:", { after = from, timeout = 20 })
  assert(boot:find(": 0 mismatches", 1, true), vm.name .. ": " .. boot)
  return vm.name
end)
assert(#names == 8 and names[8] == "ci-8")
-- A VM's pattern is not in another's overlay.
local other = lab:vm(2)
local from = other.console_offset
other:send("blk-verify 64 16 101\n")
local crossed = other:wait_for_console("blk-verify 64 16:", { after = from, timeout = 20 })
assert(not crossed:find(": 0 mismatches", 1, true), "ci-2 sees ci-1's writes: " .. crossed)

-- The base is unchanged.
assert(read("base.img", #zeros) == zeros, "the base was written")

-- The handle.
assert(lab:vm(1).name == "ci-1" and lab:vm("ci-5").name == "ci-5")
assert(lab:vm(9) == nil and lab:vm("nope") == nil)
fails("lab:vm: expected an index from 1 to 8 or a VM name", lab.vm, lab, {})
assert(#lab:vms() == 8)
local err = fails("lab 'ci': ci-3: ", lab.each, lab, function(vm)
  if vm.name == "ci-3" then error("boom") end
end)
-- The message only, as any caught error: no traceback inside it.
assert(err:match("^lab 'ci': ci%-3: [^\n]+:%d+: boom$"), err)
fails("lab:each: expected a function(vm)", lab.each, lab, 3)

local ended = lab:shutdown{ timeout = 5 }
-- The guests idle, and idling serves the agent channel: each one is asked and ends itself.
for _, e in ipairs(ended) do
  assert(e.how == "graceful" and e.outcome == "exit code 0", e.name .. ": " .. e.how .. ", " .. e.outcome)
end
assert(#ended == 8 and ended[1].name == "ci-1")
assert(lab:vm(4).state == "stopped", lab:vm(4).state)
assert(lab.state == "shut down" and tostring(lab) == "lab<ci 8 VMs, shut down>", lab.state)
fails("cannot start lab 'ci': it is shut down", lab.start, lab)
for _, path in ipairs(overlays) do assert(exists(path), "overlays stay until destroy") end

lab:destroy()
assert(lab.state == "destroyed" and tostring(lab) == "lab<ci 8 VMs, destroyed>")
lab:destroy() -- idempotent
no_vms()
for _, path in ipairs(overlays) do assert(not exists(path), path .. " is left") end
-- Both directories the lab made (labs/ and labs/ci/) go with it.
assert(not exists("labs/."), "the lab's directories are left")
assert(read("base.img", #zeros) == zeros)
no_threads_of("ci-")
fails("cannot start lab 'ci': it is destroyed", lab.start, lab)

-- Bad options change nothing.
local good = { memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; idle" } }
fails("hv.lab: option 'name' is required", hv.lab, { template = good, count = 1 })
fails("hv.lab: option 'count' is required", hv.lab, { name = "x", template = good })
fails("option 'count' must be an integer from 1 to 1024", hv.lab,
      { name = "x", template = good, count = 0 })
fails("option 'template' is required", hv.lab, { name = "x", count = 1 })
fails("unknown option 'name'", hv.lab,
      { name = "x", count = 1, template = { name = "y", guest = good.guest } })
fails("disk 1 must be a disk template { base = PATH }", hv.lab,
      { name = "x", count = 1, template = { guest = good.guest, disks = { "base.img" } } })
fails("option 'base' is required", hv.lab,
      { name = "x", count = 1, template = { guest = good.guest, disks = { { format = "raw" } } } })
fails("option 'ready': the readiness \"kvp:\" is empty", hv.lab,
      { name = "x", count = 1, template = good, ready = "kvp:" })
-- A key the agent would refuse could only time out: refused at once, with the agent's reason.
fails("the readiness \"kvp:my key\" can never be met: key \"my key\" is invalid", hv.lab,
      { name = "x", count = 1, template = good, ready = "kvp:my key" })
fails("can never be met", hv.pool.define, { name = "x", template = good, ready = "kvp:a/b" })
fails("lab name \"a/b\" is invalid", hv.lab, { name = "a/b", count = 1, template = good })
fails("does not exist", hv.lab, { name = "x", count = 2, dir = "x-lab",
      template = { guest = good.guest, disks = { { base = "missing.img" } } } })
assert(not exists("x-lab/."), "a failed lab leaves no directory")
local squatter = hv.vm{ name = "dup-2", guest = good.guest, memory = "32M" }
fails("lab 'dup': a vm named 'dup-2' already exists", hv.lab,
      { name = "dup", count = 3, template = good })
squatter:destroy()
no_vms()

-- Fail fast, naming the VM and why; nothing is left.
local function failing(name, cmdline, ready, timeout, pattern, parallel)
  local l = hv.lab{ name = name, count = 6, dir = name .. "-lab", ready = ready,
                    template = { memory = "32M", disks = { { base = "base.img" } },
                                 guest = hv.guest.builtin{ cmdline = cmdline } } }
  local paths = l:overlays()
  local e = fails(pattern, l.start, l,
                  { parallel = parallel or 2, timeout = timeout, progress = false })
  assert(e:find("lab '" .. name .. "': vm '" .. name .. "%-%d'"), e)
  assert(e:find("(the lab was destroyed)", 1, true), e)
  assert(l.state == "destroyed")
  no_vms()
  for _, path in ipairs(paths) do assert(not exists(path), path .. " is left") end
  assert(not exists(name .. "-lab/."), "the directory is left")
  no_threads_of(name .. "-")
  return e
end
failing("crash", "fault", "console:hello", 20, "crashed")
failing("exits", "exit 7", "console:hello", 20, "exit code 7")
failing("slow", "idle", "console:never printed", 0.2, "timed out")
-- One VM of a lab that fails: with parallel = 1 it is the first.
local e = failing("first", "fault", "console:hello", 20, "did not become ready", 1)
assert(e:find("vm 'first-1'", 1, true), e)

-- <close> destroys the lab when its variable goes out of scope, even on an error.
local closed_paths
local ok = pcall(function()
  local l <close> = hv.lab{ name = "closed", count = 2, ready = "console:hello",
                            template = { memory = "32M", disks = { { base = "base.img" } },
                                         guest = hv.guest.builtin{ cmdline = "hello; idle" } } }
  closed_paths = l:overlays()
  l:start{ progress = false }
  error("leaving the block")
end)
assert(not ok)
no_vms()
for _, path in ipairs(closed_paths) do assert(not exists(path), path .. " is left") end

-- A lab nobody holds is destroyed when it is collected.
local collected_paths
do
  local l = hv.lab{ name = "collected", count = 2, ready = "console:hello",
                    template = { memory = "32M", disks = { { base = "base.img" } },
                                 guest = hv.guest.builtin{ cmdline = "hello; idle" } } }
  collected_paths = l:overlays()
  l:start{ progress = false }
end
collectgarbage()
collectgarbage()
no_vms()
for _, path in ipairs(collected_paths) do assert(not exists(path), path .. " is left") end
no_threads_of("collected")
assert(read("base.img", #zeros) == zeros)
print("lab: ok")
