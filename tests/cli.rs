//! The `luvisor` command line: help, version, exit codes, errors, doctor, REPL, run -e/-i,
//! completions and the manual page.
//!
//! Tests that interact with a running process wait for the output they need (a line on
//! stdout or stderr) before they act, never for a length of time.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};

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
    for word in ["completions", "manpage"] {
        assert!(out.contains(word), "--help mentions {word}:\n{out}");
    }
    let run_help = text(&luvisor(&["run", "--help"]).stdout);
    assert!(
        run_help.contains("traceback") && run_help.contains("os.exit"),
        "{run_help}"
    );
    // Every subcommand answers --help with what it offers.
    for (command, words) in [
        (
            "run",
            &["-e <CODE>", "-i", "[SCRIPT]", "standard input"][..],
        ),
        (
            "repl",
            &[
                "Tab",
                "history",
                "piped",
                "--connect <ADDR>",
                "--key-file <KEY>",
            ][..],
        ),
        ("doctor", &["--json", "/dev/kvm"][..]),
        (
            "completions",
            &["bash", "zsh", "fish", "elvish", "powershell"][..],
        ),
        ("manpage", &["roff", "[COMMAND]"][..]),
        (
            "serve",
            &[
                "[CONFIG]",
                "--policies <DIR>",
                "--record <TRACE>",
                "SIGTERM",
            ][..],
        ),
        ("policy", &["check", "simulate"][..]),
    ] {
        let help = luvisor(&[command, "--help"]);
        assert!(help.status.success(), "{command} --help");
        let help = text(&help.stdout);
        for word in words {
            assert!(
                help.contains(word),
                "{command} --help mentions {word}:\n{help}"
            );
        }
    }
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

/// Runs `luvisor ARGS` with `input` on its standard input.
fn luvisor_with_input(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    // A child that exits without reading its input (a failed `run -i`) closes the pipe.
    if let Err(e) = stdin.write_all(input.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// An error from a `hv` function caught with pcall is its message alone, and one that
/// ends the script is printed once with one traceback, whichever way the script came.
#[test]
fn hv_errors_are_plain_messages_with_one_traceback() {
    let body = "local ok, e = pcall(hv.disk.open, '/nonexistent/x.img')\n\
                print(type(e), e)\n\
                hv.disk.open('/nonexistent/y.img')\n";
    let path = script("hv_error.lua", body);
    let from_file = luvisor(&["run", path.to_str().unwrap()]);
    let from_stdin = luvisor_with_input(&["run", "-"], body);
    for (out, chunk) in [(from_file, path.to_str().unwrap()), (from_stdin, "stdin")] {
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(
            text(&out.stdout),
            "string\thv.disk.open: disk image /nonexistent/x.img does not exist\n"
        );
        let err = text(&out.stderr);
        assert!(
            err.starts_with(
                "luvisor: hv.disk.open: disk image /nonexistent/y.img does not exist\n\
                 stack traceback:\n"
            ),
            "{err}"
        );
        assert_eq!(err.matches("stack traceback:").count(), 1, "{err}");
        assert_eq!(err.matches("does not exist").count(), 1, "{err}");
        assert!(err.contains(&format!("{chunk}:3: in main chunk")), "{err}");
        assert!(!err.contains("runtime error"), "{err}");
    }

    // The REPL prints the message and one traceback, and catches like a script does
    // (each line is a chunk of its own, so no locals).
    let out = luvisor_with_input(&["repl"], &body.replace("local ok, e", "ok, e"));
    let stdout = text(&out.stdout);
    let err = text(&out.stderr);
    assert!(
        stdout.contains("string\thv.disk.open: disk image /nonexistent/x.img does not exist\n"),
        "{stdout}"
    );
    assert!(
        err.starts_with("error: hv.disk.open: disk image /nonexistent/y.img does not exist\n"),
        "{err}"
    );
    assert_eq!(err.matches("stack traceback:").count(), 1, "{err}");
    assert!(!err.contains("runtime error"), "{err}");
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
    assert!(stdout.contains("[ ok ] KVM API version: 12"), "{stdout}");
    assert!(stdout.contains("probe VM"), "{stdout}");
    // What luvisor allows comes first, KVM's own limit is labelled as such.
    assert!(
        stdout.contains("vCPUs per VM: luvisor allows 1 to 8; KVM allows up to "),
        "{stdout}"
    );
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert!(stdout.contains("backend: pvm"), "{stdout}");
        assert!(
            stdout.contains("PVM is software virtualization"),
            "{stdout}"
        );
    }
}

/// Every check `luvisor doctor` makes, by id.
const DOCTOR_CHECKS: &[&str] = &[
    "device",
    "api_version",
    "backend",
    "user_memory",
    "irqchip",
    "irqfd",
    "ioeventfd",
    "dirty_log",
    "immediate_exit",
    "vcpus",
    "probe",
];

fn doctor_json(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one JSON object:\n{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[test]
fn doctor_json_has_every_check_with_its_values() {
    if !common::kvm_available() {
        return;
    }
    let out = luvisor(&["doctor", "--json"]);
    let report = doctor_json(&out);
    assert!(out.status.success(), "{report:#}");
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(report["luvisor"], env!("CARGO_PKG_VERSION"));
    assert_eq!(report["verdict"], "This host can run VMs.");
    let order: Vec<&str> = report["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(order, DOCTOR_CHECKS);
    for id in DOCTOR_CHECKS {
        let check = &report["checks"][id];
        let status = check["status"].as_str().unwrap_or_default();
        assert!(status == "ok" || status == "warn", "{id}: {check:#}");
        assert!(
            check["title"].is_string() && check["detail"].is_string(),
            "{check:#}"
        );
    }
    let checks = &report["checks"];
    assert_eq!(checks["api_version"]["values"]["api_version"], 12);
    assert_eq!(checks["device"]["values"]["device"], "10:232");
    assert_eq!(checks["irqfd"]["values"]["supported"], true);
    let vcpus = &checks["vcpus"]["values"];
    assert_eq!(vcpus["luvisor_max"], 8, "{vcpus:#}");
    let kvm_max = vcpus["kvm_max"].as_i64().unwrap();
    assert!(kvm_max >= 1, "{vcpus:#}");
    assert_eq!(vcpus["usable_max"].as_i64(), Some(kvm_max.min(8)));
    assert!(checks["probe"]["values"]["milliseconds"].as_f64().unwrap() > 0.0);
}

/// Runs `luvisor ARGS` in a mount namespace where /dev/kvm is /dev/null: a file that
/// opens fine but is not KVM. Needs root, `unshare` and an existing /dev/kvm to mount
/// over; returns None (after saying so) where they are missing.
fn run_with_dev_null_as_kvm(args: &[&str]) -> Option<Output> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let have_unshare = Command::new("unshare").arg("--version").output().is_ok();
    if !root || !have_unshare || !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipping: needs root, unshare and /dev/kvm to bind-mount /dev/null over it");
        return None;
    }
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg("mount --bind /dev/null /dev/kvm || exit 99; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_luvisor"))
        .args(args)
        .output()
        .unwrap();
    if out.status.code() == Some(99) {
        eprintln!("skipping: cannot bind-mount here: {}", text(&out.stderr));
        return None;
    }
    Some(out)
}

#[test]
fn doctor_fails_when_dev_kvm_is_not_kvm() {
    let Some(out) = run_with_dev_null_as_kvm(&["doctor"]) else {
        return;
    };
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "[FAIL] KVM API version: ioctl KVM_GET_API_VERSION on /dev/kvm failed: \
             Inappropriate ioctl for device"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("not KVM's 10:232: it is not KVM"),
        "{stdout}"
    );
    assert!(stdout.contains("[skip] probe VM"), "{stdout}");
    assert!(stdout.contains("No VM can run on this host."), "{stdout}");
    // Nothing made up from failed ioctls.
    assert!(!stdout.contains("API version: -1"), "{stdout}");
    assert!(!stdout.contains("18446744073709551615"), "{stdout}");
    assert!(!stdout.contains("[ ok ] user memory"), "{stdout}");

    let Some(out) = run_with_dev_null_as_kvm(&["doctor", "--json"]) else {
        return;
    };
    assert_eq!(out.status.code(), Some(1));
    let report = doctor_json(&out);
    assert_eq!(report["ok"], false);
    assert_eq!(report["verdict"], "No VM can run on this host.");
    let checks = &report["checks"];
    assert_eq!(checks["device"]["status"], "ok");
    assert_eq!(checks["device"]["values"]["device"], "1:3");
    assert_eq!(checks["api_version"]["status"], "fail");
    assert!(
        checks["api_version"]["values"]["error"]
            .as_str()
            .unwrap()
            .contains("KVM_GET_API_VERSION"),
        "{report:#}"
    );
    for id in ["user_memory", "irqfd", "vcpus", "probe"] {
        assert_eq!(checks[id]["status"], "skipped", "{id}: {report:#}");
    }
}

#[test]
fn the_lua_api_says_when_dev_kvm_is_not_kvm() {
    let code = "local h = hv.host(); assert(h.kvm == false, 'kvm should be false'); \
                print(h.kvm_error); \
                local vm = hv.vm{ name = 'x', guest = hv.guest.builtin{} }; \
                local ok, err = pcall(vm.start, vm); assert(not ok); print(err)";
    let Some(out) = run_with_dev_null_as_kvm(&["run", "-e", code]) else {
        return;
    };
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert_eq!(stdout.matches("/dev/kvm is not KVM").count(), 2, "{stdout}");
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

/// Starts `luvisor ARGS` with piped stdio and its history under a fresh state directory.
fn spawn_repl_with(name: &str, args: &[&str]) -> (std::path::PathBuf, std::process::Child) {
    let state = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(args)
        .env("XDG_STATE_HOME", &state)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (state, child)
}

fn spawn_repl(name: &str) -> (std::path::PathBuf, std::process::Child) {
    spawn_repl_with(name, &["repl"])
}

/// The lines a child writes on one of its pipes, read as they come by a thread, so a test
/// can wait for the line it needs before it acts.
struct Lines {
    receiver: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn new(pipe: impl Read + Send + 'static) -> Lines {
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            receiver,
            seen: Vec::new(),
        }
    }

    /// Blocks until a line matching `wanted` arrives and returns it; panics, showing what
    /// came, if the pipe closes first.
    fn wait_for(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            match self.receiver.recv() {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "the pipe closed before {what}; it had:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Every line, up to the end of the pipe.
    fn all(mut self) -> Vec<String> {
        self.seen.extend(self.receiver.iter());
        self.seen
    }
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
    // Piped input with an error in it: the REPL goes on, and exits 1 at the end.
    assert_eq!(out.status.code(), Some(1), "{stderr}");
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
    assert!(stderr.contains("error: stdin:1: oops"), "{stderr}");
    let _ = std::fs::remove_dir_all(state);
}

/// Piped input is not typed by a person: it stays out of the history, and any error makes
/// the exit code 1 once the input ends.
#[test]
fn repl_piped_input_skips_history_and_sets_the_exit_code() {
    let (state, mut child) = spawn_repl("luvisor-repl-piped");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"x = 20\nx + 22\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).lines().any(|l| l == "42"));
    assert!(
        !state.join("luvisor/history").exists(),
        "piped input went into the history"
    );

    for (input, message) in [
        ("error('first')\n1 + 1\n", "error: stdin:1: first"),
        (
            "1 + 1\nlocal = 3\n",
            "error: stdin:1: <name> expected near '='",
        ),
        (
            "function f(\n",
            "error: stdin:1: <name> or '...' expected near <eof>",
        ),
    ] {
        let (state, mut child) = spawn_repl("luvisor-repl-piped-err");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{input:?}: {stderr}");
        assert!(stderr.contains(message), "{input:?}: {stderr}");
        assert!(!state.join("luvisor/history").exists());
        let _ = std::fs::remove_dir_all(state);
    }
    let _ = std::fs::remove_dir_all(state);
}

/// Each chunk announces that it runs, then blocks; the test presses Ctrl-C only once the
/// announcement is out, and sends the next chunk only once "interrupted" came back.
#[test]
fn repl_ctrl_c_interrupts_a_running_chunk() {
    let (state, mut child) = spawn_repl("luvisor-repl-int");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = Lines::new(child.stdout.take().unwrap());
    let mut stderr = Lines::new(child.stderr.take().unwrap());
    // The banner comes once the REPL handles Ctrl-C itself.
    stdout.wait_for("the banner", |l| l.contains("repl"));
    // Lua's print goes through C stdio, which holds output to a pipe back; the
    // announcements must arrive while the chunk still runs.
    writeln!(stdin, "io.stdout:setvbuf('no')").unwrap();
    let mut chunks = vec![
        "print('ready 1'); hv.sleep(600)".to_string(),
        "print('ready 2'); while true do end".to_string(),
    ];
    if common::kvm_available() {
        chunks.push(
            "vm = hv.vm{ name = 'w', memory = '16M', guest = hv.guest.builtin{ cmdline = 'idle' } }; \
             vm:start(); print('ready 3'); vm:wait_for_console('never printed', { timeout = 600 })"
                .to_string(),
        );
        chunks.push("print('ready 4'); vm:wait{ timeout = 600 }".to_string());
    }
    for (i, chunk) in chunks.iter().enumerate() {
        writeln!(stdin, "{chunk}").unwrap();
        stdin.flush().unwrap();
        let ready = format!("ready {}", i + 1);
        stdout.wait_for(&ready, |l| l == ready);
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let line = stderr.wait_for("the interruption", |l| l.starts_with("error:"));
        assert!(
            line.starts_with("error: interrupted"),
            "chunk {chunk:?}: {line}"
        );
    }
    writeln!(stdin, "1 + 1").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    let stdout = stdout.all();
    let stderr = stderr.all();
    // The interrupted chunks count as errors of piped input.
    assert_eq!(status.code(), Some(1), "{stderr:?}");
    let interrupted = stderr.iter().filter(|l| l.contains("interrupted")).count();
    assert_eq!(interrupted, chunks.len(), "{stderr:?}");
    assert!(
        stdout.iter().any(|l| l == "2"),
        "the REPL goes on after an interrupt: {stdout:?}"
    );
    let _ = std::fs::remove_dir_all(state);
}

/// A pseudo-terminal for a child: the child gets the slave side as stdin, stdout and
/// stderr; the test reads and writes the master side.
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
}

fn open_pty() -> Pty {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the integers we pass; a null name and termios
    // mean "don't report the name" and "default settings"; size is read only.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // Other tests spawn children at the same time; none may inherit these fds, or the
    // master would not see the end of the session when this child exits.
    for fd in [master, slave] {
        // SAFETY: fcntl on fds we own, setting only the close-on-exec flag.
        let rc = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        assert_eq!(rc, 0, "fcntl: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just opened by openpty and are owned by nothing else.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(master),
            slave: std::fs::File::from_raw_fd(slave),
        }
    }
}

/// Bytes from the master side of a pty, read by a thread; `next_prompt` blocks until the
/// REPL asks for the next line. The read ends with EIO once the child is gone.
struct Screen {
    receiver: Receiver<Vec<u8>>,
    seen: String,
    /// How far `next_prompt` has matched: each wait looks only at newer output.
    matched: usize,
}

impl Screen {
    fn new(mut master: std::fs::File) -> Screen {
        let (sender, receiver) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = master.read(&mut buf) {
                if n == 0 || sender.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Screen {
            receiver,
            seen: String::new(),
            matched: 0,
        }
    }

    /// Blocks until the editor shows an empty prompt after the previous one, and returns
    /// what came in between. An empty prompt is drawn as the prompt followed by a carriage
    /// return (the cursor goes back to place itself after it); a prompt redrawn with text
    /// on the line, as after a completion, is not.
    fn next_prompt(&mut self) -> String {
        const EMPTY_PROMPT: &str = "hv> \r";
        loop {
            if let Some(at) = self.seen[self.matched..].find(EMPTY_PROMPT) {
                let shown = self.seen[self.matched..self.matched + at].to_string();
                self.matched += at + EMPTY_PROMPT.len();
                return shown;
            }
            match self.receiver.recv() {
                Ok(bytes) => self.seen.push_str(&String::from_utf8_lossy(&bytes)),
                Err(_) => panic!("the terminal closed before a prompt:\n{:?}", self.seen),
            }
        }
    }

    fn rest(mut self) -> String {
        for bytes in self.receiver.iter() {
            self.seen.push_str(&String::from_utf8_lossy(&bytes));
        }
        self.seen
    }
}

/// In a terminal the REPL edits lines: Tab completes, and what was typed is kept in the
/// history file for the next session.
#[test]
fn repl_in_a_terminal_completes_and_keeps_history() {
    let state = std::env::temp_dir().join(format!("luvisor-repl-tty-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let pty = open_pty();
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("repl")
        .env("XDG_STATE_HOME", &state)
        .env("TERM", "xterm")
        .stdin(pty.slave.try_clone().unwrap())
        .stdout(pty.slave.try_clone().unwrap())
        .stderr(pty.slave)
        .spawn()
        .unwrap();
    let mut keyboard = pty.master.try_clone().unwrap();
    let mut screen = Screen::new(pty.master);
    // Between lines the editor puts the terminal back in cooked mode, where Ctrl-D would
    // be taken by the kernel's line discipline; the prompt is drawn once raw mode is on
    // again, so every line is typed once the next empty prompt is on the screen.
    screen.next_prompt();
    keyboard.write_all(b"answer = 6 * 7\r").unwrap();
    screen.next_prompt();
    // `hv.vers` + Tab completes to `hv.version`, which evaluates to the version string.
    keyboard.write_all(b"hv.vers\t\r").unwrap();
    let shown = screen.next_prompt();
    assert!(
        shown.contains("hv> hv.version")
            && shown.contains(&format!("\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{shown:?}"
    );
    keyboard.write_all(b"answer\r").unwrap();
    let shown = screen.next_prompt();
    assert!(shown.contains("42"), "{shown:?}");
    // Ctrl-D at an empty prompt ends the session.
    keyboard.write_all(b"\x04").unwrap();
    let status = child.wait().unwrap();
    let screen = screen.rest();
    assert!(status.success(), "{screen}");
    let history = std::fs::read_to_string(state.join("luvisor/history")).expect("history file");
    assert!(history.contains("answer = 6 * 7"), "{history}");
    assert!(history.contains("hv.version"), "{history}");
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

#[test]
fn run_e_runs_code_before_the_script() {
    // Alone, repeated, in order.
    let out = luvisor(&[
        "run",
        "-e",
        "x = 20",
        "-e",
        "x = x + 22",
        "-e",
        "print(x, hv.version)",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("42\t{}\n", env!("CARGO_PKG_VERSION"))
    );
    // Before a script, which sees its globals; `arg` is set for both.
    let path = script("after_e.lua", "print(x, arg[1], ...)\n");
    let out = luvisor(&[
        "run",
        "-e",
        "x = 'from -e'; print(arg[0] ~= nil, arg[1])",
        path.to_str().unwrap(),
        "one",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "true\tone\nfrom -e\tone\tone\n");
    // An error in -e code stops there, named as lua names it.
    let out = luvisor(&["run", "-e", "error('bad code')", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).is_empty(), "the script did not run");
    assert_stderr_has(
        &out,
        "luvisor: (command line):1: bad code\nstack traceback:",
    );
    // Code that starts with a dash is code, not an option.
    let out = luvisor(&["run", "-e", "-- a comment"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn run_i_enters_the_repl_with_the_scripts_globals() {
    let path = script(
        "lab.lua",
        "greeting = 'hello from ' .. arg[1]\nlocal hidden = 1\n",
    );
    let (state, mut child) = spawn_repl_with(
        "luvisor-run-i",
        &[
            "run",
            "-i",
            "-e",
            "suffix = '!'",
            path.to_str().unwrap(),
            "lab",
        ],
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"greeting .. suffix\nhidden\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(stdout.contains("repl"), "the REPL started: {stdout}");
    assert!(stdout.contains("\"hello from lab!\""), "{stdout}");
    assert!(
        stdout.lines().any(|l| l == "nil"),
        "locals stay local: {stdout}"
    );
    let _ = std::fs::remove_dir_all(state);

    // A script that fails does not reach the prompt.
    let failing = script("lab_fails.lua", "error('no lab')\n");
    let out = luvisor_with_input(&["run", "-i", failing.to_str().unwrap()], "1 + 1\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(!text(&out.stdout).contains("repl"), "{}", text(&out.stdout));
    assert_stderr_has(&out, "no lab");
    // The prompt needs standard input, so the script cannot come from it.
    let out = luvisor_with_input(&["run", "-i", "-"], "print(1)\n");
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(&out, "give the script as a file");
}

#[test]
fn completions_for_every_shell() {
    for (shell, marker) in [
        ("bash", "_luvisor()"),
        ("zsh", "#compdef luvisor"),
        ("fish", "complete -c luvisor"),
        ("elvish", "edit:completion:arg-completer[luvisor]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let out = luvisor(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}:\n{script}");
        for word in ["doctor", "completions", "manpage"] {
            assert!(script.contains(word), "{shell} completes {word}");
        }
    }
    let out = luvisor(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));

    // Where bash is installed, the script really completes.
    if Command::new("bash").arg("--version").output().is_err() {
        eprintln!("skipping the bash run: no bash");
        return;
    }
    let out = Command::new("bash")
        .arg("-c")
        .arg(
            "source <(\"$0\" completions bash) || exit 1\n\
             COMP_WORDS=(luvisor do); COMP_CWORD=1; _luvisor luvisor do luvisor\n\
             echo \"${COMPREPLY[@]}\"\n\
             COMP_WORDS=(luvisor doctor --j); COMP_CWORD=2; _luvisor luvisor --j doctor\n\
             echo \"${COMPREPLY[@]}\"",
        )
        .arg(env!("CARGO_BIN_EXE_luvisor"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "doctor\n--json\n");
}

#[test]
fn manpage_is_roff() {
    let out = luvisor(&["manpage"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(
        page.contains(&format!(
            ".TH luvisor 1  \"luvisor {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{page}"
    );
    assert!(
        page.contains(".SH SYNOPSIS") && page.contains(".SH SUBCOMMANDS"),
        "{page}"
    );
    for sub in [
        "run",
        "repl",
        "serve",
        "policy",
        "doctor",
        "completions",
        "manpage",
    ] {
        assert!(page.contains(&format!("luvisor\\-{sub}(1)")), "{page}");
    }
    // Each subcommand has the page the list refers to.
    let out = luvisor(&["manpage", "run"]);
    assert!(out.status.success());
    let page = text(&out.stdout);
    assert!(page.contains(".TH luvisor-run 1"), "{page}");
    assert!(page.contains("\\fB\\-e\\fR"), "{page}");
    let out = luvisor(&["manpage", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    assert_stderr_has(
        &out,
        "pages exist for: run, repl, serve, test, policy, doctor, completions, manpage",
    );
}

/// A fresh directory for one test.
fn scratch(test: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("luvisor-cli-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn default_policy() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/dynamic_memory.lua")
}

#[test]
fn policy_check_exit_codes() {
    let out = luvisor(&["policy", "check", default_policy().to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("policy 'dynamic-memory' (every 500 ms) loads"),
        "{stdout}"
    );
    assert!(stdout.contains("busy: 1G -> "), "{stdout}");

    // The shipped migration trigger loads and, with no peer hosts, decides nothing.
    let migrate = default_policy().with_file_name("migrate_on_pressure.lua");
    let out = luvisor(&["policy", "check", migrate.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("policy 'migrate-on-pressure' (every 1000 ms) loads")
            && stdout.contains("decided nothing"),
        "{stdout}"
    );

    let dir = scratch("check");
    for (name, body, needle) in [
        (
            "syntax.lua",
            "return {\n name = 'x',\n tick = function(ctx)\n",
            "syntax.lua:4:",
        ),
        (
            "tick.lua",
            "return { name = 'x', tick = function(ctx)\n error('boom') end }",
            "tick.lua:2: boom",
        ),
        ("table.lua", "return 3", "must return a policy table"),
        (
            "io.lua",
            "return { name = 'x', tick = function(ctx)\n io.write('x') end }",
            "tick.lua:2:",
        ),
        (
            "spin.lua",
            "return { name = 'x', tick = function(ctx)\n while true do end end }",
            "spin.lua:2: instruction budget",
        ),
    ] {
        let file = dir.join(name);
        std::fs::write(&file, body).unwrap();
        let out = luvisor(&["policy", "check", file.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let needle = if name == "io.lua" {
            "io.lua:2: attempt to index a nil value (global 'io')"
        } else {
            needle
        };
        assert_stderr_has(&out, needle);
    }
    let out = luvisor(&["policy", "check", dir.join("missing.lua").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "cannot read");
    let out = luvisor(&["policy", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A trace made up by hand: a host and `vms` VMs whose guests report `available` bytes
/// free of 1 GiB, one sample per entry.
fn made_up_trace(path: &std::path::Path, vms: usize, available: &[u64]) {
    const M: u64 = 1 << 20;
    let mut lines = vec![serde_json::json!({
        "type": "header", "format": "luvisor-policy-trace", "version": 1, "luvisor": "test"
    })];
    for (i, free) in available.iter().enumerate() {
        let vm = |n: usize| {
            serde_json::json!({
                "name": format!("vm{n}"), "state": "running",
                "memory": {
                    "size": 1024 * M, "target": 1024 * M, "resident": 512 * M,
                    "min": 256 * M, "max": 2048 * M, "startup": 1024 * M,
                    "buffer": 20, "weight": 5000,
                    "stats": { "total": 1024 * M, "available": free, "age_ms": 100 }
                }
            })
        };
        lines.push(serde_json::json!({
            "type": "sample",
            "input": {
                "now_ms": i as u64 * 500,
                "host": {
                    "memory_total": 64 * 1024 * M, "memory_available": 32 * 1024 * M,
                    "memory_reserve": 512 * M, "vms_resident": 0
                },
                "vms": (0..vms).map(vm).collect::<Vec<_>>()
            }
        }));
    }
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(path, text.join("\n") + "\n").unwrap();
}

#[test]
fn policy_simulate_replays_a_made_up_trace() {
    let dir = scratch("simulate");
    let trace = dir.join("trace.jsonl");
    // Demand rises from 224M to 924M: the default policy follows it, plus its 20% buffer.
    made_up_trace(&trace, 2, &[800 << 20, 800 << 20, 100 << 20]);
    let out = luvisor(&[
        "policy",
        "simulate",
        default_policy().to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ticks: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(ticks.len(), 3);
    let decisions = &ticks[0]["decisions"];
    assert_eq!(decisions.as_array().unwrap().len(), 2);
    // 224M of demand + 20% = 268.8M, down from 1G by at most 10% of max (204.8M).
    assert_eq!(
        decisions[0]["target"],
        serde_json::json!(((1024u64 << 20) - 214748364) / 4096 * 4096)
    );
    assert!(decisions[0]["reason"]
        .as_str()
        .unwrap()
        .contains("step limited"));
    let last = &ticks[2]["decisions"][0];
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .starts_with("demand 924M + 20% buffer"),
        "{last}"
    );
    assert!(ticks[0]["matches_recording"].is_null());
    assert_stderr_has(&out, "replayed 3 tick(s) of 'dynamic-memory'");
    assert_stderr_has(&out, "tick cost: mean");

    // Not a trace: a clear error.
    std::fs::write(dir.join("bad.jsonl"), "{\"type\":\"nope\"}\n").unwrap();
    let out = luvisor(&[
        "policy",
        "simulate",
        default_policy().to_str().unwrap(),
        "--trace",
        dir.join("bad.jsonl").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "bad.jsonl:1: not a policy trace record");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `luvisor --log-level info serve ARGS` in `dir`; its stderr lines.
fn spawn_serve(dir: &std::path::Path, args: &[&str]) -> (std::process::Child, Lines) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["--log-level", "info", "serve"])
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start luvisor serve");
    let lines = Lines::new(child.stderr.take().unwrap());
    (child, lines)
}

fn signal(child: &std::process::Child, signal: i32) {
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
}

#[test]
fn serve_records_a_trace_that_replays_to_the_same_decisions_and_stops_on_sigterm() {
    if !common::kvm_available() {
        return;
    }
    let dir = scratch("serve");
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(
        dir.join("lab.lua"),
        r#"
        local vm = hv.vm{ name = "web", memory = { startup = "128M", min = "64M", max = "256M" },
                          guest = hv.guest.builtin{ cmdline = "idle" } }
        vm:start()
        "#,
    )
    .unwrap();
    // Its decisions depend on its own state and on the targets it set before.
    std::fs::write(
        dir.join("policies/stepper.lua"),
        r#"
        local n = 0
        return { name = "stepper", interval_ms = 50, tick = function(ctx)
            n = n + 1
            for _, vm in ipairs(ctx.vms) do
                local step = (n % 3 == 0) and -4 or 8
                ctx:set_memory_target(vm, vm.memory.target + step * 1024 * 1024, "step " .. n)
            end
            print("ticked " .. n)
        end }
        "#,
    )
    .unwrap();
    let (child, mut lines) = spawn_serve(
        &dir,
        &[
            "lab.lua",
            "--policies",
            "policies",
            "--record",
            "trace.jsonl",
        ],
    );
    lines.wait_for("serve to be ready", |l| {
        l.contains("luvisor serve: serving 1 VM(s) with 1 policy(ies)")
    });
    lines.wait_for("six ticks", |l| l.contains("ticked 6"));
    signal(&child, libc::SIGTERM);
    let out = child.wait_with_output().unwrap();
    let stderr = lines.all().join("\n");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains(r#"vm stopped vm="web""#), "{stderr}");
    assert!(
        stderr.contains("luvisor serve: stopped 1 running VM(s)"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args([
            "policy",
            "simulate",
            "policies/stepper.lua",
            "--trace",
            "trace.jsonl",
            "--json",
            "--check",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let ticks: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // "ticked 6" was printed by the sixth run: the shadow run and five ticks.
    assert!(ticks.len() >= 6, "a shadow run and five ticks: {ticks:?}");
    assert_eq!(ticks[0]["shadow"], true);
    for tick in &ticks {
        assert_eq!(tick["matches_recording"], true, "{tick}");
        assert_eq!(tick["decisions"][0]["vm"], "web");
    }
    assert_stderr_has(&out, "decided the same as the recording");
    // The trace also holds the host and the VM as serve sampled them.
    let trace = std::fs::read_to_string(dir.join("trace.jsonl")).unwrap();
    assert!(trace
        .lines()
        .next()
        .unwrap()
        .contains("luvisor-policy-trace"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_stops_a_config_script_that_is_still_running_and_fails_with_a_broken_one() {
    if !common::kvm_available() {
        return;
    }
    let dir = scratch("serve-config");
    std::fs::write(
        dir.join("slow.lua"),
        r#"
        local vm = hv.vm{ name = "slow", memory = "64M", guest = hv.guest.builtin{ cmdline = "idle" } }
        vm:start()
        io.stderr:write("config started\n")
        hv.sleep(3600)
        "#,
    )
    .unwrap();
    let (child, mut lines) = spawn_serve(&dir, &["slow.lua"]);
    lines.wait_for("the config script to run", |l| l.contains("config started"));
    signal(&child, libc::SIGINT);
    let out = child.wait_with_output().unwrap();
    let stderr = lines.all().join("\n");
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("luvisor serve: stopped 1 running VM(s)"),
        "{stderr}"
    );

    std::fs::write(
        dir.join("broken.lua"),
        "hv.vm{ name = 'b', memory = '64M', guest = hv.guest.builtin{ cmdline = 'idle' } }\n\
         error('bad config')\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["serve", "broken.lua"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "broken.lua:2: bad config");
    let out = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .args(["serve", "--policies", "no-such-dir"])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "cannot watch no-such-dir");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_listen_needs_a_private_key_file_and_an_address_it_can_bind() {
    let dir = scratch("serve-listen");
    let out = luvisor(&["serve", "--listen", "127.0.0.1:0"]);
    assert_eq!(out.status.code(), Some(2), "--listen needs --key-file");
    assert_stderr_has(&out, "--key-file");
    let key = dir.join("peer.key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let key = key.to_str().unwrap();
    let out = luvisor(&["serve", "--listen", "127.0.0.1:0", "--key-file", key]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "chmod 600");
    std::fs::set_permissions(key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = luvisor(&["serve", "--listen", "256.1.1.1:7001", "--key-file", key]);
    assert_eq!(out.status.code(), Some(1));
    assert_stderr_has(&out, "cannot listen on 256.1.1.1:7001");
    let _ = std::fs::remove_dir_all(&dir);
}
