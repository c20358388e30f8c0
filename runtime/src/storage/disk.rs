//! A disk as luvisor sees it: an image file with a format, a size, a read-only flag and
//! I/O statistics. The file is opened and locked for a VM when the VM starts
//! ([`Disk::attach`]) and unlocked when it stops.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::qcow2::{self, Qcow2Backend};
use super::raw::RawBackend;
use super::{create_new, lock_file, DiskBackend, LockMode, StorageError, SECTOR_SIZE};

/// How deep overlays may chain (overlay of an overlay of ...).
const MAX_BACKING_DEPTH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// Counters a virtio-blk device updates as it serves requests.
#[derive(Debug, Default)]
pub struct DiskStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub discards: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub errors: AtomicU64,
}

/// A copy of [`DiskStats`] at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DiskStatsSnapshot {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

impl DiskStats {
    pub fn snapshot(&self) -> DiskStatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DiskStatsSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A disk image a VM can use.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    format: DiskFormat,
    readonly: bool,
    size: u64,
    serial: String,
    stats: Arc<DiskStats>,
}

fn open_file(path: &Path, writable: bool) -> Result<File, StorageError> {
    File::options()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound {
                path: path.to_path_buf(),
            },
            _ => StorageError::Open {
                path: path.to_path_buf(),
                source,
            },
        })
}

fn detect_format(file: &File, path: &Path) -> Result<DiskFormat, StorageError> {
    if qcow2::is_qcow2(file).map_err(StorageError::io(path))? {
        Ok(DiskFormat::Qcow2)
    } else {
        Ok(DiskFormat::Raw)
    }
}

/// The default serial: the file name, cut to the 20 bytes virtio-blk allows.
fn default_serial(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut serial = String::new();
    for c in name.chars() {
        if serial.len() + c.len_utf8() > 20 {
            break;
        }
        serial.push(c);
    }
    serial
}

/// Resolves a backing file name from a qcow2 header against the overlay's directory.
fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let backing = Path::new(name);
    if backing.is_absolute() {
        backing.to_path_buf()
    } else {
        overlay.parent().unwrap_or(Path::new(".")).join(backing)
    }
}

/// Opens an image of either format as a backend; qcow2 images bring their backing chain.
fn open_backend(
    path: &Path,
    writable: bool,
    depth: usize,
) -> Result<Box<dyn DiskBackend>, StorageError> {
    if depth > MAX_BACKING_DEPTH {
        return Err(StorageError::Unsupported {
            path: path.to_path_buf(),
            feature: format!("a backing chain deeper than {MAX_BACKING_DEPTH} images"),
        });
    }
    let file = open_file(path, writable)?;
    lock_file(
        &file,
        path,
        if writable {
            LockMode::Exclusive
        } else {
            LockMode::Shared
        },
    )?;
    match detect_format(&file, path)? {
        DiskFormat::Raw => {
            let size = file.metadata().map_err(StorageError::io(path))?.len();
            Ok(Box::new(RawBackend::new(file, size)))
        }
        DiskFormat::Qcow2 => {
            let header = qcow2::Header::read(&file, path)?;
            let backing = match &header.backing_file {
                Some(name) => Some(open_backend(
                    &resolve_backing(path, name),
                    false,
                    depth + 1,
                )?),
                None => None,
            };
            Ok(Box::new(Qcow2Backend::open(file, path, writable, backing)?))
        }
    }
}

impl Disk {
    /// Creates a sparse raw image of `size` bytes; `path` must not exist.
    pub fn create_raw(path: &Path, size: u64) -> Result<Disk, StorageError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(StorageError::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        let file = create_new(path)?;
        if let Err(source) = file.set_len(size) {
            let _ = std::fs::remove_file(path);
            return Err(StorageError::Io {
                path: path.to_path_buf(),
                source,
            });
        }
        Disk::open(path, false)
    }

    /// Creates an empty qcow2 image of `size` bytes; `path` must not exist.
    pub fn create_qcow2(path: &Path, size: u64) -> Result<Disk, StorageError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(StorageError::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        qcow2::create(path, size, None)?;
        Disk::open(path, false)
    }

    /// Creates a qcow2 overlay at `path` whose unwritten clusters come from `base`. The
    /// base must exist and nobody may be writing it; it is never written through the
    /// overlay.
    pub fn create_overlay(base: &Path, path: &Path) -> Result<Disk, StorageError> {
        let base_disk = Disk::open(base, true)?;
        let absolute = std::fs::canonicalize(base).map_err(StorageError::io(base))?;
        let name = absolute.to_str().ok_or_else(|| StorageError::Unsupported {
            path: base.to_path_buf(),
            feature: "a base path that is not UTF-8".into(),
        })?;
        qcow2::create(
            path,
            base_disk.size,
            Some((name, base_disk.format.as_str())),
        )?;
        Disk::open(path, false)
    }

    /// Opens an existing image, checking its format, size and that it is not locked
    /// against the requested access right now.
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, StorageError> {
        // Open the whole chain once, exactly as a VM would, then let it go.
        let backend = open_backend(path, !readonly, 0)?;
        let size = backend.size();
        drop(backend);
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(StorageError::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        let file = open_file(path, false)?;
        Ok(Disk {
            format: detect_format(&file, path)?,
            path: path.to_path_buf(),
            readonly,
            size,
            serial: default_serial(path),
            stats: Arc::new(DiskStats::default()),
        })
    }

    /// Opens and locks the image for a VM: exclusively when writable, shared otherwise.
    pub fn attach(&self) -> Result<Box<dyn DiskBackend>, StorageError> {
        open_backend(&self.path, !self.readonly, 0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn format(&self) -> DiskFormat {
        self.format
    }
    pub fn readonly(&self) -> bool {
        self.readonly
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn serial(&self) -> &str {
        &self.serial
    }
    pub fn set_serial(&mut self, serial: &str) {
        self.serial = serial.chars().take(20).collect();
    }
    pub fn stats(&self) -> &Arc<DiskStats> {
        &self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luvisor-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    #[test]
    fn bad_input_is_rejected() {
        let missing = scratch("missing.img");
        assert!(matches!(
            Disk::open(&missing, true),
            Err(StorageError::NotFound { .. })
        ));
        let odd = scratch("odd.img");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            Disk::open(&odd, true),
            Err(StorageError::SizeNotSectorMultiple { size: 1000, .. })
        ));
        assert!(matches!(
            Disk::create_raw(&scratch("x.img"), 1000),
            Err(StorageError::SizeNotSectorMultiple { .. })
        ));
        let exists = scratch("exists.img");
        std::fs::write(&exists, vec![0u8; 512]).unwrap();
        assert!(matches!(
            Disk::create_raw(&exists, 512),
            Err(StorageError::Exists { .. })
        ));
        assert_eq!(
            std::fs::read(&exists).unwrap().len(),
            512,
            "an existing file is left alone"
        );
    }

    #[test]
    fn locks_keep_writers_apart() {
        let path = scratch("locked.img");
        let disk = Disk::create_raw(&path, 1 << 20).unwrap();
        assert_eq!(disk.format(), DiskFormat::Raw);
        assert_eq!(disk.serial(), "locked.img");
        let writer = disk.attach().unwrap();
        assert!(matches!(
            Disk::open(&path, false),
            Err(StorageError::Locked { .. })
        ));
        assert!(matches!(
            Disk::open(&path, true),
            Err(StorageError::Locked { .. })
        ));
        let overlay = scratch("over-locked.qcow2");
        assert!(matches!(
            Disk::create_overlay(&path, &overlay),
            Err(StorageError::Locked { .. })
        ));
        assert!(!overlay.exists(), "a refused overlay leaves no file behind");
        drop(writer);
        let ro = Disk::open(&path, true).unwrap();
        let reader = ro.attach().unwrap();
        let reader2 = ro.attach().unwrap();
        assert!(
            matches!(Disk::open(&path, false), Err(StorageError::Locked { .. })),
            "readers keep writers out"
        );
        drop((reader, reader2));
        Disk::open(&path, false).unwrap();
    }

    #[test]
    fn overlays_chain() {
        let base = scratch("chain-base.img");
        let mut b = Disk::create_raw(&base, 1 << 20).unwrap().attach().unwrap();
        b.write_at(&[5u8; 512], 0).unwrap();
        drop(b);
        let mid = scratch("chain-mid.qcow2");
        Disk::create_overlay(&base, &mid).unwrap();
        let top = scratch("chain-top.qcow2");
        let disk = Disk::create_overlay(&mid, &top).unwrap();
        assert_eq!(disk.format(), DiskFormat::Qcow2);
        assert_eq!(disk.size(), 1 << 20);
        let mut t = disk.attach().unwrap();
        let mut buf = [0u8; 512];
        t.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [5u8; 512]);
        assert!(
            matches!(Disk::open(&base, false), Err(StorageError::Locked { .. })),
            "the base is held shared"
        );
    }
}
