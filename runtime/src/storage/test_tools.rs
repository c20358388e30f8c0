//! Test helpers for checks that need QEMU's tools (`qemu-img`, `qemu-io`).

use std::process::{Command, Output};

/// True when `tool` can run. In CI (`CI=true`) a missing tool is a failure, because `.ci/run`
/// installs it; elsewhere the check is skipped with a message.
pub fn tool_available(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{tool} is missing, and the checks that use it must run in CI");
        }
        eprintln!("skipping: {tool} is not installed");
    }
    found
}

/// Runs `tool args...` and returns its output; panics only if it cannot be started.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"))
}

/// A `qemu-io` that holds `path` (raw) open for writing until [`QemuIoHolder::release`]:
/// it returns once `qemu-io` has answered a read, so the image is certainly open and
/// locked by then (no waiting for a time).
pub struct QemuIoHolder {
    child: std::process::Child,
}

impl QemuIoHolder {
    pub fn start(path: &std::path::Path) -> QemuIoHolder {
        use std::io::{BufRead, BufReader, Write};
        use std::process::Stdio;
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qemu-io");
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(b"read 0 512\n").expect("talk to qemu-io");
        stdin.flush().expect("talk to qemu-io");
        let stdout = child.stdout.take().expect("piped stdout");
        let answered = BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.contains("read 512/512"));
        assert!(answered, "qemu-io never read the image");
        child.stdin = Some(stdin);
        QemuIoHolder { child }
    }

    /// Ends `qemu-io` (end of its input) and waits for it, which releases its locks.
    pub fn release(mut self) {
        drop(self.child.stdin.take());
        self.child.wait().expect("wait for qemu-io");
    }
}
