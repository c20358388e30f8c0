//! Labs and pools clean up after scripts that end badly: an error, `os.exit`, and Ctrl-C
//! (SIGINT) while a lab starts or after it started. Each script runs in its own
//! `luvisor run` process; afterwards no overlay, pool file or directory is left and the
//! process has exited. (In-process checks, threads included, are in tests/lua/lab.lua.)

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// The start of every script: a base image and a lab of four VMs in `lab/` whose
/// readiness is `ready`.
fn lab_script(ready: &str, rest: &str) -> String {
    lab_script_running("hello; idle", ready, rest)
}

/// [`lab_script`] whose guests run `cmdline`.
fn lab_script_running(cmdline: &str, ready: &str, rest: &str) -> String {
    format!(
        r#"
hv.disk.create{{ path = "base.img", size = "4M" }}
local lab = hv.lab{{ name = "int", count = 4, dir = "lab", ready = {ready:?},
  template = {{ memory = "32M", disks = {{ {{ base = "base.img" }} }},
               guest = hv.guest.builtin{{ cmdline = {cmdline:?} }} }} }}
{rest}
"#
    )
}

/// Starts `luvisor run script` in `dir`; its stderr lines arrive on the receiver.
fn spawn(dir: &Path, body: &str) -> (Child, Receiver<String>) {
    std::fs::write(dir.join("script.lua"), body).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["run", "script.lua"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run luvisor");
    let stderr = child.stderr.take().unwrap();
    let (lines, inbox) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    (child, inbox)
}

/// Waits for a stderr line containing `text`; every line seen so far.
fn wait_for_line(inbox: &Receiver<String>, text: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match inbox.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(text);
                seen.push(line);
                if found {
                    return;
                }
            }
            Err(_) => panic!("no stderr line with {text:?}; saw:\n{}", seen.join("\n")),
        }
    }
}

/// Waits for the process to end; its exit code and the rest of its stderr.
fn finish(
    mut child: Child,
    inbox: Receiver<String>,
    mut seen: Vec<String>,
) -> (Option<i32>, String) {
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            panic!("luvisor did not exit; stderr:\n{}", seen.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    seen.extend(inbox.iter());
    (status.code(), seen.join("\n"))
}

fn sigint(child: &Child) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
}

/// Nothing the lab or pool made is left in `dir`: only the base and the script.
fn only_inputs_left(dir: &Path) {
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        ["base.img", "script.lua"],
        "left in {}",
        dir.display()
    );
    let base = std::fs::read(dir.join("base.img")).unwrap();
    assert!(base.iter().all(|&b| b == 0), "the base was written");
}

#[test]
fn ctrl_c_while_a_lab_starts_destroys_it() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("lab-sigint-start");
    let (child, inbox) = spawn(
        &dir,
        &lab_script(
            "console:never printed",
            r#"lab:start{ parallel = 2, timeout = 600, progress = "lines" }"#,
        ),
    );
    let mut seen = Vec::new();
    wait_for_line(&inbox, "int-2 booting", &mut seen);
    assert!(dir.join("lab/int-4.disk0.qcow2").exists());
    sigint(&child);
    let (code, stderr) = finish(child, inbox, seen);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "lab 'int': interrupted while starting, 0 of 4 VMs ready (the lab was destroyed)"
        ),
        "{stderr}"
    );
    only_inputs_left(&dir);
}

#[test]
fn ctrl_c_after_a_lab_started_ends_the_script_and_destroys_it() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("lab-sigint-after");
    let (child, inbox) = spawn(
        &dir,
        &lab_script(
            "console:hello",
            r#"lab:start{ progress = "lines" }
io.stderr:write("waiting\n")
lab:vm(1):wait_for_console("never printed", { timeout = math.huge })"#,
        ),
    );
    let mut seen = Vec::new();
    wait_for_line(&inbox, "waiting", &mut seen);
    sigint(&child);
    let (code, stderr) = finish(child, inbox, seen);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    only_inputs_left(&dir);
}

#[test]
fn ctrl_c_ends_a_lab_shutdown_that_waits_for_guests_that_never_answer() {
    if !common::kvm_available() {
        return;
    }
    let dir = common::scratch_dir("lab-sigint-shutdown");
    // The guests' agents answer nothing for a day: only the hard stop ends them, and the
    // shutdown would wait its whole hour for it.
    let (child, inbox) = spawn(
        &dir,
        &lab_script_running(
            "hello; agent-hang 86400000; idle",
            "console:agent-hang",
            r#"lab:start{ progress = false }
io.stderr:write("shutting down\n")
lab:shutdown{ timeout = 3600 }
io.stderr:write("the shutdown returned\n")"#,
        ),
    );
    let mut seen = Vec::new();
    wait_for_line(&inbox, "shutting down", &mut seen);
    sigint(&child);
    let (code, stderr) = finish(child, inbox, seen);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "lab 'int': interrupted while shutting down (the VMs still running were stopped hard)"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("the shutdown returned"), "{stderr}");
    only_inputs_left(&dir);
}

#[test]
fn an_error_or_os_exit_leaves_no_lab_or_pool_files() {
    if !common::kvm_available() {
        return;
    }
    let pool = r#"hv.pool.define{ name = "p", min = 2, ready = "console:hello", dir = "pool",
  template = { memory = "32M", disks = { { base = "base.img" } },
               guest = hv.guest.builtin{ cmdline = "hello; idle" } } }
local vm = hv.pool.claim("p")
assert(vm.state == "running")"#;
    for (name, end, want) in [
        ("error", r#"error("boom")"#, Some(1)),
        ("exit", "os.exit(3)", Some(3)),
        ("end", "-- the script just ends", Some(0)),
    ] {
        let dir = common::scratch_dir(&format!("lab-end-{name}"));
        let rest = format!("lab:start{{ progress = false }}\n{pool}\n{end}");
        let (child, inbox) = spawn(&dir, &lab_script("console:hello", &rest));
        let (code, stderr) = finish(child, inbox, Vec::new());
        assert_eq!(code, want, "{name}: {stderr}");
        only_inputs_left(&dir);
    }
}
