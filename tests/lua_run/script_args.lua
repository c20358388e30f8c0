-- `luvisor run` passes arguments like `lua`: in `arg` and as `...`.
local a, b = ...
assert(arg[0]:match("script_args%.lua$"), arg[0])
assert(arg[1] == "one" and arg[2] == "--two", tostring(arg[1]) .. " " .. tostring(arg[2]))
assert(a == "one" and b == "--two")
-- arg[-1] is the interpreter, as in `lua`: the luvisor binary.
assert(arg[-1] and arg[-1]:match("luvisor"), tostring(arg[-1]))
assert(require("hv") == hv)
-- A VM left running is stopped when the script ends.
local vm = hv.vm{ name = "left-running", memory = "16M", guest = hv.guest.builtin{ cmdline = "idle" } }
vm:start()
if arg[3] then os.exit(tonumber(arg[3])) end
print("args: ok")
