//! A migration triggered by a policy: two `luvisor serve` hosts on loopback run the
//! shipped `policies/migrate_on_pressure.lua`; memory pressure is induced on one (its
//! reserve set to all of its memory), its VM moves to the other, and does not come back.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{kvm_available, scratch_dir};
use luvisor_runtime::migration::PeerKey;
use luvisor_runtime::remote::client::RemoteHost;

const CONFIG: &str = r#"
-- A serve host for the policy test: its peer, an optional VM, optional pressure.
hv.hosts{ { name = "peer", addr = os.getenv("LUVISOR_TEST_PEER"), key_file = os.getenv("LUVISOR_TEST_KEY") } }
if os.getenv("LUVISOR_TEST_VM") then
  local vm = hv.vm{ name = "web", memory = "64M", guest = hv.guest.builtin{ cmdline = "count 200" } }
  vm:start()
end
if os.getenv("LUVISOR_TEST_PRESSURE") then
  -- Keep all of the host's memory for itself: the VMs are "using" what it lacks.
  hv.host{ memory_reserve = hv.host().memory_total }
end
hv.policy.load(os.getenv("LUVISOR_TEST_POLICY"))
"#;

struct Host {
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

fn start(dir: &Path, key: &Path, listen: &str, peer: &str, vm: bool, pressure: bool) -> Host {
    let config = dir.join("host.lua");
    std::fs::write(&config, CONFIG).unwrap();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/migrate_on_pressure.lua");
    let mut command = Command::new(env!("CARGO_BIN_EXE_luvisor"));
    command
        .args(["--log-level", "info", "serve"])
        .arg(&config)
        .args(["--listen", listen, "--key-file"])
        .arg(key)
        .env("LUVISOR_TEST_PEER", peer)
        .env("LUVISOR_TEST_KEY", key)
        .env("LUVISOR_TEST_POLICY", &policy)
        .current_dir(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if vm {
        command.env("LUVISOR_TEST_VM", "1");
    }
    if pressure {
        command.env("LUVISOR_TEST_PRESSURE", "1");
    }
    let mut child = command.spawn().expect("start luvisor serve");
    let output = Arc::new(Mutex::new(Vec::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                output.lock().unwrap().push(line);
            }
        });
    }
    Host { child, output }
}

/// The state of vm `web` on the host at `addr`, if it has one.
fn web_state(addr: &str, key: &PeerKey) -> Option<String> {
    let mut host = RemoteHost::connect(addr, key.clone(), Duration::from_secs(5)).ok()?;
    let vms = host.list_vms().ok()?;
    vms.into_iter().find(|v| v.name == "web").map(|v| v.state)
}

#[test]
fn pressure_moves_a_vm_to_the_peer_and_it_does_not_come_back() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("migration-policy");
    let key_path = dir.join("key");
    std::fs::write(&key_path, [7u8; 32]).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = PeerKey::from_file(&key_path).unwrap();
    let (a_addr, b_addr) = (free_port(), free_port());
    let b = start(&dir, &key_path, &b_addr, &a_addr, false, false);
    let a = start(&dir, &key_path, &a_addr, &b_addr, true, true);
    let dump = |what: &str| {
        format!(
            "{what}\n--- host a:\n{}\n--- host b:\n{}",
            a.output.lock().unwrap().join("\n"),
            b.output.lock().unwrap().join("\n")
        )
    };

    // The policy holds the pressure for its hold ticks, then moves the VM.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if web_state(&b_addr, &key).as_deref() == Some("running") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            dump("the VM never reached host b")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(
        web_state(&a_addr, &key).as_deref(),
        Some("migrated"),
        "{}",
        dump("host a")
    );

    // Host a's policy status records the migration with the report a local
    // `vm:migrate` returns (its record is written when the migration call returns,
    // just after the VM runs on b).
    let report = loop {
        let report = RemoteHost::connect(&a_addr, key.clone(), Duration::from_secs(5))
            .and_then(|mut host| host.policies())
            .ok()
            .and_then(|statuses| {
                statuses
                    .as_array()?
                    .iter()
                    .flat_map(|s| s["migrations"].as_array().cloned().unwrap_or_default())
                    .find_map(|m| m.get("report").filter(|r| r.is_object()).cloned())
            });
        if let Some(report) = report {
            break report;
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            dump("no migration report in host a's policy status")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for field in [
        "downtime_ms",
        "total_ms",
        "bytes_sent",
        "iterations",
        "pages_sent",
        "zero_pages",
        "final_pages",
        "mbps",
        "throttle",
        "destination_build_ms",
    ] {
        assert!(report.get(field).is_some(), "no {field} in {report}");
    }

    // Host b is not under pressure, and host a's policy has nothing left to move: the VM
    // stays where it went for longer than both policies' hold time.
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(
        web_state(&b_addr, &key).as_deref(),
        Some("running"),
        "{}",
        dump("host b")
    );
    assert_eq!(
        web_state(&a_addr, &key).as_deref(),
        Some("migrated"),
        "{}",
        dump("host a")
    );
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
