-- A passing test file for `luvisor test` (see docs/testing.md):
--   luvisor test examples/tests/passing.lua
-- Every VM a test makes is destroyed when the test ends, pass or fail, so each test can
-- use the same VM name.

describe("the built-in guest", function()
  local guest = hv.guest.builtin{ cmdline = "hello; count 1 3; exit 7" }

  it("boots, prints and exits with its code", function()
    local vm = hv.vm{ name = "demo", memory = "16M", guest = guest }
    vm:start()
    assert.equal(7, vm:wait{ timeout = 10 })
    assert.equal("hello from luvisor guest\ncount 1\ncount 2\ncount 3\n", vm:console())
  end)

  it("gets a fresh registry for each test's VMs", function()
    -- The previous test's VM "demo" is gone: the name is free again.
    assert.equal(0, #hv.vms())
    local vm = hv.vm{ name = "demo", memory = "16M", guest = guest }
    assert.equal({ name = "demo", state = "created", vcpus = 1 },
                 { name = vm.name, state = vm.state, vcpus = vm.vcpus })
  end)

  describe("with bad input", function()
    it("refuses an unknown option and names it", function()
      assert.error_contains(function() hv.vm{ name = "x", guest = guest, memroy = "1G" } end,
                            "unknown option 'memroy'")
    end)
  end)

  pending("boots a Linux kernel", "the built-in guest is not Linux")
end)
