//! The VMs one process manages, addressed by id (stable, never reused) and by name
//! (unique among live VMs; free again once a VM is destroyed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::devices::console::ConsoleFileError;
use crate::vm::{ConfigError, Vm, VmConfig};

/// A VM's identity in a registry; never reused within a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmId(pub u64);

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("a vm named '{0}' already exists; choose another name or destroy it first")]
    DuplicateName(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    ConsoleFile(#[from] ConsoleFileError),
}

#[derive(Default)]
pub struct Registry {
    vms: Mutex<BTreeMap<VmId, Arc<Vm>>>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<VmId, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Validates `config` and records a new VM in state `created`.
    pub fn create(&self, config: VmConfig) -> Result<Arc<Vm>, RegistryError> {
        config.validate()?;
        let mut vms = self.lock();
        if vms.values().any(|vm| vm.name() == config.name) {
            return Err(RegistryError::DuplicateName(config.name));
        }
        let id = VmId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let vm = Arc::new(Vm::new(id, config)?);
        vms.insert(id, vm.clone());
        Ok(vm)
    }

    pub fn get(&self, id: VmId) -> Option<Arc<Vm>> {
        self.lock().get(&id).cloned()
    }

    pub fn find(&self, name: &str) -> Option<Arc<Vm>> {
        self.lock().values().find(|vm| vm.name() == name).cloned()
    }

    /// Every VM, in creation order.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        self.lock().values().cloned().collect()
    }

    /// Stops the VM (if it runs) and forgets it; its name is free again. Returns false
    /// when no such VM exists.
    pub fn destroy(&self, id: VmId) -> bool {
        let vm = self.lock().remove(&id);
        match vm {
            Some(vm) => {
                vm.stop();
                true
            }
            None => false,
        }
    }

    /// Stops every VM (they stay recorded).
    pub fn stop_all(&self) {
        for vm in self.list() {
            vm.stop();
        }
    }
}
