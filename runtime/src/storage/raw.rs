//! Raw image files: byte `n` of the disk is byte `n` of the file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vm_memory::bitmap::Bitmap;

use crate::vstate::memory::GuestSlice;

use super::probe::{self, PROBE_BYTES};
use super::{fallocate, sync_data, DiskBackend};

pub struct RawBackend {
    file: File,
    size: u64,
    /// Set when the image's format was probed rather than given: the image must keep
    /// probing as raw, so guest writes that would plant another format's magic in its
    /// first sector are refused (the path is for the message).
    format_guard: Option<PathBuf>,
    /// Whether a refused write was logged already: one warning per disk, so a guest that
    /// keeps trying cannot flood the host log (each refusal is still counted).
    refusal_logged: bool,
}

impl RawBackend {
    pub fn new(file: File, size: u64) -> RawBackend {
        RawBackend {
            file,
            size,
            format_guard: None,
            refusal_logged: false,
        }
    }

    /// A raw image whose format was probed: writes that would make its first sector
    /// probe as another format fail with `PermissionDenied` and change nothing (what
    /// QEMU does for probed raw images).
    pub fn probed(file: File, size: u64, path: PathBuf) -> RawBackend {
        RawBackend {
            format_guard: Some(path),
            ..RawBackend::new(file, size)
        }
    }

    /// Refuses writing `data` at `offset` if it would change what the image probes as.
    fn check_format_kept(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let Some(path) = &self.format_guard else {
            return Ok(());
        };
        if offset >= PROBE_BYTES as u64 {
            return Ok(());
        }
        let mut head = [0u8; PROBE_BYTES];
        let n = (self.size as usize).min(PROBE_BYTES);
        let path = path.clone();
        self.read_at(&mut head[..n], 0)?;
        if !probe::would_change_format(&head[..n], data, offset) {
            return Ok(());
        }
        let mut after = head;
        let start = offset as usize;
        let len = data.len().min(PROBE_BYTES - start);
        after[start..start + len].copy_from_slice(&data[..len]);
        let format = probe::probe(&after).name();
        if !self.refusal_logged {
            self.refusal_logged = true;
            tracing::warn!(
                image = %path.display(),
                format,
                "refused a guest write that would make sector 0 of a probed raw image look \
                 like a {format} image (further refusals on this disk are only counted)"
            );
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{}: refused a write that would make sector 0 of this probed raw image look \
                 like a {format} image (give format = \"raw\" to allow it)",
                path.display()
            ),
        ))
    }

    /// Like [`Self::check_format_kept`] for a range that will read as zeros.
    fn check_zeroes_keep_format(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.format_guard.is_none() || offset >= PROBE_BYTES as u64 {
            return Ok(());
        }
        let zeros = [0u8; PROBE_BYTES];
        let n = len.min(PROBE_BYTES as u64 - offset) as usize;
        self.check_format_kept(&zeros[..n], offset)
    }

    /// Zeros `[offset, offset+len)` by writing zeros, for filesystems without hole punching.
    fn write_zero_bytes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let chunk = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk.len() as u64) as usize;
            self.file.write_all_at(&chunk[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl DiskBackend for RawBackend {
    fn lock_file(&self) -> Option<&File> {
        Some(&self.file)
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        // A file shorter than its disk (never written to the end) reads as zeros there.
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_to_guest(
        &mut self,
        dst: &GuestSlice<'_>,
        offset: u64,
        _scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        // The kernel writes guest memory behind `vm-memory`'s back: record the pages as
        // written by the VMM (for diff snapshots and migration) before they change, so a
        // reader of the bitmap never misses them.
        dst.bitmap().mark_dirty(0, dst.len());
        let guard = dst.ptr_guard_mut();
        let mut done = 0;
        while done < dst.len() {
            // SAFETY: `guard` keeps `dst`'s mapping alive and covers `dst.len()` bytes of
            // guest memory, writable by the host; the kernel writes at most the
            // `dst.len() - done` bytes after `done`. The guest may touch these bytes
            // meanwhile: that only makes what it reads back unspecified, and the host
            // never reads them.
            let n = unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    dst.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => {
                    // Past the end of a file shorter than its disk: zeros.
                    let rest = dst
                        .subslice(done, dst.len() - done)
                        .map_err(io::Error::other)?;
                    let zeros = [0u8; 4096];
                    let mut at = 0;
                    while at < rest.len() {
                        let chunk = zeros.len().min(rest.len() - at);
                        rest.subslice(at, chunk)
                            .map_err(io::Error::other)?
                            .copy_from(&zeros[..chunk]);
                        at += chunk;
                    }
                    break;
                }
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_from_guest(
        &mut self,
        src: &GuestSlice<'_>,
        offset: u64,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        if self.format_guard.is_some() && offset < PROBE_BYTES as u64 {
            // The guard judges the data: it must judge a copy the guest cannot change
            // between the check and the write.
            if scratch.len() < src.len() {
                scratch.resize(src.len(), 0);
            }
            let data = &mut scratch[..src.len()];
            src.copy_to(data);
            return self.write_at(data, offset);
        }
        let guard = src.ptr_guard();
        let mut done = 0;
        while done < src.len() {
            // SAFETY: `guard` keeps `src`'s mapping alive and covers `src.len()` bytes of
            // guest memory; the kernel reads at most the `src.len() - done` bytes after
            // `done`. Nothing here looks at the data, so the guest changing it meanwhile
            // only decides what lands on its own disk.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    guard.as_ptr().add(done).cast(),
                    src.len() - done,
                    (offset + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => return Err(io::ErrorKind::WriteZero.into()),
                n if n > 0 => done += n as usize,
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_format_kept(buf, offset)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        sync_data(&self.file)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_zeroes_keep_format(offset, len)?;
        // Discard is advisory: without hole punching there is nothing to release.
        fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )
        .map(|_| ())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_zeroes_keep_format(offset, len)?;
        if fallocate(
            &self.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        )? {
            Ok(())
        } else {
            self.write_zero_bytes(offset, len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn reads_writes_and_punches_holes() {
        let path = std::env::temp_dir().join(format!("luvisor-raw-{}.img", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(4 << 20).unwrap();
        let mut disk = RawBackend::new(file, 4 << 20);
        disk.write_at(&[7u8; 65536], 1 << 20).unwrap();
        disk.flush().unwrap();
        let mut buf = [0u8; 16];
        disk.read_at(&mut buf, (1 << 20) + 100).unwrap();
        assert_eq!(buf, [7u8; 16]);
        let blocks_before = std::fs::metadata(&path).unwrap().blocks();
        disk.write_zeroes(1 << 20, 65536).unwrap();
        disk.read_at(&mut buf, (1 << 20) + 100).unwrap();
        assert_eq!(buf, [0u8; 16]);
        assert!(
            std::fs::metadata(&path).unwrap().blocks() < blocks_before,
            "the hole was punched"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn probed_images_keep_probing_as_raw() {
        let path =
            std::env::temp_dir().join(format!("luvisor-raw-guard-{}.img", std::process::id()));
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let open = || File::options().read(true).write(true).open(&path).unwrap();
        let mut disk = RawBackend::probed(open(), 1 << 20, path.clone());
        let mut qcow2_header = [0u8; 512];
        qcow2_header[..4].copy_from_slice(b"QFI\xfb");
        let err = disk.write_at(&qcow2_header, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(err.to_string().contains("qcow2"), "{err}");
        // Byte by byte does not get around it either.
        disk.write_at(b"QFI", 0).unwrap();
        assert!(disk.write_at(b"\xfb", 3).is_err());
        assert_eq!(
            &std::fs::read(&path).unwrap()[..4],
            b"QFI\0",
            "nothing was written"
        );
        // Anywhere past the first sector is the guest's business, and so is raw data.
        disk.write_at(&qcow2_header, 512).unwrap();
        disk.write_at(&[0xEE; 512], 0).unwrap();
        disk.write_zeroes(0, 4096).unwrap();
        // Given explicitly, the format is never second-guessed.
        let mut explicit = RawBackend::new(open(), 1 << 20);
        explicit.write_at(&qcow2_header, 0).unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
