//! Pause really quiesces the machine: with I/O in flight, nothing in guest memory
//! changes between two looks at a paused VM.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{builtin, kvm_available, scratch_dir};
use luvisor_runtime::storage::Disk;
use luvisor_runtime::Registry;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryRegion};

const TIMEOUT: Duration = Duration::from_secs(20);

/// A hash of every byte of guest RAM.
fn digest(vm: &luvisor_runtime::Vm) -> u64 {
    vm.with_memory(|mem| {
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        let mut page = vec![0u8; 1 << 20];
        for region in mem.iter() {
            let mut at = 0;
            while at < region.len() {
                let n = (region.len() - at).min(page.len() as u64) as usize;
                mem.read_slice(&mut page[..n], region.start_addr().unchecked_add(at))
                    .unwrap();
                for chunk in page[..n].chunks_exact(8) {
                    hash = (hash ^ u64::from_le_bytes(chunk.try_into().unwrap()))
                        .wrapping_mul(0x100_0000_01b3);
                }
                at += n as u64;
            }
        }
        hash
    })
    .expect("the VM has a machine")
}

#[test]
fn a_paused_vm_changes_nothing_even_with_io_in_flight() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("quiesce");
    let disk = Arc::new(Disk::create_raw(&dir.join("a.img"), 16 << 20).unwrap());
    let reg = Registry::new();
    let mut config = builtin("quiesce", "blk-bench rand read 4 30");
    config.memory = 32 << 20;
    config.disks = vec![disk];
    let vm = reg.create(config).unwrap();
    vm.start().unwrap();
    // Wait until requests flow: the device keeps writing read data into guest memory.
    let busy = |vm: &luvisor_runtime::Vm| vm.config().disks[0].stats().snapshot().reads;
    let deadline = std::time::Instant::now() + TIMEOUT;
    while busy(&vm) < 1000 {
        assert!(std::time::Instant::now() < deadline, "the guest never read");
        std::thread::sleep(Duration::from_millis(5));
    }
    for _ in 0..3 {
        vm.pause().unwrap();
        let reads = busy(&vm);
        let first = digest(&vm);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(digest(&vm), first, "guest memory changed while paused");
        assert_eq!(busy(&vm), reads, "the device served requests while paused");
        vm.resume().unwrap();
        let resumed_at = busy(&vm);
        while busy(&vm) < resumed_at + 100 {
            assert!(std::time::Instant::now() < deadline, "I/O did not resume");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    vm.stop();
    std::fs::remove_dir_all(&dir).unwrap();
}
