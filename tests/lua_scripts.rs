//! Runs the Lua test suites under `tests/lua/` with `luvisor test`, every example under
//! `examples/` with `luvisor run`, and the example test files under `examples/tests/`
//! with `luvisor test`, exactly as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn lua_files(dir: &str) -> Vec<PathBuf> {
    let root = repo().join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "lua"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no Lua files in {}", root.display());
    files
}

fn describe(output: &Output) -> String {
    format!(
        "exit status {}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `luvisor test ARGS` from the repository root; each file runs in its own scratch
/// directory (--isolate).
fn luvisor_test(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("test")
        .arg("--isolate")
        .args(args)
        .current_dir(repo())
        .output()
        .expect("run luvisor test")
}

#[test]
fn lua_test_suites_pass() {
    if !common::kvm_available() {
        return;
    }
    // One file at a time: dynamic_memory.lua measures this process's RSS.
    let output = luvisor_test(&["tests/lua"]);
    println!("{}", String::from_utf8_lossy(&output.stdout));
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Every file ran: each has its header line.
    for file in lua_files("tests/lua") {
        let name = format!("tests/lua/{}", file.file_name().unwrap().to_string_lossy());
        assert!(
            stdout.lines().any(|l| l == name),
            "{name} did not run\n{stdout}"
        );
    }
}

/// `luvisor run` passes arguments like `lua` does (a `luvisor run` script, not a test file).
#[test]
fn script_arguments_reach_the_script() {
    if !common::kvm_available() {
        return;
    }
    let scratch = common::scratch_dir("script-args");
    let output = Command::new(env!("CARGO_BIN_EXE_luvisor"))
        .arg("run")
        .arg(repo().join("tests/lua_run/script_args.lua"))
        .args(["one", "--two"])
        .current_dir(&scratch)
        .output()
        .expect("run luvisor");
    let _ = std::fs::remove_dir_all(&scratch);
    assert!(output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("args: ok"));
}

#[test]
fn examples_run() {
    if !common::kvm_available() {
        return;
    }
    let mut failures = Vec::new();
    for script in lua_files("examples") {
        // Each in its own scratch directory: examples write images with relative paths.
        let scratch = common::scratch_dir(&format!(
            "example-{}",
            script.file_stem().unwrap().to_string_lossy()
        ));
        let output = Command::new(env!("CARGO_BIN_EXE_luvisor"))
            .arg("run")
            .arg(&script)
            .current_dir(&scratch)
            .output()
            .expect("run luvisor");
        let _ = std::fs::remove_dir_all(&scratch);
        let name = script.display().to_string();
        println!("{name}: {}", output.status);
        if !output.status.success() {
            failures.push(format!("{name}: {}", describe(&output)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// examples/tests/ holds a passing and a deliberately failing test file: the run exits 1
/// and shows both, the failure with its location and diff.
#[test]
fn example_tests_show_a_passing_and_a_failing_test() {
    if !common::kvm_available() {
        return;
    }
    let output = luvisor_test(&["examples/tests"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    for expected in [
        "examples/tests/passing.lua",
        "  ✓ the built-in guest boots, prints and exits with its code (",
        "  - the built-in guest boots a Linux kernel (pending: the built-in guest is not Linux)",
        "examples/tests/failing.lua",
        "  ✓ a deliberately failing suite passes this one (",
        "  ✗ a deliberately failing suite expects a VM with one vCPU, but makes it with two (",
        "   at examples/tests/failing.lua:14",
        "   .vcpus: expected 1, got 2",
        "   + count 4",
        "4 passed, 2 failed, 1 skipped",
    ] {
        assert!(stdout.contains(expected), "missing {expected:?}\n{stdout}");
    }
}
