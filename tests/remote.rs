//! Remote control with real VMs, from the three clients: the Rust client, a
//! `luvisor run` script using `hv.connect`, and `luvisor repl --connect`.
//!
//! The script and the REPL drive a real `luvisor serve CONFIG --listen ADDR --key-file
//! KEY` process ([`ServeHost`]): the config script creates the VMs, and what the tests
//! check goes through the remote connection only, as for a user. The Rust client test
//! plays the host itself (a registry behind the control handler, on a loopback port,
//! through the test listener that stands in for serve's accept loop), because it checks
//! what the remote calls did against the VM's own view in this process (its state, its
//! memory read directly, a handle gone stale).
//!
//! Every wait is for an event (console output, the guest's end, a line the host
//! printed), never for a time.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use luvisor_runtime::migration::PeerKey;
use luvisor_runtime::remote::protocol::FailureKind;
use luvisor_runtime::remote::{test_listener, RemoteError, RemoteHost};
use luvisor_runtime::{Registry, VmId};

const GREETING: &str = "hello from luvisor guest";
const T: Duration = Duration::from_secs(10);

/// Writes a private key file in `dir`.
fn key_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// A `luvisor serve CONFIG --listen 127.0.0.1:0 --key-file KEY` process, killed (and
/// its VMs with it) when dropped.
struct ServeHost {
    child: Child,
    addr: String,
}

impl ServeHost {
    /// Starts serve in `dir` with `config` as its config script (and `--policies
    /// policies` when given), and waits until it listens.
    fn start(dir: &Path, config: &str, key: &Path, policies: Option<&Path>) -> ServeHost {
        let config_path = dir.join("serve.lua");
        std::fs::write(&config_path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_luvisor"));
        command.arg("serve").arg(&config_path);
        if let Some(policies) = policies {
            command.arg("--policies").arg(policies);
        }
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--key-file"])
            .arg(key)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start luvisor serve");
        // serve prints `luvisor serve: listening on ADDR` once its listener is up.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut printed = String::new();
        let addr = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                let status = child.wait().unwrap();
                panic!("luvisor serve ended ({status}) before it listened:\n{printed}");
            }
            printed.push_str(&line);
            if let Some(addr) = line.trim().strip_prefix("luvisor serve: listening on ") {
                break addr.to_string();
            }
        };
        // Keep draining its stderr so that it never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        ServeHost { child, addr }
    }
}

impl Drop for ServeHost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Serves `registry` on a loopback port with the key in `key`; returns the address.
fn serve(registry: &Arc<Registry>, key: &Path) -> String {
    test_listener::spawn(
        PeerKey::from_file(key).unwrap(),
        luvisor_lua::remote::control_handler(registry),
    )
    .unwrap()
}

#[test]
fn the_rust_client_drives_a_real_vm() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("remote-rust");
    let key = key_file(&dir, "key", b"a key for the rust client test 0123");
    let registry = Arc::new(Registry::new());
    let local = registry
        .create(common::builtin("listener", "listen"))
        .unwrap();
    let addr = serve(&registry, &key);
    let mut host = RemoteHost::connect_with_key_file(&addr, &key, T).unwrap();

    let vm = host.find_vm("listener").unwrap();
    assert_eq!(vm.state, "created");
    let vm = vm.vm_ref();
    host.start(&vm).unwrap();
    assert_eq!(local.state().as_str(), "running");
    let (line, at) = host
        .wait_for_console(&vm, "listening", 0, common::TIMEOUT, &|| false)
        .unwrap();
    assert!(line.contains("listening"), "{line}");
    host.send(&vm, b"hello\n").unwrap();
    let (_, at) = host
        .wait_for_console(&vm, GREETING, at, common::TIMEOUT, &|| false)
        .unwrap();
    assert!(host.console(&vm).unwrap().contains(GREETING));
    assert!(host.vm_info(&vm).unwrap().console_offset >= at);

    // Pause acts on the VM itself.
    host.pause(&vm).unwrap();
    assert_eq!(local.state().as_str(), "paused");
    assert_eq!(host.vm_info(&vm).unwrap().state, "paused");

    // Guest memory, while nothing in the guest changes it: reads (bigger than one
    // request's chunk) match the VM's own reads, and a write lands in the guest (the
    // old bytes go back before the guest runs again).
    let len = 5 << 20;
    let remote = host.read_memory(&vm, 1 << 20, len).unwrap();
    let mut own = vec![0u8; len as usize];
    local.read_memory(1 << 20, &mut own).unwrap();
    assert!(remote == own, "remote and local reads differ");
    let scratch = (60 << 20) + 123;
    let before = host.read_memory(&vm, scratch, 16).unwrap();
    host.write_memory(&vm, scratch, b"written remotely")
        .unwrap();
    let mut back = [0u8; 16];
    local.read_memory(scratch, &mut back).unwrap();
    assert_eq!(&back, b"written remotely");
    host.write_memory(&vm, scratch, &before).unwrap();
    let err = host.read_memory(&vm, 1 << 40, 16).unwrap_err();
    assert!(err.to_string().contains("is not all RAM"), "{err}");

    host.resume(&vm).unwrap();
    assert_eq!(local.state().as_str(), "running");

    // A wait that runs out names the whole timeout asked for, not a slice of it.
    let err = host
        .wait(&vm, Duration::from_millis(1500), &|| false)
        .unwrap_err();
    assert_eq!(err.failure_kind(), Some(FailureKind::TimedOut));
    assert!(err.to_string().contains("timed out after 1.5s"), "{err}");

    // The guest's end, with its exit code.
    host.send(&vm, b"exit 7\n").unwrap();
    let (code, state, reason) = host.wait(&vm, common::TIMEOUT, &|| false).unwrap();
    assert_eq!((code, state.as_str(), reason), (Some(7), "stopped", None));

    // A destroyed VM's handle is stale, even once another VM takes its name.
    registry.destroy(VmId(vm.id));
    registry
        .create(common::builtin("listener", "hello"))
        .unwrap();
    let err = host.vm_info(&vm).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("host {addr}: vm 'listener' no longer exists")
    );

    // The wrong key gets nowhere.
    let wrong = key_file(&dir, "wrong", b"not the key of that host at all!!");
    let err = RemoteHost::connect_with_key_file(&addr, &wrong, T).unwrap_err();
    assert!(matches!(err, RemoteError::Connect { .. }), "{err}");
    assert!(
        format!("{:?}", std::error::Error::source(&err)).contains("AuthFailed"),
        "{err}"
    );
    registry.stop_all();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A script that drives the remote host through `hv.connect`; `...` is the address, the
/// key file and a wrong key file.
const SCRIPT: &str = r#"
local addr, key, wrong_key = ...
local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "'")
  err = tostring(err)
  assert(err:find(pattern, 1, true), "error '" .. err .. "' does not mention '" .. pattern .. "'")
  return err
end

local host = hv.connect(addr, { key_file = key, timeout = 10 })
assert(tostring(host):find("at " .. addr, 1, true), tostring(host))
local info = host:info()
assert(info.addr == addr and info.name == host.name and info.cpus >= 1, "host:info")
assert(info.memory_total > 0 and info.memory_reserve > 0 and info.vms_resident >= 0)
assert(info.kvm.api == 12, "kvm")

local vms = host:vms()
assert(#vms == 1 and vms[1].name == "remote-lua", "host:vms")
local vm = host:vm("remote-lua")
assert(vm == vms[1], "handles of one VM are equal")
assert(vm.state == "created" and vm.vcpus == 1 and vm.memory_size == 128 * 1024 * 1024)
assert(vm.host.addr == addr)
fails("host " .. addr .. ": there is no vm named 'nope'; its VMs are: remote-lua", host.vm, host, "nope")
fails("host:vm: name must be a string", host.vm, host, 3)
fails("host " .. addr .. ": cannot send input to vm 'remote-lua': it is created", vm.send, vm, "x")

-- The remote policy engine's status, as hv.policy.status() shows it there.
local policies = host:policies()
assert(#policies == 1 and policies[1].name == "quiet" and policies[1].running, "policies")
assert(type(policies[1].decisions) == "table")

vm:start()
assert(vm.state == "running")
local _, at = vm:wait_for_console("listening", { timeout = 20 })
vm:send("hello\n")
_, at = vm:wait_for_console("hello from luvisor guest", { timeout = 20, after = at })
assert(vm.console_offset >= at and vm:console():find("hello from luvisor guest", 1, true))
assert(vm.boot_time_ms and vm.run_time_ms > 0 and vm.memory_resident > 0)
fails("vm:wait_for_console: pattern must be a string", vm.wait_for_console, vm, 42)
fails("unknown option 'tiemout'", vm.wait, vm, { tiemout = 1 })

-- Dynamic memory, through vm.memory.
local mem = vm.memory
assert(mem.max == 128 * 1024 * 1024 and mem.min == 32 * 1024 * 1024 and mem.startup == 64 * 1024 * 1024)
assert(mem.buffer == 20 and mem.weight == 5000)
local applied, clamped = mem:set_target("48M", { reason = "remote test" })
assert(applied == 48 * 1024 * 1024 and not clamped and mem.target == applied)
applied, clamped = mem:set_target("1G")
assert(applied == 128 * 1024 * 1024 and clamped)
fails("vm.memory:set_target: target must be a size", mem.set_target, mem, {})
mem:set_stats_period(2)
assert(mem.stats_period == 2)

vm:pause()
assert(vm.state == "paused")
-- Guest memory while the guest and its balloon stand still; the old bytes go back.
local at60 = 60 * 1024 * 1024
local old = mem:read(at60, 12)
mem:write(at60, "remote bytes")
assert(mem:read(at60, 12) == "remote bytes")
mem:write(at60, old)
fails("vm.memory:read: len", mem.read, mem, 0, 65 * 1024 * 1024)
fails("host " .. addr .. ": timed out after", vm.wait_for_console, vm, "never printed", { timeout = 0.5 })
vm:resume()
assert(vm.state == "running")

-- serve --listen can migrate; to a port where nothing listens the VM stays there.
local err = fails("host " .. addr .. ": cannot migrate vm 'remote-lua' to 127.0.0.1:1",
                  vm.migrate, vm, "127.0.0.1:1", { max_downtime_ms = 100 })
assert(err:find("goes on running", 1, true), err)
assert(vm.state == "running")
fails("unknown option 'downtime'", vm.migrate, vm, "127.0.0.1:1", { downtime = 1 })

-- The agent channel, through the remote handle ("listen" serves it while it waits).
assert(vm.kvp.guest:wait("ready", { value = "1", timeout = 20 }) == "1")
assert(vm.kvp.guest:list().boot_id ~= nil and vm.kvp.guest:get("ready") == "1")
local health = vm.health
assert(health.state == "ok" or health.state == "late", health.state)
assert(vm.agent.connected and vm.agent.name == "luvisor-guest", "vm.agent")
vm.kvp.host:set("role", "remote")
assert(vm.kvp.host:get("role") == "remote" and vm.kvp.host:list().role == "remote")
local r = vm:exec("kvp-get role", { timeout = 20 })
assert(r.code == 0 and r.stdout == "role=remote\n", r.stdout)
r = vm:exec("nope", { timeout = 20 })
assert(r.code == 2 and not r.truncated, r.stdout)
assert(vm.kvp.host:delete("role") and not vm.kvp.host:delete("role"))
fails("host " .. addr .. ": the value of key \"big\" is 1025 bytes", vm.kvp.host.set, vm.kvp.host,
      "big", string.rep("v", 1025))
fails("vm:exec: the command must be a string", vm.exec, vm, 42)
assert(type(vm:time_drift_ms()) == "number")

vm:send("exit 5\n")
local code, state = vm:wait{ timeout = 20 }
assert(code == 5 and state == "stopped", tostring(code) .. " " .. tostring(state))
assert(vm.exit_code == 5)
local down = vm:shutdown{ timeout = 5 }
assert(down.how == "already_stopped" and down.code == 5, down.how)
assert(vm.health.state == "none")

fails("failed authentication", hv.connect, addr, { key_file = wrong_key })
print("remote script ok")
"#;

/// The serve config of the script test: one VM with dynamic memory, not started.
const SCRIPT_HOST_CONFIG: &str = r#"
hv.vm{ name = "remote-lua",
       memory = { startup = "64M", min = "32M", max = "128M", buffer = 20, weight = 5000 },
       guest = hv.guest.builtin{ cmdline = "listen" } }
"#;

#[test]
fn a_script_drives_a_remote_vm_through_hv_connect() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("remote-lua");
    let key = key_file(&dir, "key", b"a key for the lua script test 0123");
    let wrong = key_file(&dir, "wrong", b"this is some other host's key!!!!");
    // A policy that decides nothing, so that the script's targets stay as it sets them.
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("quiet.lua"),
        "return { name = 'quiet', interval_ms = 1000, tick = function(ctx) end }\n",
    )
    .unwrap();
    let host = ServeHost::start(&dir, SCRIPT_HOST_CONFIG, &key, Some(&policies));
    let (code, stdout, stderr) = common::run_script(
        &dir,
        "remote.lua",
        SCRIPT,
        &[&host.addr, key.to_str().unwrap(), wrong.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("remote script ok"), "{stdout}");
    drop(host);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A script that migrates a VM from here to host A, then drives A to migrate it to host
/// B and back: `...` is A's address, B's address and the key both serve with.
const MIGRATION_SCRIPT: &str = r#"
local a_addr, b_addr, key = ...
local function keys(t)
  local names = {}
  for name in pairs(t) do names[#names + 1] = name end
  table.sort(names)
  return table.concat(names, " ")
end
local function fails(pattern, f, ...)
  local ok, err = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "'")
  err = tostring(err)
  assert(err:find(pattern, 1, true), "error '" .. err .. "' does not mention '" .. pattern .. "'")
  return err
end

-- A local migration to A, for the fields of local progress and of a local report.
local vm = hv.vm{ name = "wanderer", memory = "64M",
                  guest = hv.guest.builtin{ cmdline = "dirty 8 20; listen" } }
vm:start()
vm:wait_for_console("dirty: pass", { timeout = 60 })
local local_progress
local local_report = vm:migrate(a_addr, { key_file = key, timeout = 60,
  on_progress = function(p) local_progress = keys(p) end })
assert(vm.state == "migrated" and local_progress, "moved to A")

local a = hv.connect(a_addr, { key_file = key })
local b = hv.connect(b_addr, { key_file = key })
local far = a:vm("wanderer")
assert(far.state == "running", far.state)

-- A key file A cannot read: said like any migration that could not begin.
fails("host " .. a_addr .. ": cannot migrate vm 'wanderer' to " .. b_addr
      .. " (it goes on running here): cannot read key file nonexistent: ",
      far.migrate, far, b_addr, { key_file = "nonexistent" })
assert(far.state == "running")

-- A to B, with the options of a local migration; progress comes as it runs.
local calls, finals, last, fields = 0, 0, -1, nil
local r = far:migrate(b_addr, { key_file = key, max_downtime_ms = 50, timeout = 60,
  auto_converge = true,
  on_progress = function(p)
    calls = calls + 1
    assert(p.iteration > last, "passes in order")
    last = p.iteration
    if p.final then finals = finals + 1 end
    assert(p.remaining_bytes >= 0 and p.mbps >= 0 and p.throttle >= 0)
    fields = keys(p)
  end })
-- The final pass's report is skipped when the answer came with it (a client shows only
-- the newest report, and none once the answer is there); the first pass's comes while
-- the client waits for the answer.
assert(calls >= 1 and finals <= 1, calls .. " reports, " .. finals .. " final")
assert(fields == local_progress, fields .. " vs " .. local_progress)
assert(keys(r) == keys(local_report), keys(r) .. " vs " .. keys(local_report))
assert(r.mbps > 0 and type(r.throttle) == "number" and type(r.destination_build_ms) == "number")
assert(far.state == "migrated", far.state)
local there = b:vm("wanderer")
assert(there.state == "running", there.state)

-- A paused VM arrives paused (B migrates it with the key it serves with).
there:pause()
there:migrate(a_addr, { timeout = 60 })
assert(there.state == "migrated", there.state)
local home = a:vm("wanderer")
assert(home.state == "paused", home.state)
home:resume()
local at = home.console_offset
home:send("dirty-verify\n")
local line = home:wait_for_console("dirty-verify:", { timeout = 60, after = at })
assert(line:find("dirty-verify: ok", 1, true), line)
print("remote migration ok")
"#;

#[test]
fn a_script_migrates_a_remote_vm_with_the_options_and_report_of_a_local_one() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("remote-migrate");
    let key = key_file(&dir, "key", b"a key for the remote migration 012");
    let (dir_a, dir_b) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let a = ServeHost::start(&dir_a, "-- VMs arrive\n", &key, None);
    let b = ServeHost::start(&dir_b, "-- VMs arrive\n", &key, None);
    let (code, stdout, stderr) = common::run_script(
        &dir,
        "remote_migrate.lua",
        MIGRATION_SCRIPT,
        &[&a.addr, &b.addr, key.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("remote migration ok"), "{stdout}");
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn repl_connect_binds_the_remote_host_to_host() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("remote-repl");
    let key = key_file(&dir, "key", b"a key for the repl connect test 01");
    let host = ServeHost::start(
        &dir,
        "hv.vm{ name = 'far', guest = hv.guest.builtin{ cmdline = 'listen' } }\n",
        &key,
        None,
    );
    let addr = host.addr.clone();
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["repl", "--connect", &addr, "--key-file"])
        .arg(&key)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"far = host:vm('far')\n\
              far:start()\n\
              far:wait_for_console('listening', { timeout = 20 })\n\
              far.state\n\
              #hv.vms()\n\
              host:vm('nope')\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("connected to luvisor host") && stdout.contains(&addr),
        "{stdout}"
    );
    // The remote VM runs; `hv` is still this machine's (no VMs there).
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"\"running\""), "{stdout}");
    assert!(lines.contains(&"0"), "{stdout}");
    assert!(
        stderr.contains(&format!("error: host {addr}: there is no vm named 'nope'")),
        "{stderr}"
    );
    // Piped input with a failed chunk exits 1.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let mut remote = RemoteHost::connect_with_key_file(&addr, &key, T).unwrap();
    assert_eq!(remote.find_vm("far").unwrap().state, "running");
    drop(remote);
    drop(host);

    // A host that cannot be reached: a clear error and exit code 1 before any prompt.
    let out = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["repl", "--connect", "127.0.0.1:1", "--key-file"])
        .arg(&key)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("hv.connect: cannot open a control connection to host 127.0.0.1:1"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
