//! Lifecycle of real VMs on /dev/kvm running the built-in guest.

mod common;

use std::time::Duration;

use common::*;
use luvisor_runtime::{Registry, VmOutcome, VmState};

#[test]
fn hello_and_exit_code() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "hello", "hello; exit 7");
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(7));
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(vm.console().text(), "hello from luvisor guest\n");
    assert!(vm.boot_time().is_some());
}

#[test]
fn fault_is_reported_as_crash_with_rip() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "crasher", "hello; fault");
    let outcome = vm.wait(TIMEOUT).unwrap();
    assert_eq!(vm.state(), VmState::Crashed);
    let VmOutcome::Crashed(reason) = outcome else {
        panic!("expected a crash, got {outcome:?}")
    };
    assert!(reason.contains("rip=0x"), "reason names RIP: {reason}");
    assert!(
        reason.contains("triple fault") || reason.contains("internal error"),
        "reason names the exit kind: {reason}"
    );
}

#[test]
fn compute_matches_host() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "compute", "compute 1000000");
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..1_000_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    assert_eq!(vm.console().text(), format!("compute {x:016x}\n"));
}

fn counts(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("count ")).count()
}

#[test]
fn paused_counter_does_not_advance() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let wall = std::time::Instant::now();
    let vm = start(&reg, "counter", "count 20");
    vm.wait_for_console("count 3", 0, TIMEOUT).unwrap();
    vm.pause().unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let before = counts(&vm.console().text());
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        counts(&vm.console().text()),
        before,
        "no output while paused"
    );
    vm.resume().unwrap();
    assert_eq!(vm.state(), VmState::Running);
    let next = format!("count {}", before + 2);
    vm.wait_for_console(&next, 0, TIMEOUT).unwrap();
    // Paused time is not guest time: the guest prints `count n` only once its clock has
    // reached n * 20 ms, so there is no burst of catch-up lines after resume.
    let after = counts(&vm.console().text());
    let run_time = vm.run_time();
    assert!(
        after as u128 <= run_time.as_millis() / 20,
        "{after} counts in {run_time:?} of guest time"
    );
    assert!(
        run_time + Duration::from_millis(300) <= wall.elapsed(),
        "the clock stopped while paused"
    );
    vm.stop();
    assert_eq!(vm.state(), VmState::Stopped);
    assert_eq!(vm.outcome(), Some(VmOutcome::Stopped));
}

#[test]
fn stop_is_idempotent_and_keeps_the_record() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "stopper", "hello; idle");
    vm.wait_for_console("luvisor guest", 0, TIMEOUT).unwrap();
    vm.stop();
    vm.stop();
    assert_eq!(vm.state(), VmState::Stopped);
    assert!(vm.console().text().contains("hello from luvisor guest"));
    assert!(vm.pause().is_err());
    assert!(vm.start().is_err(), "a stopped VM cannot be started again");
    let id = vm.id();
    assert!(reg.destroy(id));
    assert!(reg.get(id).is_none());
    // The name is free again.
    let again = start(&reg, "stopper", "exit 0");
    assert_eq!(again.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
}

#[test]
fn sixteen_vms_at_once() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vms: Vec<_> = (0..16)
        .map(|i| start(&reg, &format!("many-{i}"), &format!("count 10 3; exit {i}")))
        .collect();
    for (i, vm) in vms.iter().enumerate() {
        assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(i as u32));
        assert_eq!(counts(&vm.console().text()), 3);
    }
}

#[test]
fn multi_vcpu_vm_runs_and_pauses() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let mut config = builtin("smp", "count 10");
    config.vcpus = 4;
    let vm = reg.create(config).unwrap();
    vm.start().unwrap();
    vm.wait_for_console("count 2", 0, TIMEOUT).unwrap();
    vm.pause().unwrap();
    vm.resume().unwrap();
    vm.wait_for_console("count 4", 0, TIMEOUT).unwrap();
    vm.stop();
    assert_eq!(vm.state(), VmState::Stopped);
}

#[test]
fn guest_reports_bad_commands() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "bad", "hello; frobnicate 3");
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(2));
    assert!(vm
        .console()
        .text()
        .contains("error: frobnicate: unknown command"));
}

#[test]
fn touch_writes_memory() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "toucher", "touch 16; touch 16");
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    let text = vm.console().text();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0].starts_with("touched 16 MiB "));
    assert_eq!(
        lines[0], lines[1],
        "same pattern, same checksum; the pages went back to the pool"
    );
    let reg2 = Registry::new();
    let big = start(&reg2, "too-big", "touch 1024");
    assert_eq!(big.wait(TIMEOUT).unwrap(), VmOutcome::Exited(2));
    assert!(big
        .console()
        .text()
        .contains("not enough free guest memory"));
}

/// `wait_for_console` returns the whole line holding the match, even when the match
/// arrives before the rest of its line: the guest prints `count N` a byte at a time, and
/// the pattern `count ` is complete before the number is written.
#[test]
fn wait_for_console_returns_whole_lines() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = start(&reg, "lines", "count 1 200");
    let mut after = 0;
    for n in 1..=200u64 {
        let (line, end) = vm.wait_for_console("count ", after, TIMEOUT).unwrap();
        assert_eq!(line, format!("count {n}"), "match number {n}");
        after = end;
    }
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
}

/// A console file that cannot be written (here /dev/full) does not stop the guest; the
/// error is reported, once, and the in-memory console goes on.
#[test]
fn console_file_write_error_is_reported() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let mut config = builtin("full", "hello; count 1 3");
    config.console_file = Some("/dev/full".into());
    let vm = reg.create(config).unwrap();
    assert_eq!(vm.console().tee_error(), None);
    vm.start().unwrap();
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    let error = vm.console().tee_error().expect("the write error is kept");
    assert!(
        error.starts_with("writing console file /dev/full failed: No space left on device"),
        "{error}"
    );
    assert_eq!(
        vm.console().text(),
        "hello from luvisor guest\ncount 1\ncount 2\ncount 3\n"
    );
}

fn mkfifo(path: &std::path::Path) {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: c_path is a valid NUL-terminated string for the call's duration.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
}

/// A fifo console with no reader is refused at once (opening it for writing would block
/// until a reader came); with a reader that does not keep up, the guest is never held up.
#[test]
fn console_fifo_never_blocks() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("console-fifo");
    let fifo = dir.join("console.fifo");
    mkfifo(&fifo);
    let reg = std::sync::Arc::new(Registry::new());
    let mut config = builtin("fifo", "count 0 10000");
    config.console_file = Some(fifo.clone());
    // Created on another thread: should it block, a reader opened here unblocks it and
    // the test fails instead of hanging.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let (reg2, config2) = (reg.clone(), config.clone());
    let creator = std::thread::spawn(move || {
        let result = reg2.create(config2).map(|_| ());
        let _ = done_tx.send(());
        result
    });
    if done_rx.recv_timeout(TIMEOUT).is_err() {
        let _unblock = std::fs::File::open(&fifo);
        panic!("creating a VM with a reader-less console fifo blocked");
    }
    let err = creator.join().unwrap().expect_err("no reader: refused");
    assert!(
        err.to_string()
            .starts_with(&format!("console fifo {} has no reader", fifo.display())),
        "{err}"
    );
    assert!(reg.list().is_empty(), "nothing was created");

    // A reader that opens the fifo and reads nothing until the guest is done.
    use std::os::unix::fs::OpenOptionsExt;
    let mut reader = std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let vm = reg.create(config).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    let console = vm.console().text();
    assert_eq!(
        console.lines().count(),
        10_000,
        "the console has every line"
    );
    assert_eq!(vm.console().tee_error(), None);
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut got);
    let got = String::from_utf8(got).unwrap();
    // Far more was printed than a pipe holds: the fifo got whole lines from the start.
    assert!(got.len() < console.len() && got.starts_with("count 1\r\ncount 2\r\n"));
    assert!(got.ends_with("\r\n"), "whole lines only");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Exit codes are the unsigned 32-bit value the guest wrote to the exit port.
#[test]
fn exit_codes_are_unsigned_32_bit() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    for code in [4_294_967_295u32, 2_147_483_648] {
        let vm = start(&reg, &format!("exit-{code}"), &format!("exit {code}"));
        assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(code));
        assert_eq!(
            luvisor_runtime::vm::describe_outcome(vm.outcome().as_ref()),
            format!("exit code {code}")
        );
    }
}

/// The largest memory size a VM may have is accepted and boots; one page more is refused
/// with a message stating that same limit, which the docs state too.
#[test]
fn memory_limit_boundary() {
    if !kvm_available() {
        return;
    }
    use luvisor_runtime::size::format_size;
    use luvisor_runtime::vstate::memory::MAX_MEMORY;
    let reg = Registry::new();
    let mut config = builtin("largest", "hello; touch 16; exit 0");
    config.memory = MAX_MEMORY;
    let vm = reg.create(config.clone()).unwrap();
    vm.start().unwrap();
    assert_eq!(
        vm.wait(TIMEOUT).unwrap(),
        VmOutcome::Exited(0),
        "{}",
        vm.console().text()
    );

    config.name = "too-large".into();
    config.memory = MAX_MEMORY + 4096;
    let err = reg.create(config).err().expect("one page over the limit");
    let limit = format_size(MAX_MEMORY);
    assert_eq!(limit, "63G");
    assert!(
        err.to_string().contains(&format!("between 4M and {limit}")),
        "{err}"
    );
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for doc in ["docs/lua-api.md", "lua-api/types/hv.lua"] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        assert!(
            text.contains(&format!("from 4M to {limit}")),
            "{doc} states the memory limit"
        );
    }
}

/// The command-line limit counts the `virtio_mmio.device` entries the VM adds for its
/// disks and agent channel, and is checked when the VM is created: a command line that fills the limit
/// exactly with 16 disks boots (the guest sees the last disk), one byte more is refused
/// by `Registry::create`, not later by `start`.
#[test]
fn cmdline_limit_counts_disk_entries() {
    if !kvm_available() {
        return;
    }
    use luvisor_runtime::boot::builtin::MAX_CMDLINE;
    use luvisor_runtime::builder::{full_cmdline, MAX_DISKS};
    use luvisor_runtime::storage::Disk;
    let dir = scratch_dir("cmdline-disks");
    let disks: Vec<_> = (0..MAX_DISKS)
        .map(|i| {
            std::sync::Arc::new(Disk::create_raw(&dir.join(format!("{i}.img")), 1 << 20).unwrap())
        })
        .collect();
    let entries = full_cmdline("", MAX_DISKS).len();
    let commands = "blk-use 15; blk-info;";
    let fill = |len: usize| format!("{commands}{}", " ".repeat(len - commands.len()));

    let reg = Registry::new();
    let mut config = builtin("too-long", &fill(MAX_CMDLINE - entries + 1));
    config.disks = disks.clone();
    let err = reg
        .create(config)
        .err()
        .expect("one byte over with its disks");
    assert_eq!(
        err.to_string(),
        format!(
            "the guest command line is {} bytes ({entries} of them for the virtio_mmio.device \
             entries the VM adds for its 16 disks and agent channel); the limit is {MAX_CMDLINE}",
            MAX_CMDLINE + 1
        )
    );
    assert!(reg.list().is_empty());

    let mut config = builtin("just-fits", &fill(MAX_CMDLINE - entries));
    config.disks = disks;
    let vm = reg.create(config).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(0));
    assert!(
        vm.console().text().starts_with("blk-info capacity=2048 "),
        "{}",
        vm.console().text()
    );
    drop(vm);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A NUL byte in the command line is refused when the VM is created.
#[test]
fn cmdline_with_nul_is_refused() {
    let reg = Registry::new();
    let err = reg
        .create(builtin("nul", "hello\0exit 3"))
        .err()
        .expect("NUL refused");
    assert_eq!(
        err.to_string(),
        "the guest command line has a NUL byte at offset 5; it must be text without NUL bytes"
    );
    assert!(reg.list().is_empty());
}

#[test]
fn serial_input_reaches_a_listening_guest_in_order() {
    if !kvm_available() {
        return;
    }
    let reg = Registry::new();
    let vm = reg.create(builtin("listener", "listen")).unwrap();
    let err = vm.send_input(b"hello\n").unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot send input to vm 'listener': it is created"
    );
    vm.start().unwrap();
    vm.wait_for_console("listening", 0, TIMEOUT).unwrap();
    // Far more than the UART's 64-byte FIFO: the host buffer feeds it as the guest reads.
    let mut input = Vec::new();
    for i in 0..500 {
        input.extend_from_slice(format!("compute {i}\n").as_bytes());
    }
    input.extend_from_slice(b"exit 4\n");
    vm.send_input(&input).unwrap();
    let too_much = vec![b'x'; 70_000];
    let err = vm.send_input(&too_much).unwrap_err();
    assert!(
        matches!(err, luvisor_runtime::VmError::Input { .. }),
        "{err:?}"
    );
    assert_eq!(vm.wait(TIMEOUT).unwrap(), VmOutcome::Exited(4));
    let expected: String = std::iter::once("listening\n".to_string())
        .chain((0..500).map(|i| format!("compute {:016x}\n", guest_compute(i))))
        .collect();
    assert_eq!(vm.console().text(), expected);
}

/// The guest's `compute` loop, recomputed on the host.
fn guest_compute(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}
