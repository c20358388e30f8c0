-- `luvisor test`'s cleanup and a warm pool defined at the file's top level: a VM claimed
-- in a test goes when that test ends (warm ones were restored before the test started),
-- and the VMs the pool's filler restores in the background while a test runs stay the
-- pool's. Every wait is for a status change, with a long safety timeout.

local function wait_until(what, done)
  local deadline = hv.now() + 60
  while not done() do
    assert(hv.now() < deadline, "timed out waiting for " .. what)
    hv.sleep(0.01)
  end
end

local function vm_names()
  local names = {}
  for _, vm in ipairs(hv.vms()) do names[vm.name] = true end
  return names
end

local pool = hv.pool.define{
  name = "pc", min = 2, max = 4, ready = "console:hello from luvisor guest", dir = "pc-pool",
  template = { memory = "32M", guest = hv.guest.builtin{ cmdline = "hello; idle" } },
}
-- Both ready VMs exist before the first test starts: define returns once they are.
assert(pool.ready == 2, "define returned before its min VMs were ready")

local claimed, refilled

describe("a pool defined at the top level", function()
  it("serves a warm claim and refills while the test runs", function()
    local vm, how = pool:claim{ timeout = 30 }
    assert.equal("warm", how)
    claimed = vm.name
    wait_until("the refill", function() return pool.ready == 2 end)
    refilled = pool:status().ready_vms
    assert.equal(2, #refilled)
  end)

  it("released the VM claimed in the last test and kept its ready VMs", function()
    assert.truthy(claimed and refilled, "the first test ran")
    local names = vm_names()
    assert.falsy(names[claimed], claimed .. " outlived the test that claimed it")
    assert.equal(0, pool.claimed)
    assert.equal(1, pool.returned)
    -- The one restored during the last test too: it is the pool's, not the test's.
    assert.equal(refilled, pool:status().ready_vms)
    for _, name in ipairs(refilled) do assert.truthy(names[name], name) end
  end)
end)
