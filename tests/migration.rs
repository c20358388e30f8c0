//! Live migration between hosts on loopback. This test process is one host (its own
//! registry, and a peer server so VMs can come back); each destination is a
//! `luvisor serve --listen` process whose config script verifies every VM that arrives
//! (`dirty-verify`, printed) and sends it back here. The guests run `dirty`, which keeps
//! rewriting memory, so every migration moves a VM that changes under it.
//!
//! The fault rounds make destinations fail on purpose at seeded random points (the
//! hidden `LUVISOR_MIGRATION_FAULT`: the process exits as if killed, or drops the
//! connection) or cut the connection through a proxy after a random number of bytes.
//! After each round the VM must run in exactly one place with its memory intact.
//! `LUVISOR_MIGRATION_ROUNDS` and `LUVISOR_MIGRATION_SEED` change the rounds and the
//! seed (`bench/migration_faults.sh` runs 1000).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::{kvm_available, scratch_dir, TIMEOUT};
use luvisor_runtime::migration::{
    protocol, spawn_server, Arrival, MigrateOptions, PeerKey, ServerHandle, ServerHandlers,
};
use luvisor_runtime::storage::Disk;
use luvisor_runtime::{Registry, Vm, VmError, VmState};

/// How long anything in these tests may take before it counts as hung.
const LONG: Duration = Duration::from_secs(90);

/// The destination's config: verify each arrival, then send it back to
/// `LUVISOR_TEST_BACK` (when set) with the key in `LUVISOR_TEST_KEY`.
const DESTINATION_CONFIG: &str = r#"
local back = os.getenv("LUVISOR_TEST_BACK")
local key = os.getenv("LUVISOR_TEST_KEY")
hv.migration.on_arrival(function(vm, info)
  vm:send("dirty-verify\n")
  local line = vm:wait_for_console("dirty-verify:", { timeout = 60 })
  print("verified on destination: " .. line)
  io.stdout:flush()
  if back then
    -- Dirtying again while it moves back.
    vm:send("dirty 8 20\n")
    local r = vm:migrate(back, { key_file = key, timeout = 60 })
    print(("sent back: downtime %.2f ms"):format(r.downtime_ms))
    io.stdout:flush()
  end
end)
"#;

fn write_key(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(31) ^ byte).collect();
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// Lines a child printed (stdout and stderr), and a way to wait for one.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    added: Condvar,
}

impl Lines {
    fn read_from(self: &Arc<Self>, stream: impl Read + Send + 'static) {
        let lines = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                lines.lines.lock().unwrap().push(line);
                lines.added.notify_all();
            }
        });
    }

    /// The first line at index `from` or later that contains `text`, and its index.
    fn wait_for(&self, text: &str, from: usize) -> (String, usize) {
        let deadline = std::time::Instant::now() + LONG;
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some((i, line)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(text))
            {
                return (line.clone(), i);
            }
            let now = std::time::Instant::now();
            assert!(
                now < deadline,
                "no line with {text:?}; the peer printed:\n{}",
                lines.join("\n")
            );
            lines = self.added.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn all(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// A `luvisor serve --listen` destination.
struct Peer {
    child: Child,
    addr: String,
    lines: Arc<Lines>,
}

impl Peer {
    fn start(dir: &Path, key: &Path, back: Option<&str>, fault: Option<&str>) -> Peer {
        Peer::start_with(dir, key, back, fault, DESTINATION_CONFIG)
    }

    /// A destination whose config script is `script`.
    fn start_with(
        dir: &Path,
        key: &Path,
        back: Option<&str>,
        fault: Option<&str>,
        script: &str,
    ) -> Peer {
        let config = dir.join("destination.lua");
        std::fs::write(&config, script).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_luvisor"));
        command
            .args(["--log-level", "info", "serve"])
            .arg(&config)
            .args(["--listen", "127.0.0.1:0", "--key-file"])
            .arg(key)
            .env("LUVISOR_TEST_KEY", key)
            .env_remove("LUVISOR_MIGRATION_FAULT")
            .env_remove("LUVISOR_TEST_BACK")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(back) = back {
            command.env("LUVISOR_TEST_BACK", back);
        }
        if let Some(fault) = fault {
            command.env("LUVISOR_MIGRATION_FAULT", fault);
        }
        let mut child = command.spawn().expect("start luvisor serve");
        let lines = Arc::new(Lines::default());
        lines.read_from(child.stdout.take().unwrap());
        lines.read_from(child.stderr.take().unwrap());
        let (line, _) = lines.wait_for("listening on ", 0);
        let addr = line.rsplit(' ').next().unwrap().to_string();
        Peer { child, addr, lines }
    }

    /// Waits for the process to end; its exit code.
    fn wait_exit(&mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This process as a host: VMs, and a server for the ones that come back.
struct Home {
    registry: Arc<Registry>,
    server: ServerHandle,
    arrivals: Receiver<Arrival>,
    key: PeerKey,
}

impl Home {
    fn new(key_path: &Path) -> Home {
        let registry = Arc::new(Registry::new());
        let key = PeerKey::from_file(key_path).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let server = spawn_server(
            listener,
            key.clone(),
            registry.clone(),
            ServerHandlers::default(),
        )
        .unwrap();
        let arrivals = server.arrivals();
        Home {
            registry,
            server,
            arrivals,
            key,
        }
    }

    fn addr(&self) -> String {
        self.server.local_addr().to_string()
    }

    fn options(&self) -> MigrateOptions {
        let mut options = MigrateOptions::new(self.key.clone());
        options.timeout = Duration::from_secs(60);
        options
    }

    /// The VM that comes back from `peer`.
    fn wait_arrival(&self, name: &str, peer: &Peer) -> Arc<Vm> {
        let arrival = self.arrivals.recv_timeout(LONG).unwrap_or_else(|_| {
            panic!(
                "vm '{name}' did not come back; the peer printed:\n{}",
                peer.lines.all()
            )
        });
        assert_eq!(arrival.vm.name(), name);
        assert_eq!(arrival.vm.state(), VmState::Running);
        arrival.vm
    }
}

/// A VM that dirties 8 MiB at 20 MiB/s, with a disk, waiting for the first progress line.
fn dirtying_vm(home: &Home, name: &str, disk: Option<&Path>) -> Arc<Vm> {
    let mut config = common::builtin(name, "dirty 8 20; listen");
    if let Some(path) = disk {
        config.disks = vec![Arc::new(Disk::create_raw(path, 4 << 20).unwrap())];
    }
    let vm = home.registry.create(config).unwrap();
    vm.start().unwrap();
    vm.wait_for_console("dirty: pass", 0, TIMEOUT).unwrap();
    vm
}

/// Checks the guest's whole dirty region; returns the pass it is at. Leaves it
/// dirtying again.
fn verify(vm: &Vm) -> u64 {
    let from = vm.console().total();
    vm.send_input(b"dirty-verify\n").unwrap();
    let (line, _) = vm.wait_for_console("dirty-verify:", from, TIMEOUT).unwrap();
    assert!(line.contains("dirty-verify: ok"), "{line}");
    vm.send_input(b"dirty 8 20\n").unwrap();
    line.rsplit(' ').next().unwrap().trim().parse().unwrap()
}

/// Whether another opener can lock the image for writing (it cannot while a VM has it).
fn image_is_free(path: &Path) -> bool {
    Disk::open(path, false).is_ok()
}

#[test]
fn a_dirtying_vm_moves_to_another_host_and_back() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-round-trip");
    let key = write_key(&dir, "peer.key", 1);
    let home = Home::new(&key);
    let disk = dir.join("disk.img");
    let vm = dirtying_vm(&home, "traveller", Some(&disk));
    let from = vm.console().total();
    vm.send_input(b"blk-write 0 64 7\n").unwrap();
    vm.wait_for_console("blk-write 0 64 done", from, TIMEOUT)
        .unwrap();
    let pass_before = verify(&vm);
    let peer = Peer::start(&dir, &key, Some(&home.addr()), None);

    let mut iterations = Vec::new();
    let report = vm
        .migrate(&peer.addr, &home.options(), &mut |p| {
            iterations.push(p.iteration)
        })
        .expect("migrate");
    eprintln!("migrated: {report:?}");
    assert_eq!(vm.state(), VmState::Migrated);
    assert!(report.bytes_sent > 8 << 20, "the dirty region moved");
    assert!(report.iterations >= 2, "a full pass and a final one");
    assert!(!report.downtime.is_zero() && report.downtime <= report.total);
    assert_eq!(iterations.first(), Some(&0));
    let outcome = vm.outcome().unwrap();
    assert_eq!(
        luvisor_runtime::vm::describe_outcome(Some(&outcome)),
        format!("migrated to {}", peer.addr)
    );
    // A migrated VM is final: nothing more to do with it here.
    assert!(matches!(vm.pause(), Err(VmError::InvalidState { .. })));

    let (line, _) = peer.lines.wait_for("verified on destination", 0);
    assert!(line.contains("dirty-verify: ok"), "{line}");
    peer.lines.wait_for("arrived from", 0);

    let back = home.wait_arrival("traveller", &peer);
    // It replaced its `migrated` record here, and kept counting.
    assert_eq!(home.registry.list().len(), 1);
    let pass_after = verify(&back);
    assert!(pass_after >= pass_before, "{pass_after} < {pass_before}");
    peer.lines.wait_for("sent back: downtime", 0);
    // The disk came back with it, data and lock: the guest reads what it wrote before
    // it left, and nobody else can open the image for writing.
    let from = back.console().total();
    back.send_input(b"blk-verify 0 64 7\n").unwrap();
    let (line, _) = back
        .wait_for_console("blk-verify 0 64:", from, TIMEOUT)
        .unwrap();
    assert!(line.contains(": 0 mismatches"), "{line}");
    assert!(!image_is_free(&disk));
    back.stop();
    assert!(image_is_free(&disk));
}

/// The destination's config for a VM with an agent: exec in it, read its keys, send it
/// back.
const AGENT_DESTINATION_CONFIG: &str = r#"
local back = os.getenv("LUVISOR_TEST_BACK")
local key = os.getenv("LUVISOR_TEST_KEY")
hv.migration.on_arrival(function(vm, info)
  local r = vm:exec("kvp-get role; hello", { timeout = 60 })
  print(("exec on destination: code %d, %s"):format(r.code, r.stdout:gsub("\n", "|")))
  print("boot_id on destination: " .. tostring(vm.kvp.guest:get("boot_id")))
  io.stdout:flush()
  vm.kvp.host:set("visited", "yes")
  vm:migrate(back, { key_file = key, timeout = 60 })
  print("sent back")
  io.stdout:flush()
end)
"#;

/// A VM serving its agent channel goes to another host and back: exec answers on both,
/// the guest's boot id and both sides' keys travel with it, and the time is set again
/// after each move.
#[test]
fn a_vm_with_an_agent_answers_exec_after_migrating() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-agent");
    let key = write_key(&dir, "peer.key", 3);
    let home = Home::new(&key);
    let vm = home
        .registry
        .create(common::builtin("agent-traveller", ""))
        .unwrap();
    vm.kvp_host_set("role", "cache").unwrap();
    vm.start().unwrap();
    vm.wait_for_guest_kvp("ready", Some("1"), TIMEOUT).unwrap();
    let boot_id = vm.kvp_guest_get("boot_id").unwrap();
    let generation = vm.agent_stats().unwrap().time_generation;
    let peer = Peer::start_with(
        &dir,
        &key,
        Some(&home.addr()),
        None,
        AGENT_DESTINATION_CONFIG,
    );
    vm.migrate(&peer.addr, &home.options(), &mut |_| {})
        .expect("migrate");
    assert_eq!(vm.state(), VmState::Migrated);
    let (line, _) = peer.lines.wait_for("exec on destination", 0);
    assert!(
        line.contains("code 0, role=cache|hello from luvisor guest|"),
        "{line}"
    );
    let (line, _) = peer.lines.wait_for("boot_id on destination", 0);
    assert!(line.ends_with(&boot_id), "{line}");

    let back = home.wait_arrival("agent-traveller", &peer);
    let r = back.exec("kvp-get visited; kvp-get role", TIMEOUT).unwrap();
    assert_eq!(r.stdout, "visited=yes\nrole=cache\n");
    assert_eq!(back.kvp_guest_get("boot_id"), Some(boot_id));
    // Set on arrival there, and again here.
    assert!(back.agent_stats().unwrap().time_generation > generation);
    let out = back.shutdown(TIMEOUT).unwrap();
    assert_eq!(out.how, luvisor_runtime::agent::ShutdownHow::Graceful);
}

#[test]
fn a_wrong_key_is_refused_and_the_vm_stays() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-wrong-key");
    let right = write_key(&dir, "right.key", 1);
    let wrong = write_key(&dir, "wrong.key", 2);
    let home = Home::new(&wrong);
    let vm = dirtying_vm(&home, "stays", None);
    let peer = Peer::start(&dir, &right, None, None);
    let err = vm
        .migrate(&peer.addr, &home.options(), &mut |_| {})
        .unwrap_err();
    let text = luvisor_runtime::error_chain(&err);
    assert!(text.contains("authentication"), "{text}");
    assert!(text.contains("it goes on running here"), "{text}");
    assert_eq!(vm.state(), VmState::Running);
    verify(&vm);
    peer.lines.wait_for("it did not authenticate", 0);
    assert!(!peer.lines.all().contains("arrived"));
}

#[test]
fn a_vm_that_is_not_running_cannot_migrate_nor_one_to_its_own_host() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-refused");
    let key = write_key(&dir, "peer.key", 3);
    let home = Home::new(&key);
    let created = home
        .registry
        .create(common::builtin("never-started", "idle"))
        .unwrap();
    let err = created
        .migrate(&home.addr(), &home.options(), &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, VmError::InvalidState { .. }), "{err}");
    // Migrating to this very host: refused, it is here already.
    let vm = dirtying_vm(&home, "twin", None);
    let err = vm
        .migrate(&home.addr(), &home.options(), &mut |_| {})
        .unwrap_err();
    let text = luvisor_runtime::error_chain(&err);
    assert!(text.contains("is on this host already"), "{text}");
    assert_eq!(vm.state(), VmState::Running);
    verify(&vm);
}

#[test]
fn a_destination_that_stops_answering_times_out_and_the_vm_stays() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-hang");
    let key = write_key(&dir, "peer.key", 4);
    let home = Home::new(&key);
    let vm = dirtying_vm(&home, "patient", None);
    for fault in ["pages:1:hang", "ready:hang"] {
        let peer = Peer::start(&dir, &key, None, Some(fault));
        let mut options = home.options();
        options.timeout = Duration::from_secs(3);
        let err = vm.migrate(&peer.addr, &options, &mut |_| {}).unwrap_err();
        let text = luvisor_runtime::error_chain(&err);
        assert!(text.contains("it goes on running here"), "{fault}: {text}");
        assert_eq!(vm.state(), VmState::Running, "{fault}");
        verify(&vm);
        assert!(!peer.lines.all().contains("arrived"), "{fault}");
    }
}

#[test]
fn a_guest_dirtying_as_fast_as_it_can_moves_with_auto_converge() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-auto-converge");
    let key = write_key(&dir, "peer.key", 6);
    let home = Home::new(&key);
    // Rate 0: as fast as the guest can write, far more than the link carries.
    let mut config = common::builtin("busy", "dirty 8 0; listen");
    config.vcpus = 2;
    let vm = home.registry.create(config).unwrap();
    vm.start().unwrap();
    vm.wait_for_console("dirty: pass", 0, TIMEOUT).unwrap();
    let peer = Peer::start(&dir, &key, Some(&home.addr()), None);
    let mut options = home.options();
    options.auto_converge = true;
    options.max_downtime = Duration::from_millis(10);
    let mut throttles = Vec::new();
    let report = vm
        .migrate(&peer.addr, &options, &mut |p| throttles.push(p.throttle))
        .expect("migrate");
    eprintln!("migrated: {report:?}; throttle by pass: {throttles:?}");
    assert!(throttles.iter().all(|t| (0.0..=0.95).contains(t)));
    let (line, _) = peer.lines.wait_for("verified on destination", 0);
    assert!(line.contains("dirty-verify: ok"), "{line}");
    let back = home.wait_arrival("busy", &peer);
    verify(&back);
}

/// The destination's config for a VM that left its source paused: say in which state
/// it arrived, then let it run and verify it.
const PAUSED_DESTINATION_CONFIG: &str = r#"
hv.migration.on_arrival(function(vm, info)
  print("arrived in state " .. vm.state)
  io.stdout:flush()
  vm:resume()
  vm:send("dirty-verify\n")
  local line = vm:wait_for_console("dirty-verify:", { timeout = 60 })
  print("verified on destination: " .. line)
  io.stdout:flush()
end)
"#;

/// A paused VM is never resumed by its migration: when the migration fails (here after
/// STATE and READY, so the source must ask the destination what became of it) it stays
/// paused at the source, and when it succeeds it arrives paused.
#[test]
fn a_paused_vm_arrives_paused_and_stays_paused_when_its_migration_fails() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-paused");
    let key = write_key(&dir, "peer.key", 8);
    let home = Home::new(&key);
    let disk = dir.join("disk.img");
    let vm = dirtying_vm(&home, "sleeper", Some(&disk));
    verify(&vm);
    vm.pause().unwrap();

    let failing = Peer::start_with(
        &dir,
        &key,
        None,
        Some("ready:close"),
        PAUSED_DESTINATION_CONFIG,
    );
    let err = vm
        .migrate(&failing.addr, &home.options(), &mut |_| {})
        .unwrap_err();
    let text = luvisor_runtime::error_chain(&err);
    assert!(text.contains("(it stays paused here)"), "{text}");
    assert_eq!(vm.state(), VmState::Paused, "{text}");
    assert!(!image_is_free(&disk), "the disk lock was taken back");
    assert!(!failing.lines.all().contains("arrived in state"));

    let peer = Peer::start_with(&dir, &key, None, None, PAUSED_DESTINATION_CONFIG);
    let mut finals = 0;
    let report = vm
        .migrate(&peer.addr, &home.options(), &mut |p| {
            finals += usize::from(p.final_pass)
        })
        .expect("migrate");
    eprintln!("migrated paused: {report:?}");
    assert_eq!(vm.state(), VmState::Migrated);
    assert_eq!(finals, 1);
    let (line, at) = peer.lines.wait_for("arrived in state", 0);
    assert!(line.ends_with("arrived in state paused"), "{line}");
    let (line, _) = peer.lines.wait_for("verified on destination", at);
    assert!(line.contains("dirty-verify: ok"), "{line}");
}

/// Forwards the first connection to `first` and every later one (the source's
/// questions after a lost RUNNING) to `later`: someone on the path who redirects them.
struct SwitchingProxy {
    addr: String,
}

impl SwitchingProxy {
    fn start(first: String, later: String) -> SwitchingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                let target = if n == 0 { &first } else { &later };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let pair = Pair {
                    client,
                    server,
                    cuts: Arc::new(AtomicU64::new(0)),
                };
                pair.pump(true, None);
                pair.pump(false, None);
            }
        });
        SwitchingProxy { addr }
    }
}

/// RUNNING is lost (the destination drops the connection right after it started the
/// VM), and someone on the path sends the source's question to another host with the
/// same key, or back to the source's own listener. Either would say it does not know
/// the migration; the source must not take that for the destination's answer and
/// resume the VM, which runs at the destination: it leaves it paused and says why.
#[test]
fn a_question_that_reaches_another_instance_leaves_the_vm_paused_here() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-redirected-question");
    let key = write_key(&dir, "peer.key", 7);
    let home = Home::new(&key);
    let elsewhere = Peer::start(&dir, &key, None, None);
    for (round, redirect_to, expected) in [
        (0, elsewhere.addr.clone(), "not as instance"),
        (1, home.addr(), "this very luvisor process"),
    ] {
        let name = format!("doubted-{round}");
        let vm = dirtying_vm(&home, &name, None);
        let destination = Peer::start(&dir, &key, None, Some("started:close"));
        let proxy = SwitchingProxy::start(destination.addr.clone(), redirect_to.clone());
        let err = vm
            .migrate(&proxy.addr, &home.options(), &mut |_| {})
            .unwrap_err();
        let text = luvisor_runtime::error_chain(&err);
        eprintln!("question sent to {redirect_to}: {text}");
        assert!(text.contains("did not confirm"), "{text}");
        assert!(text.contains(expected), "{text}");
        assert!(text.contains("it is left paused here"), "{text}");
        // Not resumed here: it runs at the destination, and only there.
        assert_eq!(vm.state(), VmState::Paused, "{text}");
        let (line, _) = destination.lines.wait_for("verified on destination", 0);
        assert!(line.contains("dirty-verify: ok"), "{line}");
        assert!(destination.lines.all().contains("arrived from"));
        if round == 0 {
            // The other host was asked, and answered what it knows: nothing.
            elsewhere.lines.wait_for("answered a migration query", 0);
            assert!(!elsewhere.lines.all().contains("arrived from"));
        }
        // The operator's call: the copy here goes.
        vm.stop();
    }
}

/// A seeded xorshift: the rounds are the same on every run with one seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Where a proxy cuts the first connection it forwards (both ways at once).
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// After this many bytes.
    Bytes(u64),
    /// When a frame of this kind comes: after forwarding it whole, or only its
    /// header (then it never arrives complete).
    Frame { kind: u8, whole: bool },
}

/// The handshake's messages before the first frame, in bytes: client hello (44) and
/// proof (32) on the way to the server (the proof only after the challenge came
/// back); challenge (64) on the way back.
const HANDSHAKE_DOWN: &[usize] = &[44, 32];
const HANDSHAKE_UP: &[usize] = &[64];

/// Forwards connections to `target`; the first one is cut by `cut` in one direction.
/// Later connections (the source's questions) go through.
struct CuttingProxy {
    addr: String,
    cuts: Arc<AtomicU64>,
}

impl CuttingProxy {
    fn start(target: String, cut: Cut, towards_destination: bool) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let cuts = Arc::new(AtomicU64::new(0));
        let counter = cuts.clone();
        std::thread::spawn(move || {
            for (n, client) in listener.incoming().enumerate() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let limit = (n == 0).then_some(cut);
                let (down, up) = if towards_destination {
                    (limit, None)
                } else {
                    (None, limit)
                };
                let pair = Pair {
                    client,
                    server,
                    cuts: counter.clone(),
                };
                pair.pump(true, down);
                pair.pump(false, up);
            }
        });
        CuttingProxy { addr, cuts }
    }

    fn did_cut(&self) -> bool {
        self.cuts.load(Ordering::SeqCst) > 0
    }
}

/// Both ends of one proxied connection.
struct Pair {
    client: TcpStream,
    server: TcpStream,
    cuts: Arc<AtomicU64>,
}

impl Pair {
    /// Copies one direction (`down`: client to server); where `limit` says, shuts both
    /// connections down.
    fn pump(&self, down: bool, limit: Option<Cut>) {
        let (mut from, mut to) = if down {
            (
                self.client.try_clone().unwrap(),
                self.server.try_clone().unwrap(),
            )
        } else {
            (
                self.server.try_clone().unwrap(),
                self.client.try_clone().unwrap(),
            )
        };
        let both = (
            self.client.try_clone().unwrap(),
            self.server.try_clone().unwrap(),
        );
        let cuts = self.cuts.clone();
        let cut_now = move || {
            cuts.fetch_add(1, Ordering::SeqCst);
            let _ = both.0.shutdown(Shutdown::Both);
            let _ = both.1.shutdown(Shutdown::Both);
        };
        let limit = match limit {
            Some(Cut::Frame { kind, whole }) => {
                let handshake = if down { HANDSHAKE_DOWN } else { HANDSHAKE_UP };
                std::thread::spawn(move || {
                    cut_at_frame(&mut from, &mut to, handshake, kind, whole);
                    cut_now();
                });
                return;
            }
            Some(Cut::Bytes(n)) => Some(n),
            None => None,
        };
        std::thread::spawn(move || {
            let mut done = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let want = match limit {
                    Some(limit) if done >= limit => {
                        cut_now();
                        return;
                    }
                    Some(limit) => buf.len().min((limit - done) as usize),
                    None => buf.len(),
                };
                let n = match from.read(&mut buf[..want]) {
                    Ok(0) | Err(_) => {
                        let _ = to.shutdown(Shutdown::Write);
                        return;
                    }
                    Ok(n) => n,
                };
                if to.write_all(&buf[..n]).is_err() {
                    let _ = from.shutdown(Shutdown::Read);
                    return;
                }
                done += n as u64;
            }
        });
    }
}

/// Forwards the handshake, then frame by frame until a frame of `kind`, which goes
/// whole or only its header; returns then (the caller cuts). Returns early if the
/// stream ends.
fn cut_at_frame(
    from: &mut TcpStream,
    to: &mut TcpStream,
    handshake: &[usize],
    kind: u8,
    whole: bool,
) {
    fn copy(from: &mut TcpStream, to: &mut TcpStream, len: usize) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; len];
        from.read_exact(&mut buf).ok()?;
        to.write_all(&buf).ok()?;
        Some(buf)
    }
    for &message in handshake {
        if copy(from, to, message).is_none() {
            return;
        }
    }
    loop {
        let Some(header) = copy(from, to, 5) else {
            return;
        };
        let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
        if header[4] == kind && !whole {
            return;
        }
        // The payload (after the kind byte) and the 32-byte tag.
        if copy(from, to, len.saturating_sub(1) + 32).is_none() || header[4] == kind {
            return;
        }
    }
}

/// What one fault round does.
#[derive(Debug, Clone)]
enum Plan {
    /// The destination fails on purpose (`POINT:ACTION`).
    Fault(String),
    /// A proxy cuts the connection, towards the destination or back.
    Cut { cut: Cut, towards_destination: bool },
}

const FAULT_POINTS: &[&str] = &[
    "hello", "pages:1", "pages:2", "pages:4", "pages:9", "state", "built", "ready", "go", "started",
];

/// Frame cuts around the hand-over: (kind, whole, towards the destination).
const FRAME_CUTS: &[(u8, bool, bool)] = &[
    (protocol::KIND_STATE, false, true),
    (protocol::KIND_STATE, true, true),
    (protocol::KIND_GO, false, true),
    (protocol::KIND_GO, true, true),
    (protocol::KIND_ACCEPT, false, false),
    (protocol::KIND_READY, false, false),
    (protocol::KIND_RUNNING, false, false),
];

/// Round `round`'s plan: first every fault point with every action once and every
/// frame cut, then seeded random faults and cuts.
fn plan(round: u64, rng: &mut Rng) -> Plan {
    let faults = FAULT_POINTS.len() as u64 * 2;
    if round < faults {
        let point = FAULT_POINTS[(round / 2) as usize];
        let action = if round.is_multiple_of(2) {
            "exit"
        } else {
            "close"
        };
        return Plan::Fault(format!("{point}:{action}"));
    }
    if round < faults + FRAME_CUTS.len() as u64 {
        let (kind, whole, towards_destination) = FRAME_CUTS[(round - faults) as usize];
        return Plan::Cut {
            cut: Cut::Frame { kind, whole },
            towards_destination,
        };
    }
    if rng.below(2) == 0 {
        let towards_destination = rng.below(4) != 0;
        let cut = if rng.below(2) == 0 {
            let (kind, whole, towards) = FRAME_CUTS[rng.below(FRAME_CUTS.len() as u64) as usize];
            return Plan::Cut {
                cut: Cut::Frame { kind, whole },
                towards_destination: towards,
            };
        } else if towards_destination {
            // The migration sends some 10 MB; past its end nothing is cut.
            Cut::Bytes(rng.below(12 << 20))
        } else {
            // The destination says little: the handshake (64 bytes), ACCEPT, READY
            // and RUNNING (about 40 each).
            Cut::Bytes(rng.below(170))
        };
        Plan::Cut {
            cut,
            towards_destination,
        }
    } else {
        let point = FAULT_POINTS[rng.below(FAULT_POINTS.len() as u64) as usize];
        let action = if rng.below(2) == 0 { "exit" } else { "close" };
        Plan::Fault(format!("{point}:{action}"))
    }
}

#[test]
fn faults_at_random_points_leave_the_vm_in_exactly_one_place() {
    if !kvm_available() {
        return;
    }
    let rounds: u64 = std::env::var("LUVISOR_MIGRATION_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(36);
    let seed: u64 = std::env::var("LUVISOR_MIGRATION_SEED")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0x5EED_1234_ABCD_0042);
    eprintln!("{rounds} rounds, seed {seed:#x}");
    let dir = scratch_dir("migration-faults");
    let key = write_key(&dir, "peer.key", 5);
    let home = Home::new(&key);
    let disk = dir.join("disk.img");
    let mut vm = dirtying_vm(&home, "survivor", Some(&disk));
    let mut rng = Rng(seed | 1);
    let mut pass = verify(&vm);
    let (mut moved, mut stayed) = (0, 0);
    for round in 0..rounds {
        let plan = plan(round, &mut rng);
        let fault = match &plan {
            Plan::Fault(f) => Some(f.as_str()),
            Plan::Cut { .. } => None,
        };
        let mut peer = Peer::start(&dir, &key, Some(&home.addr()), fault);
        let proxy = match &plan {
            Plan::Cut {
                cut,
                towards_destination,
            } => Some(CuttingProxy::start(
                peer.addr.clone(),
                *cut,
                *towards_destination,
            )),
            Plan::Fault(_) => None,
        };
        let target = proxy.as_ref().map_or(peer.addr.clone(), |p| p.addr.clone());
        let result = vm.migrate(&target, &home.options(), &mut |_| {});
        let what = format!("round {round} ({plan:?})");
        eprintln!("{what}");
        match result {
            Ok(_) => {
                // The VM runs there: it is verified there and comes back.
                assert_eq!(vm.state(), VmState::Migrated, "{what}");
                let (line, _) = peer.lines.wait_for("verified on destination", 0);
                assert!(line.contains("dirty-verify: ok"), "{what}: {line}");
                vm = home.wait_arrival("survivor", &peer);
                moved += 1;
            }
            Err(e) => {
                let text = luvisor_runtime::error_chain(&e);
                eprintln!("{what}: {text}");
                assert!(text.contains("it goes on running here"), "{what}: {text}");
                assert_eq!(vm.state(), VmState::Running, "{what}: {text}");
                // The disk is this VM's again.
                assert!(
                    !image_is_free(&disk),
                    "{what}: the disk lock was not taken back"
                );
                stayed += 1;
                let exited = matches!(&plan, Plan::Fault(f) if f.ends_with(":exit"));
                if exited {
                    // The destination is gone, and whatever it had with it.
                    assert_eq!(peer.wait_exit(), Some(101), "{what}: {}", peer.lines.all());
                } else {
                    // It lives and holds no copy: the same VM is accepted there now.
                    let seen = peer.lines.count();
                    assert!(
                        !peer.lines.all().contains("arrived from"),
                        "{what}: it ran on the destination too:\n{}",
                        peer.lines.all()
                    );
                    vm.migrate(&peer.addr, &home.options(), &mut |_| {})
                        .unwrap_or_else(|e| {
                            panic!(
                                "{what}: the retry failed: {}",
                                luvisor_runtime::error_chain(&e)
                            )
                        });
                    peer.lines.wait_for("verified on destination", seen);
                    vm = home.wait_arrival("survivor", &peer);
                }
            }
        }
        if let Some(proxy) = &proxy {
            eprintln!("{what}: cut: {}", proxy.did_cut());
        }
        let now = verify(&vm);
        assert!(now >= pass, "{what}: pass went back from {pass} to {now}");
        pass = now;
    }
    eprintln!("{moved} rounds moved the VM, {stayed} kept it at the source");
    assert!(
        moved > 0 && stayed > 0,
        "both outcomes happen: {moved} moved, {stayed} stayed"
    );
}
