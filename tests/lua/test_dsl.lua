-- The test DSL of `luvisor test` checking itself: hook order, the `assert` table, print
-- capture, pending tests, and hv.on handlers that go with their test. (What failures look
-- like, --filter, --jobs, cleanup and Ctrl-C are checked from outside by
-- tests/test_runner.rs.)

local log = {}
local function note(what) log[#log + 1] = what end

describe("hooks", function()
  before_each(function() note("before outer") end)
  after_each(function() note("after outer") end)

  describe("inner", function()
    before_each(function() note("before inner 1") end)
    before_each(function() note("before inner 2") end)
    after_each(function() note("after inner") end)
    it("run around a test, outer to inner before, inner to outer after", function()
      note("test")
      assert.equal({ "before outer", "before inner 1", "before inner 2", "test" }, log)
    end)
  end)

  it("saw the after_each hooks of the previous test in order", function()
    assert.equal({ "before outer", "before inner 1", "before inner 2", "test", "after inner",
                   "after outer", "before outer" }, log)
  end)
end)

describe("the assert table", function()
  it("keeps Lua's plain assert, which returns its arguments", function()
    local a, b, c = assert(1, "message", 3)
    assert.equal({ 1, "message", 3 }, { a, b, c })
    local ok, err = pcall(assert, false, "plain message")
    assert.equal({ false, "plain message" }, { ok, err })
    ok, err = pcall(assert, nil)
    assert.equal("assertion failed!", err)
  end)

  it("compares deeply and raises a failure that shows the difference", function()
    assert.equal({ a = { 1, 2 }, b = "x" }, { b = "x", a = { 1, 2 } })
    local ok, failure = pcall(assert.equal, { a = { 1, 2 } }, { a = { 1, 3 } })
    assert.falsy(ok)
    local text = tostring(failure)
    assert.contains("tables differ at 1 path", text)
    assert.contains(".a[2]: expected 2, got 3", text)
    assert.match("test_dsl%.lua:%d+: ", text)
  end)

  it("has not_equal, truthy, falsy, match and contains", function()
    assert.not_equal({ 1 }, { 2 })
    assert.truthy(0)
    assert.falsy(nil)
    assert.match("^h.llo$", "hello")
    assert.contains("ell", "hello")
    for _, bad in ipairs{
      function() assert.not_equal({ 1 }, { 1 }) end,
      function() assert.truthy(false) end,
      function() assert.falsy(0) end,
      function() assert.match("^x", "hello") end,
      function() assert.match("x", 42) end,
      function() assert.contains("x", "hello") end,
      function() assert.fail("always") end,
    } do
      assert.error(bad)
    end
  end)

  it("checks errors by pattern or by text, and returns the message", function()
    local message = assert.error(function() error("disk 7 (raw) failed", 0) end, "disk %d+")
    assert.equal("disk 7 (raw) failed", message)
    assert.error_contains(function() error("disk 7 (raw) failed") end, "(raw)")
    -- Errors of hv calls are plain messages.
    assert.error_contains(function() hv.sleep(-1) end, "hv.sleep: seconds must be a number >= 0")
    assert.error_contains(function() assert.error(function() end) end,
                          "expected an error, but the function returned")
    assert.error_contains(function() assert.error(function() error("a") end, "b") end,
                          "the error does not match the pattern \"b\"")
    assert.error_contains(function() assert.error(function() end, "[") end, "bad pattern")
  end)

  it("names the assertions it has when asked for one it does not", function()
    assert.error_contains(function() assert.almost_equal(1, 1) end,
                          "assert.almost_equal is not an assertion; there are: are, are_not, contains, equal, equals, error")
  end)
end)

describe("a test", function()
  it("cannot declare tests or hooks while it runs", function()
    assert.error_contains(function() it("nested", function() end) end,
                          "it: cannot be called while a test runs")
    assert.error_contains(function() describe("nested", function() end) end,
                          "describe: cannot be called while a test runs")
    assert.error_contains(function() before_each(function() end) end,
                          "before_each: cannot be called while a test runs")
  end)

  it("cannot exit the runner", function()
    assert.error_contains(function() os.exit(3) end, "os.exit(3) called in a test file")
  end)

  it("can declare itself pending part way", function()
    pending("waits for a feature")
    error("not reached")
  end)

  local stale
  it("can add an event handler", function()
    stale = hv.on("heartbeat_lost", function() error("stale handler") end)
  end)

  it("does not hear the handlers an earlier test added", function()
    assert.truthy(stale, "the previous test ran")
    assert.equal(false, hv.off(stale))
  end)

  it("takes busted's names for the same assertions", function()
    assert.same({ a = { 1, 2 } }, { a = { 1, 2 } })
    assert.are.same({ 1 }, { 1 })
    assert.are.equal(3, 3)
    assert.equals("x", "x")
    assert.are_not.same({ 1 }, { 2 })
    assert.is_true(true); assert.is_false(false); assert.is_nil(nil); assert.is_not_nil(0)
    assert.is["true"](true); assert.is_not["nil"](1)
    assert.equal("boom", assert.has_error(function() error("boom", 0) end, "boom"))
    assert.has_no.error(function() end)
    local message = assert.error(function() assert.is_nil(1) end)
    assert.contains("expected nil, got 1", message)
    message = assert.error(function() assert.has_no_error(function() error("x", 0) end) end)
    assert.contains("expected no error", message)
  end)

  pending("is counted, not run, when declared pending")
  it("without a function is pending too")
end)
