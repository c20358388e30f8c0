//! Builds the built-in test guest (`guest/`, a separate no_std workspace) and leaves
//! `$OUT_DIR/guest.elf` for `include_bytes!`.
//!
//! The nested cargo gets its own target directory (sharing ours would deadlock on the
//! build lock) and a clean set of rustflags (the outer build's flags are not for a
//! freestanding binary).

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let guest_dir = manifest_dir.parent().unwrap().join("guest");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    for watched in [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "linker.ld",
        "src",
        "abi/src",
        "abi/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            guest_dir.join(watched).display()
        );
    }

    let status = Command::new(&cargo)
        .current_dir(&guest_dir)
        .args(["build", "--release", "--manifest-path"])
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .status()
        .unwrap_or_else(|e| panic!("cannot run {cargo} to build the built-in guest: {e}"));
    if !status.success() {
        panic!(
            "building the built-in guest in {} failed: {status}",
            guest_dir.display()
        );
    }
    let elf = target_dir.join("release").join("luvisor-guest");
    std::fs::copy(&elf, out_dir.join("guest.elf"))
        .unwrap_or_else(|e| panic!("cannot copy {} into OUT_DIR: {e}", elf.display()));
}
