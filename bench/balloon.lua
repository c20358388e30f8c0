-- virtio-balloon figures: how fast the host gets memory back.
--   1. inflate: a 1.5G VM whose guest touched 1530 MiB (resident on the host, free in
--      the guest, free page reporting off) is asked down by 1 GiB; the time until the
--      balloon holds 1 GiB, and the host RSS released per second;
--   2. deflate: the target back up; the time until the balloon is empty;
--   3. free page reporting: the guest frees 1 GiB it touched and turns reporting on;
--      the time until the host's resident memory has fallen by 1 GiB.
-- ROUNDS rounds (default 5), medians printed.
--
--   luvisor run bench/balloon.lua [ROUNDS]
local rounds = tonumber(arg[1]) or 5
local G, M = 1024 * 1024 * 1024, 1024 * 1024

local function median(t)
  table.sort(t)
  return t[(#t + 1) // 2]
end

local function wait_until(f, what)
  local deadline = hv.now() + 60
  while not f() do
    if hv.now() > deadline then error("never happened: " .. what) end
    hv.sleep(0.0002)
  end
  return hv.now()
end

local function send(vm, line, expect)
  local from = vm.console_offset
  vm:send(line .. "\n")
  vm:wait_for_console(expect, { timeout = 60, after = from })
end

local inflate_s, inflate_rate, released_gib, deflate_s, report_s, report_rate = {}, {}, {}, {}, {}, {}
for round = 1, rounds do
  local vm = hv.vm{ name = "balloon-" .. round,
                    memory = { startup = "1536M", min = "256M", max = "1536M" },
                    guest = hv.guest.builtin{ cmdline = "balloon-report off; listen" } }
  vm:start()
  vm:wait_for_console("listening", { timeout = 30 })
  vm.memory:set_stats_period(0)
  send(vm, "touch 1530", "touched 1530 MiB")
  local before = vm.memory.resident

  -- 1. Inflate by 1 GiB.
  local t0 = hv.now()
  vm.memory:set_target(512 * M)
  local t1 = wait_until(function() return vm.memory.held == G end, "inflated")
  local released = before - vm.memory.resident
  inflate_s[#inflate_s + 1] = t1 - t0
  inflate_rate[#inflate_rate + 1] = released / G / (t1 - t0)
  released_gib[#released_gib + 1] = released / G

  -- 2. Deflate it again.
  t0 = hv.now()
  vm.memory:set_target(1536 * M)
  t1 = wait_until(function() return vm.memory.held == 0 end, "deflated")
  deflate_s[#deflate_s + 1] = t1 - t0

  -- 3. Free page reporting of 1 GiB the guest touched and freed.
  send(vm, "touch 1024", "touched 1024 MiB")
  before = vm.memory.resident
  t0 = hv.now()
  vm:send("balloon-report on\n")
  t1 = wait_until(function() return vm.memory.resident < before - G + 16 * M end, "reported")
  report_s[#report_s + 1] = t1 - t0
  report_rate[#report_rate + 1] = (before - vm.memory.resident) / G / (t1 - t0)
  vm:destroy()
end

print(("inflate 1 GiB of resident guest memory: %.1f ms, host RSS fell by %.2f GiB, released at %.2f GiB/s (median of %d)")
  :format(median(inflate_s) * 1000, median(released_gib), median(inflate_rate), rounds))
print(("deflate 1 GiB: %.1f ms"):format(median(deflate_s) * 1000))
print(("free page reporting of 1 GiB freed by the guest: %.1f ms, %.2f GiB/s (resident polled, so coarser)")
  :format(median(report_s) * 1000, median(report_rate)))
