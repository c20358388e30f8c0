//! The VMs one process manages, addressed by id (stable, never reused) and by name
//! (unique among live VMs; free again once a VM is destroyed).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use std::path::Path;

use crate::devices::console::ConsoleFileError;
use crate::events::EventBus;
use crate::snapshot::file::{SnapshotError, SnapshotState};
use crate::storage::StorageError;
use crate::vm::{restored_config, ConfigError, Vm, VmConfig, VmError};

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
    #[error("cannot restore {path}")]
    Snapshot {
        path: std::path::PathBuf,
        #[source]
        source: SnapshotError,
    },
    #[error("cannot restore {path}: its disks")]
    RestoreDisks {
        path: std::path::PathBuf,
        #[source]
        source: StorageError,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
}

#[derive(Default)]
pub struct Registry {
    vms: Mutex<BTreeMap<VmId, Arc<Vm>>>,
    next_id: AtomicU64,
    /// Events about this registry's VMs (a lost heartbeat), for `hv.on`.
    events: Arc<EventBus>,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Where events about this registry's VMs are raised; subscribe to receive them.
    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
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
        let vm = Arc::new(Vm::new(id, config, self.events.clone())?);
        vms.insert(id, vm.clone());
        Ok(vm)
    }

    /// Validates `config` and records a VM arriving by live migration, in state
    /// `incoming`. A VM of that name that is only the record of one that migrated away
    /// (state `migrated`) gives way: the VM is coming back. Any other VM of that name
    /// refuses it.
    pub fn create_incoming(&self, config: VmConfig) -> Result<Arc<Vm>, RegistryError> {
        config.validate()?;
        let mut vms = self.lock();
        if !Self::name_free_for_incoming(&vms, &config.name) {
            return Err(RegistryError::DuplicateName(config.name));
        }
        vms.retain(|_, vm| vm.name() != config.name);
        let id = VmId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        let vm = Arc::new(Vm::new(id, config, self.events.clone())?);
        vm.set_incoming();
        vms.insert(id, vm.clone());
        Ok(vm)
    }

    /// Whether a VM named `name` may arrive by migration now (see
    /// [`Registry::create_incoming`]).
    pub fn accepts_incoming(&self, name: &str) -> bool {
        Self::name_free_for_incoming(&self.lock(), name)
    }

    fn name_free_for_incoming(vms: &BTreeMap<VmId, Arc<Vm>>, name: &str) -> bool {
        vms.values()
            .all(|vm| vm.name() != name || vm.state() == crate::vm::VmState::Migrated)
    }

    /// Restores the snapshot in `dir` as a new running VM named `name` (the snapshotted
    /// VM's name when `None`). Everything is checked before anything is created; if the
    /// restore fails part way, the VM and the disk overlays made for it are removed.
    pub fn restore(&self, dir: &Path, name: Option<&str>) -> Result<Arc<Vm>, RegistryError> {
        self.restore_with_overlays(dir, name).map(|(vm, _)| vm)
    }

    /// [`Registry::restore`], also returning the disk overlays made for the new VM (one
    /// per frozen disk of the snapshot), which the caller may remove once the VM is gone.
    pub fn restore_with_overlays(
        &self,
        dir: &Path,
        name: Option<&str>,
    ) -> Result<(Arc<Vm>, Vec<std::path::PathBuf>), RegistryError> {
        let snapshot_error = |source| RegistryError::Snapshot {
            path: dir.to_path_buf(),
            source,
        };
        let state = SnapshotState::read(dir).map_err(snapshot_error)?;
        state.machine.layout.check().map_err(|e| {
            snapshot_error(SnapshotError::Invalid {
                path: dir.to_path_buf(),
                reason: e.to_string(),
            })
        })?;
        let name = name.unwrap_or(&state.config.name).to_string();
        if self.find(&name).is_some() {
            return Err(RegistryError::DuplicateName(name));
        }
        let (config, overlays) =
            restored_config(&state, &name).map_err(|source| RegistryError::RestoreDisks {
                path: dir.to_path_buf(),
                source,
            })?;
        let remove_overlays = || {
            for path in &overlays {
                let _ = std::fs::remove_file(path);
            }
        };
        let vm = match self.create(config) {
            Ok(vm) => vm,
            Err(e) => {
                remove_overlays();
                return Err(e);
            }
        };
        let _ = vm.set_memory_target(state.config.memory_target, "restored from a snapshot");
        if let Err(e) = vm.launch_restored(dir, &state) {
            self.destroy(vm.id());
            remove_overlays();
            return Err(e.into());
        }
        Ok((vm, overlays))
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

    /// Guest memory resident on the host over every VM of this registry (bytes).
    pub fn vms_resident(&self) -> u64 {
        self.list().iter().map(|vm| vm.memory_resident()).sum()
    }

    /// Stops every VM (they stay recorded).
    pub fn stop_all(&self) {
        for vm in self.list() {
            vm.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{GuestSpec, VmState};

    fn config(name: &str) -> VmConfig {
        let mut config = VmConfig::new(
            name,
            GuestSpec::Builtin {
                cmdline: "idle".into(),
            },
        );
        config.memory = 16 << 20;
        config
    }

    #[test]
    fn an_incoming_vm_replaces_only_a_migrated_record() {
        let registry = Registry::new();
        let live = registry.create(config("a")).unwrap();
        assert!(!registry.accepts_incoming("a"));
        assert!(matches!(
            registry.create_incoming(config("a")),
            Err(RegistryError::DuplicateName(_))
        ));
        // The VM migrated away: its record gives way to the VM coming back.
        live.mark_migrated_locked("elsewhere:1");
        assert_eq!(live.state(), VmState::Migrated);
        assert!(registry.accepts_incoming("a"));
        let back = registry.create_incoming(config("a")).unwrap();
        assert_eq!(back.state(), VmState::Incoming);
        assert_ne!(back.id(), live.id());
        assert!(registry.get(live.id()).is_none());
        assert_eq!(registry.list().len(), 1);
        // An incoming VM holds its name, and a bad configuration is refused.
        assert!(registry.create(config("a")).is_err());
        let mut bad = config("b");
        bad.vcpus = 0;
        assert!(registry.create_incoming(bad).is_err());
    }
}
