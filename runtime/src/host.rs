//! What kind of KVM this host has, and what it supports.
//!
//! Our development and CI machines run `kvm_pvm`, a software nested hypervisor: guest
//! user-mode code runs natively but supervisor-mode code is emulated, so a stock Linux
//! guest cannot boot at usable speed (see `docs/architecture.md`, "Why the guest runs at CPL3"). Detection order: the
//! `kvm_pvm` module, then the vmx/svm CPU flags with their KVM modules.

use std::fs;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

/// How `/dev/kvm` is implemented on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmBackend {
    /// `kvm_pvm`: software virtualization with shadow paging.
    Pvm,
    /// Intel VT-x or AMD-V.
    Hardware,
    /// `/dev/kvm` exists but neither signature was found.
    Unknown,
}

impl KvmBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            KvmBackend::Pvm => "pvm",
            KvmBackend::Hardware => "hardware",
            KvmBackend::Unknown => "unknown",
        }
    }

    /// One sentence on what this backend means for guests.
    pub fn explanation(self) -> &'static str {
        match self {
            KvmBackend::Pvm => {
                "PVM is software virtualization: guest user-mode (CPL3) code runs at native speed \
                 but supervisor-mode code is emulated instruction by instruction, so the built-in \
                 CPL3 guest runs well and stock Linux guests do not boot at usable speed."
            }
            KvmBackend::Hardware => {
                "Hardware virtualization (VT-x/AMD-V): both the built-in guest and Linux guests \
                 run at full speed."
            }
            KvmBackend::Unknown => {
                "The KVM implementation could not be identified; the built-in guest may still run."
            }
        }
    }
}

/// Identifies the backend from sysfs and `/proc/cpuinfo`.
pub fn detect_backend() -> KvmBackend {
    detect_backend_in(
        Path::new("/sys/module"),
        &fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
    )
}

fn detect_backend_in(sys_module: &Path, cpuinfo: &str) -> KvmBackend {
    if sys_module.join("kvm_pvm").exists() {
        return KvmBackend::Pvm;
    }
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let has_module = sys_module.join("kvm_intel").exists() || sys_module.join("kvm_amd").exists();
    if has_flag && has_module {
        KvmBackend::Hardware
    } else {
        KvmBackend::Unknown
    }
}

/// Facts about `/dev/kvm` that luvisor relies on.
#[derive(Clone, Debug)]
pub struct KvmInfo {
    pub api_version: i32,
    pub backend: KvmBackend,
    pub max_vcpus: usize,
    pub recommended_vcpus: usize,
    pub irqchip: bool,
    pub irqfd: bool,
    pub ioeventfd: bool,
    pub dirty_log: bool,
    pub immediate_exit: bool,
    pub user_memory: bool,
}

impl KvmInfo {
    pub fn query(kvm: &Kvm) -> KvmInfo {
        KvmInfo {
            api_version: kvm.get_api_version(),
            backend: detect_backend(),
            max_vcpus: kvm.get_max_vcpus(),
            recommended_vcpus: kvm.get_nr_vcpus(),
            irqchip: kvm.check_extension(Cap::Irqchip),
            irqfd: kvm.check_extension(Cap::Irqfd),
            ioeventfd: kvm.check_extension(Cap::Ioeventfd),
            // KVM_GET_DIRTY_LOG has no capability of its own; it comes with user memory
            // slots, and KVM_CAP_SYNC_MMU means slots track host page changes.
            dirty_log: kvm.check_extension(Cap::UserMemory) && kvm.check_extension(Cap::SyncMmu),
            immediate_exit: kvm.check_extension(Cap::ImmediateExit),
            user_memory: kvm.check_extension(Cap::UserMemory),
        }
    }
}

/// Host resources, as reported by `hv.host()`.
#[derive(Clone, Debug)]
pub struct HostInfo {
    pub cpus: usize,
    pub memory_total: u64,
    pub memory_available: u64,
}

impl HostInfo {
    pub fn query() -> HostInfo {
        let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
        HostInfo {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            memory_total: meminfo_bytes(&meminfo, "MemTotal:"),
            memory_available: meminfo_bytes(&meminfo, "MemAvailable:"),
        }
    }
}

fn meminfo_bytes(meminfo: &str, key: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Resident set size of this process in bytes, from `/proc/self/statm`.
pub fn process_rss() -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    pages * page_size
}

/// CPU time (user + system) this process has used, in seconds.
pub fn process_cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage struct into the buffer we own.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return 0.0;
    }
    // SAFETY: getrusage succeeded and initialised the struct (it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Memory the host keeps for itself, which policies must not hand to VMs (bytes).
static MEMORY_RESERVE: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(DEFAULT_MEMORY_RESERVE);

/// The default host reserve: 512 MiB.
pub const DEFAULT_MEMORY_RESERVE: u64 = 512 << 20;

/// Memory the host keeps for itself (see [`set_memory_reserve`]).
pub fn memory_reserve() -> u64 {
    MEMORY_RESERVE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Sets the memory the host keeps for itself; policies give VMs only what lies above it.
pub fn set_memory_reserve(bytes: u64) {
    MEMORY_RESERVE.store(bytes, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(bytes, "host memory reserve set");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_pvm_before_cpu_flags() {
        let dir = std::env::temp_dir().join(format!("luvisor-host-{}", std::process::id()));
        fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        fs::create_dir_all(dir.join("kvm_intel")).unwrap();
        assert_eq!(
            detect_backend_in(&dir, "flags : fpu vmx sse2"),
            KvmBackend::Pvm
        );
        fs::remove_dir(dir.join("kvm_pvm")).unwrap();
        assert_eq!(
            detect_backend_in(&dir, "flags : fpu vmx sse2"),
            KvmBackend::Hardware
        );
        assert_eq!(
            detect_backend_in(&dir, "flags : fpu sse2"),
            KvmBackend::Unknown
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_meminfo() {
        let text = "MemTotal:       1024 kB\nMemAvailable:    512 kB\n";
        assert_eq!(meminfo_bytes(text, "MemTotal:"), 1024 * 1024);
        assert_eq!(meminfo_bytes(text, "MemAvailable:"), 512 * 1024);
        assert_eq!(meminfo_bytes(text, "Nope:"), 0);
    }
}
