-- vm:send: input to the guest's serial console, read by the guest's `listen` command.

local function fails(text, f, ...)
  local args = table.pack(...)
  return assert.error_contains(function() return f(table.unpack(args, 1, args.n)) end, text)
end

local GREETING = "hello from luvisor guest"
local function greetings(vm) return select(2, vm:console():gsub(GREETING, "")) end

describe("vm:send", function()
  it("feeds the guest's `listen` command, whole or not at all", function()
    local vm = hv.vm{ name = "listener", vcpus = 2, memory = "16M",
                      guest = hv.guest.builtin{ cmdline = "listen" } }
    fails("cannot send input to vm 'listener': it is created", vm.send, vm, "hello\n")
    vm:start()
    local _, at = vm:wait_for_console("listening", { timeout = 10 })

    -- One command, then several on one line and over several lines in one send.
    vm:send("hello\n")
    _, at = vm:wait_for_console(GREETING, { timeout = 10, after = at })
    vm:send("compute 10; hello\r\ncount 1 2\n")
    _, at = vm:wait_for_console("compute ", { timeout = 10, after = at })
    _, at = vm:wait_for_console(GREETING, { timeout = 10, after = at })
    _, at = vm:wait_for_console("count 2", { timeout = 10, after = at })

    -- Backspace drops the byte before it; an error is printed and the guest goes on listening.
    vm:send("hellx\bo\n")
    _, at = vm:wait_for_console(GREETING, { timeout = 10, after = at })
    vm:send("nosuch; hello\n")
    _, at = vm:wait_for_console("error: nosuch: unknown command", { timeout = 10, after = at })
    vm:send("hello\n")
    _, at = vm:wait_for_console(GREETING, { timeout = 10, after = at })
    assert.equal(4, greetings(vm), vm:console())

    -- Input sent while paused waits for the guest.
    vm:pause()
    local before = vm.console_offset
    vm:send("hello\n")
    assert.equal(before, vm.console_offset, "the guest printed while paused")
    vm:resume()
    _, at = vm:wait_for_console(GREETING, { timeout = 10, after = at })

    -- Input that cannot fit is refused whole: none of it reaches the guest.
    local err = fails("nothing was queued", vm.send, vm, string.rep("x", 70000))
    assert.contains("cannot send input to vm 'listener': 70000 bytes of serial input do not fit", err)
    fails("vm:send: text must be a string", vm.send, vm, 42)
    -- Much more than the 64-byte FIFO in one send: 40 commands in one 240-byte line.
    vm:send(string.rep("hello;", 40) .. "\nexit 3\n")
    local code, state = vm:wait{ timeout = 30 }
    assert.equal({ 3, "stopped" }, { code, state })
    assert.equal(45, greetings(vm), vm:console())
    assert.equal(1, select(2, vm:console():gsub("error:", "")), "only `nosuch` failed: " .. vm:console())

    fails("cannot send input to vm 'listener': it is stopped", vm.send, vm, "hello\n")
    vm:destroy()
    fails("vm 'listener' no longer exists", vm.send, vm, "hello\n")
  end)

  it("ends `listen` with a bare exit, and the command line goes on", function()
    -- A bare `exit` ends listen, and the command line goes on.
    local after = hv.vm{ name = "after", memory = "16M",
                         guest = hv.guest.builtin{ cmdline = "listen; hello; exit 5" } }
    after:start()
    after:wait_for_console("listening", { timeout = 10 })
    after:send("exit\n")
    assert.equal(5, after:wait{ timeout = 10 })
    assert.equal(1, greetings(after), after:console())
  end)

  it("refuses input to a crashed VM", function()
    -- A crashed VM takes no input.
    local crashed = hv.vm{ name = "crashed", memory = "16M", guest = hv.guest.builtin{ cmdline = "fault" } }
    crashed:start()
    crashed:wait{ timeout = 10 }
    fails("cannot send input to vm 'crashed': it is crashed", crashed.send, crashed, "hello\n")
  end)
end)
