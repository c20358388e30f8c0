//! A run of `luvisor test` cancelled while a test holds a running VM and an overlay (what
//! Ctrl-C does): nothing is left behind, not even a thread. Its own test binary, so that
//! no other test's threads come and go while it counts them.

use std::path::Path;
use std::sync::Arc;

use luvisor_lua::testing::{self, report::Silent, Cancel, FailureKind, Outcome};
use luvisor_runtime::{GuestSpec, Registry, VmConfig};

/// True when VM tests can run; in CI (`CI=true`) a missing /dev/kvm is a failure.
fn kvm_available() -> bool {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("/dev/kvm is missing or not accessible, and VM tests must run in CI");
        }
        eprintln!("skipping: /dev/kvm is missing or not accessible");
    }
    usable
}

/// The names of this process's threads, for messages.
fn thread_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    names.sort();
    names
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("Threads: in /proc/self/status")
}

/// Boots and destroys one VM, so that the process-wide threads a first VM starts (the
/// VM preparer) are there before the count.
fn warm_up() {
    let registry = Registry::new();
    let mut config = VmConfig::new(
        "warm-up",
        GuestSpec::Builtin {
            cmdline: "exit 0".into(),
        },
    );
    config.memory = 16 << 20;
    let vm = registry.create(config).unwrap();
    vm.start().unwrap();
    vm.wait(std::time::Duration::from_secs(20)).unwrap();
    registry.destroy(vm.id());
}

#[test]
fn a_cancelled_run_leaves_no_vms_overlays_or_threads() {
    if !kvm_available() {
        return;
    }
    warm_up();
    let before = threads();
    let names_before = thread_names();
    let dir = std::env::temp_dir().join(format!("luvisor-runner-cancel-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let overlay = dir.join("held.qcow2");
    let file = dir.join("cancelled.lua");
    std::fs::write(
        &file,
        format!(
            r#"
local base = hv.disk.create{{ path = "{dir}/base.img", size = "4M" }}
describe("a run", function()
  it("is cancelled while a VM runs", function()
    local overlay = hv.disk.overlay{{ base = base, path = "{overlay}" }}
    local vm = hv.vm{{ name = "held", vcpus = 2, memory = "16M", disks = {{ overlay }},
                      guest = hv.guest.builtin{{ cmdline = "idle" }} }}
    vm:start()
    cancel_run()
    -- Catching the interruption does not keep the test going.
    while true do pcall(hv.sleep, 600) end
  end)
  it("never runs", function() end)
end)
"#,
            dir = dir.display(),
            overlay = overlay.display()
        ),
    )
    .unwrap();
    let cancel = Cancel::new();
    let from_lua = cancel.clone();
    let options = testing::Options {
        cancel,
        // Cancel::cancel is what the Ctrl-C handler of `luvisor test` calls.
        setup: Some(Arc::new(move |lua: &mlua::Lua| {
            let cancel = from_lua.clone();
            lua.globals().set(
                "cancel_run",
                lua.create_function(move |_, ()| {
                    cancel.cancel();
                    Ok(())
                })?,
            )
        })),
        ..testing::Options::default()
    };
    let report = testing::run(std::slice::from_ref(&file), &options, &mut Silent);
    assert!(report.interrupted);
    let tests = &report.files[0].tests;
    assert_eq!(tests.len(), 1, "{tests:?}");
    match &tests[0].outcome {
        Outcome::Failed(f) => assert_eq!(f.kind, FailureKind::Interrupted, "{f:?}"),
        other => panic!("the cancelled test ended {other:?}"),
    }
    assert!(!overlay.exists(), "the overlay made in the test is removed");
    assert!(Path::new(&dir).join("base.img").exists());
    assert_eq!(
        threads(),
        before,
        "every thread of the run and its VM ended: before {names_before:?}, now {:?}",
        thread_names()
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
