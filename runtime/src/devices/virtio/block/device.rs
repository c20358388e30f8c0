//! The virtio-blk device: features, configuration space and the request loop.

use crate::vstate::memory::GuestRam;
use virtio_queue::{Queue, QueueT};

use super::request::{self, ChainBuffers, Target};
use crate::devices::virtio::{
    features, next_chain, DeviceStateError, QueueError, VirtioDevice, VirtioDeviceState,
};
use crate::snapshot::Persist;
use crate::storage::{Disk, DiskBackend, DiskStats, SECTOR_SIZE};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// virtio device ID of a block device.
pub const DEVICE_TYPE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
/// Descriptors per queue.
pub const QUEUE_SIZE: u16 = 256;

/// Feature bits (virtio 1.2, 5.2.3), from `virtio-bindings`.
pub mod feature {
    use virtio_bindings::virtio_blk as b;
    pub const SEG_MAX: u64 = 1 << b::VIRTIO_BLK_F_SEG_MAX;
    pub const RO: u64 = 1 << b::VIRTIO_BLK_F_RO;
    pub const BLK_SIZE: u64 = 1 << b::VIRTIO_BLK_F_BLK_SIZE;
    pub const FLUSH: u64 = 1 << b::VIRTIO_BLK_F_FLUSH;
    pub const DISCARD: u64 = 1 << b::VIRTIO_BLK_F_DISCARD;
    pub const WRITE_ZEROES: u64 = 1 << b::VIRTIO_BLK_F_WRITE_ZEROES;
}

pub struct Block {
    backend: Box<dyn DiskBackend>,
    readonly: bool,
    serial: Vec<u8>,
    stats: Arc<DiskStats>,
    config: [u8; 64],
    acked_features: u64,
    /// Reused for every request's data (up to the 32 MiB request limit).
    buffer: Vec<u8>,
    /// Reused for every request's descriptor list.
    chain: ChainBuffers,
}

impl Block {
    /// A device serving `backend` (already opened and locked through `disk`).
    pub fn new(disk: &Disk, backend: Box<dyn DiskBackend>) -> Block {
        let mut config = [0u8; 64];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &(backend.size() / SECTOR_SIZE).to_le_bytes()); // capacity in sectors
        put(12, &request::MAX_SEGMENTS.to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        let whole_disk = (backend.size() / SECTOR_SIZE).min(u32::MAX as u64) as u32;
        put(36, &whole_disk.to_le_bytes()); // max_discard_sectors
        put(40, &(request::MAX_RANGE_SEGMENTS as u32).to_le_bytes()); // max_discard_seg
        put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        put(48, &whole_disk.to_le_bytes()); // max_write_zeroes_sectors
        put(52, &(request::MAX_RANGE_SEGMENTS as u32).to_le_bytes()); // max_write_zeroes_seg
        config[56] = 1; // write_zeroes_may_unmap
        Block {
            backend,
            readonly: disk.readonly(),
            serial: disk.serial().as_bytes().to_vec(),
            stats: disk.stats().clone(),
            config,
            acked_features: 0,
            buffer: Vec::new(),
            chain: ChainBuffers::default(),
        }
    }
}

/// A block device's saved state. Requests are executed synchronously when the event
/// thread serves the queue, so a paused device has none in flight: every request the
/// driver posted is either in the used ring or still in the available ring, past the
/// queue's saved `next_avail`, and is served after the restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockState {
    pub acked_features: u64,
    /// What the guest was told, checked against the disk on restore.
    pub capacity_sectors: u64,
    pub readonly: bool,
}

/// What a restored block device serves: the disk and its opened backend.
pub struct BlockArgs<'a> {
    pub disk: &'a Disk,
    pub backend: Box<dyn DiskBackend>,
}

impl Persist for Block {
    type State = BlockState;
    type Args = BlockArgs<'static>;
    type Error = DeviceStateError;

    fn save(&self) -> Result<BlockState, DeviceStateError> {
        Ok(self.state())
    }

    fn restore(args: BlockArgs<'static>, state: &BlockState) -> Result<Block, DeviceStateError> {
        Block::restore_from(args.disk, args.backend, state)
    }
}

impl Block {
    fn state(&self) -> BlockState {
        BlockState {
            acked_features: self.acked_features,
            capacity_sectors: self.backend.size() / SECTOR_SIZE,
            readonly: self.readonly,
        }
    }

    /// [`Persist::restore`] for any lifetime of the disk reference.
    pub fn restore_from(
        disk: &Disk,
        backend: Box<dyn DiskBackend>,
        state: &BlockState,
    ) -> Result<Block, DeviceStateError> {
        let mut block = Block::new(disk, backend);
        let capacity = block.backend.size() / SECTOR_SIZE;
        if capacity != state.capacity_sectors {
            return Err(DeviceStateError::Invalid(format!(
                "disk {} has {capacity} sectors, the guest was told {}",
                disk.path().display(),
                state.capacity_sectors
            )));
        }
        if block.readonly != state.readonly {
            return Err(DeviceStateError::Invalid(format!(
                "disk {} is {}, the guest was told it is {}",
                disk.path().display(),
                if block.readonly {
                    "read-only"
                } else {
                    "writable"
                },
                if state.readonly {
                    "read-only"
                } else {
                    "writable"
                }
            )));
        }
        if state.acked_features & !block.features() != 0 {
            return Err(DeviceStateError::Invalid(format!(
                "features {:#x} were agreed but the device does not offer them",
                state.acked_features & !block.features()
            )));
        }
        block.acked_features = state.acked_features;
        Ok(block)
    }
}

impl Block {
    /// Makes everything written so far durable.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.backend.flush()
    }

    /// Replaces the image the device serves (same size) and returns the old one. Only
    /// while the VM is paused: the guest must not see the switch.
    pub fn swap_backend(&mut self, backend: Box<dyn DiskBackend>) -> Box<dyn DiskBackend> {
        std::mem::replace(&mut self.backend, backend)
    }

    /// Gives up writing the image (its write lock byte) while still keeping other
    /// writers out, so it can be opened read-only as a new overlay's backing file. Only
    /// while the VM is paused, after [`Block::flush`].
    pub fn give_up_writing(
        &mut self,
        path: &std::path::Path,
    ) -> Result<(), crate::storage::StorageError> {
        match self.backend.lock_file() {
            Some(file) => crate::storage::lock::give_up_writing(file).map_err(|source| {
                crate::storage::StorageError::LockFailed {
                    path: path.to_path_buf(),
                    source,
                }
            }),
            None => Ok(()),
        }
    }

    /// Takes writing back after [`Block::give_up_writing`].
    pub fn take_up_writing(
        &mut self,
        path: &std::path::Path,
    ) -> Result<(), crate::storage::StorageError> {
        match self.backend.lock_file() {
            Some(file) => crate::storage::lock::take_up_writing(file, path),
            None => Ok(()),
        }
    }

    /// Drops the image's locks (a writable image only; a read-only one is shared
    /// anyway), so the destination of a live migration can lock it. Only while the VM
    /// is paused, after [`Block::flush`]; [`Block::retake_image`] undoes it.
    pub fn release_image(
        &mut self,
        path: &std::path::Path,
    ) -> Result<(), crate::storage::StorageError> {
        match self.backend.lock_file() {
            Some(file) if !self.readonly => crate::storage::lock::release(file).map_err(|source| {
                crate::storage::StorageError::LockFailed {
                    path: path.to_path_buf(),
                    source,
                }
            }),
            _ => Ok(()),
        }
    }

    /// Locks the image again after [`Block::release_image`]; fails (a conflict) while
    /// another process holds it.
    pub fn retake_image(
        &mut self,
        path: &std::path::Path,
    ) -> Result<(), crate::storage::StorageError> {
        match self.backend.lock_file() {
            Some(file) if !self.readonly => crate::storage::lock::lock_image(
                file,
                path,
                crate::storage::lock::LockMode::Exclusive,
            ),
            _ => Ok(()),
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        self.backend.size()
    }
}

impl VirtioDevice for Block {
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn save_state(&self) -> VirtioDeviceState {
        VirtioDeviceState::Block(self.state())
    }

    fn device_type(&self) -> u32 {
        DEVICE_TYPE
    }

    fn features(&self) -> u64 {
        let mut f = features::VERSION_1 | feature::SEG_MAX | feature::BLK_SIZE | feature::FLUSH;
        if self.readonly {
            f |= feature::RO;
        } else {
            f |= feature::DISCARD | feature::WRITE_ZEROES;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        if let Some(end) = start
            .checked_add(data.len())
            .filter(|&e| e <= self.config.len())
        {
            data.copy_from_slice(&self.config[start..end]);
        }
    }

    fn activate(&mut self, acked_features: u64) {
        self.acked_features = acked_features;
    }

    fn reset(&mut self) {
        self.acked_features = 0;
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestRam,
    ) -> Result<bool, QueueError> {
        let acked = self.acked_features;
        let mut target = Target {
            backend: self.backend.as_mut(),
            readonly: self.readonly,
            serial: &self.serial,
            stats: &self.stats,
            discard: acked & feature::DISCARD != 0,
            write_zeroes: acked & feature::WRITE_ZEROES != 0,
            flush: acked & feature::FLUSH != 0,
            buffer: &mut self.buffer,
            chain: &mut self.chain,
        };
        let mut used_any = false;
        let broken = |source| QueueError {
            queue: index,
            source,
        };
        // At most one ring's worth per call, so a driver that keeps refilling the ring
        // cannot hold the event thread here; the caller comes back for the rest.
        for _ in 0..queue.size().max(1) {
            let Some(chain) = next_chain(queue, mem, index)? else {
                break;
            };
            let head = chain.head_index();
            let used_len = request::execute(chain, mem, &mut target).unwrap_or(0);
            queue.add_used(mem, head, used_len).map_err(broken)?;
            used_any = true;
        }
        Ok(used_any)
    }
}
