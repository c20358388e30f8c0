//! Disk images and the backends virtio-blk reads and writes through.
//!
//! - [`raw`]: a plain image file; discard and write-zeroes punch holes.
//! - [`qcow2`]: copy-on-write overlays in the qcow2 format (version 3, no compression,
//!   encryption or internal snapshots), readable and checkable by `qemu-img`.
//! - [`disk`]: a disk as the rest of luvisor sees it: path, format, size, read-only
//!   flag, statistics; opening a whole backing chain.
//! - [`probe`]: recognising formats from the first sector, and the guard that keeps a
//!   guest from changing how a probed raw image would be opened.
//! - [`lock`]: QEMU-compatible image locks that keep two writers apart.

pub mod disk;
pub mod lock;
pub mod probe;
pub mod qcow2;
pub mod raw;
/// Shared by the runtime's unit tests and the integration tests; not part of the API.
#[doc(hidden)]
pub mod test_tools;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::vstate::memory::GuestSlice;
use thiserror::Error;

pub use disk::{Disk, DiskFormat, DiskStats, DiskStatsSnapshot, OpenOptions};
pub use lock::LockMode;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// What a virtio-blk device needs from an image. Offsets and lengths are in bytes and
/// lie inside `[0, size())`; the device checks that before calling.
pub trait DiskBackend: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Reads `dst.len()` bytes at `offset` into guest memory. The default reads into
    /// `scratch` with [`DiskBackend::read_at`] and copies; backends that can read
    /// straight into `dst` skip that copy, which costs as much as the read itself for
    /// large requests served from the page cache.
    fn read_to_guest(
        &mut self,
        dst: &GuestSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        if scratch.len() < dst.len() {
            scratch.resize(dst.len(), 0);
        }
        let data = &mut scratch[..dst.len()];
        self.read_at(data, offset)?;
        dst.copy_from(data);
        Ok(())
    }
    /// Writes `src` (guest memory) at `offset`. The default copies it into `scratch`
    /// and calls [`DiskBackend::write_at`]; a backend may write straight from `src` only
    /// where it never inspects the data, because the guest can change `src` while the
    /// write is under way.
    fn write_from_guest(
        &mut self,
        src: &GuestSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        if scratch.len() < src.len() {
            scratch.resize(src.len(), 0);
        }
        let data = &mut scratch[..src.len()];
        src.copy_to(data);
        self.write_at(data, offset)
    }
    /// Returns once everything written so far is durable (`fdatasync`).
    fn flush(&mut self) -> io::Result<()>;
    /// The top image's file, which carries the image's locks (`None`: no file).
    fn lock_file(&self) -> Option<&File> {
        None
    }
    /// The range's contents become unspecified; space may be released.
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// The range reads back as zeros; space may be released.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

#[derive(Debug, Error)]
pub enum StorageError {
    #[error("disk image {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} already exists; refusing to overwrite it (remove it first)")]
    Exists { path: PathBuf },
    #[error("disk size {size} of {path} is empty or not a multiple of 512 bytes")]
    SizeNotSectorMultiple { path: PathBuf, size: u64 },
    #[error("disk image {path} is locked: {reason}")]
    Locked { path: PathBuf, reason: String },
    #[error(
        "disk {base_index} ({base}) is the backing file of disk {overlay_index} ({overlay}) in \
         the same VM; a VM cannot write an image it also reads through an overlay (open it \
         read-only)"
    )]
    BaseListedWritable {
        base: PathBuf,
        base_index: usize,
        overlay: PathBuf,
        overlay_index: usize,
    },
    #[error("{path} is {what}, not a disk image (a regular file or a block device)")]
    NotAnImage { path: PathBuf, what: &'static str },
    #[error(
        "cannot lock disk image {path} (its filesystem may not support OFD byte-range locks, \
         which luvisor and QEMU use to keep writers apart)"
    )]
    LockFailed {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("backing file {backing} of overlay {overlay} does not exist")]
    BackingNotFound { overlay: PathBuf, backing: PathBuf },
    #[error("the backing chain of {path} loops: {chain}")]
    BackingLoop { path: PathBuf, chain: String },
    #[error(
        "disk image {path} is in the {format} format, which luvisor does not read; convert it \
         with `qemu-img convert -O qcow2` (or `-O raw`)"
    )]
    UnsupportedFormat { path: PathBuf, format: String },
    #[error("disk image {path} changed since it was opened: {what}; open it again")]
    Changed { path: PathBuf, what: String },
    #[error("disk image {path} is listed twice in one VM (disks {first} and {second}); a VM can use an image once")]
    ListedTwice {
        path: PathBuf,
        first: usize,
        second: usize,
    },
    #[error("disk size {size} of {path} is too large: {limit}")]
    SizeTooLarge {
        path: PathBuf,
        size: u64,
        limit: String,
    },
    #[error("disk image {path} is not a valid qcow2 image: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("disk image {path} uses a qcow2 feature luvisor does not support: {feature}")]
    Unsupported { path: PathBuf, feature: String },
    #[error("I/O error on disk image {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StorageError {
    pub(crate) fn io(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
        move |source| StorageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Creates `path` for reading and writing; refuses (with [`StorageError::Exists`]) to
/// touch a file that is already there.
pub(crate) fn create_new(path: &Path) -> Result<File, StorageError> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|source| {
            if source.kind() == io::ErrorKind::AlreadyExists {
                StorageError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                StorageError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })
}

/// `fallocate` with `mode`; `Ok(false)` when the filesystem does not support it.
pub(crate) fn fallocate(file: &File, mode: i32, offset: u64, len: u64) -> io::Result<bool> {
    // SAFETY: fallocate on a file descriptor we own; no memory is involved.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
        _ => Err(err),
    }
}

/// Durably flushes a file's data (`fdatasync`).
pub(crate) fn sync_data(file: &File) -> io::Result<()> {
    file.sync_data()
}
