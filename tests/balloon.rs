//! virtio-balloon on real VMs: the built-in guest's driver holds the guest down to its
//! target from boot, follows a new target both ways, sends statistics, reports freed
//! pages so the host's resident memory falls without any target change, and a
//! snapshot of a ballooned VM restores ballooned.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use luvisor_runtime::vm::dynamic_memory::MemoryKnobs;
use luvisor_runtime::vm::SnapshotOptions;
use luvisor_runtime::{Registry, Vm};

const MIB: u64 = 1 << 20;

fn dynamic(name: &str, cmdline: &str, startup: u64) -> luvisor_runtime::VmConfig {
    let mut config = builtin(name, cmdline);
    let knobs = MemoryKnobs {
        startup,
        min: 32 * MIB,
        max: 256 * MIB,
        ..MemoryKnobs::fixed(256 * MIB)
    };
    config.memory = knobs.max;
    config.dynamic_memory = Some(knobs);
    config
}

/// Waits until `what` holds, looking again whenever the guest may have moved (this is a
/// wait for an event, with TIMEOUT only as the point to give up).
fn wait_until(vm: &Vm, what: &str, mut done: impl FnMut(&Vm) -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !done(vm) {
        assert!(
            Instant::now() < deadline,
            "vm '{}' never reached: {what}; it holds {} bytes, console: {:?}",
            vm.name(),
            vm.balloon_status().held_bytes(),
            vm.console().text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_held(vm: &Vm, bytes: u64) {
    wait_until(vm, &format!("the balloon holds {bytes} bytes"), |vm| {
        vm.balloon_status().held_bytes() == bytes
    });
}

fn start_dynamic(reg: &Registry, name: &str, cmdline: &str, startup: u64) -> Arc<Vm> {
    let vm = reg.create(dynamic(name, cmdline, startup)).unwrap();
    vm.start().unwrap();
    vm
}

#[test]
fn the_balloon_holds_the_guest_to_its_target_and_follows_it() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start_dynamic(&reg, "follow", "idle", 64 * MIB);
    // At boot the guest sees 256M and the balloon holds it down to 64M.
    wait_held(&vm, 192 * MIB);
    assert_eq!(vm.memory_size(), 64 * MIB);
    assert!(
        vm.memory_resident() < 64 * MIB,
        "the ballooned pages are not resident"
    );
    // Up: the balloon gives pages back.
    let applied = vm.set_memory_target(160 * MIB, "test").unwrap();
    assert_eq!(applied.applied, 160 * MIB);
    wait_held(&vm, 96 * MIB);
    assert_eq!(vm.memory_size(), 160 * MIB);
    // Down to min, and a request below min is clamped to it.
    let applied = vm.set_memory_target(MIB, "test").unwrap();
    assert!(applied.clamped);
    wait_held(&vm, 224 * MIB);
    assert_eq!(vm.memory_size(), 32 * MIB);
    // All the way up: the balloon is empty.
    vm.set_memory_target(256 * MIB, "test").unwrap();
    wait_held(&vm, 0);
    assert_eq!(vm.memory_size(), 256 * MIB);
    vm.stop();
}

#[test]
fn the_guest_sends_memory_statistics() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start_dynamic(&reg, "stats", "idle", 64 * MIB);
    wait_held(&vm, 192 * MIB);
    vm.set_memory_stats_period(Duration::from_millis(100))
        .unwrap();
    // Statistics that describe the ballooned guest: 64M in all, most of it free.
    wait_until(&vm, "statistics of the ballooned guest", |vm| {
        vm.memory_stats().is_some_and(|s| s.total == Some(64 * MIB))
    });
    let stats = vm.memory_stats().unwrap();
    let free = stats.free.unwrap();
    assert!(free > 32 * MIB && free < 64 * MIB, "{stats:?}");
    assert_eq!(stats.available, Some(free));
    assert_eq!(stats.swap_in, Some(0));
    // They keep coming: after a target change the total follows.
    vm.set_memory_target(128 * MIB, "test").unwrap();
    wait_until(&vm, "statistics after the target change", |vm| {
        vm.memory_stats()
            .is_some_and(|s| s.total == Some(128 * MIB))
    });
    assert!(vm
        .set_memory_stats_period(Duration::from_millis(1))
        .is_err());
    vm.stop();
}

#[test]
fn freed_guest_memory_is_reported_and_released() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    // startup = max: the balloon holds nothing, so touch has room.
    let vm = start_dynamic(&reg, "report", "touch 100; idle", 256 * MIB);
    vm.wait_for_console("touched 100 MiB", 0, TIMEOUT).unwrap();
    // touch gave its pages back to the guest's pool; the driver reports them free and
    // the host releases them, with no target change.
    wait_until(&vm, "the touched memory is released", |vm| {
        vm.memory_resident() < 32 * MIB
    });
    assert_eq!(
        vm.balloon_status().held_bytes(),
        0,
        "reported pages are not held"
    );
    assert_eq!(vm.memory_target(), 256 * MIB);
    vm.stop();
}

#[test]
fn mem_demand_follows_its_profile() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start_dynamic(&reg, "demand", "mem-demand 8M@0,40M@100,16M@200", 64 * MIB);
    let mut at = 0;
    for line in ["mem-demand 8M", "mem-demand 40M", "mem-demand 16M"] {
        at = vm.wait_for_console(line, at, TIMEOUT).unwrap().1;
    }
    // The guest now holds 16M; the freed 24M are reported, and the stats see it.
    vm.set_memory_stats_period(Duration::from_millis(100))
        .unwrap();
    wait_until(&vm, "statistics after the profile", |vm| {
        vm.memory_stats()
            .is_some_and(|s| s.free.is_some_and(|f| f < 48 * MIB))
    });
    // More than the target leaves: the guest takes pages back from the balloon
    // (DEFLATE_ON_OOM), and the host sees the balloon shrink.
    vm.stop();
    let vm = start_dynamic(&reg, "demand-oom", "mem-demand 100M@0", 64 * MIB);
    let (line, _) = vm.wait_for_console("mem-demand 100M", 0, TIMEOUT).unwrap();
    assert_eq!(line.trim(), "mem-demand 100M", "not short");
    assert!(vm.memory_size() >= 100 * MIB, "{}", vm.memory_size());
    vm.stop();
}

#[test]
fn a_ballooned_vm_restores_ballooned() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("balloon-snapshot");
    let reg = Registry::new();
    let vm = start_dynamic(&reg, "snap", "idle", 64 * MIB);
    wait_held(&vm, 192 * MIB);
    vm.set_memory_target(96 * MIB, "test").unwrap();
    wait_held(&vm, 160 * MIB);
    let snap = dir.join("snap");
    vm.snapshot(
        &snap,
        &SnapshotOptions {
            stop: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(reg.destroy(vm.id()));

    let restored = reg.restore(&snap, Some("restored")).unwrap();
    assert_eq!(restored.balloon_status().held_bytes(), 160 * MIB);
    assert_eq!(restored.memory_size(), 96 * MIB);
    assert_eq!(restored.memory_target(), 96 * MIB);
    assert!(restored.memory_resident() < 96 * MIB);
    // The restored guest's driver goes on following the target.
    restored.set_memory_target(200 * MIB, "test").unwrap();
    wait_held(&restored, 56 * MIB);
    restored.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
