//! qcow2 images: the copy-on-write overlays test labs clone from a shared base.
//!
//! Supported: version 2 and 3 images without encryption, compression, external data
//! files, extended L2 entries or internal snapshots (read-only access ignores
//! snapshots). A backing file (raw or qcow2) supplies every cluster the overlay has not
//! written. Images luvisor creates are version 3 with 64 KiB clusters and 16-bit
//! refcounts, and pass `qemu-img check`.
//!
//! Crash safety: metadata is written through (never cached dirty), in the order
//! refcount → data → L2 entry. A crash can leak a cluster (which `qemu-img check`
//! reports as a leak, not corruption) but never maps a cluster whose data was not
//! written. `flush` is `fdatasync`.
//!
//! Layout of a new image: cluster 0 holds the header, its extensions and the backing
//! file name; cluster 1 the refcount table; cluster 2 the first refcount block; the L1
//! table follows. Data and L2 clusters are appended at the end of the file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{create_new, fallocate, sync_data, DiskBackend, StorageError};

pub const MAGIC: u32 = 0x5146_49fb;
const DEFAULT_CLUSTER_BITS: u32 = 16;
const REFCOUNT_ORDER: u32 = 4; // 16-bit refcounts
const HEADER_V3_LENGTH: u32 = 104;
const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
const EXT_END: u32 = 0;

/// Largest virtual size accepted (what QEMU allows, 2^56 bytes, rounded down).
const MAX_VIRTUAL_SIZE: u64 = 1 << 55;
/// Largest L1 or refcount table read into memory.
const MAX_TABLE_BYTES: u64 = 32 << 20;

/// Bits of L1 and L2 entries.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
const ZERO: u64 = 1;

/// Incompatible feature bits we can honour.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;

/// Most L2 tables kept in memory (64 KiB each with default clusters).
const L2_CACHE_TABLES: usize = 64;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// The header fields luvisor uses.
#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub refcount_order: u32,
}

/// True when `file` starts with the qcow2 magic.
pub fn is_qcow2(file: &File) -> io::Result<bool> {
    let mut magic = [0u8; 4];
    match file.read_exact_at(&mut magic, 0) {
        Ok(()) => Ok(u32::from_be_bytes(magic) == MAGIC),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Header {
    /// Reads and validates the header of `file`.
    pub fn read(file: &File, path: &Path) -> Result<Header, StorageError> {
        let corrupt = |reason: &str| StorageError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        let unsupported = |feature: String| StorageError::Unsupported {
            path: path.to_path_buf(),
            feature,
        };
        let mut h = [0u8; 104];
        file.read_exact_at(&mut h[..72], 0)
            .map_err(|_| corrupt("the file is shorter than a qcow2 header"))?;
        if be32(&h, 0) != MAGIC {
            return Err(corrupt("bad magic"));
        }
        let version = be32(&h, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!("version {version}")));
        }
        let (incompatible_features, refcount_order, header_length) = if version == 3 {
            file.read_exact_at(&mut h[72..104], 72)
                .map_err(|_| corrupt("truncated version 3 header"))?;
            (be64(&h, 72), be32(&h, 96), be32(&h, 100))
        } else {
            (0, REFCOUNT_ORDER, 72)
        };
        let cluster_bits = be32(&h, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(corrupt(&format!(
                "cluster_bits {cluster_bits} is out of range"
            )));
        }
        if be32(&h, 32) != 0 {
            return Err(unsupported("encryption".into()));
        }
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT;
        if incompatible_features & !known != 0 {
            return Err(unsupported(format!(
                "incompatible feature bits {:#x} (external data file, compression type or extended L2)",
                incompatible_features & !known
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let size = be64(&h, 24);
        if size > MAX_VIRTUAL_SIZE {
            return Err(corrupt(&format!(
                "virtual size {size} is beyond {MAX_VIRTUAL_SIZE}"
            )));
        }
        let l1_size = be32(&h, 36);
        let l2_entries = cluster_size / 8;
        let needed_l1 = size.div_ceil(cluster_size * l2_entries);
        if (l1_size as u64) < needed_l1 {
            return Err(corrupt(&format!(
                "L1 table has {l1_size} entries, {needed_l1} needed for {size} bytes"
            )));
        }
        // Tables are read whole into memory: bound them by what they can describe and by
        // the file, so a hostile header cannot make the host allocate gigabytes.
        let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let within_file = |offset: u64, bytes: u64| {
            offset.is_multiple_of(cluster_size)
                && offset.checked_add(bytes).is_some_and(|end| end <= file_len)
        };
        let l1_bytes = l1_size as u64 * 8;
        if l1_bytes > MAX_TABLE_BYTES || !within_file(be64(&h, 40), l1_bytes) {
            return Err(corrupt(
                "the L1 table is misaligned, too large, or past the end of the file",
            ));
        }
        let refcount_bytes = be32(&h, 56) as u64 * cluster_size;
        if refcount_bytes > MAX_TABLE_BYTES || !within_file(be64(&h, 48), refcount_bytes) {
            return Err(corrupt(
                "the refcount table is misaligned, too large, or past the end of the file",
            ));
        }
        if version == 3
            && !(HEADER_V3_LENGTH as u64..=cluster_size).contains(&(header_length as u64))
        {
            return Err(corrupt(&format!(
                "header length {header_length} is out of range"
            )));
        }
        let mut header = Header {
            version,
            backing_file: None,
            backing_format: None,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset: be64(&h, 40),
            refcount_table_offset: be64(&h, 48),
            refcount_table_clusters: be32(&h, 56),
            nb_snapshots: be32(&h, 60),
            incompatible_features,
            refcount_order,
        };
        let backing_offset = be64(&h, 8);
        let backing_len = be32(&h, 16);
        if backing_offset != 0 {
            if backing_len == 0 || backing_len > 1023 {
                return Err(corrupt("backing file name length is out of range"));
            }
            let mut name = vec![0u8; backing_len as usize];
            file.read_exact_at(&mut name, backing_offset)
                .map_err(|_| corrupt("backing file name is past the end"))?;
            header.backing_file = Some(
                String::from_utf8(name).map_err(|_| corrupt("backing file name is not UTF-8"))?,
            );
        }
        if version == 3 {
            header.read_extensions(file, header_length as u64, cluster_size, path)?;
        }
        Ok(header)
    }

    fn read_extensions(
        &mut self,
        file: &File,
        mut at: u64,
        cluster_size: u64,
        path: &Path,
    ) -> Result<(), StorageError> {
        let corrupt = |reason: &str| StorageError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        };
        while at + 8 <= cluster_size {
            let mut ext = [0u8; 8];
            file.read_exact_at(&mut ext, at)
                .map_err(|_| corrupt("truncated header extension"))?;
            let (kind, len) = (be32(&ext, 0), be32(&ext, 4) as u64);
            if kind == EXT_END {
                return Ok(());
            }
            if at + 8 + len > cluster_size {
                return Err(corrupt("header extension runs past the first cluster"));
            }
            if kind == EXT_BACKING_FORMAT {
                let mut data = vec![0u8; len as usize];
                file.read_exact_at(&mut data, at + 8)
                    .map_err(|_| corrupt("truncated backing format"))?;
                self.backing_format = Some(String::from_utf8_lossy(&data).into_owned());
            }
            at += 8 + len.div_ceil(8) * 8;
        }
        Ok(())
    }
}

/// Writes a new, empty qcow2 image of `size` bytes at `path` (which must not exist),
/// optionally backed by `backing` in format `backing_format` ("raw" or "qcow2").
pub fn create(path: &Path, size: u64, backing: Option<(&str, &str)>) -> Result<(), StorageError> {
    let file = create_new(path)?;
    let result = write_new_image(&file, size, backing);
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(StorageError::io(path))
}

fn write_new_image(file: &File, size: u64, backing: Option<(&str, &str)>) -> io::Result<()> {
    let cluster_size = 1u64 << DEFAULT_CLUSTER_BITS;
    let l2_entries = cluster_size / 8;
    let l1_size = size.div_ceil(cluster_size * l2_entries).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(cluster_size);
    let refcount_table_offset = cluster_size;
    let refcount_block_offset = 2 * cluster_size;
    let l1_table_offset = 3 * cluster_size;
    let total_clusters = 3 + l1_clusters;

    let mut header = vec![0u8; cluster_size as usize];
    let put32 = |h: &mut [u8], at: usize, v: u32| h[at..at + 4].copy_from_slice(&v.to_be_bytes());
    let put64 = |h: &mut [u8], at: usize, v: u64| h[at..at + 8].copy_from_slice(&v.to_be_bytes());
    put32(&mut header, 0, MAGIC);
    put32(&mut header, 4, 3);
    put32(&mut header, 20, DEFAULT_CLUSTER_BITS);
    put64(&mut header, 24, size);
    put32(&mut header, 36, l1_size as u32);
    put64(&mut header, 40, l1_table_offset);
    put64(&mut header, 48, refcount_table_offset);
    put32(&mut header, 56, 1);
    put32(&mut header, 96, REFCOUNT_ORDER);
    put32(&mut header, 100, HEADER_V3_LENGTH);
    let mut at = HEADER_V3_LENGTH as usize;
    if let Some((_, format)) = backing {
        put32(&mut header, at, EXT_BACKING_FORMAT);
        put32(&mut header, at + 4, format.len() as u32);
        header[at + 8..at + 8 + format.len()].copy_from_slice(format.as_bytes());
        at += 8 + format.len().div_ceil(8) * 8;
    }
    put32(&mut header, at, EXT_END);
    put32(&mut header, at + 4, 0);
    at += 8;
    if let Some((name, _)) = backing {
        if at + name.len() > header.len() || name.len() > 1023 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "backing file name is too long",
            ));
        }
        put64(&mut header, 8, at as u64);
        put32(&mut header, 16, name.len() as u32);
        header[at..at + name.len()].copy_from_slice(name.as_bytes());
    }

    let mut refcount_table = vec![0u8; cluster_size as usize];
    put64(&mut refcount_table, 0, refcount_block_offset);
    let mut refcount_block = vec![0u8; cluster_size as usize];
    for i in 0..total_clusters as usize {
        refcount_block[i * 2..i * 2 + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    file.set_len(total_clusters * cluster_size)?;
    file.write_all_at(&refcount_table, refcount_table_offset)?;
    file.write_all_at(&refcount_block, refcount_block_offset)?;
    // The L1 table is already zero (set_len); the header goes last, so a half-written
    // image never has a valid magic.
    file.write_all_at(&header, 0)?;
    sync_data(file)
}

/// An open qcow2 image.
pub struct Qcow2Backend {
    file: File,
    path: PathBuf,
    header: Header,
    cluster_size: u64,
    l2_entries: u64,
    l1: Vec<u64>,
    l2_cache: HashMap<u64, Vec<u64>>,
    refcount_table: Vec<u64>,
    /// Where the next allocated cluster goes (the end of the file, cluster-aligned).
    next_free: u64,
    backing: Option<Box<dyn DiskBackend>>,
    writable: bool,
}

impl Qcow2Backend {
    /// Opens `file` (already locked by the caller). `backing` is the opened backing image
    /// when the header names one.
    pub fn open(
        file: File,
        path: &Path,
        writable: bool,
        backing: Option<Box<dyn DiskBackend>>,
    ) -> Result<Qcow2Backend, StorageError> {
        let header = Header::read(&file, path)?;
        let unsupported = |feature: &str| StorageError::Unsupported {
            path: path.to_path_buf(),
            feature: feature.into(),
        };
        if writable {
            if header.nb_snapshots > 0 {
                return Err(unsupported("writing an image with internal snapshots"));
            }
            if header.refcount_order != REFCOUNT_ORDER {
                return Err(unsupported("writing with refcounts other than 16 bits"));
            }
            if header.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0 {
                return Err(unsupported(
                    "writing an image marked dirty or corrupt (run qemu-img check -r all)",
                ));
            }
        }
        let cluster_size = 1u64 << header.cluster_bits;
        let io = StorageError::io(path);
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        file.read_exact_at(&mut l1_bytes, header.l1_table_offset)
            .map_err(io)?;
        let l1 = l1_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let mut rt_bytes =
            vec![0u8; (header.refcount_table_clusters as u64 * cluster_size) as usize];
        file.read_exact_at(&mut rt_bytes, header.refcount_table_offset)
            .map_err(StorageError::io(path))?;
        let refcount_table = rt_bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
            .collect();
        let len = file.metadata().map_err(StorageError::io(path))?.len();
        Ok(Qcow2Backend {
            next_free: len.div_ceil(cluster_size) * cluster_size,
            file,
            path: path.to_path_buf(),
            cluster_size,
            l2_entries: cluster_size / 8,
            l1,
            l2_cache: HashMap::new(),
            refcount_table,
            backing,
            writable,
            header,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    fn invalid(&self, what: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", self.path.display()),
        )
    }

    /// The L2 table at `offset`, from the cache or the file.
    fn l2_table(&mut self, offset: u64) -> io::Result<&mut Vec<u64>> {
        if !self.l2_cache.contains_key(&offset) {
            if !offset.is_multiple_of(self.cluster_size) {
                return Err(self.invalid(format!("unaligned L2 table offset {offset:#x}")));
            }
            let mut bytes = vec![0u8; self.cluster_size as usize];
            self.file.read_exact_at(&mut bytes, offset)?;
            if self.l2_cache.len() >= L2_CACHE_TABLES {
                self.l2_cache.clear();
            }
            let table = bytes
                .chunks_exact(8)
                .map(|c| u64::from_be_bytes(c.try_into().unwrap()))
                .collect();
            self.l2_cache.insert(offset, table);
        }
        Ok(self.l2_cache.get_mut(&offset).expect("inserted above"))
    }

    /// The L2 entry for guest cluster `cluster` (0 when no L2 table covers it).
    fn l2_entry(&mut self, cluster: u64) -> io::Result<u64> {
        let l1_index = (cluster / self.l2_entries) as usize;
        let l2_offset = self.l1.get(l1_index).copied().unwrap_or(0) & OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(0);
        }
        let index = (cluster % self.l2_entries) as usize;
        Ok(self.l2_table(l2_offset)?[index])
    }

    /// Reads `buf.len()` bytes of backing data at `offset` (zeros past its end).
    fn read_backing(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        if let Some(backing) = self.backing.as_mut() {
            let size = backing.size();
            if offset < size {
                let n = ((size - offset) as usize).min(buf.len());
                backing.read_at(&mut buf[..n], offset)?;
            }
        }
        Ok(())
    }

    /// Reads part of one guest cluster.
    fn read_in_cluster(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let entry = self.l2_entry(offset / self.cluster_size)?;
        if entry & COMPRESSED != 0 {
            return Err(self.invalid("compressed clusters are not supported (convert with qemu-img convert -O qcow2 without -c)".into()));
        }
        let host = entry & OFFSET_MASK;
        if host != 0 {
            self.file
                .read_exact_at(buf, host + offset % self.cluster_size)
        } else if entry & ZERO != 0 {
            buf.fill(0);
            Ok(())
        } else {
            self.read_backing(buf, offset)
        }
    }

    /// Sets the refcount of the cluster at host offset `host` to `value`.
    fn set_refcount(&mut self, host: u64, value: u16) -> io::Result<()> {
        let cluster = host / self.cluster_size;
        let per_block = self.cluster_size / 2;
        let table_index = (cluster / per_block) as usize;
        if table_index >= self.refcount_table.len() {
            return Err(self.invalid("the image outgrew its refcount table".into()));
        }
        let mut block = self.refcount_table[table_index] & OFFSET_MASK;
        if block == 0 {
            // A new refcount block, placed at the end of the file; it may have to count
            // itself, which the recursive call below does once it is installed.
            block = self.next_free;
            self.next_free += self.cluster_size;
            self.file
                .write_all_at(&vec![0u8; self.cluster_size as usize], block)?;
            self.refcount_table[table_index] = block;
            self.file.write_all_at(
                &block.to_be_bytes(),
                self.header.refcount_table_offset + table_index as u64 * 8,
            )?;
            self.set_refcount(block, 1)?;
        }
        let at = block + (cluster % per_block) * 2;
        self.file.write_all_at(&value.to_be_bytes(), at)
    }

    /// Allocates one cluster at the end of the file, with refcount 1.
    fn allocate_cluster(&mut self) -> io::Result<u64> {
        let host = self.next_free;
        self.next_free += self.cluster_size;
        self.set_refcount(host, 1)?;
        Ok(host)
    }

    /// Points guest cluster `cluster` at `entry`, creating its L2 table if needed.
    fn set_l2_entry(&mut self, cluster: u64, entry: u64) -> io::Result<()> {
        let l1_index = (cluster / self.l2_entries) as usize;
        if l1_index >= self.l1.len() {
            return Err(self.invalid(format!("cluster {cluster} is beyond the L1 table")));
        }
        let mut l2_offset = self.l1[l1_index] & OFFSET_MASK;
        if l2_offset == 0 {
            l2_offset = self.allocate_cluster()?;
            self.file
                .write_all_at(&vec![0u8; self.cluster_size as usize], l2_offset)?;
            self.l1[l1_index] = l2_offset | COPIED;
            self.file.write_all_at(
                &(l2_offset | COPIED).to_be_bytes(),
                self.header.l1_table_offset + l1_index as u64 * 8,
            )?;
        }
        let index = (cluster % self.l2_entries) as usize;
        self.l2_table(l2_offset)?[index] = entry;
        self.file
            .write_all_at(&entry.to_be_bytes(), l2_offset + index as u64 * 8)
    }

    /// Writes part of one guest cluster, allocating (and filling from the backing file)
    /// when the overlay does not have it yet.
    fn write_in_cluster(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let cluster = offset / self.cluster_size;
        let within = offset % self.cluster_size;
        let entry = self.l2_entry(cluster)?;
        if entry & COMPRESSED != 0 {
            return Err(self.invalid("compressed clusters are not supported".into()));
        }
        let host = entry & OFFSET_MASK;
        if host != 0 {
            if entry & ZERO != 0 {
                // A preallocated zero cluster: the data on disk is stale, so zero the rest.
                let mut data = vec![0u8; self.cluster_size as usize];
                data[within as usize..within as usize + buf.len()].copy_from_slice(buf);
                self.file.write_all_at(&data, host)?;
                return self.set_l2_entry(cluster, host | COPIED);
            }
            return self.file.write_all_at(buf, host + within);
        }
        let mut data = vec![0u8; self.cluster_size as usize];
        if buf.len() as u64 != self.cluster_size && entry & ZERO == 0 {
            self.read_backing(&mut data, cluster * self.cluster_size)?;
        }
        data[within as usize..within as usize + buf.len()].copy_from_slice(buf);
        let new = self.allocate_cluster()?;
        self.file.write_all_at(&data, new)?;
        self.set_l2_entry(cluster, new | COPIED)
    }

    /// Calls `f(offset, len)` for each piece of `[offset, offset+len)` within one cluster.
    fn for_each_cluster(
        &mut self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Self, u64, u64) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let cluster_end = (at / self.cluster_size + 1) * self.cluster_size;
            let n = cluster_end.min(end) - at;
            f(self, at, n)?;
            at += n;
        }
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the image is open read-only",
            ))
        }
    }
}

impl DiskBackend for Qcow2Backend {
    fn size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0usize;
        self.for_each_cluster(offset, buf.len() as u64, |q, at, n| {
            q.read_in_cluster(&mut buf[done..done + n as usize], at)?;
            done += n as usize;
            Ok(())
        })
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        let mut done = 0usize;
        self.for_each_cluster(offset, buf.len() as u64, |q, at, n| {
            q.write_in_cluster(&buf[done..done + n as usize], at)?;
            done += n as usize;
            Ok(())
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        sync_data(&self.file)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        // The guest may read anything afterwards; zeroing is one valid choice and keeps
        // the backing file from showing through.
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        let cluster_size = self.cluster_size;
        self.for_each_cluster(offset, len, |q, at, n| {
            if n < cluster_size {
                return q.write_in_cluster(&vec![0u8; n as usize], at);
            }
            let cluster = at / cluster_size;
            let entry = q.l2_entry(cluster)?;
            let host = entry & OFFSET_MASK;
            if host != 0 && entry & COMPRESSED == 0 {
                // Keep the allocation, release the space: the hole reads as zeros.
                if !fallocate(
                    &q.file,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    host,
                    cluster_size,
                )? {
                    q.file
                        .write_all_at(&vec![0u8; cluster_size as usize], host)?;
                }
                Ok(())
            } else if q.backing.is_some() || entry & COMPRESSED != 0 {
                // Unallocated over a backing file: a zero cluster hides the backing data.
                q.set_l2_entry(cluster, ZERO)
            } else {
                Ok(()) // Unallocated without backing already reads as zeros.
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::raw::RawBackend;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("luvisor-qcow2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    fn open_rw(path: &Path, backing: Option<Box<dyn DiskBackend>>) -> Qcow2Backend {
        let file = File::options().read(true).write(true).open(path).unwrap();
        Qcow2Backend::open(file, path, true, backing).unwrap()
    }

    fn raw_base(name: &str, size: u64, fill: u8) -> (PathBuf, Box<dyn DiskBackend>) {
        let path = scratch(name);
        std::fs::write(&path, vec![fill; size as usize]).unwrap();
        let file = File::open(&path).unwrap();
        (path, Box::new(RawBackend::new(file, size)))
    }

    #[test]
    fn overlay_reads_base_until_written() {
        let (base_path, base) = raw_base("base.img", 1 << 20, 0xAB);
        let path = scratch("overlay.qcow2");
        create(&path, 1 << 20, Some((base_path.to_str().unwrap(), "raw"))).unwrap();
        let mut q = open_rw(&path, Some(base));
        let mut buf = vec![0u8; 1000];
        q.read_at(&mut buf, 70_000).unwrap();
        assert!(buf.iter().all(|&b| b == 0xAB));
        q.write_at(&[1, 2, 3], 70_001).unwrap();
        q.read_at(&mut buf, 70_000).unwrap();
        assert_eq!(&buf[..5], &[0xAB, 1, 2, 3, 0xAB]);
        // A write across a cluster boundary.
        q.write_at(&vec![9u8; 200], 65_536 - 100).unwrap();
        let mut buf = vec![0u8; 300];
        q.read_at(&mut buf, 65_536 - 150).unwrap();
        assert!(buf[..50].iter().all(|&b| b == 0xAB) && buf[50..250].iter().all(|&b| b == 9));
        // Zeroing hides the base.
        q.write_zeroes(0, 65_536).unwrap();
        q.read_at(&mut buf, 0).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        drop(q);
        // Reopened, it still has everything.
        let (_, base) = raw_base("base.img", 1 << 20, 0xAB);
        let mut q = open_rw(&path, Some(base));
        let mut buf = vec![0u8; 5];
        q.read_at(&mut buf, 70_000).unwrap();
        assert_eq!(&buf, &[0xAB, 1, 2, 3, 0xAB]);
        assert_eq!(
            std::fs::read(&base_path).unwrap(),
            vec![0xAB; 1 << 20],
            "the base is untouched"
        );
    }

    #[test]
    fn grows_refcount_blocks_and_l2_tables() {
        // 3 GiB virtual: several L2 tables; writes far apart allocate each of them.
        let path = scratch("big.qcow2");
        create(&path, 3 << 30, None).unwrap();
        let mut q = open_rw(&path, None);
        for gib in 0..3u64 {
            q.write_at(&[gib as u8 + 1; 512], gib << 30).unwrap();
        }
        let mut buf = [0u8; 512];
        q.read_at(&mut buf, 2 << 30).unwrap();
        assert_eq!(buf, [3u8; 512]);
        q.read_at(&mut buf, 1 << 29).unwrap();
        assert_eq!(buf, [0u8; 512]);
    }

    #[test]
    fn rejects_garbage() {
        let path = scratch("garbage.qcow2");
        std::fs::write(&path, b"QFI\xfbnot really").unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(
            Qcow2Backend::open(file, &path, false, None),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(matches!(
            create(&path, 1 << 20, None),
            Err(StorageError::Exists { .. })
        ));
    }

    #[test]
    fn hostile_headers_fail_cleanly() {
        // Start from a valid image and corrupt one header field at a time, with values
        // chosen to break bounds: every open must return an error or succeed, never panic
        // or allocate without limit.
        let path = scratch("hostile.qcow2");
        create(&path, 1 << 20, None).unwrap();
        let good = std::fs::read(&path).unwrap();
        let fields: &[(usize, usize)] = &[
            (4, 4),
            (8, 8),
            (16, 4),
            (20, 4),
            (24, 8),
            (32, 4),
            (36, 4),
            (40, 8),
            (48, 8),
            (56, 4),
            (60, 4),
            (72, 8),
            (96, 4),
            (100, 4),
        ];
        let values: &[u64] = &[
            0,
            1,
            7,
            0x200,
            0xFFFF,
            0x7FFF_FFFF,
            0xFFFF_FFFF,
            1 << 40,
            u64::MAX,
        ];
        let mut rng = 0x1234_5678_9ABC_DEF0u64;
        for &(offset, len) in fields {
            for &value in values {
                let mut bytes = good.clone();
                let be = value.to_be_bytes();
                bytes[offset..offset + len].copy_from_slice(&be[8 - len..]);
                std::fs::write(&path, &bytes).unwrap();
                let file = File::open(&path).unwrap();
                if let Ok(mut q) = Qcow2Backend::open(file, &path, false, None) {
                    // Whatever opened must also survive reads anywhere.
                    let mut buf = [0u8; 4096];
                    for _ in 0..8 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let size = q.size();
                        if size >= 4096 {
                            let _ = q.read_at(&mut buf, (rng % (size - 4095)) & !511);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn qemu_img_accepts_our_images() {
        let Ok(out) = std::process::Command::new("qemu-img")
            .arg("--version")
            .output()
        else {
            eprintln!("skipping: qemu-img is not installed");
            return;
        };
        assert!(out.status.success());
        let (base_path, base) = raw_base("qbase.img", 4 << 20, 0x11);
        let path = scratch("qoverlay.qcow2");
        create(&path, 4 << 20, Some((base_path.to_str().unwrap(), "raw"))).unwrap();
        let mut q = open_rw(&path, Some(base));
        q.write_at(&[0x22; 4096], 1 << 20).unwrap();
        q.write_at(&[0x33; 100], 3 << 20).unwrap();
        q.write_zeroes(2 << 20, 1 << 16).unwrap();
        q.flush().unwrap();
        drop(q);
        let check = std::process::Command::new("qemu-img")
            .args(["check", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "qemu-img check: {}",
            String::from_utf8_lossy(&check.stdout)
        );
        let converted = scratch("converted.raw");
        let convert = std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-O",
                "raw",
                path.to_str().unwrap(),
                converted.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            convert.status.success(),
            "{}",
            String::from_utf8_lossy(&convert.stderr)
        );
        let flat = std::fs::read(&converted).unwrap();
        assert_eq!(flat.len(), 4 << 20);
        assert!(flat[..1 << 20].iter().all(|&b| b == 0x11));
        assert!(flat[1 << 20..(1 << 20) + 4096].iter().all(|&b| b == 0x22));
        assert!(flat[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0));
        assert_eq!(
            &flat[3 << 20..(3 << 20) + 101],
            &[[0x33u8; 100].as_slice(), &[0x11]].concat()[..]
        );

        // And we read what qemu-img writes.
        let theirs = scratch("theirs.qcow2");
        let made = std::process::Command::new("qemu-img")
            .args([
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                base_path.to_str().unwrap(),
                "-F",
                "raw",
                theirs.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        let io = std::process::Command::new("qemu-io")
            .args(["-c", "write -P 0x44 8192 4096", theirs.to_str().unwrap()])
            .output();
        let (_, base) = raw_base("qbase.img", 4 << 20, 0x11);
        let file = File::open(&theirs).unwrap();
        let mut q = Qcow2Backend::open(file, &theirs, false, Some(base)).unwrap();
        let mut buf = vec![0u8; 3 * 4096];
        q.read_at(&mut buf, 4096).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0x11));
        if io.is_ok_and(|o| o.status.success()) {
            assert!(buf[4096..8192].iter().all(|&b| b == 0x44));
        }
    }
}
