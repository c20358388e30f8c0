-- Warm pools: keep enough ready VMs for the claims to come.
--
-- Every tick, for each pool (hv.pool.define):
--
--   rate = claims_window / window_s          claims per second over the pool's window
--   want = min + ceil(rate * HORIZON_S)      ready VMs for HORIZON_S seconds of claims
--
-- The target rises at once (a claim that finds the pool empty waits for a restore), and
-- falls only once the lower want has lasted SETTLE ticks, by at most STEP_DOWN VMs a
-- tick, so a pause between two bursts does not throw the ready VMs away.
--
-- Rust clamps every target to the pool's [min, max] and to what the host's free memory
-- (above hv.host{ memory_reserve = ... }) holds at the pool's memory per VM, and the
-- pool's filler restores or destroys VMs to match (a restore from the pool's snapshot
-- takes milliseconds). Saved edits reload live (`luvisor serve --policies policies/`);
-- `luvisor policy check policies/warm_pool.lua` tries it on a sample pool.

-- Seconds of claims at the current rate the ready VMs should absorb.
local HORIZON_S = 2
-- Ticks a lower want must last before the target falls.
local SETTLE = 4
-- The most ready VMs one tick takes away.
local STEP_DOWN = 2

return {
    name = "warm_pool",
    description = "keeps min + HORIZON_S seconds of claims ready in each warm pool",
    interval_ms = 250,
    tick = function(ctx)
        for _, pool in ipairs(ctx.pools) do
            local rate = pool.claims_window / pool.window_s
            local want = pool.min + math.ceil(rate * HORIZON_S)
            local target = pool.target
            local lower_lasts = ctx:held("lower:" .. pool.name, want < target, SETTLE)
            local why = string.format("%.2f claims/s over %g s, %d claimed",
                rate, pool.window_s, pool.claimed)
            if want > target then
                ctx:pool_target(pool, want, why .. ": up to " .. want)
            elseif want < target and lower_lasts then
                local next_target = math.max(want, target - STEP_DOWN)
                ctx:pool_target(pool, next_target, why .. ": down to " .. next_target)
            end
        end
    end,
}
