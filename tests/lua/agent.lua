-- The agent channel as a script sees it: vm.health, vm.kvp, vm:exec, vm:shutdown,
-- vm:time_drift_ms and hv.on("heartbeat_lost").

local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "'")
  err = tostring(err)
  assert(err:find(pattern, 1, true), "error '" .. err .. "' does not mention '" .. pattern .. "'")
  return err
end

-- Waits (hv.sleep is a safe point: event handlers run there) until f() is true.
local function wait_until(what, f)
  for _ = 1, 6000 do
    if f() then return end
    hv.sleep(0.01)
  end
  error("never happened: " .. what)
end

-- hv.on: known events only, a function for a handler.
fails('hv.on: unknown event "heartbeat_gone"; known events are "heartbeat_lost", "heartbeat_restored"',
      hv.on, "heartbeat_gone", function() end)
fails("hv.on: the handler must be a function(vm), got an integer", hv.on, "heartbeat_lost", 3)

local lost, restored = {}, {}
local lost_id = hv.on("heartbeat_lost", function(vm) lost[#lost + 1] = vm.name end)
hv.on("heartbeat_restored", function(vm) restored[#restored + 1] = vm.name end)

-- An empty command line: the guest serves its agent channel until shut down.
local vm = hv.vm{ name = "agent", memory = "64M", guest = hv.guest.builtin{} }
assert(vm.health.state == "none", "no machine yet")
vm.kvp.host:set("role", "web") -- delivered when the agent connects
vm:start()
assert(vm.kvp.guest:wait("ready", { value = "1", timeout = 20 }) == "1")
local keys = vm.kvp.guest:list()
assert(#keys.boot_id == 16 and tonumber(keys.uptime_ms) ~= nil, "the guest's keys")
local health = vm.health
assert(health.state == "ok" or health.state == "late", health.state)
assert(vm.agent.connected and vm.agent.name == "luvisor-guest")

-- Exec: output and exit codes.
local r = vm:exec("hello", { timeout = 10 })
assert(r.code == 0 and r.stdout == "hello from luvisor guest\n" and not r.truncated)
r = vm:exec("kvp-get role; blk-info")
assert(r.code == 2 and r.stdout:find("^role=web\nerror: blk%-info: no such disk"), r.stdout)
fails("vm:exec: the command must be a string", vm.exec, vm, nil)
fails("unknown option 'timout'", vm.exec, vm, "hello", { timout = 1 })
fails("vm:exec: the command is 1025 bytes; an exec command has at most 1024", vm.exec, vm,
      string.rep("x", 1025))
fails('vm:exec: the command "hello\\nexit 3" is invalid: it holds a control character', vm.exec, vm,
      "hello\nexit 3")
fails("vm:exec: the command must be UTF-8 text (invalid utf-8", vm.exec, vm, "\255")

-- An exec whose caller gave up runs on in the guest; the next one waits for it, then
-- gets its own answer.
fails('to answer exec "sleep 300"', vm.exec, vm, "sleep 300", { timeout = 0.001 })
local stale = vm.agent.stale_replies
r = vm:exec("hello")
assert(r.code == 0 and r.stdout == "hello from luvisor guest\n", r.stdout)
assert(vm.agent.stale_replies == stale + 1, "the sleep's result went nowhere")

-- Key-value pairs both ways, and their limits.
vm.kvp.host:set("count", 3)
assert(vm.kvp.host:get("count") == "3" and vm.kvp.host:list().role == "web")
assert(vm:exec("kvp-get count").stdout == "count=3\n")
assert(vm:exec("kvp-set color blue").code == 0)
assert(vm.kvp.guest:wait("color", { value = "blue", timeout = 10 }) == "blue")
assert(vm.kvp.guest:get("color") == "blue" and vm.kvp.guest:get("nope") == nil)
fails('key "' .. string.rep("k", 65) .. '" is invalid: give 1 to 64 bytes', vm.kvp.host.set, vm.kvp.host,
      string.rep("k", 65), "v")
fails('the value of key "big" is 1025 bytes; a value has at most 1024', vm.kvp.host.set, vm.kvp.host,
      "big", string.rep("v", 1025))
fails("vm.kvp.guest is read-only", vm.kvp.guest.set, vm.kvp.guest, "a", "b")
fails("the value must be a string", vm.kvp.host.set, vm.kvp.host, "a", {})
fails("vm.kvp.host:set: the value must be UTF-8 text (invalid utf-8", vm.kvp.host.set, vm.kvp.host,
      "bin", "\255\254")
fails("vm.kvp.host:set: the key must be UTF-8 text", vm.kvp.host.set, vm.kvp.host, "\255", "v")
fails("vm.kvp.guest:wait: option 'value' must be UTF-8 text", vm.kvp.guest.wait, vm.kvp.guest, "k",
      { value = "\255" })
assert(vm.kvp.host:delete("count") and vm.kvp.host:get("count") == nil)
fails("timed out", vm.kvp.guest.wait, vm.kvp.guest, "never", { timeout = 0.2 })

-- A hostile guest's garbage is dropped and counted; the VM goes on.
assert(vm:exec("agent-evil all").code == 0)
local a = vm.agent
assert(a.malformed >= 3 and a.oversized >= 1 and a.unknown >= 1 and a.kvp_refused >= 1, "counted")
assert(vm:exec("hello").code == 0)

-- Time: a pause stops the guest's clock; the host sets it again on resume.
wait_until("the first clock setting", function()
  local s = vm.agent
  return s.time_generation > 0 and s.time_generation_applied == s.time_generation
end)
local generation = vm.agent.time_generation
vm:pause()
hv.sleep(1)
vm:resume()
wait_until("the clock set after the resume", function()
  local s = vm.agent
  return s.time_generation > generation and s.time_generation_applied == s.time_generation
end)
local drift = vm:time_drift_ms()
assert(math.abs(drift) < 500, "drift " .. drift .. " ms after a 1 s pause")

-- A guest that stops answering: heartbeat_lost fires (at a safe point) with the VM.
assert(vm:exec("agent-hang 600000").code == 0)
wait_until("heartbeat_lost", function() return #lost > 0 end)
assert(lost[1] == "agent" and vm.health.state == "lost", vm.health.state)
assert(vm.health.last_seen_ms >= 5000)
assert(#restored == 0)
assert(hv.off(lost_id) == true and hv.off(lost_id) == false)

-- A hung guest cannot shut down by itself: a hard stop after the timeout.
local down = vm:shutdown{ timeout = 0.5 }
assert(down.how == "forced" and down.code == nil and down.state == "stopped", down.how)
down = vm:shutdown{ timeout = 0.5 }
assert(down.how == "already_stopped")
vm:destroy()

-- A graceful shutdown, from a guest in the middle of its command line.
local sleeper = hv.vm{ name = "sleeper", memory = "32M", guest = hv.guest.builtin{ cmdline = "sleep 600000" } }
sleeper:start()
down = sleeper:shutdown{ timeout = 20 }
assert(down.how == "graceful" and down.code == 0 and down.acknowledged, down.how)
assert(sleeper.state == "stopped" and sleeper.exit_code == 0)
sleeper:destroy()

-- A handler that fails ends the waiting call with its error.
local failing = hv.on("heartbeat_lost", function(vm) error("handler failed for " .. vm.name) end)
local hung = hv.vm{ name = "hung", memory = "32M", guest = hv.guest.builtin{ cmdline = "agent-hang 600000; serve" } }
hung:start()
hung.kvp.guest:wait("ready", { value = "1", timeout = 20 })
fails("handler failed for hung", wait_until, "never", function() return false end)
hv.off(failing)
hung:destroy()

-- Work sent right after the start is done at once, not at the first heartbeat (the host
-- pings a second after the agent connects; no ping was needed).
local quick = hv.vm{ name = "quick", memory = "32M", guest = hv.guest.builtin{} }
quick:start()
assert(quick:exec("hello").code == 0)
assert(quick.agent.pings == 0, "the exec waited for a heartbeat")
quick:destroy()

-- A command line that does not serve the channel: the error says how to make it.
local no_serve = hv.vm{ name = "no-serve", memory = "32M", guest = hv.guest.builtin{ cmdline = "hello" } }
no_serve:start()
assert(no_serve:wait{ timeout = 10 } == 0)
fails('vm \'no-serve\' ended (exit code 0) before it published guest key "ready" (the built-in guest ' ..
      "serves its agent channel only when its command line is empty or ends with `serve`)",
      no_serve.kvp.guest.wait, no_serve.kvp.guest, "ready")
no_serve:destroy()

-- agent = false: no channel, and an empty command line ends at once as before.
local plain = hv.vm{ name = "plain", memory = "32M", agent = false, guest = hv.guest.builtin{} }
assert(plain.agent == nil and plain.health.state == "none")
plain:start()
assert(plain:wait{ timeout = 10 } == 0)
fails("has no agent channel (it was created with agent = false)", plain.exec, plain, "hello")
fails("has no agent channel", plain.kvp.host.set, plain.kvp.host, "a", "b")
fails("option 'agent' must be a boolean", hv.vm, { name = "x", agent = "no", guest = hv.guest.builtin{} })
plain:destroy()
print("agent ok")
