//! Runs every Lua test script under `tests/lua/` and every example under `examples/`
//! through the `luvisor` binary, exactly as a user would.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn lua_files(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", root.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "lua"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no Lua files in {}", root.display());
    files
}

/// Scripts written against the agent channel (`vm:exec`, `vm.kvp`, `vm:shutdown`,
/// "kvp:ready" readiness), which this tree does not have yet: skipped, by name, until it
/// is merged. Remove them from here then.
const NEEDS_AGENT: &[&str] = &["examples/lab.lua", "tests/lua/lab_agent.lua"];

/// Runs each script in its own scratch directory; reports every failure at once.
fn run_all(dir: &str, args_for: impl Fn(&Path) -> Vec<String>) {
    if !common::kvm_available() {
        return;
    }
    let mut failures = Vec::new();
    for script in lua_files(dir) {
        if NEEDS_AGENT.iter().any(|pending| script.ends_with(pending)) {
            println!("{}: skipped, it needs the agent channel", script.display());
            continue;
        }
        // The folder is part of the name: examples/storage.lua and tests/lua/storage.lua
        // run at the same time in this process and must not share a directory.
        let scratch = std::env::temp_dir().join(format!(
            "luvisor-{}-{}-{}",
            dir.replace('/', "-"),
            script.file_stem().unwrap().to_string_lossy(),
            std::process::id()
        ));
        std::fs::create_dir_all(&scratch).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_luvisor"))
            .arg("run")
            .arg(&script)
            .args(args_for(&script))
            .current_dir(&scratch)
            .output()
            .expect("run luvisor");
        let _ = std::fs::remove_dir_all(&scratch);
        let name = script.display().to_string();
        println!("{name}: {}", output.status);
        if !output.status.success() {
            failures.push(format!(
                "{name} exited with {}\n--- stdout\n{}--- stderr\n{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn lua_test_scripts_pass() {
    run_all("tests/lua", |script| {
        if script.ends_with("script_args.lua") {
            vec!["one".into(), "--two".into()]
        } else {
            Vec::new()
        }
    });
}

#[test]
fn examples_run() {
    run_all("examples", |_| Vec::new());
}
