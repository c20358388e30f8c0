//! Crash consistency: the VMM process is SIGKILLed right after the guest reports a
//! completed flush, while it keeps writing. After every restart, every sector that was
//! flushed before the kill is there, and the qcow2 overlay has no corruption.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use luvisor_runtime::storage::Disk;

const ROUNDS: u64 = 25;
const SECTORS_PER_ROUND: u64 = 64;

const SCRIPT: &str = r#"
local round = tonumber(arg[1])
local disk = hv.disk.open("vm.qcow2")
local commands = {}
for r = 0, round - 1 do
  commands[#commands + 1] = string.format("blk-verify %d 64 %d", r * 64, 1000 + r)
end
commands[#commands + 1] = string.format("blk-write %d 64 %d", round * 64, 1000 + round)
commands[#commands + 1] = "blk-flush"
-- Keep writing, unflushed, so the kill lands in the middle of I/O and allocation.
commands[#commands + 1] = string.format("blk-write 4000 4000 %d", 77 + round)
commands[#commands + 1] = "idle"
local vm = hv.vm{ name = "crash", memory = "32M", disks = { disk },
                  guest = hv.guest.builtin{ cmdline = table.concat(commands, "; ") } }
vm:start()
vm:wait_for_console("blk-flush done", { timeout = 60 })
local text = vm:console()
if text:find("mismatch at", 1, true) or text:find("error:", 1, true) then
  io.stderr:write(text)
  os.exit(3)
end
print("FLUSHED")
io.stdout:flush()
hv.sleep(60)
"#;

#[test]
fn flushed_sectors_survive_sigkill() {
    if !kvm_available() {
        return;
    }
    let dir = scratch_dir("crash");
    Disk::create_raw(&dir.join("base.img"), 8 << 20).unwrap();
    Disk::create_overlay(&dir.join("base.img"), &dir.join("vm.qcow2")).unwrap();
    std::fs::write(dir.join("round.lua"), SCRIPT).unwrap();
    for round in 0..ROUNDS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
            .args(["run", "round.lua", &round.to_string()])
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let flushed = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l == "FLUSHED");
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        let out = child.wait_with_output().unwrap();
        assert!(
            flushed,
            "round {round}: the guest never reported its flush: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // After the last kill: every flushed round is in the image, read from the host.
    let disk = Arc::new(Disk::open(&dir.join("vm.qcow2"), true).unwrap());
    let mut backend = disk.attach().unwrap();
    let mut image = vec![0u8; (ROUNDS * SECTORS_PER_ROUND * 512) as usize];
    backend.read_at(&mut image, 0).unwrap();
    for round in 0..ROUNDS {
        let bad = pattern_mismatches(
            &image,
            round * SECTORS_PER_ROUND,
            SECTORS_PER_ROUND,
            1000 + round,
        );
        assert!(
            bad.is_empty(),
            "round {round}: flushed sectors lost: {bad:?}"
        );
    }
    drop(backend);
    if qemu_tool_available("qemu-img") {
        let out = Command::new("qemu-img")
            .arg("check")
            .arg(dir.join("vm.qcow2"))
            .output()
            .unwrap();
        // 0: clean; 3: only leaked clusters, which a crash between allocation and use may leave.
        assert!(
            matches!(out.status.code(), Some(0) | Some(3)),
            "qemu-img check found corruption: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
