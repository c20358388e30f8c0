//! A disk as luvisor sees it: an image file with a format, a size, a read-only flag and
//! I/O statistics. The file is opened and locked for a VM when the VM starts
//! ([`Disk::attach`]) and unlocked when it stops.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::lock::{lock_image, LockMode};
use super::probe::{self, ProbedFormat, PROBE_BYTES};
use super::qcow2::{self, Qcow2Backend};
use super::raw::RawBackend;
use super::{create_new, DiskBackend, StorageError, SECTOR_SIZE};

/// How deep overlays may chain (overlay of an overlay of ...).
const MAX_BACKING_DEPTH: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

    /// The format named `name` ("raw" or "qcow2").
    pub fn parse(name: &str) -> Option<DiskFormat> {
        match name {
            "raw" => Some(DiskFormat::Raw),
            "qcow2" => Some(DiskFormat::Qcow2),
            _ => None,
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

/// How to open an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open without write access; the image is locked shared.
    pub readonly: bool,
    /// The image's format. `None` probes it from the first sector, and then a guest may
    /// not write anything into a raw image's first sector that would make it probe as
    /// another format.
    pub format: Option<DiskFormat>,
}

/// One image below an overlay in its backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingImage {
    pub path: PathBuf,
    pub format: DiskFormat,
    /// False when the overlay records no backing format, so the image is read as raw
    /// (never probed).
    pub format_recorded: bool,
}

/// Which file a [`Disk`] was opened on: replacing the file (a rename over it) between
/// `open` and a VM's start is noticed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
}

impl FileIdentity {
    fn of(file: &File, path: &Path) -> Result<FileIdentity, StorageError> {
        let meta = file.metadata().map_err(StorageError::io(path))?;
        Ok(FileIdentity {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// A disk image a VM can use.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    format: DiskFormat,
    format_given: bool,
    readonly: bool,
    size: u64,
    serial: String,
    identity: FileIdentity,
    backing: Vec<BackingImage>,
    /// The files of `backing`, to tell when one VM lists an overlay and its own base.
    backing_identities: Vec<FileIdentity>,
    stats: Arc<DiskStats>,
}

/// Opens an image file. Only regular files and block devices are images: the open does
/// not block (a FIFO named as a backing file would otherwise hang it forever), and
/// anything else is refused. O_NONBLOCK stays set; it changes nothing for regular files
/// and block devices.
fn open_file(path: &Path, writable: bool) -> Result<File, StorageError> {
    let file = File::options()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => StorageError::NotFound {
                path: path.to_path_buf(),
            },
            _ => StorageError::Open {
                path: path.to_path_buf(),
                source,
            },
        })?;
    let kind = file.metadata().map_err(StorageError::io(path))?.file_type();
    if kind.is_file() || kind.is_block_device() {
        return Ok(file);
    }
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_dir() {
        "a directory"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "a character device"
    };
    Err(StorageError::NotAnImage {
        path: path.to_path_buf(),
        what,
    })
}

/// What the first sector of `file` says it is; formats luvisor does not read are errors.
fn probe_format(file: &File, path: &Path) -> Result<DiskFormat, StorageError> {
    let mut head = [0u8; PROBE_BYTES];
    let mut n = 0;
    while n < head.len() {
        match file.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StorageError::io(path)(e)),
        }
    }
    match probe::probe(&head[..n]) {
        ProbedFormat::Raw => Ok(DiskFormat::Raw),
        ProbedFormat::Qcow2 => Ok(DiskFormat::Qcow2),
        ProbedFormat::Other(format) => Err(StorageError::UnsupportedFormat {
            path: path.to_path_buf(),
            format: format.into(),
        }),
    }
}

/// Parses a format name recorded in an image (a qcow2 backing-format extension).
fn recorded_format(name: &str, path: &Path) -> Result<DiskFormat, StorageError> {
    DiskFormat::parse(name).ok_or_else(|| StorageError::UnsupportedFormat {
        path: path.to_path_buf(),
        format: name.to_string(),
    })
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

/// An image opened with its whole backing chain.
struct OpenedImage {
    backend: Box<dyn DiskBackend>,
    format: DiskFormat,
    identity: FileIdentity,
}

/// Opens a whole backing chain, top image first.
struct ChainOpener {
    /// The images opened so far, to catch a chain that comes back to one of them.
    seen: Vec<(FileIdentity, PathBuf)>,
    backing: Vec<BackingImage>,
}

impl ChainOpener {
    fn open_top(
        path: &Path,
        format: Option<DiskFormat>,
        writable: bool,
    ) -> Result<(OpenedImage, ChainOpener), StorageError> {
        let mut opener = ChainOpener {
            seen: Vec::new(),
            backing: Vec::new(),
        };
        let image = opener.open(path, format, writable)?;
        Ok((image, opener))
    }

    /// Opens and locks `path` as `format` (probing when `None`: only ever for the top
    /// image, whose owner did not say), then its backing file as the overlay records it.
    fn open(
        &mut self,
        path: &Path,
        format: Option<DiskFormat>,
        writable: bool,
    ) -> Result<OpenedImage, StorageError> {
        if self.seen.len() > MAX_BACKING_DEPTH {
            return Err(StorageError::Unsupported {
                path: path.to_path_buf(),
                feature: format!("a backing chain deeper than {MAX_BACKING_DEPTH} images"),
            });
        }
        let file = open_file(path, writable)?;
        let identity = FileIdentity::of(&file, path)?;
        if let Some((_, first)) = self.seen.iter().find(|(id, _)| *id == identity) {
            let mut chain: Vec<String> = self
                .seen
                .iter()
                .map(|(_, p)| p.display().to_string())
                .collect();
            chain.push(path.display().to_string());
            return Err(StorageError::BackingLoop {
                path: first.clone(),
                chain: chain.join(" -> "),
            });
        }
        self.seen.push((identity, path.to_path_buf()));
        lock_image(
            &file,
            path,
            if writable {
                LockMode::Exclusive
            } else {
                LockMode::Shared
            },
        )?;
        let probed = format.is_none();
        let format = match format {
            Some(format) => format,
            None => probe_format(&file, path)?,
        };
        let backend: Box<dyn DiskBackend> = match format {
            DiskFormat::Raw => {
                let size = file.metadata().map_err(StorageError::io(path))?.len();
                if probed {
                    Box::new(RawBackend::probed(file, size, path.to_path_buf()))
                } else {
                    Box::new(RawBackend::new(file, size))
                }
            }
            DiskFormat::Qcow2 => {
                let header = qcow2::Header::read(&file, path)?;
                let backing = match &header.backing_file {
                    Some(name) => Some(self.open_backing(path, name, &header)?),
                    None => None,
                };
                Box::new(Qcow2Backend::open(file, path, writable, backing)?)
            }
        };
        Ok(OpenedImage {
            backend,
            format,
            identity,
        })
    }

    /// Opens the backing file `name` of the overlay at `overlay`, read-only, in the format
    /// the overlay records (raw when it records none): never by probing, which would let
    /// whoever wrote the backing file choose how it is read.
    fn open_backing(
        &mut self,
        overlay: &Path,
        name: &str,
        header: &qcow2::Header,
    ) -> Result<Box<dyn DiskBackend>, StorageError> {
        let path = resolve_backing(overlay, name);
        let (format, format_recorded) = match &header.backing_format {
            Some(recorded) => (recorded_format(recorded, &path)?, true),
            None => (DiskFormat::Raw, false),
        };
        self.backing.push(BackingImage {
            path: path.clone(),
            format,
            format_recorded,
        });
        match self.open(&path, Some(format), false) {
            Ok(image) => Ok(image.backend),
            Err(StorageError::NotFound { .. }) => Err(StorageError::BackingNotFound {
                overlay: overlay.to_path_buf(),
                backing: path,
            }),
            Err(e) => Err(e),
        }
    }
}

impl Disk {
    /// Creates an image of `size` bytes at `path`, which must not exist: a sparse raw file
    /// or an empty qcow2 image. With `format` `None` the image is raw, and treated like a
    /// probed one: the guest may not make its first sector look like another format. A
    /// create that fails leaves no file.
    pub fn create(
        path: &Path,
        size: u64,
        format: Option<DiskFormat>,
    ) -> Result<Disk, StorageError> {
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(StorageError::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        match format.unwrap_or(DiskFormat::Raw) {
            DiskFormat::Raw => {
                let file = create_new(path)?;
                if let Err(source) = file.set_len(size) {
                    let _ = std::fs::remove_file(path);
                    return Err(StorageError::Io {
                        path: path.to_path_buf(),
                        source,
                    });
                }
            }
            DiskFormat::Qcow2 => qcow2::create(path, size, None)?,
        }
        let opened = Disk::open_with(
            path,
            OpenOptions {
                readonly: false,
                format,
            },
        );
        if opened.is_err() {
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    /// Creates a sparse raw image of `size` bytes; `path` must not exist.
    pub fn create_raw(path: &Path, size: u64) -> Result<Disk, StorageError> {
        Disk::create(path, size, None)
    }

    /// Creates an empty qcow2 image of `size` bytes; `path` must not exist.
    pub fn create_qcow2(path: &Path, size: u64) -> Result<Disk, StorageError> {
        Disk::create(path, size, Some(DiskFormat::Qcow2))
    }

    /// Creates a qcow2 overlay at `path` whose unwritten clusters come from `base`. The
    /// base must exist and nobody may be writing it; it is never written through the
    /// overlay.
    pub fn create_overlay(base: &Path, path: &Path) -> Result<Disk, StorageError> {
        Disk::create_overlay_with(base, None, path)
    }

    /// [`Disk::create_overlay`] with the base's format given (probed when `None`). The
    /// overlay records the base's format, so the base is never probed again.
    pub fn create_overlay_with(
        base: &Path,
        base_format: Option<DiskFormat>,
        path: &Path,
    ) -> Result<Disk, StorageError> {
        let base_disk = Disk::open_with(
            base,
            OpenOptions {
                readonly: true,
                format: base_format,
            },
        )?;
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
        let opened = Disk::open_with(
            path,
            OpenOptions {
                readonly: false,
                format: Some(DiskFormat::Qcow2),
            },
        );
        if opened.is_err() {
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    /// Opens an existing image, probing its format, and checks its size and that it is
    /// not locked against the requested access right now.
    pub fn open(path: &Path, readonly: bool) -> Result<Disk, StorageError> {
        Disk::open_with(
            path,
            OpenOptions {
                readonly,
                format: None,
            },
        )
    }

    /// Opens an existing image as `options` say.
    pub fn open_with(path: &Path, options: OpenOptions) -> Result<Disk, StorageError> {
        // Open the whole chain once, exactly as a VM would, then let it go.
        let (image, chain) = ChainOpener::open_top(path, options.format, !options.readonly)?;
        let size = image.backend.size();
        if size == 0 || !size.is_multiple_of(SECTOR_SIZE) {
            return Err(StorageError::SizeNotSectorMultiple {
                path: path.to_path_buf(),
                size,
            });
        }
        Ok(Disk {
            format: image.format,
            format_given: options.format.is_some(),
            path: path.to_path_buf(),
            readonly: options.readonly,
            size,
            serial: default_serial(path),
            identity: image.identity,
            backing: chain.backing,
            backing_identities: chain.seen.iter().skip(1).map(|(id, _)| *id).collect(),
            stats: Arc::new(DiskStats::default()),
        })
    }

    /// Opens and locks the image for a VM: exclusively when writable, shared otherwise.
    /// Fails if the file was replaced, resized or changed format since [`Disk::open`].
    pub fn attach(&self) -> Result<Box<dyn DiskBackend>, StorageError> {
        let changed = |what: String| StorageError::Changed {
            path: self.path.clone(),
            what,
        };
        let given = self.format_given.then_some(self.format);
        let (image, _) =
            ChainOpener::open_top(&self.path, given, !self.readonly).map_err(|e| match e {
                // Only about the image itself: a backing file's errors speak for themselves.
                StorageError::UnsupportedFormat { path, format } if path == self.path => {
                    changed(format!(
                        "it was {} and now looks like a {format} image",
                        self.format.as_str()
                    ))
                }
                StorageError::SizeNotSectorMultiple { path, size } if path == self.path => {
                    changed(format!("it was {} bytes and is now {size}", self.size))
                }
                other => other,
            })?;
        if image.identity != self.identity {
            return Err(changed("the file was replaced by another file".into()));
        }
        if image.format != self.format {
            return Err(changed(format!(
                "it was {} and now looks like {}",
                self.format.as_str(),
                image.format.as_str()
            )));
        }
        let size = image.backend.size();
        if size != self.size {
            return Err(changed(format!(
                "it was {} bytes and is now {size}",
                self.size
            )));
        }
        Ok(image.backend)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn format(&self) -> DiskFormat {
        self.format
    }
    /// False when the format was probed from the image (see [`OpenOptions::format`]).
    pub fn format_given(&self) -> bool {
        self.format_given
    }
    /// The images under this one, nearest first (empty for a raw image or a qcow2 image
    /// without a backing file).
    pub fn backing_chain(&self) -> &[BackingImage] {
        &self.backing
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

/// Refuses a list of disks for one VM that names one image file twice (through any path),
/// or a writable disk together with an overlay that reads it as a backing file (the VM
/// would conflict with its own lock). A read-only disk may also be another disk's base.
pub fn check_distinct(disks: &[Arc<Disk>]) -> Result<(), StorageError> {
    for (second, disk) in disks.iter().enumerate() {
        if let Some(first) = disks[..second]
            .iter()
            .position(|d| d.identity == disk.identity)
        {
            return Err(StorageError::ListedTwice {
                path: disk.path.clone(),
                first: first + 1,
                second: second + 1,
            });
        }
    }
    for (base_index, base) in disks.iter().enumerate() {
        if base.readonly {
            continue;
        }
        if let Some(overlay_index) = disks
            .iter()
            .position(|d| d.backing_identities.contains(&base.identity))
        {
            return Err(StorageError::BaseListedWritable {
                base: base.path.clone(),
                base_index: base_index + 1,
                overlay: disks[overlay_index].path.clone(),
                overlay_index: overlay_index + 1,
            });
        }
    }
    Ok(())
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

    fn raw_with_head(name: &str, offset: usize, magic: &[u8]) -> PathBuf {
        let path = scratch(name);
        let mut bytes = vec![0u8; 1 << 20];
        bytes[offset..offset + magic.len()].copy_from_slice(magic);
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn formats_it_does_not_read_are_refused_by_name() {
        for (name, offset, magic, format) in [
            ("x.vmdk", 0, &b"KDMV"[..], "vmdk"),
            ("x.vhd", 0, b"conectix", "vhd"),
            ("x.vhdx", 0, b"vhdxfile", "vhdx"),
            ("x.vdi", 64, b"\x7f\x10\xda\xbe", "vdi"),
            ("x.qed", 0, b"QED\0", "qed"),
            ("x.luks", 0, b"LUKS\xba\xbe", "luks"),
        ] {
            let path = raw_with_head(name, offset, magic);
            let err = Disk::open(&path, true).unwrap_err();
            assert!(
                matches!(&err, StorageError::UnsupportedFormat { format: f, .. } if f == format),
                "{name}: {err}"
            );
            assert!(err.to_string().contains(format), "{err}");
            // Given explicitly, the format is used as it is.
            let disk = Disk::open_with(
                &path,
                OpenOptions {
                    readonly: true,
                    format: Some(DiskFormat::Raw),
                },
            )
            .unwrap();
            assert_eq!(disk.format(), DiskFormat::Raw);
            assert!(disk.format_given());
        }
    }

    #[test]
    fn real_images_of_other_formats_are_refused() {
        if !crate::storage::test_tools::tool_available("qemu-img") {
            return;
        }
        for format in ["vmdk", "vpc", "vhdx", "vdi", "qed"] {
            let path = scratch(&format!("made.{format}"));
            let out = crate::storage::test_tools::run(
                "qemu-img",
                &["create", "-q", "-f", format, path.to_str().unwrap(), "4M"],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let err = Disk::open(&path, false).unwrap_err();
            let expected = if format == "vpc" { "vhd" } else { format };
            assert!(
                matches!(&err, StorageError::UnsupportedFormat { format: f, .. } if f == expected),
                "{format}: {err}"
            );
        }
    }

    #[test]
    fn probed_raw_disks_refuse_a_planted_header() {
        let path = scratch("probed.img");
        let disk = Disk::create_raw(&path, 1 << 20).unwrap();
        assert!(!disk.format_given());
        let mut backend = disk.attach().unwrap();
        let mut header = [0u8; 512];
        header[..4].copy_from_slice(&qcow2::MAGIC.to_be_bytes());
        assert!(backend.write_at(&header, 0).is_err());
        drop(backend);
        assert_eq!(Disk::open(&path, true).unwrap().format(), DiskFormat::Raw);
        let given = Disk::open_with(
            &path,
            OpenOptions {
                readonly: false,
                format: Some(DiskFormat::Raw),
            },
        )
        .unwrap();
        given.attach().unwrap().write_at(&header, 0).unwrap();
    }

    #[test]
    fn backing_files_open_in_the_recorded_format_or_as_raw() {
        // A base whose first sector looks like qcow2: probed, it would be opened as qcow2.
        let base = scratch("trap-base.img");
        let mut bytes = vec![0u8; 1 << 20];
        bytes[..4].copy_from_slice(&qcow2::MAGIC.to_be_bytes());
        std::fs::write(&base, &bytes).unwrap();
        // An overlay that records no backing format.
        let overlay = scratch("no-format.qcow2");
        qcow2::create(&overlay, 1 << 20, None).unwrap();
        let patched = {
            // Point the header at the base by hand, as another tool might.
            let mut img = std::fs::read(&overlay).unwrap();
            let name = base.to_str().unwrap().as_bytes();
            let at = 4096usize;
            img[at..at + name.len()].copy_from_slice(name);
            img[8..16].copy_from_slice(&(at as u64).to_be_bytes());
            img[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            img
        };
        std::fs::write(&overlay, patched).unwrap();
        let disk = Disk::open(&overlay, true).unwrap();
        assert_eq!(
            disk.backing_chain(),
            &[BackingImage {
                path: base.clone(),
                format: DiskFormat::Raw,
                format_recorded: false
            }]
        );
        let mut buf = [0u8; 4];
        disk.attach().unwrap().read_at(&mut buf, 0).unwrap();
        assert_eq!(
            buf,
            qcow2::MAGIC.to_be_bytes(),
            "the base is read as raw bytes"
        );
        // Overlays luvisor makes record the format.
        let recorded = scratch("recorded.qcow2");
        let raw_base = scratch("plain-base.img");
        Disk::create_raw(&raw_base, 1 << 20).unwrap();
        let disk = Disk::create_overlay(&raw_base, &recorded).unwrap();
        assert!(disk.backing_chain()[0].format_recorded);
        let header = qcow2::Header::read(&File::open(&recorded).unwrap(), &recorded).unwrap();
        assert_eq!(header.backing_format.as_deref(), Some("raw"));
    }

    #[test]
    fn chain_errors_say_what_is_wrong() {
        // A missing backing file names the overlay that wants it.
        let base = scratch("gone-base.img");
        Disk::create_raw(&base, 1 << 20).unwrap();
        let overlay = scratch("orphan.qcow2");
        Disk::create_overlay(&base, &overlay).unwrap();
        std::fs::remove_file(&base).unwrap();
        let err = Disk::open(&overlay, true).unwrap_err();
        assert!(
            matches!(&err, StorageError::BackingNotFound { overlay: o, backing: b } if *o == overlay && *b == base),
            "{err}"
        );
        // A chain that loops: a -> b -> a.
        let a = scratch("loop-a.qcow2");
        let b = scratch("loop-b.qcow2");
        Disk::create_raw(&base, 1 << 20).unwrap();
        Disk::create_overlay(&base, &a).unwrap();
        Disk::create_overlay(&a, &b).unwrap();
        std::fs::remove_file(&a).unwrap();
        qcow2::create(&a, 1 << 20, Some((b.to_str().unwrap(), "qcow2"))).unwrap();
        let err = Disk::open(&b, true).unwrap_err();
        assert!(matches!(err, StorageError::BackingLoop { .. }), "{err}");
        assert!(err.to_string().contains("loops"), "{err}");
        // One image twice in one VM.
        let one = Arc::new(Disk::open(&base, true).unwrap());
        let again = Arc::new(Disk::open(&base, true).unwrap());
        let err = check_distinct(&[one.clone(), again]).unwrap_err();
        assert!(err.to_string().contains("listed twice"), "{err}");
        // An overlay and its own base: fine when the base is read-only, not writable.
        let overlay = scratch("with-base.qcow2");
        let over = Arc::new(Disk::create_overlay(&base, &overlay).unwrap());
        check_distinct(&[over.clone(), one]).unwrap();
        let writable_base = Arc::new(Disk::open(&base, false).unwrap());
        let err = check_distinct(&[over, writable_base]).unwrap_err();
        assert!(
            err.to_string().contains("is the backing file of disk 1"),
            "{err}"
        );
    }

    #[test]
    fn only_files_and_block_devices_are_images() {
        let fifo = scratch("backing.fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path, which outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = Disk::open(&fifo, true).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        // As a backing file, too: the open must not hang.
        let overlay = scratch("fifo-backed.qcow2");
        qcow2::create(&overlay, 1 << 20, Some((fifo.to_str().unwrap(), "raw"))).unwrap();
        let err = Disk::open(&overlay, true).unwrap_err();
        assert!(err.to_string().contains("is a FIFO"), "{err}");
        let err = Disk::open(&std::env::temp_dir(), true).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }

    #[test]
    fn a_replaced_file_is_an_error_at_attach() {
        let path = scratch("replaced.img");
        let disk = Disk::create_raw(&path, 1 << 20).unwrap();
        let other = scratch("replacement.img");
        std::fs::write(&other, b"").unwrap();
        std::fs::rename(&other, &path).unwrap();
        let err = disk.attach().err().expect("attach must fail");
        assert!(matches!(err, StorageError::Changed { .. }), "{err}");
        // Resized in place.
        let path = scratch("resized.img");
        let disk = Disk::create_raw(&path, 1 << 20).unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(2 << 20)
            .unwrap();
        let err = disk.attach().err().expect("attach must fail");
        assert!(
            err.to_string().contains("changed since it was opened"),
            "{err}"
        );
    }

    #[test]
    fn qemu_tools_respect_our_locks_and_we_respect_theirs() {
        if !crate::storage::test_tools::tool_available("qemu-io") {
            return;
        }
        use crate::storage::test_tools::run;
        let path = scratch("shared-with-qemu.img");
        let p = path.to_str().unwrap();
        let disk = Disk::create_raw(&path, 1 << 20).unwrap();
        let writer = disk.attach().unwrap();
        let out = run("qemu-io", &["-f", "raw", "-c", "write 0 512", p]);
        assert!(!out.status.success(), "qemu-io wrote an image a VM holds");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains("Failed to get \"write\" lock"), "{said}");
        for args in [
            &["bench", "-w", "-c", "1", "-f", "raw", p][..],
            &["resize", "-f", "raw", p, "2M"],
        ] {
            let out = run("qemu-img", args);
            assert!(
                !out.status.success(),
                "qemu-img {args:?} ran on an image a VM writes"
            );
        }
        // Read-only opens that share still work.
        let out = run("qemu-img", &["info", "-U", p]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(writer);
        // A read-only holder shares with QEMU readers but keeps QEMU writers out.
        let reader = Disk::open(&path, true).unwrap().attach().unwrap();
        assert!(run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 512", p])
            .status
            .success());
        assert!(!run("qemu-io", &["-f", "raw", "-c", "write 0 512", p])
            .status
            .success());
        drop(reader);
        assert!(run("qemu-io", &["-f", "raw", "-c", "write 0 512", p])
            .status
            .success());

        // While qemu-io holds the image for writing, luvisor refuses it.
        let holder = crate::storage::test_tools::QemuIoHolder::start(&path);
        let writer_err = Disk::open(&path, false).err();
        let reader_err = Disk::open(&path, true).err();
        holder.release();
        assert!(
            matches!(writer_err, Some(StorageError::Locked { .. })),
            "luvisor opened an image qemu-io holds for writing"
        );
        let err = reader_err.expect("a reader is refused while qemu-io writes");
        assert!(err.to_string().contains(p), "{err}");
        assert!(err.to_string().contains("another process"), "{err}");
        Disk::open(&path, false).unwrap();
    }
}
