//! The `luvisor` command line: help, version, exit codes, errors, doctor, REPL.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn luvisor(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(args)
        .output()
        .expect("run luvisor")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts that a command's stderr mentions `needle`, showing the stderr otherwise.
fn assert_stderr_has(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(needle),
        "stderr lacks {needle:?}:\n{stderr}"
    );
}

fn script(name: &str, body: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("luvisor-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn help_and_version() {
    let help = luvisor(&["--help"]);
    assert!(help.status.success());
    let out = text(&help.stdout);
    for word in ["run", "repl", "doctor", "--log-level", "--log-format"] {
        assert!(out.contains(word), "--help mentions {word}:\n{out}");
    }
    let run_help = text(&luvisor(&["run", "--help"]).stdout);
    assert!(
        run_help.contains("traceback") && run_help.contains("os.exit"),
        "{run_help}"
    );
    let version = luvisor(&["--version"]);
    assert!(version.status.success());
    assert_eq!(
        text(&version.stdout).trim(),
        format!("luvisor {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_options_are_rejected() {
    let out = luvisor(&["--log-format", "xml", "doctor"]);
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "possible values: text, json");
    let out = luvisor(&["run"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("<SCRIPT>"));
    let out = luvisor(&["run", "/nonexistent/script.lua"]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "cannot read /nonexistent/script.lua");
}

#[test]
fn script_error_prints_traceback_and_exits_1() {
    let path = script(
        "fails.lua",
        "local function inner()\n  error('boom here')\nend\ninner()\n",
    );
    let out = luvisor(&["run", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("fails.lua:2: boom here"), "{err}");
    assert!(err.contains("stack traceback:"), "{err}");
    assert!(
        err.contains("in local 'inner'") || err.contains("in function"),
        "{err}"
    );
    let syntax = script("syntax.lua", "local x = = 1\n");
    let out = luvisor(&["run", syntax.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "syntax.lua:1:");
}

#[test]
fn os_exit_code_and_vms_stopped() {
    if !common::kvm_available() {
        return;
    }
    let path = script(
        "exit.lua",
        "local vm = hv.vm{ name = 'x', memory = '16M', guest = hv.guest.builtin{ cmdline = 'idle' } }\n\
         vm:start()\nos.exit(tonumber(arg[1]))\n",
    );
    for code in ["0", "5"] {
        let out = luvisor(&["run", path.to_str().unwrap(), code]);
        assert_eq!(
            out.status.code(),
            Some(code.parse().unwrap()),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn doctor_reports_backend() {
    if !common::kvm_available() {
        return;
    }
    let out = luvisor(&["doctor"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("KVM API version: 12"), "{stdout}");
    assert!(stdout.contains("probe VM"), "{stdout}");
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(stdout.contains("backend: pvm"), "{stdout}");
        assert!(
            stdout.contains("PVM is software virtualization"),
            "{stdout}"
        );
    }
}

#[test]
fn json_logs_go_to_stderr() {
    if !common::kvm_available() {
        return;
    }
    let path = script(
        "log.lua",
        "local vm = hv.vm{ name = 'logged', memory = '16M', guest = hv.guest.builtin{ cmdline = 'exit 0' } }\n\
         vm:start()\nvm:wait{ timeout = 10 }\n",
    );
    let out = luvisor(&[
        "--log-level",
        "info",
        "--log-format",
        "json",
        "run",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    let err = text(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.contains("vm started"))
        .unwrap_or_else(|| panic!("no start log in {err}"));
    assert!(
        line.starts_with('{') && line.contains("\"vm\":\"logged\""),
        "{line}"
    );
    assert!(text(&out.stdout).is_empty());
}

/// Starts `luvisor repl` with piped stdio and its history under a fresh state directory.
fn spawn_repl(name: &str) -> (std::path::PathBuf, std::process::Child) {
    let state = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("repl")
        .env("XDG_STATE_HOME", &state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (state, child)
}

#[test]
fn repl_evaluates_piped_input() {
    if !common::kvm_available() {
        return;
    }
    let (state, mut child) = spawn_repl("luvisor-repl");
    let input = "1 + 1\n\
                 function twice(x)\n  return 2 * x\nend\n\
                 twice(21)\n\
                 vm = hv.vm{ name = 'r', memory = '16M', guest = hv.guest.builtin{ cmdline = 'hello; idle' } }\n\
                 vm\n\
                 vm:start()\n\
                 vm:wait_for_console('luvisor guest', { timeout = 10 })\n\
                 { a = 1, 'x' }\n\
                 error('oops')\n\
                 vm.state\n";
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"2"), "{stdout}");
    assert!(
        lines.contains(&"42"),
        "multi-line function definition works:\n{stdout}"
    );
    assert!(stdout.contains("vm<r #1 created, 1 vcpu, 16M>"), "{stdout}");
    assert!(
        stdout.contains("\"hello from luvisor guest\"\t"),
        "{stdout}"
    );
    assert!(stdout.contains("{ \"x\", a = 1 }"), "{stdout}");
    assert!(stdout.contains("\"running\""), "{stdout}");
    assert!(stderr.contains("oops"), "{stderr}");
    // The history persists, multi-line chunks as one entry.
    let history = std::fs::read_to_string(state.join("luvisor/history")).expect("history file");
    assert!(history.contains("1 + 1"), "{history}");
    assert!(history.contains("twice(21)"), "{history}");
    let _ = std::fs::remove_dir_all(state);
}

#[test]
fn repl_ctrl_c_interrupts_a_running_chunk() {
    let (state, mut child) = spawn_repl("luvisor-repl-int");
    // The banner comes once the REPL handles Ctrl-C itself.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut banner).unwrap();
    assert!(banner.contains("repl"), "{banner}");
    let mut input = String::from("hv.sleep(600)\nwhile true do end\n");
    let with_vm = common::kvm_available();
    if with_vm {
        // Each chunk (re)does its setup, so wherever a press lands the chunk ends with
        // "interrupted" and nothing else.
        let setup = "vm = vm or hv.vms()[1] or hv.vm{ name = 'w', memory = '16M', \
                     guest = hv.guest.builtin{ cmdline = 'idle' } }; \
                     if vm.state == 'created' then vm:start() end; ";
        input.push_str(&format!(
            "{setup}vm:wait_for_console('never printed', {{ timeout = 600 }})\n"
        ));
        input.push_str(&format!("{setup}vm:wait{{ timeout = 600 }}\n"));
    }
    input.push_str("1 + 1\n");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    // Keep pressing Ctrl-C until the REPL has worked through its input and exited; a
    // press that lands between chunks is dropped before the next chunk starts.
    for _ in 0..200 {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let expected = if with_vm { 4 } else { 2 };
    assert_eq!(stderr.matches("interrupted").count(), expected, "{stderr}");
    assert!(
        rest.lines().any(|l| l == "2"),
        "the REPL goes on after an interrupt: {rest}"
    );
    let _ = std::fs::remove_dir_all(state);
}

/// Runs a copy of the binary as user `nobody`, who cannot open /dev/kvm. Needs root and
/// setpriv; returns None (after saying so) where they are missing.
fn run_without_kvm_access(args: &[&str]) -> Option<Output> {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("skipping: needs root and setpriv to drop /dev/kvm access");
        return None;
    }
    // A copy in a world-readable place, whatever directory the checkout is in.
    let dir = std::env::temp_dir().join(format!("luvisor-nokvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.join("luvisor");
    std::fs::copy(env!("CARGO_BIN_EXE_luvisor"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.join("start.lua");
    std::fs::write(
        &script,
        "local vm = hv.vm{ name = 'x', memory = '16M', guest = hv.guest.builtin{ cmdline = 'exit 0' } }\n\
         local ok, err = pcall(vm.start, vm)\n\
         assert(not ok and vm.state == 'created')\n\
         print(tostring(err):match('[^\\n]*'))\n\
         print(hv.host().kvm, hv.host().kvm_error)\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args: Vec<String> = args
        .iter()
        .map(|a| a.replace("SCRIPT", script.to_str().unwrap()))
        .collect();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&binary)
        .args(&args)
        .current_dir(&dir)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    Some(out)
}

#[test]
fn without_kvm_access_doctor_fails_and_start_says_why() {
    let Some(out) = run_without_kvm_access(&["doctor"]) else {
        return;
    };
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("[FAIL] /dev/kvm: cannot open it (Permission denied"),
        "{stdout}"
    );
    assert!(stdout.contains("No VM can run on this host."), "{stdout}");

    let Some(out) = run_without_kvm_access(&["run", "SCRIPT"]) else {
        return;
    };
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        stdout.contains("cannot start vm 'x': cannot open /dev/kvm: Permission denied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("false\tcannot open /dev/kvm: Permission denied"),
        "{stdout}"
    );
}

#[test]
fn run_reads_a_script_from_stdin() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["run", "-", "x"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"print(arg[0], arg[1], hv.version)\nerror('late')\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        format!("-\tx\t{}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_stderr_has(&out, "stdin:2: late");
}
