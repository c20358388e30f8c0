-- Migrate on memory pressure: when this host has been short of memory for a while, move
-- its least important VM to the peer host with the most room.
--
-- Every tick:
--
--   pressure = (memory resident in VMs + the host's reserve) / the host's memory
--
-- The host is under pressure when that is above PRESSURE, or when its free memory
-- (memory_available) fell below its reserve. Once it has been under pressure for
-- HOLD_TICKS ticks in a row, the policy picks, among the running VMs from the lowest
-- weight up (memory.weight; ties: the larger VM first, then by name), the first VM whose
-- move is worth it:
--
--   * the destination is the reachable peer (ctx.hosts, declared with hv.hosts) with the
--     most headroom (memory_available - memory_reserve), whose figures are fresh;
--   * after taking the VM, the destination still has at least MARGIN more headroom than
--     this host has now (ctx:improves): a move that only turns the shortage around would
--     bounce back;
--   * the estimated migration (ctx:migration_cost) converges, pauses the VM for at most
--     MAX_DOWNTIME_S and takes at most MAX_TOTAL_S.
--
-- It then asks for one migration (ctx:migrate) and waits until it ends before asking for
-- another. Rust enforces the rest: one migration per VM at a time, at most `per_host`
-- outgoing migrations, and a cooldown per VM (hv.policy.migration_limits{ per_host = 1,
-- cooldown_s = 60 }); an intent they refuse is shown with its reason in
-- hv.policy.status("migrate-on-pressure").migrate_decisions.
--
-- Without peer hosts (no hv.hosts, or an empty list) it does nothing at all, so it is
-- safe in a policies/ folder of a host that has no peers. Try it without VMs with
-- `luvisor policy check policies/migrate_on_pressure.lua`; replay a recorded trace with
-- `luvisor policy simulate`.

local MiB = 1024 * 1024

-- The share of the host's memory that VMs (resident) plus the reserve may take before
-- the host counts as under pressure.
local PRESSURE = 0.90
-- Consecutive ticks of pressure before acting (at interval_ms = 1000: seconds). Higher:
-- fewer migrations for short peaks.
local HOLD_TICKS = 10
-- How much more headroom the destination must keep, after taking the VM, than this host
-- has now: a size ("512M") or a percent of this host's headroom ("20%").
local MARGIN = "512M"
-- Peer figures older than this are not trusted (the peer stopped answering).
local STALE_MS = 5000
-- The most a migration may cost, from ctx:migration_cost.
local MAX_DOWNTIME_S = 0.5
local MAX_TOTAL_S = 120

local function mib(bytes) return string.format("%.0fM", bytes / MiB) end

-- The peer with the most headroom, and that headroom; nil when none is usable.
local function roomiest(ctx)
    local best, best_room
    for _, peer in ipairs(ctx.hosts) do
        if peer.reachable and peer.memory_available and peer.age_ms
            and peer.age_ms <= STALE_MS then
            local room = peer.memory_available - peer.memory_reserve
            if not best or room > best_room then best, best_room = peer, room end
        end
    end
    return best, best_room
end

-- The running VMs, least important first.
local function candidates(ctx)
    local list = {}
    for _, vm in ipairs(ctx.vms) do
        if vm.state == "running" then list[#list + 1] = vm end
    end
    table.sort(list, function(a, b)
        if a.memory.weight ~= b.memory.weight then return a.memory.weight < b.memory.weight end
        if a.memory.size ~= b.memory.size then return a.memory.size > b.memory.size end
        return a.name < b.name
    end)
    return list
end

return {
    name = "migrate-on-pressure",
    description = "Moves the lowest-weight VM to the roomiest peer host when memory pressure lasts",
    interval_ms = 1000,
    tick = function(ctx)
        -- No peers: nothing to move to, and nothing to do.
        if #ctx.hosts == 0 then return end
        local host = ctx.host
        if host.memory_total <= 0 then return end
        local pressure = (host.vms_resident + host.memory_reserve) / host.memory_total
        local short = host.memory_available < host.memory_reserve
        local lasting, ticks = ctx:held("pressure", pressure > PRESSURE or short, HOLD_TICKS)
        if not lasting then return end
        -- One move at a time: wait for the one in flight to end (and show its effect).
        if #ctx.migrations > 0 then return end

        local peer, room = roomiest(ctx)
        if not peer then return end
        local headroom = host.memory_available - host.memory_reserve
        for _, vm in ipairs(candidates(ctx)) do
            -- What the VM needs there: what its guest has now.
            local need = vm.memory.size
            if ctx:improves(headroom, room - need, MARGIN) then
                local cost = ctx:migration_cost(vm)
                if cost.converges and cost.downtime_s <= MAX_DOWNTIME_S
                    and cost.total_s <= MAX_TOTAL_S then
                    ctx:migrate(vm, peer, string.format(
                        "memory pressure %.0f%% for %d ticks%s; %s has %s headroom, "
                            .. "%s after taking %s (here: %s); est. %.1f s, %.0f ms paused",
                        pressure * 100, ticks, short and " (free memory below the reserve)" or "",
                        peer.name, mib(room), mib(room - need), mib(need), mib(headroom),
                        cost.total_s, cost.downtime_s * 1000))
                    return
                end
            end
        end
    end,
}
