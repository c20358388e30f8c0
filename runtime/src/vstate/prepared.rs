//! KVM VMs prepared ahead of time.
//!
//! Most of a VM's start→ready time on PVM is one `KVM_SET_USER_MEMORY_REGION`: 4–5 ms of
//! waiting for an SRCU grace period, whatever the memory size. A background thread
//! therefore keeps one VM ready (VM fd, TSS address, in-kernel irqchip, guest RAM
//! registered as memory slots) for the memory size that was asked for last. Starting a VM
//! of that size takes it and asks for the next; any other size builds its own as before.
//!
//! A prepared VM costs no guest memory (its RAM is untouched `MAP_NORESERVE` mappings) and
//! nothing of it is ever reused: each VM fd and RAM mapping serves exactly one VM.

use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use crate::vstate::memory::GuestRam;
use kvm_ioctls::VmFd;

use super::memory::{self, MemoryBacking, MemoryError};
use super::{kvm, KvmOpenError};

/// Address KVM needs for its real-mode TSS on Intel hosts (three pages inside the MMIO
/// hole, never RAM).
const KVM_TSS_ADDRESS: usize = 0xFFFB_D000;

/// A VM with its RAM registered, not yet given vCPUs or devices.
pub struct PreparedVm {
    pub vm_fd: VmFd,
    pub memory: GuestRam,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Kvm(#[from] KvmOpenError),
    #[error("{step} failed")]
    Setup {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Builds a VM fd with its irqchip and `size` bytes of registered RAM.
pub fn prepare(size: u64) -> Result<PreparedVm, PrepareError> {
    prepare_with_memory(memory::create_ram(size)?, false)
}

/// Builds a VM fd with its irqchip and `size` bytes of registered RAM from `backing`.
/// The background preparer only keeps anonymous VMs.
pub fn prepare_with(size: u64, backing: MemoryBacking) -> Result<PreparedVm, PrepareError> {
    prepare_with_memory(memory::create_ram_with(size, backing)?, false)
}

/// Builds a VM fd with its irqchip around `memory` (a restore's RAM, mapped from its
/// snapshot and with its diffs applied), registered as memory slots, with KVM's dirty
/// log on when `log_dirty` (registering a slot costs an SRCU grace period on PVM, 4–5
/// ms, so a restore that wants the log registers with it rather than twice).
pub fn prepare_with_memory(memory: GuestRam, log_dirty: bool) -> Result<PreparedVm, PrepareError> {
    let setup = |step| move |source| PrepareError::Setup { step, source };
    let vm_fd = kvm()?.create_vm().map_err(setup("KVM_CREATE_VM"))?;
    // Needed on Intel before the first KVM_RUN; other backends may not implement it.
    if let Err(e) = vm_fd.set_tss_address(KVM_TSS_ADDRESS) {
        tracing::debug!(error = %e, "KVM_SET_TSS_ADDR not supported");
    }
    vm_fd
        .create_irq_chip()
        .map_err(setup("KVM_CREATE_IRQCHIP"))?;
    memory::set_dirty_logging(&vm_fd, &memory, log_dirty)?;
    Ok(PreparedVm { vm_fd, memory })
}

/// What a prepared VM is prepared for: its RAM size, and whether its slots log dirty
/// pages (a restore wants the log; a boot does not, since logging makes the guest's
/// first write to each page fault into KVM).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kind {
    pub size: u64,
    pub log_dirty: bool,
}

#[derive(Default)]
struct Pool {
    /// The VM kept ready, with what it was prepared for.
    ready: Option<(Kind, PreparedVm)>,
    /// What the worker should prepare next, if anything.
    wanted: Option<Kind>,
}

struct Shared {
    pool: Mutex<Pool>,
    work: Condvar,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("vm-preparer".into())
            .spawn(worker);
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the VM preparer; every VM is built on demand");
        }
        Shared {
            pool: Mutex::new(Pool::default()),
            work: Condvar::new(),
        }
    })
}

fn lock(shared: &Shared) -> MutexGuard<'_, Pool> {
    shared.pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the prepared VM if it was prepared for `kind`, and asks for another of that kind.
pub fn take(kind: Kind) -> Option<PreparedVm> {
    let shared = shared();
    let mut pool = lock(shared);
    let taken = match pool.ready.take() {
        Some((ready, vm)) if ready == kind => Some(vm),
        other => {
            pool.ready = other;
            None
        }
    };
    pool.wanted = Some(kind);
    drop(pool);
    shared.work.notify_one();
    taken
}

/// The preparer thread: keeps one VM of the wanted kind ready. It lives as long as the
/// process, so thread counts stay steady.
fn worker() {
    let shared = shared();
    loop {
        let kind = {
            let mut pool = lock(shared);
            loop {
                let satisfied = match (&pool.ready, pool.wanted) {
                    (_, None) => true,
                    (Some((ready, _)), Some(wanted)) => *ready == wanted,
                    (None, Some(_)) => false,
                };
                if !satisfied {
                    break pool.wanted.expect("checked above");
                }
                pool = shared.work.wait(pool).unwrap_or_else(|p| p.into_inner());
            }
        };
        let prepared = memory::create_ram(kind.size)
            .map_err(PrepareError::from)
            .and_then(|ram| prepare_with_memory(ram, kind.log_dirty));
        match prepared {
            Ok(vm) => {
                let mut pool = lock(shared);
                // A VM of another kind kept until now is dropped here.
                pool.ready = Some((kind, vm));
            }
            Err(e) => {
                tracing::debug!(error = %e, ?kind, "cannot prepare a VM ahead of time");
                let mut pool = lock(shared);
                if pool.wanted == Some(kind) {
                    pool.wanted = None; // Do not retry in a loop; the next start asks again.
                }
            }
        }
    }
}
