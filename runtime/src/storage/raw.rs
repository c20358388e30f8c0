//! Raw image files: byte `n` of the disk is byte `n` of the file.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::{fallocate, sync_data, DiskBackend};

pub struct RawBackend {
    file: File,
    size: u64,
}

impl RawBackend {
    pub fn new(file: File, size: u64) -> RawBackend {
        RawBackend { file, size }
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

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        sync_data(&self.file)
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
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
}
