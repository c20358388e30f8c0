-- Three VMs under the shipped dynamic memory policy: the one whose demand grows gets
-- memory within a few ticks, an idle one shrinks to near its min, and the host really
-- gets memory back when a VM is ballooned down. Runs in a scratch directory.
local MiB = 1024 * 1024
local here = arg[0]:match("^(.*)/[^/]*$") or "."
local policies = here .. "/../../policies"

local function wait_until(what, timeout, f)
  local deadline = hv.now() + timeout
  while true do
    local ok, detail = f()
    if ok then return end
    if hv.now() > deadline then error(("timed out waiting for %s: %s"):format(what, tostring(detail)), 2) end
    hv.sleep(0.1)
  end
end

local function vm(name, startup, cmdline)
  local v = hv.vm{ name = name, memory = { startup = startup, min = "32M", max = "512M" },
                   guest = hv.guest.builtin{ cmdline = cmdline } }
  v:start()
  return v
end

describe("the shipped dynamic memory policy", function()
  it("gives a growing VM memory, shrinks an idle one and returns its pages to the host", function()
    -- Demand grows from 32M to 300M a moment after the policy starts.
    local grower = vm("grower", "64M", "mem-demand 32M@0,300M@1500")
    -- Touches 200M with free page reporting off, so it stays resident on the host, then
    -- idles: only the balloon can get it back.
    local idler = vm("idler", "256M", "balloon-report off; touch 200; idle")
    -- A steady 100M.
    local steady = vm("steady", "128M", "mem-demand 100M@0")
    idler:wait_for_console("touched 200 MiB", { timeout = 30 })
    local idler_resident = idler.memory.resident
    assert(idler_resident > 190 * MiB, "the idler's touched memory is resident: " .. idler_resident)
    local rss_before = hv.host().process_rss
    local others_before = grower.memory.resident + steady.memory.resident

    hv.policy.watch(policies)
    assert(hv.policy.status("dynamic-memory"), "the shipped policy is loaded")

    -- The grower gets what it needs: its target covers its demand of 300M.
    wait_until("the grower's target to cover 300M", 30, function()
      return grower.memory.target >= 300 * MiB, grower.memory.target
    end)
    -- The idler shrinks to near its min, and the host gets its pages back.
    wait_until("the idler to shrink near its min", 30, function()
      return idler.memory.target <= 40 * MiB, idler.memory.target
    end)
    wait_until("the idler's memory to leave the host", 30, function()
      return idler.memory.resident < idler_resident - 150 * MiB, idler.memory.resident
    end)
    -- The process really gives the memory back: its RSS is lower than before by about what
    -- the idler released, once what the other two took meanwhile is counted.
    wait_until("the process RSS to fall", 30, function()
      local rss = hv.host().process_rss
      local others = grower.memory.resident + steady.memory.resident - others_before
      return rss < rss_before + others - 150 * MiB,
        ("%d MiB, was %d MiB, the other VMs took %d MiB"):format(rss // MiB, rss_before // MiB, others // MiB)
    end)
    -- The steady VM keeps about its demand plus the buffer.
    local t = steady.memory.target
    assert(t >= 100 * MiB and t <= 160 * MiB, "steady target " .. t)

    local status = hv.policy.status("dynamic-memory")
    assert(status.failures == 0, status.last_error)
    assert(#status.decisions > 0 or status.ticks > 0)
    hv.policy.unload("dynamic-memory")
    for _, v in ipairs{ grower, idler, steady } do v:destroy() end
  end)
end)
