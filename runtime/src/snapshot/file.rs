//! The snapshot directory and its state file.
//!
//! A snapshot is a directory holding:
//! - `state`: a header (magic, format version, CRC-32 and length of the content) and
//!   the content, a postcard-encoded [`SnapshotState`];
//! - `memory`: guest RAM, regions back to back in region order, sparse: pages the guest
//!   never touched or that hold only zeros are holes. A diff snapshot's `memory` holds
//!   only the pages it lists ([`MemoryState::diff`]); the rest come from its base.
//!
//! Everything read from a snapshot is checked before anything is created from it: the
//! header, the CRC, the version, the host it needs, then each state as it is restored.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::machine::MachineState;
use crate::storage::DiskFormat;
use crate::vstate::memory::DirtyPages;

/// The state file's first bytes.
pub const MAGIC: [u8; 8] = *b"LUVISNAP";
/// The state format this build writes and reads. Bump it whenever a saved structure
/// changes shape; older snapshots are then refused by name rather than misread.
pub const FORMAT_VERSION: u32 = 2;
/// magic, version, CRC-32, content length.
const HEADER_LEN: usize = 8 + 4 + 4 + 8;
/// A state file is small (registers and device state); anything claiming more than this
/// is not one of ours.
const MAX_CONTENT: u64 = 16 << 20;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a luvisor snapshot (no {STATE_FILE} file with the snapshot magic)")]
    NotASnapshot { path: PathBuf },
    #[error("snapshot {path} is truncated: its state file holds {got} bytes of {expected}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("snapshot {path} is corrupted: the state's checksum does not match its content")]
    Corrupt { path: PathBuf },
    #[error(
        "snapshot {path} has state format version {found}; this luvisor reads version {FORMAT_VERSION}"
    )]
    WrongVersion { path: PathBuf, found: u32 },
    #[error("snapshot {path} was taken on another kind of host: {reason}")]
    WrongHost { path: PathBuf, reason: String },
    #[error("snapshot {path} is corrupted: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("snapshot {path} already exists; choose another directory or remove it first")]
    Exists { path: PathBuf },
    #[error("cannot encode the snapshot state: {0}")]
    Encode(String),
}

/// What the host must offer for a restore to work: the vCPU state holds vendor-specific
/// MSRs and CPUID, and the XSAVE layout depends on the CPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostRequirements {
    /// CPUID leaf 0's vendor string ("GenuineIntel", "AuthenticAMD").
    pub cpu_vendor: String,
    /// Which kind of KVM ran the VM (`pvm` or `hardware`): their saved states differ.
    pub kvm_backend: String,
}

impl HostRequirements {
    pub fn of_this_host() -> HostRequirements {
        HostRequirements {
            cpu_vendor: cpu_vendor(),
            kvm_backend: crate::host::detect_backend().as_str().to_string(),
        }
    }

    /// Why this host cannot restore a snapshot that needs `self`, if it cannot.
    pub fn mismatch(&self) -> Option<String> {
        let here = HostRequirements::of_this_host();
        if here.cpu_vendor != self.cpu_vendor {
            return Some(format!(
                "its CPU vendor is {}, this host's is {}",
                self.cpu_vendor, here.cpu_vendor
            ));
        }
        if here.kvm_backend != self.kvm_backend {
            return Some(format!(
                "it ran on {} KVM, this host has {}",
                self.kvm_backend, here.kvm_backend
            ));
        }
        None
    }
}

fn cpu_vendor() -> String {
    let leaf = std::arch::x86_64::__cpuid(0);
    let mut bytes = Vec::with_capacity(12);
    for reg in [leaf.ebx, leaf.edx, leaf.ecx] {
        bytes.extend_from_slice(&reg.to_le_bytes());
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One disk of the saved VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// The image the guest's disk was at the snapshot (frozen: read-only from then on,
    /// unless the snapshot was taken with shared disks).
    pub path: PathBuf,
    pub format: DiskFormat,
    pub readonly: bool,
    pub serial: String,
    /// The image stays shared with the running VM (`disks = "shared"`): a restore opens
    /// it as it is rather than in a new overlay.
    pub shared: bool,
}

/// The configuration a restored VM gets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConfig {
    pub name: String,
    pub vcpus: u8,
    pub memory: u64,
    pub cmdline: String,
    pub console_capacity: usize,
    pub disks: Vec<SavedDisk>,
    /// Dynamic memory knobs, and the balloon target when the snapshot was taken.
    pub dynamic_memory: Option<crate::vm::dynamic_memory::MemoryKnobs>,
    pub memory_target: u64,
}

/// Guest RAM in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// Guest-physical start and length of each region, in file order.
    pub regions: Vec<(u64, u64)>,
    /// Set for a diff snapshot: the memory file holds only these pages; the rest come
    /// from the base snapshot (itself full or a diff).
    pub diff: Option<DiffMemory>,
    /// Bytes the memory file really takes on disk, for reports.
    pub allocated_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffMemory {
    /// The base snapshot's directory (absolute).
    pub base: PathBuf,
    /// The base snapshot's id: a snapshot written to the same path later is refused.
    pub base_id: u64,
    /// The pages the memory file holds.
    pub pages: DirtyPages,
}

/// Everything in a snapshot's state file.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// Random; identifies this snapshot for the diffs taken against it.
    pub id: u64,
    pub host: HostRequirements,
    pub config: SavedConfig,
    pub machine: MachineState,
    pub memory: MemoryState,
    /// When it was taken, milliseconds since the Unix epoch.
    pub taken_at_ms: u64,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

impl SnapshotState {
    /// Encodes the state into `dir/state` (written to a temporary name, synced, then
    /// renamed, so a crash never leaves a half-written state file under the real name).
    pub fn write(&self, dir: &Path) -> Result<u64, SnapshotError> {
        let content =
            postcard::to_stdvec(self).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        let mut bytes = Vec::with_capacity(HEADER_LEN + content.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes.extend_from_slice(&crc32fast::hash(&content).to_le_bytes());
        bytes.extend_from_slice(&(content.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&content);
        let path = dir.join(STATE_FILE);
        let temporary = dir.join(format!(".{STATE_FILE}.partial"));
        let mut file = File::create(&temporary).map_err(io_error("create", &temporary))?;
        file.write_all(&bytes)
            .and_then(|_| file.sync_all())
            .map_err(io_error("write", &temporary))?;
        std::fs::rename(&temporary, &path).map_err(io_error("rename into", &path))?;
        Ok(bytes.len() as u64)
    }

    /// Reads and checks `dir/state`: magic, version, length, CRC, then decodes it and
    /// checks the host.
    pub fn read(dir: &Path) -> Result<SnapshotState, SnapshotError> {
        let path = dir.join(STATE_FILE);
        let mut file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapshotError::NotASnapshot {
                    path: dir.to_path_buf(),
                })
            }
            Err(e) => return Err(io_error("open", &path)(e)),
        };
        let mut bytes = Vec::new();
        Read::by_ref(&mut file)
            .take(HEADER_LEN as u64 + MAX_CONTENT + 1)
            .read_to_end(&mut bytes)
            .map_err(io_error("read", &path))?;
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::NotASnapshot {
                path: dir.to_path_buf(),
            });
        }
        if bytes.len() < HEADER_LEN {
            return Err(SnapshotError::Truncated {
                path: dir.to_path_buf(),
                expected: HEADER_LEN as u64,
                got: bytes.len() as u64,
            });
        }
        let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
        let version = word(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::WrongVersion {
                path: dir.to_path_buf(),
                found: version,
            });
        }
        let crc = word(12);
        let length = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        if length > MAX_CONTENT {
            return Err(SnapshotError::Invalid {
                path: dir.to_path_buf(),
                reason: format!("its state claims {length} bytes"),
            });
        }
        let content = &bytes[HEADER_LEN..];
        if (content.len() as u64) < length {
            return Err(SnapshotError::Truncated {
                path: dir.to_path_buf(),
                expected: HEADER_LEN as u64 + length,
                got: bytes.len() as u64,
            });
        }
        if content.len() as u64 > length {
            return Err(SnapshotError::Invalid {
                path: dir.to_path_buf(),
                reason: format!(
                    "its state file has {} bytes after the state",
                    content.len() as u64 - length
                ),
            });
        }
        if crc32fast::hash(content) != crc {
            return Err(SnapshotError::Corrupt {
                path: dir.to_path_buf(),
            });
        }
        let state: SnapshotState =
            postcard::from_bytes(content).map_err(|e| SnapshotError::Invalid {
                path: dir.to_path_buf(),
                reason: format!("its state does not decode: {e}"),
            })?;
        if let Some(reason) = state.host.mismatch() {
            return Err(SnapshotError::WrongHost {
                path: dir.to_path_buf(),
                reason,
            });
        }
        Ok(state)
    }
}
