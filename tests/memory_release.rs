//! `stop` frees guest memory and vCPU threads: after 20 create/touch/stop cycles the
//! process is back near its baseline. One test in its own binary, so no other test's
//! VMs disturb the measurement.

mod common;

use std::time::Duration;

use common::*;
use luvisor_runtime::host::process_rss;
use luvisor_runtime::Registry;

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs one VM that touches 32 MiB, and returns the process RSS while it was running.
fn cycle(reg: &Registry, i: usize) -> u64 {
    let vm = start(reg, &format!("cycle-{i}"), "touch 32; idle");
    vm.wait_for_console("touched 32 MiB", 0, TIMEOUT).unwrap();
    let running = process_rss();
    vm.stop();
    assert!(reg.destroy(vm.id()));
    running
}

#[test]
fn stop_frees_memory_and_threads() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    cycle(&reg, 0); // warm up: signal handler, KVM handle, allocator arenas
    std::thread::sleep(Duration::from_millis(50));
    let baseline_rss = process_rss();
    let baseline_threads = thread_count();
    let mut peak = 0;
    for i in 1..=20 {
        peak = peak.max(cycle(&reg, i));
    }
    let rss = process_rss();
    let threads = thread_count();
    println!(
        "rss: baseline {} KiB, after 20 cycles {} KiB, peak while running {} KiB",
        baseline_rss >> 10,
        rss >> 10,
        peak >> 10
    );
    assert!(
        peak >= baseline_rss + (32 << 20),
        "a running VM's touched memory shows in RSS (peak {peak})"
    );
    // 20 cycles touch 640 MiB in all; what stays must be far below a single VM's 32 MiB.
    assert!(
        rss < baseline_rss + (16 << 20),
        "RSS grew from {baseline_rss} to {rss} bytes"
    );
    assert_eq!(threads, baseline_threads, "vCPU and event threads are gone");
    assert!(reg.list().is_empty());
}
