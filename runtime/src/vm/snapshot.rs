//! Snapshot and restore of one VM ("migration to a file").
//!
//! A snapshot pauses the VM (vCPUs out of the guest with their I/O completed, the event
//! thread serving nothing), saves every component's state and guest memory into a new
//! directory, freezes the disks, and resumes (or stops) the VM. A restore builds a new
//! machine from that directory and runs it from where the snapshot left it.
//!
//! Disks are frozen with the snapshot: each writable disk is flushed and becomes
//! read-only; the running VM goes on in a new qcow2 overlay on top of it, and every VM
//! restored from the snapshot gets its own new overlay. So a snapshot can be restored
//! many times and its disks never change under it. With `shared_disks` (for a disk
//! another host opens, as in migration) the disks are left as they are.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Vm, VmError, VmState};
use crate::builder::RestoreParts;
use crate::snapshot::file::{
    DiffMemory, HostRequirements, MemoryState, SavedConfig, SavedDisk, SnapshotError,
    SnapshotState, MEMORY_FILE,
};
use crate::snapshot::machine::{save_clock, IrqchipState, MachineState};
use crate::snapshot::Persist;
use crate::storage::{Disk, OpenOptions};
use crate::vm::error::VCPU_ACK_TIMEOUT;
use crate::vm::{GuestSpec, VmConfig};
use crate::vstate::memory::{
    apply_ram_diff, create_ram_with, map_file_over, save_ram, set_dirty_logging, take_dirty,
    MemoryBacking, PageSelection,
};
use crate::vstate::prepared;
use crate::vstate::vcpu::{deadline_after, VcpuCommand};

/// The largest console buffer a restored VM gets, whatever its snapshot says.
const MAX_RESTORED_CONSOLE: usize = 64 << 20;

/// How a snapshot is taken.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// Stop the VM after the snapshot instead of resuming it.
    pub stop: bool,
    /// Take a diff against this earlier snapshot of the same VM: only memory changed
    /// since then is saved.
    pub base: Option<PathBuf>,
    /// Leave the disks as they are (another host opens the same images) rather than
    /// freezing them under new overlays.
    pub shared_disks: bool,
}

/// What a snapshot took.
#[derive(Debug, Clone)]
pub struct SnapshotReport {
    pub path: PathBuf,
    /// Bytes of guest memory written (zero pages are holes and not counted).
    pub memory_bytes: u64,
    /// Pages the memory file holds data for.
    pub memory_pages: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Whether it is a diff.
    pub diff: bool,
    /// How long the VM was paused for it.
    pub paused_for: Duration,
    /// The overlay each frozen disk's VM now writes to, by disk index.
    pub new_overlays: Vec<(usize, PathBuf)>,
}

/// Where a VM goes on writing after its disk at `path` is frozen by the snapshot `dir`.
fn live_overlay_path(path: &Path, dir: &Path) -> PathBuf {
    let snapshot = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "snapshot".into());
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!("{file}.after-{snapshot}.qcow2"))
}

/// The overlay a VM restored under `name` writes to, above the frozen disk at `path`.
pub fn restore_overlay_path(path: &Path, name: &str) -> PathBuf {
    let file = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    path.with_file_name(format!("{file}.{safe}.qcow2"))
}

/// A fresh id for a snapshot, so a diff can tell its base from another snapshot later
/// written to the same path.
fn new_snapshot_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.write_u32(std::process::id());
    hasher.finish()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Vm {
    fn snapshot_error(&self, source: SnapshotError) -> VmError {
        VmError::Snapshot {
            name: self.config.name.clone(),
            source,
        }
    }

    /// Takes a snapshot into the new directory `dir`; see the module docs. On failure
    /// the directory is removed, the disks are as they were, and the VM is left running
    /// (or paused) as it was.
    pub fn snapshot(
        &self,
        dir: &Path,
        options: &SnapshotOptions,
    ) -> Result<SnapshotReport, VmError> {
        let _control = self.lock_control();
        let was = self.state();
        if !matches!(was, VmState::Running | VmState::Paused) {
            return Err(self.invalid("snapshot", was));
        }
        let base = match &options.base {
            None => None,
            Some(base) => {
                let tracking = self.lock().tracking_since.clone();
                let base = std::fs::canonicalize(base).map_err(|source| {
                    self.snapshot_error(SnapshotError::Io {
                        what: "find the base snapshot",
                        path: base.clone(),
                        source,
                    })
                })?;
                // The base must be the snapshot tracking started from, and still the same
                // one (not another snapshot written to its path since).
                let same = match &tracking {
                    Some((path, id)) if *path == base => SnapshotState::read(&base)
                        .map_err(|e| self.snapshot_error(e))?
                        .id
                        .eq(id),
                    _ => false,
                };
                if !same {
                    return Err(self.snapshot_error(SnapshotError::Invalid {
                        path: base.clone(),
                        reason: match tracking {
                            Some((t, _)) => format!(
                                "a diff must be taken against the VM's latest snapshot or \
                                 restore, which is {} (as it was then)",
                                t.display()
                            ),
                            None => "this VM has not been snapshotted or restored since it \
                                     started, so there is nothing to take a diff against"
                                .into(),
                        },
                    }));
                }
                Some(base)
            }
        };
        let disks = self.live_disks();
        // A VM that stops with its snapshot writes nothing more: its disks need no new
        // overlay to keep the snapshot's images unchanged.
        let freeze: Vec<(usize, PathBuf)> = if options.shared_disks || options.stop {
            Vec::new()
        } else {
            disks
                .iter()
                .enumerate()
                .filter(|(_, d)| !d.readonly())
                .map(|(i, d)| (i, live_overlay_path(d.path(), dir)))
                .collect()
        };
        for (_, overlay) in &freeze {
            if overlay.exists() {
                return Err(self.snapshot_error(SnapshotError::Exists {
                    path: overlay.clone(),
                }));
            }
        }
        if let Err(e) = std::fs::create_dir(dir) {
            return Err(
                self.snapshot_error(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    SnapshotError::Exists {
                        path: dir.to_path_buf(),
                    }
                } else {
                    SnapshotError::Io {
                        what: "create the snapshot directory",
                        path: dir.to_path_buf(),
                        source: e,
                    }
                }),
            );
        }
        let paused_at = Instant::now();
        if was == VmState::Running {
            if let Err(e) = self.pause_locked() {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        }
        let result = self.save_paused(dir, base.as_deref(), &disks, &freeze);
        let result = match result {
            Ok(report) => Ok(report),
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                if base.is_some() {
                    // The dirty pages taken for the failed diff are gone from KVM's log
                    // and the VMM's bitmap: a later diff against the same base would miss
                    // them, so none is allowed.
                    self.lock().tracking_since = None;
                }
                Err(e)
            }
        };
        let paused_for = paused_at.elapsed();
        if options.stop && result.is_ok() {
            self.stop_locked();
        } else if was == VmState::Running {
            if let Err(e) = self.resume_locked() {
                // The snapshot itself is complete; say what went wrong with the VM.
                tracing::error!(vm = self.name(), error = %e, "cannot resume the VM after its snapshot");
                if result.is_ok() {
                    return Err(e);
                }
            }
        }
        result.map(|mut report| {
            report.paused_for = paused_for;
            report
        })
    }

    /// The disks the VM writes now (a snapshot switches them to new overlays).
    pub fn live_disks(&self) -> Vec<Arc<Disk>> {
        let inner = self.lock();
        if inner.live_disks.is_empty() {
            self.config.disks.clone()
        } else {
            inner.live_disks.clone()
        }
    }

    /// Everything of [`Vm::snapshot`] that happens while the VM is paused.
    fn save_paused(
        &self,
        dir: &Path,
        base: Option<&Path>,
        disks: &[Arc<Disk>],
        freeze: &[(usize, PathBuf)],
    ) -> Result<SnapshotReport, VmError> {
        let name = || self.config.name.clone();
        let (machine, memory, devices) = self.save_machine_state()?;

        // Guest memory.
        let memory_path = dir.join(MEMORY_FILE);
        let file = File::create(&memory_path).map_err(|source| {
            self.snapshot_error(SnapshotError::Io {
                what: "create",
                path: memory_path.clone(),
                source,
            })
        })?;
        let memory_error = |source| VmError::Memory {
            name: name(),
            source,
        };
        let diff_pages = match base {
            Some(_) => {
                let inner = self.lock();
                let machine = inner
                    .machine
                    .as_ref()
                    .ok_or_else(|| self.invalid("snapshot", inner.state))?;
                Some(take_dirty(&machine.vm_fd, &memory).map_err(memory_error)?)
            }
            None => None,
        };
        let selection = match &diff_pages {
            Some(pages) => PageSelection::Dirty(pages),
            None => PageSelection::All,
        };
        let saved = save_ram(&memory, &file, selection).map_err(memory_error)?;
        file.sync_all().map_err(|source| {
            self.snapshot_error(SnapshotError::Io {
                what: "sync",
                path: memory_path.clone(),
                source,
            })
        })?;

        // Disks: flushed, then frozen under new overlays.
        let mut saved_disks = Vec::with_capacity(disks.len());
        for (i, disk) in disks.iter().enumerate() {
            let flushed = devices.with_block(i, |block| block.flush());
            if let Some(Err(source)) = flushed {
                return Err(VmError::Disk {
                    name: name(),
                    source: crate::storage::StorageError::Io {
                        path: disk.path().to_path_buf(),
                        source,
                    },
                });
            }
            saved_disks.push(SavedDisk {
                path: std::fs::canonicalize(disk.path())
                    .unwrap_or_else(|_| disk.path().to_path_buf()),
                format: disk.format(),
                readonly: disk.readonly(),
                serial: disk.serial().to_string(),
                shared: !freeze.iter().any(|(f, _)| *f == i) && !disk.readonly(),
            });
        }
        let state = SnapshotState {
            host: HostRequirements::of_this_host(),
            config: self.saved_config(saved_disks),
            machine,
            memory: MemoryState {
                regions: region_layout(&memory),
                diff: match (base, diff_pages) {
                    (Some(base), Some(pages)) => Some(DiffMemory {
                        base: base.to_path_buf(),
                        base_id: self.lock().tracking_since.as_ref().map_or(0, |(_, id)| *id),
                        pages,
                    }),
                    _ => None,
                },
                allocated_bytes: saved.bytes_written,
            },
            id: new_snapshot_id(),
            taken_at_ms: now_ms(),
        };
        let state_bytes = state.write(dir).map_err(|e| self.snapshot_error(e))?;

        // Freezing comes last: everything before it changes nothing outside `dir`.
        let new_overlays = self.freeze_disks(&devices, disks, freeze)?;

        // From now on, changes are tracked against this snapshot for the next diff.
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        {
            let mut inner = self.lock();
            let logging = inner.dirty_logging;
            if let Some(machine) = inner.machine.as_ref() {
                // Registering the slots again costs 4–5 ms on PVM: only the first time.
                let on = if logging {
                    Ok(())
                } else {
                    set_dirty_logging(&machine.vm_fd, &memory, true)
                };
                if let Err(e) = on.and_then(|_| take_dirty(&machine.vm_fd, &memory).map(|_| ())) {
                    tracing::warn!(vm = self.name(), error = %e, "cannot track dirty pages; diff snapshots will be refused");
                    inner.tracking_since = None;
                } else {
                    inner.tracking_since = Some((canonical.clone(), state.id));
                    inner.dirty_logging = true;
                }
            }
        }
        Ok(SnapshotReport {
            path: canonical,
            memory_bytes: saved.bytes_written,
            memory_pages: saved.pages_written,
            state_bytes,
            diff: base.is_some(),
            paused_for: Duration::ZERO,
            new_overlays,
        })
    }

    /// The configuration a copy of this VM gets (a restore, or the destination of a
    /// migration), with `disks`.
    pub(crate) fn saved_config(&self, disks: Vec<SavedDisk>) -> SavedConfig {
        let GuestSpec::Builtin { cmdline } = &self.config.guest;
        SavedConfig {
            name: self.config.name.clone(),
            vcpus: self.config.vcpus,
            memory: self.config.memory,
            cmdline: cmdline.clone(),
            console_capacity: self.config.console_capacity,
            disks,
            dynamic_memory: self.config.dynamic_memory,
            memory_target: self.memory_target(),
        }
    }

    /// The state of every part of the paused machine but guest memory: vCPUs, irqchip,
    /// clocks, COM1 and the virtio devices; with the machine's RAM and device manager.
    /// Snapshots and live migration take it the same way.
    pub(crate) fn save_machine_state(
        &self,
    ) -> Result<
        (
            MachineState,
            Arc<crate::vstate::memory::GuestRam>,
            Arc<crate::devices::manager::DeviceManager>,
        ),
        VmError,
    > {
        let name = || self.config.name.clone();
        // vCPUs, the irqchip and the clock.
        let (replies, irqchip, kvm_clock, memory, devices) = {
            let inner = self.lock();
            let machine = inner
                .machine
                .as_ref()
                .ok_or_else(|| self.invalid("snapshot", inner.state))?;
            let mut replies = Vec::new();
            for v in &machine.vcpus {
                let (tx, rx) = std::sync::mpsc::channel();
                v.send(VcpuCommand::SaveState(tx));
                replies.push((v.index, rx));
            }
            let kvm_state = |source| VmError::KvmState {
                name: name(),
                source,
            };
            let irqchip = IrqchipState::save(&machine.vm_fd).map_err(kvm_state)?;
            let kvm_clock = save_clock(&machine.vm_fd).map_err(kvm_state)?;
            (
                replies,
                irqchip,
                kvm_clock,
                machine.memory.clone(),
                machine.devices.clone(),
            )
        };
        let deadline = deadline_after(VCPU_ACK_TIMEOUT);
        let mut vcpus = Vec::with_capacity(replies.len());
        for (index, rx) in replies {
            let wait = deadline.saturating_duration_since(Instant::now());
            let state = rx
                .recv_timeout(wait)
                .map_err(|_| VmError::VcpuTimeout {
                    name: name(),
                    op: "save state",
                })?
                .map_err(|source| VmError::VcpuState {
                    name: name(),
                    source,
                })?;
            debug_assert_eq!(vcpus.len(), index);
            vcpus.push(state);
        }
        let device_states = devices.save().map_err(|source| VmError::Devices {
            name: name(),
            source,
        })?;
        let serial = {
            let inner = self.lock();
            let machine = inner
                .machine
                .as_ref()
                .ok_or_else(|| self.invalid("snapshot", inner.state))?;
            let serial = machine.serial.lock().unwrap_or_else(|p| p.into_inner());
            serial.save().map_err(|e| VmError::Restore {
                name: name(),
                reason: format!("cannot save the serial port: {e}"),
            })?
        };

        let machine = MachineState {
            vcpus,
            irqchip,
            kvm_clock,
            run_time_ns: self.clock.elapsed().as_nanos() as u64,
            serial,
            layout: devices.layout().clone(),
            devices: device_states,
        };
        Ok((machine, memory, devices))
    }

    /// Switches each disk in `freeze` to a new overlay on top of its (flushed) image,
    /// which from then on is only read. All or nothing, and never unlocked:
    ///
    /// 1. each device gives up writing its image but keeps refusing other writers (the
    ///    image is never open to a writer), then its overlay is created and opened, which
    ///    reads the image as its backing file;
    /// 2. only when every overlay is ready do the devices switch to them.
    ///
    /// If any step of 1 fails, the overlays made so far are removed and every device
    /// takes writing back, so the disks are as they were.
    fn freeze_disks(
        &self,
        devices: &crate::devices::manager::DeviceManager,
        disks: &[Arc<Disk>],
        freeze: &[(usize, PathBuf)],
    ) -> Result<Vec<(usize, PathBuf)>, VmError> {
        let name = || self.config.name.clone();
        let mut given_up: Vec<usize> = Vec::new();
        let mut ready: Vec<(usize, PathBuf, Disk, Box<dyn crate::storage::DiskBackend>)> =
            Vec::new();
        let mut failure = None;
        for (index, overlay_path) in freeze {
            let disk = &disks[*index];
            let gave_up = devices.with_block(*index, |block| block.give_up_writing(disk.path()));
            match gave_up {
                None => continue,
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                Some(Ok(())) => given_up.push(*index),
            }
            let made = Disk::create_overlay_with(disk.path(), Some(disk.format()), overlay_path);
            let opened = made.and_then(|mut overlay| {
                // The guest's disk keeps its serial through the switch.
                overlay.set_serial(disk.serial());
                match overlay.attach() {
                    Ok(backend) => Ok((overlay, backend)),
                    Err(e) => {
                        let _ = std::fs::remove_file(overlay_path);
                        Err(e)
                    }
                }
            });
            match opened {
                Ok((overlay, backend)) => {
                    ready.push((*index, overlay_path.clone(), overlay, backend))
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if let Some(source) = failure {
            for (_, path, _, backend) in ready.drain(..) {
                drop(backend);
                let _ = std::fs::remove_file(&path);
            }
            for index in given_up {
                let disk = &disks[index];
                if let Some(Err(e)) =
                    devices.with_block(index, |block| block.take_up_writing(disk.path()))
                {
                    tracing::error!(vm = self.name(), disk = %disk.path().display(), error = %e, "cannot take writing back after a failed snapshot; the guest's writes to this disk fail");
                }
            }
            return Err(VmError::Disk {
                name: name(),
                source,
            });
        }
        let mut done = Vec::with_capacity(ready.len());
        let mut inner = self.lock();
        if inner.live_disks.is_empty() {
            inner.live_disks = self.config.disks.clone();
        }
        for (index, path, overlay, backend) in ready {
            // The old backend only reads the image now; it goes with the switch.
            devices.with_block(index, |block| drop(block.swap_backend(backend)));
            inner.live_disks[index] = Arc::new(overlay);
            done.push((index, path));
        }
        Ok(done)
    }

    /// Builds and starts this (created) VM from a snapshot read into `state`.
    pub(crate) fn launch_restored(
        self: &Arc<Self>,
        dir: &Path,
        state: &SnapshotState,
    ) -> Result<(), VmError> {
        let _control = self.lock_control();
        let name = || self.config.name.clone();
        let memory_error = |source| VmError::Memory {
            name: name(),
            source,
        };
        // The chain of memory files: the full snapshot at the root, then each diff.
        let mut chain = vec![(dir.to_path_buf(), state.memory.diff.clone())];
        let mut root = dir.to_path_buf();
        let mut next = state.memory.diff.as_ref().map(|d| d.base.clone());
        while let Some(base) = next {
            if chain.len() > 64 {
                return Err(self.snapshot_error(SnapshotError::Invalid {
                    path: dir.to_path_buf(),
                    reason: "its chain of diff snapshots is longer than 64 (or loops)".into(),
                }));
            }
            let base_state = SnapshotState::read(&base).map_err(|e| self.snapshot_error(e))?;
            if base_state.memory.regions != state.memory.regions {
                return Err(self.snapshot_error(SnapshotError::Invalid {
                    path: base.clone(),
                    reason: "its memory layout differs from the diff's".into(),
                }));
            }
            let wanted = chain
                .last()
                .and_then(|(_, diff)| diff.as_ref().map(|d| d.base_id));
            if wanted != Some(base_state.id) {
                return Err(self.snapshot_error(SnapshotError::Invalid {
                    path: base.clone(),
                    reason: "it is not the snapshot the diff was taken against (it was \
                             replaced since)"
                        .into(),
                }));
            }
            next = base_state.memory.diff.as_ref().map(|d| d.base.clone());
            chain.push((base.clone(), base_state.memory.diff.clone()));
            root = base;
        }
        // A VM prepared ahead of time (KVM VM, irqchip, slots with the dirty log on) when
        // one is ready: the snapshot's memory is mapped over its RAM. Otherwise one is
        // built around the snapshot's memory mapped afresh.
        let backing =
            MemoryBacking::file_private(&root.join(MEMORY_FILE), 0).map_err(memory_error)?;
        let kind = prepared::Kind {
            size: self.config.memory,
            log_dirty: true,
        };
        let (ram, vm_fd) = match (prepared::take(kind), backing) {
            (Some(ready), MemoryBacking::FilePrivate { file, offset }) => {
                let ram = map_file_over(ready.memory, file, offset).map_err(memory_error)?;
                (ram, Some(ready.vm_fd))
            }
            (_, backing) => (
                create_ram_with(self.config.memory, backing).map_err(memory_error)?,
                None,
            ),
        };
        if region_layout(&ram) != state.memory.regions {
            return Err(self.snapshot_error(SnapshotError::Invalid {
                path: dir.to_path_buf(),
                reason: "its memory layout does not match its memory size".into(),
            }));
        }
        // Diffs, oldest first.
        for (path, diff) in chain.iter().rev() {
            if let Some(diff) = diff {
                let file_path = path.join(MEMORY_FILE);
                let file = File::open(&file_path).map_err(|source| {
                    self.snapshot_error(SnapshotError::Io {
                        what: "open",
                        path: file_path.clone(),
                        source,
                    })
                })?;
                apply_ram_diff(&ram, &file, &diff.pages).map_err(memory_error)?;
            }
        }
        let mapped_at = Instant::now();
        let (vm_fd, memory) = match vm_fd {
            Some(vm_fd) => (vm_fd, ram),
            None => {
                let prepared::PreparedVm { vm_fd, memory } =
                    prepared::prepare_with_memory(ram, true).map_err(|source| {
                        VmError::Prepare {
                            name: name(),
                            source,
                        }
                    })?;
                (vm_fd, memory)
            }
        };
        tracing::debug!(
            vm = self.name(),
            took_us = mapped_at.elapsed().as_micros() as u64,
            "restore: KVM VM created, memory registered"
        );
        self.launch(Some(RestoreParts {
            state: &state.machine,
            vm_fd,
            memory,
        }))?;
        // The slots were registered with the dirty log on: changes from here on are
        // tracked for a diff against this snapshot.
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mut inner = self.lock();
        inner.tracking_since = Some((canonical, state.id));
        inner.dirty_logging = true;
        Ok(())
    }
}

/// The configuration of a VM restored from `state` under `name`, with its disks opened
/// (each frozen disk under a new overlay of its own). Creates the overlays; on error,
/// removes those it created.
pub fn restored_config(
    state: &SnapshotState,
    name: &str,
) -> Result<(VmConfig, Vec<PathBuf>), crate::storage::StorageError> {
    let (mut config, overlays) = config_from_saved(&state.config, name)?;
    config.agent = state.machine.layout.has_agent();
    Ok((config, overlays))
}

/// [`restored_config`] from the saved configuration alone (a migration brings one).
pub(crate) fn config_from_saved(
    saved_config: &SavedConfig,
    name: &str,
) -> Result<(VmConfig, Vec<PathBuf>), crate::storage::StorageError> {
    let mut disks = Vec::with_capacity(saved_config.disks.len());
    let mut created = Vec::new();
    for saved in &saved_config.disks {
        let opened = if saved.readonly || saved.shared {
            Disk::open_with(
                &saved.path,
                OpenOptions {
                    readonly: saved.readonly,
                    format: Some(saved.format),
                },
            )
        } else {
            let overlay = restore_overlay_path(&saved.path, name);
            let made = Disk::create_overlay_with(&saved.path, Some(saved.format), &overlay);
            if made.is_ok() {
                created.push(overlay);
            }
            made
        };
        match opened {
            Ok(mut disk) => {
                disk.set_serial(&saved.serial);
                disks.push(Arc::new(disk));
            }
            Err(e) => {
                for path in &created {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        }
    }
    let mut config = VmConfig::new(
        name,
        GuestSpec::Builtin {
            cmdline: saved_config.cmdline.clone(),
        },
    );
    config.vcpus = saved_config.vcpus;
    config.memory = saved_config.memory;
    // Bounded whatever the file says: the console buffer is allocated up front.
    config.console_capacity = saved_config.console_capacity.min(MAX_RESTORED_CONSOLE);
    config.disks = disks;
    config.dynamic_memory = saved_config.dynamic_memory;
    Ok((config, created))
}

/// Guest-physical start and length of each RAM region, in file order.
pub(crate) fn region_layout(mem: &crate::vstate::memory::GuestRam) -> Vec<(u64, u64)> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}
