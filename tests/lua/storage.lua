-- Disks through the hv module: creation, overlays, stats, and every bad input.

-- Paths are relative: the test runner starts each script in its own scratch directory.
local dir = ""
local function fails(text, f, ...)
  local args = table.pack(...)
  return assert.error_contains(function() return f(table.unpack(args, 1, args.n)) end, text)
end
local function exists(path)
  local f = io.open(path, "rb")
  if f then f:close() end
  return f ~= nil
end

-- The base image every test uses, made at the top level so it stays for all of them.
local base = hv.disk.create{ path = dir .. "base.img", size = "32M" }

describe("hv.disk", function()
  it("creates images and refuses bad sizes, formats and options", function()
    assert(base.size == 32 * 1024 * 1024 and base.format == "raw" and base.readonly == false)
    assert(base.path == dir .. "base.img")
    assert.equal("disk<" .. dir .. "base.img raw 32M>", tostring(base))
    fails("already exists; refusing to overwrite it", hv.disk.create, { path = dir .. "base.img", size = "1M" })
    fails("option 'size' must be a non-zero multiple of 512 bytes, got 1000", hv.disk.create, { path = dir .. "odd.img", size = 1000 })
    fails("option 'size' is required", hv.disk.create, { path = dir .. "nosize.img" })
    fails("option 'size' must be a size", hv.disk.create, { path = dir .. "q.img", size = "12Q" })
    fails("option 'format' must be \"raw\" or \"qcow2\"", hv.disk.create, { path = dir .. "f.img", size = "1M", format = "vmdk" })
    fails("unknown option 'sise'", hv.disk.create, { path = dir .. "x.img", sise = "1M" })
    assert(not exists(dir .. "odd.img") and not exists(dir .. "f.img"), "failed creates leave no files")
    local q = hv.disk.create{ path = dir .. "empty.qcow2", size = "16M", format = "qcow2", serial = "q-serial" }
    assert(q.format == "qcow2" and q.serial == "q-serial")
  end)

  it("opens images and refuses what it cannot read", function()
    fails("does not exist", hv.disk.open, dir .. "missing.img")
    local f = io.open(dir .. "short.img", "wb"); f:write(string.rep("x", 1000)); f:close()
    fails("not a multiple of 512 bytes", hv.disk.open, dir .. "short.img")
    fails("unknown option 'read_only'", hv.disk.open, dir .. "base.img", { read_only = true })
    fails("option 'serial' must be at most 20 bytes", hv.disk.open, dir .. "base.img", { serial = string.rep("s", 21) })
    local ro = hv.disk.open(dir .. "base.img", { readonly = true })
    assert(ro.readonly and ro.format == "raw")
  end)

  it("makes overlays from a path or a disk", function()
    local o1 = hv.disk.overlay{ base = dir .. "base.img", path = dir .. "o1.qcow2" }
    local o2 = hv.disk.overlay{ base = base, path = dir .. "o2.qcow2" }
    assert(o1.format == "qcow2" and o1.size == base.size)
    fails("does not exist", hv.disk.overlay, { base = dir .. "nope.img", path = dir .. "o3.qcow2" })
    fails("already exists", hv.disk.overlay, { base = base, path = dir .. "o1.qcow2" })
    fails("option 'base' is required", hv.disk.overlay, { path = dir .. "o4.qcow2" })
    assert(not exists(dir .. "o3.qcow2"))
    -- Under `luvisor test`, o1 and o2 go when this test ends: the next test makes
    -- overlays of the same names.
  end)

  it("gives VMs disks, counts their I/O and locks images in use", function()
    local o1 = hv.disk.overlay{ base = dir .. "base.img", path = dir .. "o1.qcow2" }
    local o2 = hv.disk.overlay{ base = base, path = dir .. "o2.qcow2" }
    -- VMs with disks; stats count what the guest did.
    fails("option 'disks' item 1 must be a disk", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { "base.img" } })
    fails("option 'disks' must be a list of disks", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = base })
    local vm = hv.vm{ name = "w", memory = "32M", disks = { o1 },
                      guest = hv.guest.builtin{ cmdline = "blk-write 0 1000 42; blk-flush; blk-verify 0 1000 42; idle" } }
    vm:start()
    vm:wait_for_console("blk-verify 0 1000: 0 mismatches", { timeout = 30 })
    local s = o1:stats()
    assert(s.writes > 0 and s.reads > 0 and s.flushes == 1 and s.errors == 0)
    assert(s.bytes_written == 1000 * 512 and s.bytes_read == 1000 * 512, s.bytes_written .. " " .. s.bytes_read)

    -- A disk a running VM writes cannot be opened for writing, nor used as a base, nor
    -- attached to a second VM.
    fails("is locked", hv.disk.open, dir .. "o1.qcow2")
    fails("holds it for writing", hv.disk.open, dir .. "o1.qcow2", { readonly = true })
    fails("holds it for writing", hv.disk.overlay, { base = o1, path = dir .. "o5.qcow2" })
    assert(not exists(dir .. "o5.qcow2"))
    local second = hv.vm{ name = "second", memory = "32M", disks = { o1 }, guest = hv.guest.builtin{ cmdline = "exit 0" } }
    fails("cannot start vm 'second': attaching a disk", second.start, second)
    assert.equal({ "created", "running" }, { second.state, vm.state })
    -- The base of running overlays cannot be written either.
    local o2vm = hv.vm{ name = "o2", memory = "32M", disks = { o2 }, guest = hv.guest.builtin{ cmdline = "idle" } }
    o2vm:start()
    fails("is locked", hv.disk.open, dir .. "base.img")
    vm:stop(); o2vm:stop()
    second:start()
    assert.equal(0, second:wait{ timeout = 10 })
    -- Once stopped, the overlay opens again, and the base is untouched.
    assert(hv.disk.open(dir .. "o1.qcow2"))
    local check = hv.vm{ name = "check", memory = "32M", disks = { base },
                         guest = hv.guest.builtin{ cmdline = "blk-verify 0 1 42" } }
    check:start()
    assert.equal(0, check:wait{ timeout = 10 })
    assert(check:console():find("blk-verify 0 1: 1 mismatches", 1, true), "the base never saw the overlay's write")
  end)

  it("reads the format it is given and probes for one otherwise", function()
    -- Formats: given, never second-guessed; omitted, probed, and other formats refused by name.
    local function write_file(path, bytes)
      local f = assert(io.open(path, "wb")); f:write(bytes); f:close()
    end
    write_file(dir .. "fake.vmdk", "KDMV" .. string.rep("\0", 1024 * 1024 - 4))
    fails("is in the vmdk format, which luvisor does not read", hv.disk.open, dir .. "fake.vmdk")
    fails("is in the vmdk format", hv.disk.overlay, { base = dir .. "fake.vmdk", path = dir .. "o6.qcow2" })
    assert(not exists(dir .. "o6.qcow2"))
    local as_raw = hv.disk.open(dir .. "fake.vmdk", { format = "raw", readonly = true })
    assert(as_raw.format == "raw" and as_raw:stats().format_probed == false)
    fails("option 'format' must be \"raw\" or \"qcow2\", got \"vmdk\"", hv.disk.open, dir .. "base.img", { format = "vmdk" })
    fails("is not a valid qcow2 image", hv.disk.open, dir .. "base.img", { format = "qcow2" })
    local probed = hv.disk.open(dir .. "base.img", { readonly = true })
    assert(probed:stats().format_probed == true and probed:stats().format == "raw")
    local o7 = hv.disk.overlay{ base = dir .. "fake.vmdk", format = "raw", path = dir .. "o7.qcow2" }
    local st = o7:stats()
    assert(#st.backing == 1 and st.backing[1].format == "raw" and st.backing[1].format_recorded == true)
    assert(st.backing[1].path:find("fake.vmdk", 1, true))
  end)

  it("opens disk specs of hv.vm and refuses bad disk lists", function()
    local ro = hv.disk.open(dir .. "base.img", { readonly = true })
    local probed = hv.disk.open(dir .. "base.img", { readonly = true })
    -- Disk specs in hv.vm, and what a disks list may not be.
    local spec_vm = hv.vm{ name = "spec", memory = "32M",
                           disks = { { path = dir .. "base.img", format = "raw", readonly = true, serial = "from-spec" } },
                           guest = hv.guest.builtin{ cmdline = "blk-id; blk-verify 0 1 42" } }
    spec_vm:start()
    assert.equal(0, spec_vm:wait{ timeout = 10 })
    assert.contains("blk-id from-spec", spec_vm:console())
    fails("unknown option 'size'", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { { path = dir .. "base.img", size = 1 } } })
    fails("option 'path' is required", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { { format = "raw" } } })
    fails("but it has the key 'a'", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { a = 1 } })
    fails("option 'disks' item 2 is nil", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { ro, nil, probed } })
    fails("but it has the key", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { [3] = base } })
    fails("is listed twice in one VM (disks 1 and 2)", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { ro, probed } })
    fails("option 'serial' must not contain NUL bytes", hv.disk.open, dir .. "base.img", { serial = "a\0b" })
    fails("option 'serial' must not contain NUL bytes", hv.vm, { name = "bad", guest = hv.guest.builtin{}, disks = { { path = dir .. "base.img", readonly = true, serial = "a\0b" } } })
  end)

  it("creates the largest qcow2 image and refuses larger ones up front", function()
    -- qcow2 sizes: the largest is created and opens; beyond it, refused up front with no file.
    local huge = hv.disk.create{ path = dir .. "huge.qcow2", size = 1 << 51, format = "qcow2" }
    assert(huge.size == 1 << 51 and hv.disk.open(dir .. "huge.qcow2", { readonly = true }).size == 1 << 51)
    for _, size in ipairs{ (1 << 51) + 512, 1 << 52, 1 << 56, 1 << 58 } do
      fails("is too large", hv.disk.create, { path = dir .. "too-big.qcow2", size = size, format = "qcow2" })
      assert(not exists(dir .. "too-big.qcow2"), "a refused create leaves no file")
    end
  end)
end)
