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
