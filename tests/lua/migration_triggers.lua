-- Migration triggers from a script: hv.hosts declares peers (validated), which are polled
-- in the background into ctx.hosts; a policy's ctx:migrate intents are refused with
-- their reasons (the peer here is not listening, and this luvisor has no live migration
-- wired in yet). The VM stays in state `created`. Runs in a scratch directory; every wait
-- is for a status change, with a long safety timeout.

local repo = arg[0]:match("^(.*)/tests/lua/[^/]*$") or "."

local function write(path, text)
    local f = assert(io.open(path, "w"))
    f:write(text)
    f:close()
end

local function wait_until(what, done)
    local deadline = hv.now() + 30
    while not done() do
        assert(hv.now() < deadline, "timed out waiting for " .. what)
        hv.sleep(0.01)
    end
end

write("key", string.rep("k", 32))
assert(os.execute("chmod 600 key"))
write("open-key", string.rep("k", 32))
assert(os.execute("chmod 644 open-key"))

-- Bad declarations raise and change nothing.
local ok, err = pcall(hv.hosts, { { name = "b", addr = "127.0.0.1:1", key_file = "open-key" } })
assert(not ok and err:find("chmod 600", 1, true), err)
ok, err = pcall(hv.hosts, {
    { name = "b", addr = "127.0.0.1:1", key_file = "key" },
    { name = "b", addr = "127.0.0.1:2", key_file = "key" },
})
assert(not ok and err:find("two hosts are named 'b'", 1, true), err)
assert(#hv.hosts() == 0)

-- Nothing listens on port 1: the peer is polled and found unreachable.
local hosts = hv.hosts{ { name = "b", addr = "127.0.0.1:1", key_file = "key" } }
assert(#hosts == 1 and hosts[1].name == "b" and hosts[1].key_file == "key")
wait_until("the peer's first poll", function()
    local h = hv.hosts()[1]
    return h.error ~= "not polled yet"
end)
local b = hv.hosts()[1]
assert(b.reachable == false and b.memory_total == nil and b.error:find("127.0.0.1:1", 1, true), b.error)

local limits = hv.policy.migration_limits{ cooldown_s = 5 }
assert(limits.per_host == 1 and limits.cooldown_s == 5 and limits.bandwidth == 1024 * 1024 * 1024)

hv.vm{ name = "web", memory = "64M", guest = hv.guest.builtin{ cmdline = "idle" } }
write("mover.lua", [[
return { name = "mover", interval_ms = 20, tick = function(ctx)
    assert(#ctx.hosts == 1 and ctx.hosts[1].name == "b" and not ctx.hosts[1].reachable)
    assert(not pcall(function() ctx.hosts[1].reachable = true end))
    local ok, why = ctx:migrate(ctx.vms[1], ctx.hosts[1], "testing")
    assert(not ok and why)
end }
]])
hv.policy.load("mover.lua")
wait_until("a migrate decision", function()
    local s = hv.policy.status("mover")
    return s.ticks >= 1 and #s.migrate_decisions == 1
end)
local status = hv.policy.status("mover")
assert(status.failures == 0, status.last_error)
local d = status.migrate_decisions[1]
assert(d.vm == "web" and d.host == "b" and d.reason == "testing", d.vm)
-- The guards refuse a migration to a host that does not answer.
assert(d.refused:find("host 'b' is unreachable", 1, true), d.refused)
assert(#status.migrations == 0)
hv.policy.unload("mover")

-- The shipped trigger loads alongside, and with an unreachable peer does nothing.
local shipped = hv.policy.load(repo .. "/policies/migrate_on_pressure.lua")
assert(shipped.name == "migrate-on-pressure" and shipped.running)
hv.policy.unload("migrate-on-pressure")
hv.hosts{}
assert(#hv.hosts() == 0)
