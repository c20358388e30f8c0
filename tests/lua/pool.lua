-- hv.pool: a warm pool restored from a snapshot of a booted template serves claims warm,
-- refills, counts a destroyed VM returned; an empty pool serves cold, or says why not;
-- policies/warm_pool.lua scales the pool with the claim rate and back, and reloads;
-- removing a pool leaves no VM, file or thread. Every wait is for an event (a status
-- change), with a long safety timeout. Runs in a scratch directory.

local repo = arg[0]:match("^(.*)/tests/lua/[^/]*$") or "."

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

local function wait_until(what, done)
  local deadline = hv.now() + 30
  while not done() do
    assert(hv.now() < deadline, "timed out waiting for " .. what)
    hv.sleep(0.01)
  end
end

local pid = io.open("/proc/self/stat"):read(64):match("^(%d+)")
local function has_thread(name)
  local p = assert(io.popen("cat /proc/" .. pid .. "/task/*/comm"))
  local names = p:read("a")
  p:close()
  return names:find(name, 1, true) ~= nil
end

hv.disk.create{ path = "base.img", size = "4M" }
local template = {
  memory = "32M",
  disks = { { base = "base.img" } },
  guest = hv.guest.builtin{ cmdline = "hello; blk-write 0 8 3; listen" },
}

-- The template boots, becomes ready, is snapshotted; two VMs are kept ready, and define
-- returns once they are.
local pool = hv.pool.define{ name = "t", template = template, ready = "console:hello from luvisor guest",
                             min = 2, max = 6, dir = "t-pool" }
assert(pool.name == "t" and pool.min == 2 and pool.max == 6 and pool.target == 2)
assert(pool.dir == "t-pool" and exists("t-pool/snapshot/state"))
assert(hv.vms()[1] == nil or hv.vms()[1].name ~= "t-template", "the template VM is gone")
assert(pool.ready == 2, "define returned before its min VMs were ready")
local s = hv.pool.status("t")
assert(s.target == 2 and s.target_reason == "min" and s.claimed == 0 and s.last_error == nil, s.last_error)
assert(#s.ready_vms == 2 and s.ready_vms[1] == "t-1", s.ready_vms[1])
assert(s.memory == 32 * 1024 * 1024 and s.window_s == 10 and s.last_restore_ms > 0)

-- A claim right after define is served warm, and the pool refills.
local vm, how = hv.pool.claim("t", { timeout = 5 })
assert(how == "warm" and vm.name == "t-1" and vm.state == "running", how)
assert(pool.claimed == 1 and pool.claims == 1)
wait_until("the refill", function() return pool.ready == 2 end)
-- The claimed VM goes on from the snapshot: it listens, its disk holds what the template
-- wrote, and what it writes goes to its own overlay.
vm:send("blk-verify 0 8 3; blk-write 8 8 9; blk-verify 8 8 9\n")
local line = vm:wait_for_console("blk-verify 0 8:", { timeout = 10 })
assert(line:find(": 0 mismatches", 1, true), line)
line = vm:wait_for_console("blk-verify 8 8:", { timeout = 10 })
assert(line:find(": 0 mismatches", 1, true), line)
local second = pool:claim{ timeout = 5 }
second:send("blk-verify 8 8 9\n")
line = second:wait_for_console("blk-verify 8 8:", { timeout = 10 })
assert(not line:find(": 0 mismatches", 1, true), "a claimed VM sees another's writes: " .. line)

-- Destroying a claimed VM gives it back to the pool's accounting, with its overlay.
local overlay = "t-pool/t-template.disk0.qcow2.t-1.qcow2"
assert(exists(overlay), overlay)
vm:destroy()
s = pool:status()
assert(s.claimed == 1 and s.returned == 1 and s.claims == 2, s.claimed)
assert(not exists(overlay), "the destroyed VM's overlay is left")
second:destroy()
assert(pool.claimed == 0 and pool.returned == 2)

-- set_target keeps within [min, max].
assert(hv.pool.set_target("t", 100, "test") == 6)
local target, clamped = pool:set_target(0)
assert(target == 2 and clamped)
fails("n must be a whole number", pool.set_target, pool, -1)

-- An empty pool: a claim restores a VM on the spot (cold); a host without the memory
-- for one more VM says so after its timeout.
local cold = hv.pool.define{ name = "cold", template = template, ready = "console:hello",
                             min = 0, max = 2 }
assert(cold.ready == 0 and cold.target == 0)
local c, kind = hv.pool.claim(cold, { timeout = 5 })
assert(kind == "cold" and c.state == "running", kind)
local reserve = hv.host().memory_reserve
hv.host{ memory_reserve = hv.host().memory_total * 2 }
local err = fails("pool 'cold': no ready VM within", hv.pool.claim, "cold", { timeout = 0.1 })
assert(err:find("less than the 32M one more VM needs", 1, true), err)
hv.host{ memory_reserve = reserve }
c:destroy()
-- A pool whose min VMs the host's memory cannot hold is not defined: define says why
-- after its timeout, and leaves nothing.
hv.host{ memory_reserve = hv.host().memory_total * 2 }
err = fails("pool 'starved': 0 of its min = 1 VMs were ready after", hv.pool.define,
            { name = "starved", template = template, ready = "console:hello", timeout = 5 })
hv.host{ memory_reserve = reserve }
assert(err:find("less than the 32M one more VM needs", 1, true), err)
assert(not exists("starved.pool/."), "the failed pool's directory is left")
assert(hv.pool.status("starved") == nil)
cold:remove()
assert(not exists("cold.pool/."), "the removed pool's directory is left")
fails("no pool named 'cold'", hv.pool.claim, "cold")
assert(hv.pool.status("cold") == nil)

-- The warm pool policy: claims raise the target, a reload takes effect, and once the
-- claims stop it falls back to min. A one-second window keeps the test short.
local scaled = hv.pool.define{ name = "s", template = template, ready = "console:hello",
                               min = 1, max = 8, window = 1 }
os.execute("mkdir -p policies")
local source = assert(io.open(repo .. "/policies/warm_pool.lua")):read("a")
local function save(horizon)
  local text = source:gsub("local HORIZON_S = %d+", "local HORIZON_S = " .. horizon)
  local f = assert(io.open("policies/warm_pool.lua.tmp", "w"))
  f:write(text)
  f:close()
  assert(os.rename("policies/warm_pool.lua.tmp", "policies/warm_pool.lua"))
end
save(2)
hv.policy.load("policies/warm_pool.lua")
local claimed = {}
for i = 1, 4 do claimed[i] = scaled:claim{ timeout = 5 } end
wait_until("the target to rise", function() return scaled.target >= 3 end)
wait_until("the ready VMs to follow", function() return scaled.ready == scaled.target end)
-- A longer horizon: the reloaded version asks for more than max; Rust clamps it.
save(100)
local status = hv.policy.load("policies/warm_pool.lua")
assert(status.generation == 2 and status.name == "warm_pool")
claimed[5] = scaled:claim{ timeout = 5 }
-- The clamped decision is looked for while it is the latest one: with a one-second
-- window, a later tick may already see fewer claims and ask for less.
-- Both are watched in one loop for the same reason.
local decided, reached_max, reason
wait_until("a decision clamped to max, applied", function()
  local d = hv.policy.status("warm_pool").pool_decisions[1]
  if d and d.pool == "s" and d.clamped and d.target == 8 then decided = d end
  local status = scaled:status()
  if status.target == 8 then reached_max, reason = true, status.target_reason end
  return decided ~= nil and reached_max
end)
assert(reason:find("policy warm_pool: ", 1, true), reason)
wait_until("the target to fall back to min", function() return scaled.target == 1 end)
wait_until("the ready VMs to follow", function() return scaled.ready == 1 end)
hv.policy.unload("warm_pool")

-- Bad definitions leave nothing behind.
fails("min = 3 and max = 2 are out of range", hv.pool.define,
      { name = "x", template = template, ready = "console:hello", min = 3, max = 2 })
fails("pool 't' already exists", hv.pool.define,
      { name = "t", template = template, ready = "console:hello" })
local crash = fails("pool 'bad': the template VM did not become ready", hv.pool.define,
      { name = "bad", ready = "console:hello", dir = "bad-pool",
        template = { memory = "32M", guest = hv.guest.builtin{ cmdline = "fault" } } })
assert(crash:find("crashed", 1, true), crash)
assert(not exists("bad-pool/."), "a failed pool's directory is left")
fails("option 'max' must be an integer from 1 to 256", hv.pool.define,
      { name = "x", template = template, max = 0 })

-- Removing a pool destroys its VMs, claimed ones too, and its files and thread.
assert(has_thread("pool-t"))
pool:remove()
scaled:remove()
for _, v in ipairs(claimed) do fails("no longer exists", function() return v.state end) end
assert(#hv.vms() == 0, "VMs are left: " .. tostring(hv.vms()[1]))
assert(not exists("t-pool/."), "the pool's directory is left")
assert(not exists("s.pool/."), "the pool's directory is left")
assert(not has_thread("pool-t") and not has_thread("pool-s"), "a pool thread is left")
fails("no pool named 't'", function() return pool.ready end)
print("pool: ok")
