-- Dynamic memory, the way Hyper-V does it.
--
-- Every tick, for each running VM whose guest reports memory statistics:
--
--   demand = total - available                  what the guest really uses
--   target = demand * (1 + buffer / 100)        plus the VM's buffer (memory.buffer, %)
--   target within [memory.min, memory.max]
--
-- When the host is short of memory, the VMs share what it can give by weight
-- (memory.weight, 0-10000): each keeps its min, and the rest goes to the heavier VMs
-- first, in proportion to their weights, never beyond what a VM wants.
--
-- To keep targets from flapping, demand is smoothed over a few ticks (it rises at once
-- but falls slowly), small changes are ignored, and one tick moves a target by at most a
-- step. A VM without statistics (no balloon driver yet, or stopped) keeps its target.
--
-- Rust checks and clamps every intent to [min, max] and logs it with its reason; a tick
-- that raises an error changes nothing. Adapt the numbers below to your hosts: the file is
-- reloaded as soon as you save it (`luvisor serve --policies policies/`), and
-- `luvisor policy check policies/dynamic_memory.lua` tries it without VMs.

local MiB = 1024 * 1024

-- Ticks of history the falling demand is averaged over. More: slower to give memory
-- back after a peak.
local WINDOW = 5
-- Changes smaller than this share of the current target are ignored (the dead band).
local DEAD_BAND = 0.05
-- The most a target moves in one tick, as a share of the VM's max (but at least
-- MIN_STEP): up quickly, since a guest short of memory suffers at once; down gently.
local STEP_UP = 0.25
local STEP_DOWN = 0.10
local MIN_STEP = 32 * MiB
-- Statistics older than this are not trusted (the guest stopped reporting).
local STALE_MS = 10000

-- What a VM should have, and its demand; nil when it has no usable statistics.
local function wanted(ctx, vm, m)
    local stats = m.stats
    if not stats then return nil end
    local total, available = stats.total, stats.available
    if not total or not available or stats.age_ms > STALE_MS then return nil end
    local now = total - available
    -- Rises at once, falls as the average of the last WINDOW ticks.
    local smoothed = ctx:mean(vm, "demand", WINDOW) or now
    local demand = now > smoothed and now or smoothed
    local want = demand * (1 + m.buffer / 100)
    if want < m.min then want = m.min elseif want > m.max then want = m.max end
    return math.floor(want), demand
end

-- Shares `capacity` bytes among the VMs 1..n (want[i], min[i], weight[i]): everyone gets
-- min, then the rest goes by weight, never above want; what the VMs that are full leave
-- goes to the others, round after round. A VM of weight 0 gets only what is left at the
-- end. Returns the amounts.
local function share_by_weight(n, want, min, weight, capacity)
    local give, spare, active, weights = {}, capacity, {}, 0
    for i = 1, n do
        give[i] = min[i]
        spare = spare - min[i]
        if want[i] > min[i] and weight[i] > 0 then
            active[#active + 1] = i
            weights = weights + weight[i]
        end
    end
    -- A remainder under 1M is not worth another round.
    while spare >= MiB and weights > 0 do
        local per_weight = spare / weights
        local still, still_weights, handed = {}, 0, 0
        for _, i in ipairs(active) do
            local take, need = math.floor(per_weight * weight[i]), want[i] - give[i]
            if take >= need then
                take = need
            else
                still[#still + 1] = i
                still_weights = still_weights + weight[i]
            end
            give[i] = give[i] + take
            handed = handed + take
        end
        spare = spare - handed
        active, weights = still, still_weights
    end
    for i = 1, n do
        if spare < MiB then break end
        if weight[i] == 0 and want[i] > give[i] then
            local take = math.min(spare, want[i] - give[i])
            give[i] = give[i] + take
            spare = spare - take
        end
    end
    return give
end

return {
    name = "dynamic-memory",
    description = "Hyper-V style dynamic memory: demand plus buffer, shared by weight when the host is short",
    interval_ms = 500,
    tick = function(ctx)
        local host = ctx.host
        -- What the host can give VMs: all but its reserve, and less when its free memory
        -- already fell below the reserve.
        local capacity = host.memory_total - host.memory_reserve
        -- The VMs this policy moves, 1..n, one array per figure (cheaper than a table
        -- per VM); `fixed` is what the VMs it leaves alone hold.
        local n, vms, want, demand, min, weight = 0, {}, {}, {}, {}, {}
        local fixed, sum_targets = 0, 0
        for _, vm in ipairs(ctx.vms) do
            if vm.state == "running" then
                local m = vm.memory
                sum_targets = sum_targets + m.target
                local w, d = wanted(ctx, vm, m)
                if w then
                    n = n + 1
                    vms[n], want[n], demand[n], min[n], weight[n] = vm, w, d, m.min, m.weight
                else
                    fixed = fixed + m.target -- kept as it is
                end
            end
        end
        if host.memory_available < host.memory_reserve then
            capacity = math.min(capacity, sum_targets - (host.memory_reserve - host.memory_available))
        end

        local sum_wanted = fixed
        for i = 1, n do sum_wanted = sum_wanted + want[i] end
        -- When the host is short, what each VM gets instead of what it wants.
        local given = sum_wanted > capacity and share_by_weight(n, want, min, weight, capacity - fixed)
        local short_note = given
            and string.format("; host short (%.0fM for VMs), weight ", capacity / MiB)

        for i = 1, n do
            local vm = vms[i]
            local m = vm.memory
            local target, goal = m.target, want[i]
            local shared = given and given[i] < goal
            if shared then goal = given[i] end
            local change = goal - target
            -- The dead band: not worth a balloon move.
            if math.abs(change) >= DEAD_BAND * target then
                local step = math.max(MIN_STEP, (change > 0 and STEP_UP or STEP_DOWN) * m.max)
                local limited = math.abs(change) > step
                if limited then change = change > 0 and step or -step end
                -- The reason is written only for the VMs that change, in one format.
                local why = string.format("demand %.0fM + %d%% buffer%s%s", demand[i] / MiB,
                    m.buffer, shared and short_note .. weight[i] or "",
                    limited and string.format("; step limited to %.0fM", step / MiB) or "")
                ctx:set_memory_target(vm, math.floor(target + change), why)
            end
        end
    end,
}
