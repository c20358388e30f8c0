-- A deliberately failing test file: it shows what `luvisor test` reports when tests fail
-- (the location, and a diff of what was expected and what came). Run it with
--   luvisor test examples/tests/failing.lua
-- which exits 1. The VMs of the failing tests are destroyed all the same.

describe("a deliberately failing suite", function()
  it("passes this one", function()
    assert.truthy(hv.version)
  end)

  it("expects a VM with one vCPU, but makes it with two", function()
    local vm = hv.vm{ name = "web", vcpus = 2, memory = "64M",
                      guest = hv.guest.builtin{ cmdline = "idle" } }
    assert.equal({ name = "web", vcpus = 1, memory_size = 64 * 1024 * 1024, state = "created" },
                 { name = vm.name, vcpus = vm.vcpus, memory_size = vm.memory_size, state = vm.state })
  end)

  it("expects a console the guest does not print", function()
    local vm = hv.vm{ name = "counter", memory = "16M",
                      guest = hv.guest.builtin{ cmdline = "count 1 4" } }
    vm:start()
    vm:wait{ timeout = 10 }
    assert.equal("count 1\ncount 2\ncount 3\n", vm:console())
  end)
end)
