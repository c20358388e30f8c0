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

local function mib(bytes)
    return string.format("%.0fM", bytes / MiB)
end

-- What a VM should have, from its demand, and why. nil when it has no usable statistics.
local function wanted(ctx, vm)
    local stats = vm.memory.stats
    if vm.state ~= "running" or not stats or not stats.total or not stats.available
        or stats.age_ms > STALE_MS then
        return nil
    end
    local now = stats.total - stats.available
    -- Rises at once, falls as the average of the last WINDOW ticks.
    local smoothed = ctx:mean(vm, "demand", WINDOW) or now
    local demand = math.max(now, smoothed)
    local want = demand * (1 + vm.memory.buffer / 100)
    want = math.max(vm.memory.min, math.min(vm.memory.max, want))
    return math.floor(want), string.format("demand %s + %d%% buffer", mib(demand), vm.memory.buffer)
end

-- Shares `capacity` bytes among `vms` (each with min, want and weight): everyone gets min,
-- then the rest goes by weight, never above want. VMs that are full hand their share on to
-- the others. Returns the amounts, in the same order.
local function share_by_weight(vms, capacity)
    local give, spare = {}, capacity
    for i, v in ipairs(vms) do
        give[i] = v.min
        spare = spare - v.min
    end
    while spare > 0 do
        local weights = 0
        for i, v in ipairs(vms) do
            if give[i] < v.want then weights = weights + v.weight end
        end
        if weights == 0 then break end
        local handed = 0
        for i, v in ipairs(vms) do
            if give[i] < v.want then
                local share = math.floor(spare * v.weight / weights)
                local take = math.min(share, v.want - give[i])
                give[i] = give[i] + take
                handed = handed + take
            end
        end
        spare = spare - handed
        if handed == 0 then break end
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
        local fixed, sum_targets = 0, 0
        local managed = {}
        for _, vm in ipairs(ctx.vms) do
            local m = vm.memory
            if vm.state == "running" then sum_targets = sum_targets + m.target end
            local want, why = wanted(ctx, vm)
            if want then
                managed[#managed + 1] = {
                    vm = vm, want = want, why = why,
                    min = m.min, weight = m.weight, target = m.target,
                }
            elseif vm.state == "running" then
                fixed = fixed + m.target -- kept as it is
            end
        end
        if host.memory_available < host.memory_reserve then
            capacity = math.min(capacity, sum_targets - (host.memory_reserve - host.memory_available))
        end

        local sum_wanted = fixed
        for _, v in ipairs(managed) do sum_wanted = sum_wanted + v.want end
        if sum_wanted > capacity then
            local give = share_by_weight(managed, capacity - fixed)
            for i, v in ipairs(managed) do
                if give[i] < v.want then
                    v.want = give[i]
                    v.why = string.format("%s; host short (%s for VMs), weight %d",
                        v.why, mib(capacity), v.weight)
                end
            end
        end

        for _, v in ipairs(managed) do
            local change = v.want - v.target
            -- The dead band: not worth a balloon move.
            if math.abs(change) >= DEAD_BAND * v.target then
                local share = change > 0 and STEP_UP or STEP_DOWN
                local step = math.max(MIN_STEP, share * v.vm.memory.max)
                local why = v.why
                if math.abs(change) > step then
                    change = change > 0 and step or -step
                    why = string.format("%s; step limited to %s", why, mib(step))
                end
                ctx:set_memory_target(v.vm, math.floor(v.target + change), why)
            end
        end
    end,
}
