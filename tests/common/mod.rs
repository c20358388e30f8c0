//! Helpers shared by the VM tests: they need a real `/dev/kvm`.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use luvisor_runtime::{GuestSpec, Registry, Vm, VmConfig};

/// True when VM tests can run. In CI (`CI=true`) a missing or unusable `/dev/kvm` is a
/// failure; elsewhere the test is skipped with a message.
pub fn kvm_available() -> bool {
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

#[allow(unused_imports)] // not every test binary checks images with QEMU's tools
pub use luvisor_runtime::storage::test_tools::tool_available as qemu_tool_available;

pub fn builtin(name: &str, cmdline: &str) -> VmConfig {
    let mut config = VmConfig::new(
        name,
        GuestSpec::Builtin {
            cmdline: cmdline.into(),
        },
    );
    config.memory = 64 << 20;
    config
}

pub fn start(registry: &Registry, name: &str, cmdline: &str) -> Arc<Vm> {
    let vm = registry.create(builtin(name, cmdline)).expect("create vm");
    vm.start().expect("start vm");
    vm
}

pub const TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh scratch directory for one test.
pub fn scratch_dir(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("luvisor-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Checks `count` sectors from `start` of a flat image against the guest's pattern;
/// returns the sectors that differ.
pub fn pattern_mismatches(image: &[u8], start: u64, count: u64, seed: u64) -> Vec<u64> {
    use luvisor_guest_abi::pattern::{check_sector, SECTOR};
    (start..start + count)
        .filter(|&s| {
            let at = s as usize * SECTOR;
            !check_sector(seed, s, &image[at..at + SECTOR])
        })
        .collect()
}

/// Runs `luvisor run` on a script body; returns (exit code, stdout, stderr).
pub fn run_script(
    dir: &std::path::Path,
    name: &str,
    body: &str,
    args: &[&str],
) -> (Option<i32>, String, String) {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("run")
        .arg(&path)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run luvisor");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
