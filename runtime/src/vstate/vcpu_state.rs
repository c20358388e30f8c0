//! A vCPU's complete architectural state, as KVM holds it: saved from a paused vCPU and
//! written into a fresh one on restore.
//!
//! The set is the one known to work on PVM hosts (it is what Firecracker saves): general
//! and special registers, MSRs, the local APIC, XSAVE (which holds the x87/SSE/AVX state,
//! so `KVM_GET_FPU` is not needed) and XCRs, pending events, debug registers, the MP
//! state and the CPUID the vCPU was given. Nested virtualisation state is never saved:
//! PVM refuses `KVM_GET_NESTED_STATE`, and the built-in guest has none.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::kvm;

/// `IA32_TSC_DEADLINE`: restored after `IA32_TSC`, or KVM measures the deadline against
/// the wrong clock.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vcpu {index} is running; its state can be saved only while the VM is paused")]
    NotPaused { index: usize },
    #[error("vcpu {index} ended before it answered")]
    Gone { index: usize },
    #[error("{op} failed on vcpu {index}")]
    Ioctl {
        op: &'static str,
        index: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Kvm(#[from] super::KvmOpenError),
    #[error("cannot list the MSRs this KVM saves")]
    MsrList(#[source] kvm_ioctls::Error),
    #[error("vcpu {index}: KVM accepted {accepted} of {total} MSRs; it refused MSR {msr:#x}")]
    MsrRefused {
        index: usize,
        accepted: usize,
        total: usize,
        msr: u32,
    },
    #[error("vcpu {index}: the saved state has {count} {what}, more than KVM allows ({max})")]
    TooMany {
        index: usize,
        what: &'static str,
        count: usize,
        max: usize,
    },
}

/// Everything KVM holds for one vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub msrs: Vec<kvm_msr_entry>,
    pub lapic: kvm_lapic_state,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub events: kvm_vcpu_events,
    pub debug_regs: kvm_debugregs,
    pub mp_state: kvm_mp_state,
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// The MSRs KVM can save on this host (`KVM_GET_MSR_INDEX_LIST`), asked once.
fn saved_msr_indices() -> Result<&'static [u32], VcpuStateError> {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    if let Some(list) = LIST.get() {
        return Ok(list);
    }
    let kvm = kvm()?;
    let list = kvm.get_msr_index_list().map_err(VcpuStateError::MsrList)?;
    Ok(LIST.get_or_init(|| list.as_slice().to_vec()))
}

/// Reads `indices` from the vCPU. KVM stops at the first MSR it cannot read, so those it
/// refuses are skipped one by one: a host may list an MSR it then cannot read for this
/// vCPU (PVM does), and such an MSR has no state to carry.
fn read_msrs(
    fd: &VcpuFd,
    index: usize,
    indices: &[u32],
) -> Result<Vec<kvm_msr_entry>, VcpuStateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        // KVM takes at most KVM_MAX_MSR_ENTRIES per call.
        let batch = &rest[..rest.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooMany {
            index,
            what: "MSRs",
            count: entries.len(),
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(|source| VcpuStateError::Ioctl {
                op: "KVM_GET_MSRS",
                index,
                source,
            })?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        // Past this batch, or past the one KVM refused in it.
        let consumed = if read == batch.len() { read } else { read + 1 };
        rest = &rest[consumed..];
    }
    Ok(saved)
}

impl VcpuState {
    /// Saves the state of a vCPU that is outside `KVM_RUN` with no I/O pending (see
    /// `Vcpu::complete_pending_io`).
    pub fn save(fd: &VcpuFd, index: usize) -> Result<VcpuState, VcpuStateError> {
        let ioctl = |op| move |source| VcpuStateError::Ioctl { op, index, source };
        // First: KVM_GET_MP_STATE makes the LAPIC accept pending INIT/SIPI events, which
        // can change the registers and the LAPIC saved after it.
        let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        Ok(VcpuState {
            mp_state,
            regs: fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?,
            msrs: read_msrs(fd, index, saved_msr_indices()?)?,
            lapic: fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?,
            xsave: fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?,
            events: fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?,
            debug_regs: fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?,
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(ioctl("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
        })
    }

    /// Writes the state into a freshly created vCPU. CPUID goes first (it decides which
    /// MSRs and XSAVE features exist), then the rest in the order KVM needs: special
    /// registers before general ones, the LAPIC before the MSRs (a TSC deadline written
    /// while the LAPIC timer is still masked one-shot, as in a fresh vCPU, is dropped),
    /// and `IA32_TSC_DEADLINE` after `IA32_TSC`.
    pub fn restore(&self, fd: &VcpuFd, index: usize) -> Result<(), VcpuStateError> {
        let ioctl = |op| move |source| VcpuStateError::Ioctl { op, index, source };
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| VcpuStateError::TooMany {
            index,
            what: "CPUID entries",
            count: self.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        })?;
        fd.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))?;
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        // SAFETY: `self.xsave` is a whole `kvm_xsave` (4 KiB region) as KVM_GET_XSAVE
        // returned it; KVM validates its content and reads no more than the struct holds.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_lapic(&self.lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        let mut msrs = self.msrs.clone();
        // Stable: everything else keeps KVM's order.
        msrs.sort_by_key(|m| m.index == MSR_IA32_TSC_DEADLINE);
        let list = Msrs::from_entries(&msrs).map_err(|_| VcpuStateError::TooMany {
            index,
            what: "MSRs",
            count: msrs.len(),
            max: kvm_bindings::KVM_MAX_MSR_ENTRIES,
        })?;
        let accepted = fd.set_msrs(&list).map_err(ioctl("KVM_SET_MSRS"))?;
        if accepted != msrs.len() {
            return Err(VcpuStateError::MsrRefused {
                index,
                accepted,
                total: msrs.len(),
                msr: msrs[accepted].index,
            });
        }
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        Ok(())
    }
}
