//! The built-in guest under QEMU: `luvisor guest-elf` writes the embedded image, and
//! qemu-system-x86_64 (`-M microvm`, KVM) boots it through its PVH entry
//! (`guest/src/pvh.rs`), the way `bench/migration.sh` runs it for the comparison with
//! QEMU's live migration.
//!
//! Outside CI the tests skip with a message when qemu-system-x86_64 or /dev/kvm is
//! missing; in CI (`CI=true`) that is a failure (`.ci/run` installs qemu-system-x86).
//! They wait for the guest's output or exit, never for a length of time; the only
//! timeout is a guard against a hung QEMU.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
/// A guard against a hung QEMU, not a measurement.
const GUARD: Duration = Duration::from_secs(60);

/// True when QEMU and KVM are there. In CI a missing QEMU fails the test.
fn qemu_available() -> bool {
    if !common::kvm_available() {
        return false;
    }
    let found = Command::new(QEMU)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{QEMU} is missing, and the QEMU tests must run in CI (.ci/run installs qemu-system-x86)");
        }
        eprintln!("skipping: {QEMU} is missing (Debian package qemu-system-x86)");
    }
    found
}

/// Writes the built-in guest's image with `luvisor guest-elf` into a scratch directory.
fn guest_elf(test: &str) -> PathBuf {
    let path = common::scratch_dir(test).join("guest.elf");
    let out = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("guest-elf")
        .arg(&path)
        .output()
        .expect("run luvisor guest-elf");
    assert!(
        out.status.success(),
        "luvisor guest-elf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&path).unwrap();
    assert_eq!(image, luvisor_runtime::boot::builtin::GUEST_ELF);
    path
}

/// QEMU booting `elf` with `cmdline`: COM1 on its stdin and stdout, the guest's exit
/// port as `isa-debug-exit` (so QEMU exits with `code * 2 + 1`), no reboot after a
/// triple fault.
fn qemu(elf: &Path, cmdline: &str) -> Child {
    Command::new(QEMU)
        .args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=on",
            "-enable-kvm",
            "-cpu",
            "qemu64,pni=off",
            "-m",
            "64M",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0x500,iosize=4",
            "-kernel",
        ])
        .arg(elf)
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-system-x86_64")
}

/// The guest's console lines (without the `\r` it sends before each `\n`), as they come.
fn lines(child: &mut Child) -> Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    rx
}

/// Reads lines until one starts with `prefix`; returns it.
fn wait_for_line(rx: &Receiver<String>, prefix: &str, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + GUARD;
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                seen.push(line.clone());
                if line.starts_with(prefix) {
                    return line;
                }
            }
            Err(RecvTimeoutError::Timeout) => panic!("no line {prefix:?} from QEMU: {seen:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("QEMU ended before a line {prefix:?}: {seen:?}")
            }
        }
    }
}

/// Waits for QEMU to exit; kills it if it does not.
fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + GUARD;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("QEMU did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The guest's `compute N`, recomputed here.
fn compute(iterations: u64) -> u64 {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for i in 0..iterations {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x = x.wrapping_add(i);
    }
    x
}

#[test]
fn boots_under_qemu_and_runs_its_command_line() {
    if !qemu_available() {
        return;
    }
    let elf = guest_elf("qemu-boot");
    // count needs the clock (kvmclock under QEMU) and idle (a pause loop there).
    let mut child = qemu(&elf, "hello; compute 1000; count 10 3; touch 8; exit 5");
    let rx = lines(&mut child);
    let status = wait_exit(&mut child);
    let output: Vec<String> = rx.iter().collect();
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert_eq!(
        output[..5],
        [
            "hello from luvisor guest".to_string(),
            format!("compute {:016x}", compute(1000)),
            "count 1".into(),
            "count 2".into(),
            "count 3".into(),
        ],
        "console: {output:?}, stderr: {stderr}"
    );
    assert!(
        output[5].starts_with("touched 8 MiB "),
        "console: {output:?}"
    );
    // isa-debug-exit: QEMU exits with (code << 1) | 1.
    assert_eq!(status.code(), Some(5 << 1 | 1), "stderr: {stderr}");
}

#[test]
fn listens_dirties_and_verifies_over_the_serial_console_under_qemu() {
    if !qemu_available() {
        return;
    }
    let elf = guest_elf("qemu-listen");
    let mut child = qemu(&elf, "dirty 4 50; listen");
    let rx = lines(&mut child);
    let mut seen = Vec::new();
    let mut stdin = child.stdin.take().unwrap();
    wait_for_line(&rx, "dirty: pass", &mut seen);
    stdin.write_all(b"dirty-verify\n").unwrap();
    stdin.flush().unwrap();
    wait_for_line(&rx, "dirty: stopped at pass", &mut seen);
    wait_for_line(&rx, "listening", &mut seen);
    let verdict = wait_for_line(&rx, "dirty-verify:", &mut seen);
    assert!(
        verdict.starts_with("dirty-verify: ok, 1024 pages"),
        "{verdict}"
    );
    // An error is reported and the guest goes on listening; `exit 4` ends it.
    stdin.write_all(b"nonsense\nexit 4\n").unwrap();
    stdin.flush().unwrap();
    let error = wait_for_line(&rx, "error:", &mut seen);
    assert_eq!(error, "error: nonsense: unknown command");
    assert_eq!(wait_exit(&mut child).code(), Some(4 << 1 | 1));
}

#[test]
fn a_triple_fault_under_qemu_ends_it_without_an_exit_code() {
    if !qemu_available() {
        return;
    }
    let elf = guest_elf("qemu-fault");
    let mut child = qemu(&elf, "hello; fault");
    let rx = lines(&mut child);
    let mut seen = Vec::new();
    wait_for_line(&rx, "hello from luvisor guest", &mut seen);
    // With -no-reboot, the shutdown after the triple fault ends QEMU with 0, a status
    // isa-debug-exit never gives (its statuses are odd).
    assert_eq!(wait_exit(&mut child).code(), Some(0));
}
