//! `luvisor doctor`: can this host run VMs, and what kind of KVM is it?
//!
//! Every value it reports comes from an ioctl it made on /dev/kvm itself, and every ioctl
//! that fails is reported as such: a file that opens but is not KVM (a bind mount, a
//! wrong device node) must not pass as a working KVM with made-up numbers.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use luvisor_lua::host::error_chain;
use luvisor_runtime::host::{detect_backend, KvmBackend};
use luvisor_runtime::vm::MAX_VCPUS;
use luvisor_runtime::{GuestSpec, Registry, VmConfig, VmOutcome};
use serde_json::{json, Map, Value};

const KVM_PATH: &str = "/dev/kvm";

/// KVM ioctls are `_IO(KVMIO, nr)`: no direction and no size bits, so the request is
/// just the type byte and the number.
const KVMIO: libc::c_ulong = 0xAE;
const KVM_GET_API_VERSION: libc::c_ulong = KVMIO << 8;
const KVM_CHECK_EXTENSION: libc::c_ulong = (KVMIO << 8) | 0x03;
/// The only API version there has ever been; anything else is not KVM as we know it.
const KVM_API_VERSION: i32 = 12;
/// KVM's misc device: major 10, minor 232.
const KVM_DEVICE: (u64, u64) = (10, 232);

/// The capabilities luvisor relies on: (check id, title, KVM_CAP_* numbers that must all
/// be present).
const CAPABILITIES: &[(&str, &str, &[u32])] = &[
    (
        "user_memory",
        "user memory slots",
        &[kvm_bindings::KVM_CAP_USER_MEMORY],
    ),
    (
        "irqchip",
        "in-kernel irqchip",
        &[kvm_bindings::KVM_CAP_IRQCHIP],
    ),
    ("irqfd", "irqfd", &[kvm_bindings::KVM_CAP_IRQFD]),
    ("ioeventfd", "ioeventfd", &[kvm_bindings::KVM_CAP_IOEVENTFD]),
    // KVM_GET_DIRTY_LOG has no capability of its own; it comes with user memory slots,
    // and KVM_CAP_SYNC_MMU means slots track host page changes.
    (
        "dirty_log",
        "dirty page logging",
        &[
            kvm_bindings::KVM_CAP_USER_MEMORY,
            kvm_bindings::KVM_CAP_SYNC_MMU,
        ],
    ),
    (
        "immediate_exit",
        "immediate exit (vCPU kick)",
        &[kvm_bindings::KVM_CAP_IMMEDIATE_EXIT],
    ),
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Status {
    Ok,
    /// Works, with a limitation worth knowing.
    Warn,
    Fail,
    /// Not run because an earlier check failed.
    Skipped,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
            Status::Skipped => "skipped",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Status::Ok => " ok ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
            Status::Skipped => "skip",
        }
    }
}

/// One line of the report.
struct Check {
    id: &'static str,
    title: &'static str,
    status: Status,
    detail: String,
    /// Indented lines under the check: explanations and advice.
    notes: Vec<String>,
    /// The measured values, for `--json`.
    values: Map<String, Value>,
}

impl Check {
    fn new(
        id: &'static str,
        title: &'static str,
        status: Status,
        detail: impl Into<String>,
    ) -> Check {
        Check {
            id,
            title,
            status,
            detail: detail.into(),
            notes: Vec::new(),
            values: Map::new(),
        }
    }

    fn note(mut self, note: impl Into<String>) -> Check {
        self.notes.push(note.into());
        self
    }

    fn value(mut self, key: &str, value: impl Into<Value>) -> Check {
        self.values.insert(key.to_string(), value.into());
        self
    }
}

/// An ioctl on /dev/kvm that failed.
#[derive(Debug, thiserror::Error)]
#[error("ioctl {name} on {KVM_PATH} failed")]
struct IoctlError {
    name: String,
    #[source]
    source: std::io::Error,
}

/// Makes an ioctl whose argument is an integer (or unused) and returns its result.
fn kvm_ioctl(
    kvm: &File,
    request: libc::c_ulong,
    arg: libc::c_ulong,
    name: &str,
) -> Result<i32, IoctlError> {
    // SAFETY: both KVM_GET_API_VERSION and KVM_CHECK_EXTENSION take an integer argument
    // (or none), so the kernel reads and writes no memory of ours; the fd is open for the
    // duration of the call.
    let rc = unsafe { libc::ioctl(kvm.as_raw_fd(), request, arg) };
    if rc < 0 {
        Err(IoctlError {
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        })
    } else {
        Ok(rc)
    }
}

fn check_extension(kvm: &File, cap: u32) -> Result<i32, IoctlError> {
    kvm_ioctl(
        kvm,
        KVM_CHECK_EXTENSION,
        cap as libc::c_ulong,
        &format!("KVM_CHECK_EXTENSION({cap})"),
    )
}

/// The whole report: every check, run in order; a check that depends on a failed one is
/// skipped.
fn checks() -> Vec<Check> {
    let mut checks = Vec::new();
    let kvm = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(KVM_PATH)
    {
        Ok(file) => file,
        Err(e) => {
            checks.push(
                Check::new("device", KVM_PATH, Status::Fail, format!("cannot open it ({e})"))
                    .value("path", KVM_PATH)
                    .value("error", e.to_string())
                    .note(
                        "Load the kvm module (and kvm_intel, kvm_amd or kvm_pvm), and make sure \
                         this user can read and write /dev/kvm (e.g. membership of the 'kvm' group).",
                    ),
            );
            skip_rest(&mut checks, "/dev/kvm cannot be opened");
            return checks;
        }
    };
    let mut device = Check::new("device", KVM_PATH, Status::Ok, "opened").value("path", KVM_PATH);
    let mut not_kvm_device = None;
    if let Ok(meta) = kvm.metadata() {
        let (major, minor) = (
            libc::major(meta.rdev()) as u64,
            libc::minor(meta.rdev()) as u64,
        );
        if meta.file_type().is_char_device() {
            device = device.value("device", format!("{major}:{minor}"));
            if (major, minor) != KVM_DEVICE {
                not_kvm_device = Some(format!(
                    "{KVM_PATH} is the character device {major}:{minor}, not KVM's {}:{}: it is not KVM",
                    KVM_DEVICE.0, KVM_DEVICE.1
                ));
            }
        } else {
            not_kvm_device = Some(format!("{KVM_PATH} is not a character device, so not KVM"));
        }
    }
    checks.push(device);

    // The API version comes first: if this fails, the file is not KVM at all.
    match kvm_ioctl(&kvm, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION") {
        Ok(version) => checks.push(
            Check::new(
                "api_version",
                "KVM API version",
                if version == KVM_API_VERSION {
                    Status::Ok
                } else {
                    Status::Fail
                },
                if version == KVM_API_VERSION {
                    version.to_string()
                } else {
                    format!("{version}, but luvisor needs {KVM_API_VERSION}")
                },
            )
            .value("api_version", version),
        ),
        Err(e) => {
            let mut check = Check::new(
                "api_version",
                "KVM API version",
                Status::Fail,
                error_chain(&e),
            )
            .value("error", error_chain(&e));
            check = check.note(not_kvm_device.unwrap_or_else(|| {
                format!("{KVM_PATH} opened but does not answer KVM ioctls: it is not KVM")
            }));
            checks.push(check);
            checks.push(backend_check());
            skip_rest(&mut checks, "/dev/kvm does not answer KVM ioctls");
            return checks;
        }
    }

    checks.push(backend_check());

    let mut ioctls_ok = true;
    for &(id, title, caps) in CAPABILITIES {
        let mut answers = Map::new();
        let mut failure = None;
        for &cap in caps {
            match check_extension(&kvm, cap) {
                Ok(n) => {
                    answers.insert(format!("KVM_CHECK_EXTENSION({cap})"), n.into());
                }
                Err(e) => {
                    failure = Some(error_chain(&e));
                    break;
                }
            }
        }
        let supported = failure.is_none() && answers.values().all(|v| v.as_i64() > Some(0));
        let check = match failure {
            Some(error) => {
                ioctls_ok = false;
                Check::new(id, title, Status::Fail, error.clone()).value("error", error)
            }
            None if supported => Check::new(id, title, Status::Ok, "supported"),
            None => Check::new(id, title, Status::Fail, "missing"),
        };
        checks.push(
            check
                .value("supported", supported)
                .value("answers", Value::Object(answers)),
        );
    }

    checks.push(vcpu_check(&kvm, &mut ioctls_ok));

    let failed = checks.iter().any(|c| c.status == Status::Fail);
    if failed || !ioctls_ok {
        checks.push(Check::new(
            "probe",
            "probe VM",
            Status::Skipped,
            "skipped: the checks above failed",
        ));
    } else {
        checks.push(match probe_vm() {
            Ok(took) => {
                let ms = took.as_secs_f64() * 1000.0;
                Check::new(
                    "probe",
                    "probe VM",
                    Status::Ok,
                    format!("the built-in guest booted and exited in {ms:.1} ms"),
                )
                .value("milliseconds", ms)
            }
            Err(e) => Check::new("probe", "probe VM", Status::Fail, e.clone()).value("error", e),
        });
    }
    checks
}

/// Which KVM this is, from sysfs and the CPU flags (no ioctl involved).
fn backend_check() -> Check {
    let backend = detect_backend();
    let mut check = Check::new(
        "backend",
        "backend",
        if backend == KvmBackend::Unknown {
            Status::Warn
        } else {
            Status::Ok
        },
        backend.as_str(),
    )
    .value("backend", backend.as_str())
    .note(backend.explanation());
    if backend == KvmBackend::Unknown {
        check =
            check.note("The backend could not be identified from /sys/module or the CPU flags.");
    }
    check
}

/// How many vCPUs a VM may have: luvisor's own limit, and KVM's (KVM_CAP_MAX_VCPUS, which
/// per the KVM API falls back to KVM_CAP_NR_VCPUS when 0; KVM_CAP_NR_VCPUS falls back to 4).
fn vcpu_check(kvm: &File, ioctls_ok: &mut bool) -> Check {
    const ID: &str = "vcpus";
    const TITLE: &str = "vCPUs per VM";
    let answers = check_extension(kvm, kvm_bindings::KVM_CAP_NR_VCPUS)
        .and_then(|nr| check_extension(kvm, kvm_bindings::KVM_CAP_MAX_VCPUS).map(|max| (nr, max)));
    let (nr, max) = match answers {
        Ok(answers) => answers,
        Err(e) => {
            *ioctls_ok = false;
            return Check::new(ID, TITLE, Status::Fail, error_chain(&e))
                .value("luvisor_max", MAX_VCPUS)
                .value("error", error_chain(&e));
        }
    };
    let recommended = if nr > 0 { nr } else { 4 };
    let kvm_max = if max > 0 { max } else { recommended };
    let usable = (MAX_VCPUS as i32).min(kvm_max);
    let detail = format!(
        "luvisor allows 1 to {MAX_VCPUS}; KVM allows up to {kvm_max} (recommends at most {recommended})"
    );
    let check = Check::new(
        ID,
        TITLE,
        if usable < 1 {
            Status::Fail
        } else if usable < MAX_VCPUS as i32 {
            Status::Warn
        } else {
            Status::Ok
        },
        detail,
    )
    .value("luvisor_max", MAX_VCPUS)
    .value("kvm_max", kvm_max)
    .value("kvm_recommended", recommended)
    .value("usable_max", usable);
    if (1..MAX_VCPUS as i32).contains(&usable) {
        check.note(format!(
            "VMs with more than {usable} vCPUs will fail to start here."
        ))
    } else {
        check
    }
}

fn skip_rest(checks: &mut Vec<Check>, why: &str) {
    let rest: Vec<(&'static str, &'static str)> =
        [("api_version", "KVM API version"), ("backend", "backend")]
            .into_iter()
            .chain(CAPABILITIES.iter().map(|&(id, title, _)| (id, title)))
            .chain([("vcpus", "vCPUs per VM"), ("probe", "probe VM")])
            .filter(|(id, _)| !checks.iter().any(|c| c.id == *id))
            .collect();
    for (id, title) in rest {
        checks.push(Check::new(
            id,
            title,
            Status::Skipped,
            format!("skipped: {why}"),
        ));
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "This host can run VMs."
    } else {
        "No VM can run on this host."
    }
}

pub fn run(json: bool) -> ExitCode {
    let checks = checks();
    let ok = checks
        .iter()
        .all(|c| matches!(c.status, Status::Ok | Status::Warn));
    let mut text = String::new();
    if json {
        let mut by_id = Map::new();
        for c in &checks {
            by_id.insert(
                c.id.to_string(),
                json!({
                    "title": c.title,
                    "status": c.status.as_str(),
                    "detail": c.detail,
                    "notes": c.notes,
                    "values": c.values,
                }),
            );
        }
        let report = json!({
            "luvisor": env!("CARGO_PKG_VERSION"),
            "ok": ok,
            "verdict": verdict(ok),
            "order": checks.iter().map(|c| c.id).collect::<Vec<_>>(),
            "checks": by_id,
        });
        text.push_str(&format!("{report}\n"));
    } else {
        text.push_str(&format!("luvisor {} doctor\n", env!("CARGO_PKG_VERSION")));
        for c in &checks {
            text.push_str(&format!("[{}] {}: {}\n", c.status.tag(), c.title, c.detail));
            for note in &c.notes {
                text.push_str(&format!("       {note}\n"));
            }
        }
        text.push_str(&format!("{}\n", verdict(ok)));
    }
    // A closed stdout (`luvisor doctor | head -1`) is reported, not a panic.
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        eprintln!("luvisor doctor: cannot write the report: {e}");
        return ExitCode::FAILURE;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
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
