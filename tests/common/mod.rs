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
