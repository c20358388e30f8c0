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

describe("hv.hosts and migrate intents", function()
    it("refuses bad declarations and changes nothing", function()
        assert.error_contains(function()
            hv.hosts{ { name = "b", addr = "127.0.0.1:1", key_file = "open-key" } }
        end, "chmod 600")
        assert.error_contains(function()
            hv.hosts{
                { name = "b", addr = "127.0.0.1:1", key_file = "key" },
                { name = "b", addr = "127.0.0.1:2", key_file = "key" },
            }
        end, "two hosts are named 'b'")
        assert.equal(0, #hv.hosts())
    end)

    it("polls an unreachable peer, and the guards refuse a policy's migration to it", function()
        -- Nothing listens on port 1: the peer is polled and found unreachable.
        local hosts = hv.hosts{ { name = "b", addr = "127.0.0.1:1", key_file = "key" } }
        assert.equal(1, #hosts)
        assert.equal({ "b", "key" }, { hosts[1].name, hosts[1].key_file })
        wait_until("the peer's first poll", function()
            local h = hv.hosts()[1]
            return h.error ~= "not polled yet"
        end)
        local b = hv.hosts()[1]
        assert.equal({ false, nil }, { b.reachable, b.memory_total })
        assert.contains("127.0.0.1:1", b.error)

        local limits = hv.policy.migration_limits{ cooldown_s = 5 }
        assert.equal({ per_host = 1, cooldown_s = 5, bandwidth = 1024 * 1024 * 1024 },
                     { per_host = limits.per_host, cooldown_s = limits.cooldown_s, bandwidth = limits.bandwidth })

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
        assert.equal(0, status.failures, status.last_error)
        local d = status.migrate_decisions[1]
        assert.equal({ vm = "web", host = "b", reason = "testing" }, { vm = d.vm, host = d.host, reason = d.reason })
        -- The guards refuse a migration to a host that does not answer.
        assert.contains("host 'b' is unreachable", d.refused)
        assert.equal(0, #status.migrations)
        hv.policy.unload("mover")
    end)

    it("loads the shipped trigger alongside, which does nothing with an unreachable peer", function()
        hv.hosts{ { name = "b", addr = "127.0.0.1:1", key_file = "key" } }
        local shipped = hv.policy.load(repo .. "/policies/migrate_on_pressure.lua")
        assert.equal({ "migrate-on-pressure", true }, { shipped.name, shipped.running })
        hv.policy.unload("migrate-on-pressure")
        hv.hosts{}
        assert.equal(0, #hv.hosts())
    end)
end)
