//! KVM state: the VM file descriptor and its memory, vCPUs and their threads.
//!
//! - [`memory`]: guest RAM layout, allocation and KVM memory slots.
//! - [`vcpu`]: one thread per vCPU, driven by typed commands, running `KVM_RUN`.
//! - [`vcpu_state`]: a vCPU's saved architectural state.
//! - [`clock`]: the VM's running-time clock (stops while paused).
//! - [`prepared`]: a VM fd with registered RAM kept ready ahead of time.

pub mod clock;
pub mod memory;
pub mod prepared;
pub mod vcpu;
pub mod vcpu_state;

use std::sync::{Arc, OnceLock};

use kvm_ioctls::Kvm;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KvmOpenError {
    #[error("cannot open /dev/kvm")]
    Open(#[source] kvm_ioctls::Error),
    /// Something else sits at /dev/kvm (a bind-mounted /dev/null, a wrong device node).
    #[error("/dev/kvm is not KVM: KVM_GET_API_VERSION {0}; run `luvisor doctor`")]
    NotKvm(String),
}

/// The only KVM API version there has ever been.
const KVM_API_VERSION: i32 = 12;

/// The process-wide `/dev/kvm` handle, opened on first use.
pub fn kvm() -> Result<Arc<Kvm>, KvmOpenError> {
    static KVM: OnceLock<Arc<Kvm>> = OnceLock::new();
    if let Some(kvm) = KVM.get() {
        return Ok(kvm.clone());
    }
    let kvm = Kvm::new().map_err(KvmOpenError::Open)?;
    // Opening succeeds on any device node; the first ioctl tells whether it is KVM.
    let version = kvm.get_api_version();
    if version < 0 {
        let errno = std::io::Error::last_os_error();
        return Err(KvmOpenError::NotKvm(format!("failed: {errno}")));
    }
    if version != KVM_API_VERSION {
        return Err(KvmOpenError::NotKvm(format!(
            "returned {version}, not {KVM_API_VERSION}"
        )));
    }
    let kvm = Arc::new(kvm);
    Ok(KVM.get_or_init(|| kvm).clone())
}
