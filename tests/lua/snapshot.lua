-- Snapshot and restore: a counting guest goes on where it was; a chain of three rounds;
-- ten VMs from one snapshot, each with its own disk overlay; diff snapshots; bad
-- snapshots are refused and leave nothing behind. Runs in a scratch directory.

local function last_count(vm)
  local n
  for c in vm:console():gmatch("count (%d+)") do n = tonumber(c) end
  return n
end

local function fails(text, f, ...)
  local args = table.pack(...)
  return assert.error_contains(function() return f(table.unpack(args, 1, args.n)) end, text)
end

-- A counting guest with a disk it has written to, and its snapshot "snap-web": made by
-- the first test that needs it (the snapshot directory stays for the later ones).
local web
local function snapshot_of_web()
  if web then return web end
  local disk = hv.disk.create{ path = "disk.img", size = "4M" }
  local vm = hv.vm{ name = "web", memory = "32M", disks = { disk },
                    guest = hv.guest.builtin{ cmdline = "blk-write 0 64 7; count 20" } }
  vm:start()
  vm:wait_for_console("count 5", { timeout = 10 })
  local report = vm:snapshot("snap-web")
  web = { vm = vm, report = report, at = last_count(vm) }
  return web
end

describe("snapshots", function()
  it("are taken of a running VM, which goes on in an overlay", function()
    local r = snapshot_of_web().report
    local vm = web.vm
    assert(r.path:find("snap-web", 1, true) and not r.diff, "a full snapshot")
    assert(r.memory_bytes > 0 and r.memory_bytes <= 32 * 1024 * 1024, "memory_bytes " .. r.memory_bytes)
    assert.contains("disk.img.after-snap-web.qcow2", r.overlays[1], "the VM goes on in an overlay")
    assert.equal("running", vm.state, "the VM runs on after its snapshot")
    vm:wait_for_console("count " .. (web.at + 3), { timeout = 10 })
    vm:stop()
  end)

  it("restore to where they were taken", function()
    local at_snapshot = snapshot_of_web().at
    local copy = hv.restore("snap-web", { name = "web-copy" })
    assert.equal("running", copy.state)
    copy:wait_for_console("count " .. (at_snapshot + 2), { timeout = 10 })
    local text = copy:console()
    assert(not text:find("count 1\n", 1, true), "a restored guest does not start over: " .. text)
    copy:send("") -- the serial port works (nothing to send, but the call reaches it)
  end)

  it("chain through three rounds of snapshot and restore", function()
    -- Three rounds of snapshot and restore in a chain.
    local at_snapshot = snapshot_of_web().at
    local current = hv.restore("snap-web", { name = "web-copy" })
    current:wait_for_console("count " .. (at_snapshot + 1), { timeout = 10 })
    for round = 1, 3 do
      local n = last_count(current)
      current:snapshot("chain-" .. round, { stop = true })
      assert.equal("stopped", current.state, "stop = true stops the VM")
      local nxt = hv.restore("chain-" .. round, { name = "chain-" .. round })
      nxt:wait_for_console("count " .. (n + 2), { timeout = 10 })
      current = nxt
    end
    current:stop()
  end)

  it("give ten VMs, each with its own overlay", function()
    -- Ten VMs from one snapshot, each with its own overlay, each counting.
    local at_snapshot = snapshot_of_web().at
    local many = {}
    for i = 1, 10 do
      many[i] = hv.restore("snap-web", { name = "many-" .. i })
    end
    for i = 1, 10 do
      many[i]:wait_for_console("count " .. (at_snapshot + 1), { timeout = 10 })
    end
    for i = 1, 10 do many[i]:destroy() end
    local f = io.open("disk.img.many-1.qcow2") ; assert(f, "each restore has its own overlay") ; f:close()
  end)

  it("keep a disk's serial and data through two snapshots in a row", function()
    -- Two snapshots in a row, then a restore: the disk keeps its serial through the
    -- overlays, and the data written before the first snapshot reads back.
    local sdisk = hv.disk.create{ path = "serial.img", size = "4M", serial = "web-disk" }
    local s1 = hv.vm{ name = "serial", memory = "32M", disks = { sdisk },
                      guest = hv.guest.builtin{ cmdline = "blk-write 0 64 5; listen" } }
    s1:start()
    s1:wait_for_console("listening", { timeout = 10 })
    s1:snapshot("serial-1")
    s1:snapshot("serial-2")
    s1:stop()
    local s2 = hv.restore("serial-2", { name = "serial-restored" })
    s2:send("blk-id; blk-verify 0 64 5\n")
    local id = s2:wait_for_console("blk-id", { timeout = 10 })
    assert.equal("blk-id web-disk", id)
    local verified = s2:wait_for_console("blk-verify 0 64:", { timeout = 10 })
    assert.contains(": 0 mismatches", verified)
    s2:stop()
  end)

  it("that fail while freezing the second disk leave both disks as they were", function()
    -- A snapshot that fails while freezing the second of two disks leaves both disks as they
    -- were: the first disk's overlay is removed, both disks take writes, the VM runs on.
    local fa = hv.disk.create{ path = "freeze-a.img", size = "4M" }
    local fb = hv.disk.create{ path = "freeze-b.img", size = "4M" }
    local fvm = hv.vm{ name = "freeze", memory = "32M", disks = { fa, fb },
                       guest = hv.guest.builtin{ cmdline = "listen" } }
    fvm:start()
    fvm:wait_for_console("listening", { timeout = 10 })
    -- A dangling link where the second overlay would go: it does not "exist", but it
    -- cannot be created either.
    assert(os.execute("ln -s nowhere freeze-b.img.after-freeze-snap.qcow2"))
    fails("already exists", fvm.snapshot, fvm, "freeze-snap")
    assert.equal("running", fvm.state)
    assert(not io.open("freeze-a.img.after-freeze-snap.qcow2"), "the first overlay was removed")
    assert(not io.open("freeze-snap/state"), "the snapshot directory was removed")
    local at = fvm.console_offset
    fvm:send("blk-use 0; blk-write 0 8 3; blk-use 1; blk-write 0 8 4\n")
    fvm:wait_for_console("blk-write 0 8 done", { timeout = 10, after = at })
    local _, after_first = fvm:wait_for_console("blk-write 0 8 done", { timeout = 10, after = at })
    fvm:wait_for_console("blk-write 0 8 done", { timeout = 10, after = after_first })
    fvm:stop()
  end)

  it("complete or retry requests in flight, never lose them", function()
    -- Requests in flight at the snapshot are completed or retried after a restore, never
    -- lost: a long write is cut by the snapshot, the restored guest finishes it, and every
    -- sector reads back.
    local busy_disk = hv.disk.create{ path = "busy.img", size = "16M" }
    local busy = hv.vm{ name = "busy", memory = "32M", disks = { busy_disk },
                        guest = hv.guest.builtin{ cmdline = "blk-write 0 30000 9; listen" } }
    busy:start()
    hv.sleep(0.01)
    busy:snapshot("busy-snap", { stop = true })
    -- The write may have finished before the snapshot on a fast machine: then the restored
    -- guest is already listening (and its console starts empty).
    local before = busy:console()
    local resumed = hv.restore("busy-snap", { name = "busy-restored" })
    -- Input waits in the serial port until `listen` reads it, whichever case this is.
    resumed:send("blk-verify 0 30000 9\n")
    local line = resumed:wait_for_console("blk-verify 0 30000:", { timeout = 30 })
    assert.contains(": 0 mismatches", line)
    -- The snapshot may cut the line itself: its start printed here, the rest after the
    -- restore. Read as one, the two consoles hold it whole.
    local whole = before .. resumed:console()
    assert(whole:find("blk-write 0 30000 done", 1, true), whole)
    resumed:send("exit 0\n")
    assert.equal(0, resumed:wait{ timeout = 10 })
  end)

  it("can be diffs of only what changed, which restore to the same guest", function()
    -- A diff snapshot holds only what changed since the last snapshot, and restores to
    -- the same guest.
    local d = hv.vm{ name = "diff", memory = "64M",
                     guest = hv.guest.builtin{ cmdline = "touch 8; count 20" } }
    d:start()
    d:wait_for_console("count 2", { timeout = 10 })
    local full = d:snapshot("diff-base", { disks = "shared" })
    local diff = d:snapshot("diff-1", { base = "diff-base", disks = "shared" })
    assert(diff.diff, "a diff")
    assert(diff.memory_bytes < full.memory_bytes,
           ("the diff (%d bytes) is smaller than the full snapshot (%d)"):format(diff.memory_bytes, full.memory_bytes))
    fails("latest snapshot", d.snapshot, d, "diff-bad", { base = "snap-web" })
    local n = last_count(d)
    d:stop()
    local from_diff = hv.restore("diff-1", { name = "from-diff" })
    from_diff:wait_for_console("count " .. (n + 1), { timeout = 10 })
    -- A restored VM tracks its changes from the snapshot it came from: a diff on top of a
    -- diff, restored again, still counts on.
    local again = from_diff:snapshot("diff-2", { base = "diff-1", disks = "shared", stop = true })
    assert(again.diff and again.memory_bytes < full.memory_bytes, "a small diff of a restored VM")
    local m = last_count(from_diff)
    local twice = hv.restore("diff-2", { name = "from-diff-2" })
    twice:wait_for_console("count " .. (m + 1), { timeout = 10 })
    twice:stop()
  end)

  it("that are bad are refused and create nothing", function()
    -- Bad snapshots are refused and create nothing.
    local function copy_dir(from, to)
      assert(os.execute(("cp -r %q %q"):format(from, to)))
    end
    snapshot_of_web()
    local function vm_count() return #hv.vms() end
    local before = vm_count()
    -- Corrupted at several offsets: the magic, the checksum, the length, the content, the end.
    local size = io.open("snap-web/state", "rb"):seek("end")
    for i, case in ipairs{ { 0, "not a luvisor snapshot" }, { 12, "corrupted" }, { 16, "" },
                           { 100, "corrupted" }, { size - 1, "corrupted" } } do
      local at, why = case[1], case[2]
      local d = "corrupt-" .. i
      copy_dir("snap-web", d)
      local state = io.open(d .. "/state", "r+b")
      state:seek("set", at) ; local byte = state:read(1) ; state:seek("set", at)
      state:write(string.char(byte:byte() ~ 0x5a)) ; state:close()
      fails(why, hv.restore, d, { name = "bad-1" })
    end
    -- A memory file cut short is refused too, before any VM runs.
    copy_dir("snap-web", "short-memory")
    assert(os.execute("truncate -s 4096 short-memory/memory"))
    fails("too short", hv.restore, "short-memory", { name = "bad-5" })
    copy_dir("snap-web", "truncated")
    assert(os.execute("truncate -s 50 truncated/state"))
    fails("truncated", hv.restore, "truncated", { name = "bad-2" })
    copy_dir("snap-web", "version")
    local v = io.open("version/state", "r+b") ; v:seek("set", 8) ; v:write("\99\0\0\0") ; v:close()
    fails("format version 99", hv.restore, "version", { name = "bad-3" })
    fails("not a luvisor snapshot", hv.restore, ".", { name = "bad-4" })
    local running = hv.vm{ name = "running", memory = "16M", guest = hv.guest.builtin{ cmdline = "idle" } }
    running:start()
    fails("already exists", running.snapshot, running, "snap-web")
    assert.equal("running", running.state, "a refused snapshot leaves the VM running")
    running:destroy()
    assert.equal(before, vm_count(), "a refused restore leaves no VM behind")
    for _, name in ipairs{ "bad-1", "bad-2", "bad-3", "bad-4", "bad-5" } do
      assert(not io.open("disk.img." .. name .. ".qcow2"), "a refused restore leaves no overlay: " .. name)
    end
  end)
end)
