-- hv.policy: loading, hot reload from a watched directory, broken edits, runaway ticks,
-- the sandbox, unloading. VMs stay in state `created`: targets can be set in any state.
-- Every wait is for an event (a status or target change), with a long safety timeout.

local M = 1024 * 1024
local repo = arg[0]:match("^(.*)/tests/lua/[^/]*$") or "."

local function write(path, text)
    -- Written to a temporary name and renamed, as editors save.
    local f = assert(io.open(path .. ".tmp", "w"))
    f:write(text)
    f:close()
    assert(os.rename(path .. ".tmp", path))
end

local function wait_until(what, done)
    local deadline = hv.now() + 30
    while not done() do
        assert(hv.now() < deadline, "timed out waiting for " .. what)
        hv.sleep(0.005)
    end
end

local function fixed(name, mib)
    return string.format([[
return { name = %q, interval_ms = 20, tick = function(ctx)
    for _, vm in ipairs(ctx.vms) do
        ctx:set_memory_target(vm, %d * 1024 * 1024, "fixed at %dM")
    end
end }
]], name, mib, mib)
end

-- Made at the top level, so it stays for every test of the file.
local vm = hv.vm{ name = "dm", memory = { startup = "512M", min = "128M", max = "1G" },
                  guest = hv.guest.builtin{ cmdline = "idle" } }

describe("hv.policy", function()
    it("starts with the VM at its startup memory", function()
        assert.equal(512 * M, vm.memory.target)
    end)

    it("loads a watched directory, reloads on each edit and keeps the last good version", function()
        os.execute("mkdir -p policies")
        write("policies/p.lua", fixed("p", 300))

        -- Watching loads what is there; the policy sets the target with its reason.
        local found = hv.policy.watch("policies/")
        assert.equal(1, #found)
        assert.equal({ "p", 1 }, { found[1].name, found[1].generation }, found[1].last_error)
        wait_until("the first target", function() return vm.memory.target == 300 * M end)
        local status = hv.policy.status("p")
        assert(status.running and status.failures == 0 and status.ticks >= 1)
        assert.equal({ vm = "dm", reason = "fixed at 300M" },
                     { vm = status.decisions[1].vm, reason = status.decisions[1].reason })

        -- An edit changes what the policy does.
        local saved = hv.now()
        write("policies/p.lua", fixed("p", 400))
        wait_until("the edited policy", function() return vm.memory.target == 400 * M end)
        print(string.format("edit to first applied decision: %.0f ms", (hv.now() - saved) * 1000))
        assert.equal(2, hv.policy.status("p").generation)

        -- A broken edit keeps version 2 running, and the status says where the error is.
        write("policies/p.lua", "return {\n  name = 'p',\n  tick = function(ctx)\n    ctx:set(\nend }\n")
        wait_until("the error", function() return hv.policy.status("p").last_error ~= nil end)
        status = hv.policy.status("p")
        assert.equal({ 2, true }, { status.generation, status.running })
        assert.contains("policies/p.lua:5:", status.last_error)
        local ticks = status.ticks
        wait_until("more ticks of version 2", function() return hv.policy.status("p").ticks > ticks + 2 end)
        assert.equal(400 * M, vm.memory.target)

        -- Runaway ticks are stopped and counted; the script goes on.
        write("policies/spin.lua", [[
local n = 0
return { name = "spin", interval_ms = 20, tick = function(ctx)
    n = n + 1
    if n > 1 then while true do end end
end }
]])
        write("policies/bomb.lua", [[
local n, hoard = 0, {}
return { name = "bomb", interval_ms = 20, tick = function(ctx)
    n = n + 1
    if n > 1 then for i = 1, 1e9 do hoard[#hoard + 1] = string.rep("x", 1000) .. i end end
end }
]])
        wait_until("both to fail", function()
            local spin, bomb = hv.policy.status("spin"), hv.policy.status("bomb")
            return spin and bomb and spin.failures >= 1 and bomb.failures >= 1
        end)
        assert.match("instruction budget of %d+ exceeded", hv.policy.status("spin").last_error)
        assert.contains("not enough memory", hv.policy.status("bomb").last_error)
        assert(hv.policy.status("spin").running and hv.policy.status("bomb").running)

        -- Recording: every tick's input and decisions, as JSON lines.
        hv.policy.record("trace.jsonl")
        local recorded = hv.policy.status("p").ticks
        wait_until("recorded ticks", function() return hv.policy.status("p").ticks > recorded + 2 end)
        hv.policy.record(nil)
        local trace = assert(io.open("trace.jsonl")):read("a")
        assert.match('^{"type":"header","format":"luvisor%-policy%-trace"', trace)
        assert.contains('"type":"tick","policy":"p"', trace)
        assert.contains('"reason":"fixed at 400M"', trace)

        -- Removing a file stops its policy.
        os.remove("policies/spin.lua")
        os.remove("policies/bomb.lua")
        wait_until("the removal", function() return #hv.policy.status() == 1 end)
        hv.policy.unload("p")
        assert.equal(0, #hv.policy.status())
    end)

    it("keeps policy files in their sandbox", function()
        for name, code in pairs({
            io = "io.open('/etc/passwd')",
            execute = "os.execute('true')",
            exit = "os.exit(1)",
            debug = "debug.getinfo(1)",
            bytecode = "assert(load(string.dump(function() end)))",
            binary = "assert(load('\\27LuaT', 'x', 'b'))",
            require = "require('../../etc/passwd')",
            dofile = "dofile('/etc/passwd')",
        }) do
            local file = "escape_" .. name .. ".lua"
            local f = assert(io.open(file, "w"))
            f:write(code .. "\nreturn { name = 'escape', tick = function() end }\n")
            f:close()
            local err = assert.error(function() hv.policy.load(file) end, nil, name .. " escaped the sandbox")
            assert.contains("escape_" .. name .. ".lua:1:", err)
        end
        assert.equal(nil, hv.policy.status("escape"))
    end)

    it("refuses bad explicit loads, and loads and unloads the default policy", function()
        assert.error_contains(function() hv.policy.load("policies/none.lua") end, "cannot read")
        assert.error_contains(function()
            hv.policy.load(repo .. "/policies/dynamic_memory.lua", { memory_limit = "1K" })
        end, "at least 1M")
        local dm = hv.policy.load(repo .. "/policies/dynamic_memory.lua")
        assert.equal({ "dynamic-memory", 500, true }, { dm.name, dm.interval_ms, dm.running })
        hv.policy.unload("dynamic-memory")
        assert.error_contains(function() hv.policy.unload("dynamic-memory") end,
                              "no policy named 'dynamic-memory'")
        assert.equal(0, #hv.policy.status())
    end)
end)
