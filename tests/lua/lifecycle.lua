-- The VM lifecycle through the hv module, as a user script sees it.

describe("a VM's lifecycle", function()
  it("starts, pauses, resumes and stops", function()
    local vm = hv.vm{ name = "life", vcpus = 2, memory = "64M",
                      guest = hv.guest.builtin{ cmdline = "hello; count 20" } }
    assert.equal("created", vm.state)
    assert.equal({ name = "life", vcpus = 2, memory_size = 64 * 1024 * 1024 },
                 { name = vm.name, vcpus = vm.vcpus, memory_size = vm.memory_size })
    assert.equal(nil, vm.boot_time_ms)
    vm:start()
    assert.equal("running", vm.state)
    local line, offset = vm:wait_for_console("hello from luvisor guest", { timeout = 10 })
    assert.equal("hello from luvisor guest", line)
    assert(offset > 0)
    assert(vm.boot_time_ms > 0, "boot time is recorded once the guest is ready")

    -- Pause: the counter stops; resume: it goes on.
    vm:wait_for_console("count 2", { timeout = 10 })
    vm:pause()
    assert.equal("paused", vm.state)
    local function counts() return select(2, vm:console():gsub("count ", "")) end
    local frozen = counts()
    hv.sleep(0.2)
    assert.equal(frozen, counts(), "the counter advanced while paused")
    vm:resume()
    assert.equal("running", vm.state)
    vm:wait_for_console("count " .. (frozen + 2), { timeout = 10 })

    -- A timeout says what was awaited and what was seen.
    local err = assert.error_contains(function() vm:wait_for_console("never printed", { timeout = 0.1 }) end,
                                      'timed out after 100ms waiting for console output "never printed"')
    assert.contains("last console line", err)
    assert.error_contains(function() vm:wait{ timeout = 0.05 } end, "waiting for the guest to end")

    vm:stop()
    vm:stop() -- idempotent
    assert.equal("stopped", vm.state)
    assert.contains("hello from luvisor guest", vm:console())
    assert.equal({ nil, "stopped", "stopped by the host" }, { vm:wait{ timeout = 1 } })
  end)

  it("reports exit codes and crashes, and lists its VMs", function()
    local life = hv.vm{ name = "life", memory = "16M", guest = hv.guest.builtin{ cmdline = "idle" } }
    local e = hv.vm{ name = "e", memory = "64M", guest = hv.guest.builtin{ cmdline = "exit 3" } }
    e:start()
    assert.equal(3, e:wait{ timeout = 10 })
    assert.equal({ 3, "stopped" }, { e.exit_code, e.state })

    local c = hv.vm{ name = "c", memory = "64M", guest = hv.guest.builtin{ cmdline = "fault" } }
    c:start()
    local code, state = c:wait{ timeout = 10 }
    assert.equal({ nil, "crashed" }, { code, state })
    assert.contains("rip=0x", c.crash_reason)
    print("crash reason: " .. c.crash_reason)

    -- A VM that ended reports why when someone waits for its console.
    assert.error_contains(function() e:wait_for_console("never", { timeout = 5 }) end, "exit code 3")

    -- hv.vms() lists handles; tostring is readable.
    local names = {}
    for _, h in ipairs(hv.vms()) do names[#names + 1] = h.name end
    assert.equal({ "life", "e", "c" }, names)
    assert.match("^vm<e #%d+ stopped, 1 vcpu, 64M>$", tostring(e))
    assert(hv.vms()[2] == e, "handles to the same VM compare equal")
    assert(life)
  end)

  it("tees its console to a file, line by line", function()
    local teed = hv.vm{ name = "teed", memory = "16M", console = "console.log",
                        guest = hv.guest.builtin{ cmdline = "hello; count 1 2" } }
    teed:start()
    assert.equal(0, teed:wait{ timeout = 10 })
    local f = assert(io.open("console.log", "rb"))
    local logged = f:read("a")
    f:close()
    assert.equal("hello from luvisor guest\r\ncount 1\r\ncount 2\r\n", logged)
    assert.equal("hello from luvisor guest\ncount 1\ncount 2\n", teed:console())
    assert.equal(nil, teed.console_error)

    -- A console file that cannot be written: the guest goes on, the error is reported.
    local full = hv.vm{ name = "full", memory = "16M", console = "/dev/full",
                        guest = hv.guest.builtin{ cmdline = "hello; exit 0" } }
    assert.equal(nil, full.console_error)
    full:start()
    assert.equal(0, full:wait{ timeout = 10 })
    assert.equal("hello from luvisor guest\n", full:console())
    assert.contains("writing console file /dev/full failed: No space left on device", full.console_error)
    assert.equal(nil, teed.console_error)
  end)

  it("returns whole lines from wait_for_console", function()
    -- `count ` is on the console before its number.
    local counter = hv.vm{ name = "lines", memory = "16M", guest = hv.guest.builtin{ cmdline = "count 1 100" } }
    counter:start()
    local line, after = nil, 0
    for n = 1, 100 do
      line, after = counter:wait_for_console("count ", { timeout = 10, after = after })
      assert.equal("count " .. n, line, string.format("match %d", n))
    end
    assert.equal(0, counter:wait{ timeout = 10 })
  end)

  it("reports exit codes as unsigned 32-bit values", function()
    local max = hv.vm{ name = "max", memory = "16M", guest = hv.guest.builtin{ cmdline = "exit 4294967295" } }
    max:start()
    local code, state = max:wait{ timeout = 10 }
    assert.equal({ 4294967295, "stopped" }, { code, state })
    assert.equal(4294967295, max.exit_code)
    assert.error_contains(function() max:wait_for_console("never", { timeout = 5 }) end, "(exit code 4294967295)")
  end)
end)

describe("hv.host()", function()
  it("describes the host", function()
    local host = hv.host()
    assert(host.cpus >= 1 and host.memory_total > 0 and host.memory_available > 0)
    assert.equal(12, host.kvm.api)
    assert(host.kvm.backend == "pvm" or host.kvm.backend == "hardware" or host.kvm.backend == "unknown",
           host.kvm.backend)
  end)
end)
