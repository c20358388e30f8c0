//! Disk images and the backends virtio-blk reads and writes through.
//!
//! - [`raw`]: a plain image file; discard and write-zeroes punch holes.
//! - [`qcow2`]: copy-on-write overlays in the qcow2 format (version 3, no compression,
//!   encryption or internal snapshots), readable and checkable by `qemu-img`.
//! - [`disk`]: a disk as the rest of luvisor sees it: path, format, size, read-only
//!   flag, statistics, and the file locks that keep two VMs from writing one image.

pub mod disk;
pub mod qcow2;
pub mod raw;

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

pub use disk::{Disk, DiskFormat, DiskStats, DiskStatsSnapshot};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;

/// What a virtio-blk device needs from an image. Offsets and lengths are in bytes and
/// lie inside `[0, size())`; the device checks that before calling.
pub trait DiskBackend: Send {
    fn size(&self) -> u64;
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Returns once everything written so far is durable (`fdatasync`).
    fn flush(&mut self) -> io::Result<()>;
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
    #[error("disk size {size} of {path} is not a multiple of 512 bytes")]
    SizeNotSectorMultiple { path: PathBuf, size: u64 },
    #[error(
        "disk image {path} is {held} by another user (a running VM or another process); {wanted}"
    )]
    Locked {
        path: PathBuf,
        held: &'static str,
        wanted: &'static str,
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

/// How a disk's file is locked while a VM uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Readers share the image; nobody may write it meanwhile.
    Shared,
    /// One writer, nobody else.
    Exclusive,
}

/// Takes an advisory `flock` on `file`, failing at once if it conflicts.
///
/// `flock` locks belong to the open file description, so two opens of one image in the
/// same process conflict exactly like two processes do.
pub fn lock_file(file: &File, path: &Path, mode: LockMode) -> Result<(), StorageError> {
    let op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(match mode {
            LockMode::Exclusive => StorageError::Locked {
                path: path.to_path_buf(),
                held: "in use",
                wanted: "it cannot be opened read-write while anything else has it open",
            },
            LockMode::Shared => StorageError::Locked {
                path: path.to_path_buf(),
                held: "open read-write",
                wanted: "it cannot be read while something writes it",
            },
        })
    } else {
        Err(StorageError::Io {
            path: path.to_path_buf(),
            source: err,
        })
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
