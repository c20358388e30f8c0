//! KVM state: the VM file descriptor and its memory, vCPUs and their threads.
//!
//! - [`memory`]: guest RAM layout, allocation and KVM memory slots.
//! - [`vcpu`]: one thread per vCPU, driven by typed commands, running `KVM_RUN`.
//! - [`clock`]: the VM's running-time clock (stops while paused).
//! - [`prepared`]: a VM fd with registered RAM kept ready ahead of time.

pub mod clock;
pub mod memory;
pub mod prepared;
pub mod vcpu;

use std::sync::{Arc, OnceLock};

use kvm_ioctls::Kvm;
use thiserror::Error;

#[derive(Debug, Error)]
#[error("cannot open /dev/kvm")]
pub struct KvmOpenError(#[source] pub kvm_ioctls::Error);

/// The process-wide `/dev/kvm` handle, opened on first use.
pub fn kvm() -> Result<Arc<Kvm>, KvmOpenError> {
    static KVM: OnceLock<Arc<Kvm>> = OnceLock::new();
    if let Some(kvm) = KVM.get() {
        return Ok(kvm.clone());
    }
    let kvm = Arc::new(Kvm::new().map_err(KvmOpenError)?);
    Ok(KVM.get_or_init(|| kvm).clone())
}
