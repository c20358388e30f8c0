//! virtio-blk on real VMs: guest writes checked from the host, overlays, read-only
//! disks, discard and write-zeroes, serials, locks and host I/O errors.

mod common;

use std::path::Path;
use std::sync::Arc;

use common::*;
use luvisor_guest_abi::pattern::SECTOR;
use luvisor_runtime::storage::{Disk, DiskFormat, OpenOptions};
use luvisor_runtime::{Registry, Vm, VmOutcome};

fn vm_with_disks(reg: &Registry, name: &str, cmdline: &str, disks: Vec<Arc<Disk>>) -> Arc<Vm> {
    let mut config = builtin(name, cmdline);
    config.memory = 32 << 20;
    config.disks = disks;
    let vm = reg.create(config).expect("create vm");
    vm.start().expect("start vm");
    vm
}

/// Runs a VM to its end and returns its console; panics unless it exits with `code`.
fn run_to_end(
    reg: &Registry,
    name: &str,
    cmdline: &str,
    disks: Vec<Arc<Disk>>,
    code: u32,
) -> String {
    let vm = vm_with_disks(reg, name, cmdline, disks);
    let outcome = vm.wait(TIMEOUT).unwrap();
    let console = vm.console().text();
    assert_eq!(outcome, VmOutcome::Exited(code), "console:\n{console}");
    console
}

/// Reads a whole disk (any format) through luvisor's own backends.
fn read_disk(path: &Path) -> Vec<u8> {
    let disk = Disk::open(path, true).unwrap();
    let mut backend = disk.attach().unwrap();
    let mut data = vec![0u8; disk.size() as usize];
    backend.read_at(&mut data, 0).unwrap();
    data
}

#[test]
fn guest_writes_reach_the_image() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("writes");
    let path = dir.join("data.img");
    let disk = Arc::new(Disk::create_raw(&path, 16 << 20).unwrap());
    let reg = Registry::new();
    let console = run_to_end(
        &reg,
        "writer",
        "blk-info; blk-write 10 300 7; blk-flush; blk-verify 10 300 7; blk-verify 10 1 8",
        vec![disk.clone()],
        0,
    );
    assert!(
        console.contains("blk-info capacity=32768 ro=0"),
        "{console}"
    );
    assert!(
        console.contains("blk-verify 10 300: 0 mismatches"),
        "{console}"
    );
    assert!(
        console.contains("blk-verify 10 1: 1 mismatches"),
        "a different seed must not match:\n{console}"
    );
    let image = std::fs::read(&path).unwrap();
    assert!(pattern_mismatches(&image, 10, 300, 7).is_empty());
    assert!(
        image[..10 * SECTOR].iter().all(|&b| b == 0),
        "sectors before the write are untouched"
    );
    let stats = disk.stats().snapshot();
    assert_eq!(stats.bytes_written, 300 * 512);
    assert_eq!(stats.bytes_read, 301 * 512);
    assert_eq!(stats.flushes, 1);
    assert_eq!(stats.errors, 0);
    assert_eq!(
        (stats.writes, stats.reads),
        (2, 3),
        "128-sector requests: {stats:?}"
    );
}

#[test]
fn overlays_share_a_base_and_stay_independent() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("overlays");
    let base_path = dir.join("base.img");
    let base = Arc::new(Disk::create_raw(&base_path, 8 << 20).unwrap());
    let reg = Registry::new();
    run_to_end(
        &reg,
        "seed-base",
        "blk-write 0 2000 1; blk-flush",
        vec![base],
        0,
    );
    drop(reg);
    let base_bytes = std::fs::read(&base_path).unwrap();
    assert!(pattern_mismatches(&base_bytes, 0, 2000, 1).is_empty());

    let reg = Registry::new();
    let mut vms = Vec::new();
    for i in 0..20u64 {
        let path = dir.join(format!("vm{i}.qcow2"));
        let overlay = Arc::new(Disk::create_overlay(&base_path, &path).unwrap());
        let seed = 100 + i;
        let cmdline = format!(
            "blk-write 500 100 {seed}; blk-flush; blk-verify 500 100 {seed}; blk-verify 0 500 1; blk-verify 600 1400 1"
        );
        vms.push((
            i,
            path,
            vm_with_disks(&reg, &format!("clone-{i}"), &cmdline, vec![overlay]),
        ));
    }
    for (i, path, vm) in vms {
        assert_eq!(
            vm.wait(TIMEOUT).unwrap(),
            VmOutcome::Exited(0),
            "{}",
            vm.console().text()
        );
        let console = vm.console().text();
        assert_eq!(
            console.matches(": 0 mismatches").count(),
            3,
            "clone {i}:\n{console}"
        );
        let flat = read_disk(&path);
        assert!(
            pattern_mismatches(&flat, 500, 100, 100 + i).is_empty(),
            "clone {i} has its own data"
        );
        assert!(
            pattern_mismatches(&flat, 0, 500, 1).is_empty(),
            "clone {i} sees the base"
        );
        if i == 0 && qemu_tool_available("qemu-img") {
            {
                let out = std::process::Command::new("qemu-img")
                    .arg("check")
                    .arg(&path)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "qemu-img check: {}",
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
    }
    assert!(
        std::fs::read(&base_path).unwrap() == base_bytes,
        "the base is byte-identical"
    );
}

#[test]
fn read_only_disks_reject_writes() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("readonly");
    let path = dir.join("ro.img");
    std::fs::write(&path, vec![0x3Cu8; 1 << 20]).unwrap();
    let disk = Arc::new(Disk::open(&path, true).unwrap());
    let reg = Registry::new();
    let console = run_to_end(
        &reg,
        "ro",
        "blk-info; blk-write 0 1 1",
        vec![disk.clone()],
        2,
    );
    assert!(console.contains("ro=1"), "{console}");
    assert!(
        console.contains("error: blk-write: request at sector 0 failed with status 1 (IOERR)"),
        "{console}"
    );
    assert_eq!(disk.stats().snapshot().errors, 1);
    assert_eq!(std::fs::read(&path).unwrap(), vec![0x3Cu8; 1 << 20]);
    // Two VMs may share a read-only disk.
    let a = vm_with_disks(&reg, "reader-a", "blk-info; idle", vec![disk.clone()]);
    let b = vm_with_disks(&reg, "reader-b", "blk-info; idle", vec![disk]);
    a.wait_for_console("ro=1", 0, TIMEOUT).unwrap();
    b.wait_for_console("ro=1", 0, TIMEOUT).unwrap();
}

#[test]
fn discard_and_write_zeroes_punch_holes() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = scratch_dir("zeroes");
    let path = dir.join("z.img");
    let disk = Arc::new(Disk::create_raw(&path, 4 << 20).unwrap());
    let reg = Registry::new();
    run_to_end(
        &reg,
        "fill",
        "blk-write 0 4096 5; blk-flush",
        vec![disk.clone()],
        0,
    );
    let full_blocks = std::fs::metadata(&path).unwrap().blocks();
    run_to_end(
        &reg,
        "zero",
        "blk-zero 0 2048; blk-discard 2048 1024; blk-verify 3072 1024 5",
        vec![disk.clone()],
        0,
    );
    let image = std::fs::read(&path).unwrap();
    assert!(image[..3072 * SECTOR].iter().all(|&b| b == 0));
    assert!(pattern_mismatches(&image, 3072, 1024, 5).is_empty());
    assert!(
        std::fs::metadata(&path).unwrap().blocks() < full_blocks,
        "space was released"
    );
    assert_eq!(disk.stats().snapshot().discards, 2);

    // On an overlay, zeroing hides the base.
    let over = dir.join("z.qcow2");
    let overlay = Arc::new(Disk::create_overlay(&path, &over).unwrap());
    run_to_end(
        &reg,
        "zero-overlay",
        "blk-zero 3072 512; blk-verify 3584 512 5",
        vec![overlay],
        0,
    );
    let flat = read_disk(&over);
    assert!(flat[3072 * SECTOR..3584 * SECTOR].iter().all(|&b| b == 0));
    assert!(pattern_mismatches(&flat, 3584, 512, 5).is_empty());
}

#[test]
fn serial_number_and_several_disks() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("serial");
    let mut first = Disk::create_raw(&dir.join("one.img"), 1 << 20).unwrap();
    first.set_serial("luvisor-disk-1");
    let second = Disk::create_raw(&dir.join("two.img"), 2 << 20).unwrap();
    let reg = Registry::new();
    let console = run_to_end(
        &reg,
        "serial",
        "blk-id; blk-use 1; blk-id; blk-info; blk-write 0 8 9; blk-use 0; blk-verify 0 8 9; blk-use 2",
        vec![Arc::new(first), Arc::new(second)],
        2,
    );
    assert!(console.contains("blk-id luvisor-disk-1\n"), "{console}");
    assert!(console.contains("blk-id two.img\n"), "{console}");
    assert!(console.contains("blk-info capacity=4096"), "{console}");
    assert!(
        console.contains("blk-verify 0 8: 8 mismatches"),
        "disk 0 did not get disk 1's data:\n{console}"
    );
    assert!(
        console.contains("error: blk-use: no such disk"),
        "{console}"
    );
}

#[test]
fn a_writable_disk_belongs_to_one_running_vm() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("locks");
    let disk = Arc::new(Disk::create_raw(&dir.join("shared.img"), 1 << 20).unwrap());
    let reg = Registry::new();
    let a = vm_with_disks(&reg, "owner", "blk-write 0 1 1; idle", vec![disk.clone()]);
    a.wait_for_console("blk-write 0 1 done", 0, TIMEOUT)
        .unwrap();
    let mut config = builtin("intruder", "blk-write 0 1 2");
    config.disks = vec![disk.clone()];
    let b = reg.create(config).unwrap();
    let err = b.start().unwrap_err();
    let chain = luvisor_lua::host::error_chain(&err);
    assert!(
        chain.contains("cannot start vm 'intruder'") && chain.contains("is locked"),
        "{chain}"
    );
    assert_eq!(
        b.state(),
        luvisor_runtime::VmState::Created,
        "a failed start changes nothing"
    );
    assert_eq!(a.state(), luvisor_runtime::VmState::Running);
    a.stop();
    b.start().unwrap();
    assert_eq!(b.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
}

#[test]
fn host_io_errors_reach_the_guest() {
    if !kvm_available() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = scratch_dir("ioerror");
    let path = dir.join("broken.qcow2");
    let disk = Disk::create_qcow2(&path, 1 << 20).unwrap();
    // Point the first L1 entry far past the end of the file: reading it fails on the host.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let l1_offset = 3 * 65536u64;
    file.write_all_at(&((1u64 << 63) | (1 << 40)).to_be_bytes(), l1_offset)
        .unwrap();
    drop(file);
    let disk = Arc::new(disk);
    let reg = Registry::new();
    let console = run_to_end(&reg, "broken", "blk-verify 0 1 1", vec![disk.clone()], 2);
    assert!(
        console.contains("failed with status 1 (IOERR)"),
        "{console}"
    );
    assert_eq!(disk.stats().snapshot().errors, 1);
}

#[test]
fn completions_raise_the_device_interrupt_in_the_irqchip() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("irq");
    let first = Arc::new(Disk::create_raw(&dir.join("a.img"), 1 << 20).unwrap());
    let second = Arc::new(Disk::create_raw(&dir.join("b.img"), 1 << 20).unwrap());
    let reg = Registry::new();
    let vm = vm_with_disks(
        &reg,
        "irq",
        "blk-use 1; blk-write 0 8 1; idle",
        vec![first, second],
    );
    vm.wait_for_console("blk-write 0 8 done", 0, TIMEOUT)
        .unwrap();
    // Disk 1 has IRQ 6. The guest runs with interrupts off, so the PIC keeps it latched;
    // disk 0 (IRQ 5) was never used. The guest sees the completion in the used ring a
    // moment before the device raises the interrupt, so wait for it.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let pending = loop {
        let pending = vm.pending_legacy_irqs().expect("the VM runs");
        if pending & (1 << 6) != 0 || std::time::Instant::now() > deadline {
            break pending;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    assert_ne!(pending & (1 << 6), 0, "IRQ 6 is pending: {pending:#06x}");
    assert_eq!(pending & (1 << 5), 0, "IRQ 5 is not: {pending:#06x}");
    vm.stop();
    assert_eq!(vm.pending_legacy_irqs(), None);
}

#[test]
fn a_hostile_guest_gets_errors_and_the_device_recovers_after_reset() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("evil");
    let disk = Arc::new(Disk::create_raw(&dir.join("evil.img"), 1 << 20).unwrap());
    let reg = Registry::new();
    // The guest sends a buffer outside its memory, a looping chain and a bogus available
    // index through the real path (ioeventfd, event thread); then resets the device and
    // uses it normally.
    let console = run_to_end(
        &reg,
        "evil",
        "blk-evil oob; blk-evil loop; blk-evil avail; blk-write 0 8 1; blk-verify 0 8 1",
        vec![disk.clone()],
        0,
    );
    assert!(
        console.contains("blk-evil oob: used length 0 status 0xff"),
        "{console}"
    );
    assert!(console.contains("blk-evil loop: used length"), "{console}");
    assert!(
        console.contains("blk-evil avail: device needs reset"),
        "{console}"
    );
    assert!(
        console.contains("blk-verify 0 8: 0 mismatches"),
        "{console}"
    );
    assert!(disk.stats().snapshot().errors >= 2);
}

/// The qcow2 magic and version 3, as a hostile guest would plant them in sector 0.
const QCOW2_HEAD_HEX: &str = "514649fb00000003";

#[test]
fn a_guest_cannot_turn_a_probed_raw_disk_into_another_format() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("format-guard");
    let path = dir.join("probed.img");
    std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
    let disk = Arc::new(Disk::open(&path, false).unwrap());
    assert!(!disk.format_given());
    let reg = Registry::new();
    // VMDK, VHDX, VDI (magic at 64) and QED headers are refused the same way; the write
    // at sector 1 and plain data at sector 0 are the guest's business.
    let cmdline = format!(
        "blk-poke 0 {QCOW2_HEAD_HEX}; blk-poke 0 4b444d56; blk-poke 0 7668647866696c65; \
         blk-poke 0 {vdi}; blk-poke 0 51454400; blk-poke 1 {QCOW2_HEAD_HEX}; blk-poke 0 0102",
        vdi = "00".repeat(64) + "7f10dabe"
    );
    let console = run_to_end(&reg, "hostile", &cmdline, vec![disk.clone()], 0);
    assert_eq!(
        console.matches("blk-poke 0: status 0x1").count(),
        5,
        "every planted header is an I/O error:\n{console}"
    );
    assert!(console.contains("blk-poke 1: ok"), "{console}");
    assert!(console.contains("blk-poke 0: ok"), "{console}");
    assert_eq!(disk.stats().snapshot().errors, 5);
    let image = std::fs::read(&path).unwrap();
    assert_eq!(&image[..2], &[1, 2], "only the harmless write landed");
    assert_eq!(&image[512..516], b"QFI\xfb");
    assert_eq!(Disk::open(&path, true).unwrap().format(), DiskFormat::Raw);

    // With the format given, the host never second-guesses it: the write lands.
    let given = Arc::new(
        Disk::open_with(
            &path,
            OpenOptions {
                readonly: false,
                format: Some(DiskFormat::Raw),
            },
        )
        .unwrap(),
    );
    let console = run_to_end(
        &reg,
        "trusted",
        &format!("blk-poke 0 {QCOW2_HEAD_HEX}"),
        vec![given],
        0,
    );
    assert!(console.contains("blk-poke 0: ok"), "{console}");
    assert_eq!(&std::fs::read(&path).unwrap()[..4], b"QFI\xfb");
}

#[test]
fn a_refused_header_write_is_logged() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("format-guard-log");
    let script = format!(
        r#"
local d = hv.disk.create{{ path = "probed.img", size = "1M" }}
local vm = hv.vm{{ name = "hostile", memory = "32M", disks = {{ d }},
                  guest = hv.guest.builtin{{ cmdline = "blk-poke 0 {QCOW2_HEAD_HEX}; blk-poke 0 {QCOW2_HEAD_HEX}" }} }}
vm:start()
assert(vm:wait{{ timeout = 20 }} == 0)
assert(vm:console():find("blk-poke 0: status 0x1", 1, true), vm:console())
assert(d:stats().errors == 2 and d:stats().format_probed)
"#
    );
    let (code, _, stderr) = run_script(&dir, "guard.lua", &script, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("refused a guest write") && stderr.contains("qcow2"),
        "the host logs the refusal: {stderr}"
    );
    assert_eq!(
        stderr.matches("refused a guest write").count(),
        1,
        "one warning per disk, however often the guest tries: {stderr}"
    );
}

#[test]
fn a_vm_refuses_an_image_qemu_is_writing() {
    if !kvm_available() || !qemu_tool_available("qemu-io") {
        return;
    }
    let dir = scratch_dir("qemu-holds");
    let path = dir.join("held.img");
    let disk = Arc::new(Disk::create_raw(&path, 1 << 20).unwrap());
    let reg = Registry::new();
    // A VM holds the image: qemu-io cannot write it.
    let vm = vm_with_disks(&reg, "holder", "blk-write 0 1 1; idle", vec![disk.clone()]);
    vm.wait_for_console("blk-write 0 1 done", 0, TIMEOUT)
        .unwrap();
    let out = std::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x55 0 512",
            path.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "qemu-io wrote the disk of a running VM"
    );
    vm.stop();
    // qemu-io holds it for writing: the VM cannot start.
    let holder = luvisor_runtime::storage::test_tools::QemuIoHolder::start(&path);
    let mut config = builtin("second", "blk-verify 0 1 1");
    config.memory = 32 << 20;
    config.disks = vec![disk.clone()];
    let second = reg.create(config).unwrap();
    let err = second.start().unwrap_err();
    holder.release();
    let chain = luvisor_lua::host::error_chain(&err);
    assert!(
        chain.contains(path.to_str().unwrap()) && chain.contains("another process"),
        "{chain}"
    );
    second.start().unwrap();
    assert_eq!(second.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
}
