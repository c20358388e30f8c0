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

/// A diff snapshot holds only the pages the guest changed, and its base plus the diff
/// make exactly the memory a full snapshot taken at the same moment holds.
#[test]
fn a_diff_on_its_base_is_the_full_snapshot() {
    if !kvm_available() {
        return;
    }
    use luvisor_runtime::snapshot::file::SnapshotState;
    use luvisor_runtime::vm::SnapshotOptions;
    use luvisor_runtime::vstate::memory::{apply_ram_diff, create_ram_with, MemoryBacking};

    let dir = scratch_dir("diff-equals-full");
    let reg = Registry::new();
    let mut config = builtin("diff", "touch 8; listen");
    config.memory = 64 << 20;
    let vm = reg.create(config).unwrap();
    vm.start().unwrap();
    vm.wait_for_console("listening", 0, TIMEOUT).unwrap();
    let shared = |base: Option<&std::path::Path>| SnapshotOptions {
        base: base.map(|b| b.to_path_buf()),
        shared_disks: true,
        ..Default::default()
    };
    let base = dir.join("base");
    let full_base = vm.snapshot(&base, &shared(None)).unwrap();
    vm.send_input(b"touch 4\n").unwrap();
    vm.wait_for_console("touched 4 MiB", 0, TIMEOUT).unwrap();
    // Paused across both, so they see the same memory.
    vm.pause().unwrap();
    let diff = vm
        .snapshot(&dir.join("diff"), &shared(Some(&base)))
        .unwrap();
    let full = vm.snapshot(&dir.join("full"), &shared(None)).unwrap();
    vm.stop();
    assert!(diff.diff && !full.diff);
    // The guest rewrote 4 MiB (1024 pages) plus a few pages of its own bookkeeping.
    assert!(
        (1024..1024 + 64).contains(&diff.memory_pages),
        "the diff holds {} pages",
        diff.memory_pages
    );
    assert!(full.memory_pages >= full_base.memory_pages);

    let size = 64 << 20;
    let from_diff = create_ram_with(
        size,
        MemoryBacking::file_private(&base.join("memory"), 0).unwrap(),
    )
    .unwrap();
    let state = SnapshotState::read(&dir.join("diff")).unwrap();
    let pages = &state.memory.diff.as_ref().expect("a diff").pages;
    let diff_file = std::fs::File::open(dir.join("diff").join("memory")).unwrap();
    apply_ram_diff(&from_diff, &diff_file, pages).unwrap();
    let from_full = create_ram_with(
        size,
        MemoryBacking::file_private(&dir.join("full").join("memory"), 0).unwrap(),
    )
    .unwrap();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for region in from_full.iter() {
        let mut at = 0;
        while at < region.len() {
            let addr = region.start_addr().unchecked_add(at);
            from_full.read_slice(&mut a, addr).unwrap();
            from_diff.read_slice(&mut b, addr).unwrap();
            assert!(
                a == b,
                "memory differs in the MiB at {:#x}",
                addr.raw_value()
            );
            at += a.len() as u64;
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
