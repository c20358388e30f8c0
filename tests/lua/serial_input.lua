-- vm:send: input to the guest's serial console, read by the guest's `listen` command.

local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "'")
  err = tostring(err)
  assert(err:find(pattern, 1, true), "error '" .. err .. "' does not mention '" .. pattern .. "'")
  return err
end

local GREETING = "hello from luvisor guest"
local function greetings(vm) return select(2, vm:console():gsub(GREETING, "")) end

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
assert(greetings(vm) == 4, vm:console())

-- Input sent while paused waits for the guest.
vm:pause()
local before = vm.console_offset
vm:send("hello\n")
assert(vm.console_offset == before, "the guest printed while paused")
vm:resume()
_, at = vm:wait_for_console(GREETING, { timeout = 10, after = at })

-- Input that cannot fit is refused whole: none of it reaches the guest.
local err = fails("nothing was queued", vm.send, vm, string.rep("x", 70000))
assert(err:find("cannot send input to vm 'listener': 70000 bytes of serial input do not fit", 1, true), err)
fails("vm:send: text must be a string", vm.send, vm, 42)
-- Much more than the 64-byte FIFO in one send: 40 commands in one 240-byte line.
vm:send(string.rep("hello;", 40) .. "\nexit 3\n")
local code, state = vm:wait{ timeout = 30 }
assert(code == 3 and state == "stopped", tostring(code) .. " " .. state)
assert(greetings(vm) == 45, vm:console())
assert(select(2, vm:console():gsub("error:", "")) == 1, "only `nosuch` failed: " .. vm:console())

fails("cannot send input to vm 'listener': it is stopped", vm.send, vm, "hello\n")
vm:destroy()
fails("vm 'listener' no longer exists", vm.send, vm, "hello\n")

-- A bare `exit` ends listen, and the command line goes on.
local after = hv.vm{ name = "after", memory = "16M",
                     guest = hv.guest.builtin{ cmdline = "listen; hello; exit 5" } }
after:start()
after:wait_for_console("listening", { timeout = 10 })
after:send("exit\n")
assert(after:wait{ timeout = 10 } == 5)
assert(greetings(after) == 1, after:console())

-- A crashed VM takes no input.
local crashed = hv.vm{ name = "crashed", memory = "16M", guest = hv.guest.builtin{ cmdline = "fault" } }
crashed:start()
crashed:wait{ timeout = 10 }
fails("cannot send input to vm 'crashed': it is crashed", crashed.send, crashed, "hello\n")
