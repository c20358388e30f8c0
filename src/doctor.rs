//! `luvisor doctor`: can this host run VMs, and what kind of KVM is it?

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luvisor_lua::host::error_chain;
use luvisor_runtime::host::{KvmBackend, KvmInfo};
use luvisor_runtime::{GuestSpec, Registry, VmConfig, VmOutcome};

fn line(ok: bool, what: &str, detail: impl std::fmt::Display) {
    println!("[{}] {what}: {detail}", if ok { " ok " } else { "FAIL" });
}

pub fn run() -> ExitCode {
    println!("luvisor {} doctor", env!("CARGO_PKG_VERSION"));
    let kvm = match luvisor_runtime::vstate::kvm() {
        Ok(kvm) => kvm,
        Err(e) => {
            let cause = std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default();
            line(false, "/dev/kvm", format!("cannot open it ({cause})"));
            println!(
                "       Load the kvm module (and kvm_intel, kvm_amd or kvm_pvm), and make sure this user can \
                 read and write /dev/kvm (e.g. membership of the 'kvm' group)."
            );
            println!("No VM can run on this host.");
            return ExitCode::FAILURE;
        }
    };
    line(true, "/dev/kvm", "opened");
    let info = KvmInfo::query(&kvm);
    line(info.api_version == 12, "KVM API version", info.api_version);
    println!("       backend: {}", info.backend.as_str());
    println!("       {}", info.backend.explanation());
    line(
        info.user_memory,
        "user memory slots",
        yes_no(info.user_memory),
    );
    line(info.irqchip, "in-kernel irqchip", yes_no(info.irqchip));
    line(info.irqfd, "irqfd", yes_no(info.irqfd));
    line(info.ioeventfd, "ioeventfd", yes_no(info.ioeventfd));
    line(info.dirty_log, "dirty page logging", yes_no(info.dirty_log));
    line(
        info.immediate_exit,
        "immediate exit (vCPU kick)",
        yes_no(info.immediate_exit),
    );
    line(
        info.max_vcpus >= 1,
        "vCPUs per VM",
        format!(
            "up to {} (recommended {})",
            info.max_vcpus, info.recommended_vcpus
        ),
    );

    let probe = probe_vm();
    match &probe {
        Ok(took) => line(
            true,
            "probe VM",
            format!(
                "the built-in guest booted and exited in {:.1} ms",
                took.as_secs_f64() * 1000.0
            ),
        ),
        Err(e) => line(false, "probe VM", e),
    }
    if info.backend == KvmBackend::Unknown {
        println!("       The backend could not be identified from /sys/module or the CPU flags.");
    }
    if probe.is_ok() && info.api_version == 12 {
        println!("This host can run VMs.");
        ExitCode::SUCCESS
    } else {
        println!("No VM can run on this host.");
        ExitCode::FAILURE
    }
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "supported"
    } else {
        "missing"
    }
}

/// Boots the built-in guest with `exit 0` and times it.
fn probe_vm() -> Result<Duration, String> {
    let registry = Arc::new(Registry::new());
    let mut config = VmConfig::new(
        "doctor-probe",
        GuestSpec::Builtin {
            cmdline: "exit 0".into(),
        },
    );
    config.memory = 16 << 20;
    let vm = registry.create(config).map_err(|e| e.to_string())?;
    let started = Instant::now();
    vm.start().map_err(|e| error_chain(&e))?;
    match vm.wait(Duration::from_secs(20)) {
        Ok(VmOutcome::Exited(0)) => Ok(started.elapsed()),
        Ok(other) => Err(format!("the guest ended unexpectedly: {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}
