return { name = "mover", interval_ms = 20, tick = function(ctx)
    assert(#ctx.hosts == 1 and ctx.hosts[1].name == "b" and not ctx.hosts[1].reachable)
    assert(not pcall(function() ctx.hosts[1].reachable = true end))
    local ok, why = ctx:migrate(ctx.vms[1], ctx.hosts[1], "testing")
    assert(not ok and why)
end }
