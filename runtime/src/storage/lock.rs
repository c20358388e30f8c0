//! Image locks that QEMU's tools understand.
//!
//! QEMU does not `flock` images. Each open image takes shared open-file-description
//! (OFD) byte-range locks on single bytes of the file, one byte per block-layer
//! permission:
//!
//! - byte `100 + p` says "I use permission `p`";
//! - byte `200 + p` says "I do not let anyone else use permission `p`".
//!
//! with `p` = 0 for consistent read, 1 for write, 2 for write-unchanged and 3 for resize.
//! (Read off QEMU's `block/file-posix.c` and checked against `/proc/locks` while
//! `qemu-io` held an image.) An opener first takes its own bytes, then asks the kernel
//! (`F_OFD_GETLK` with a write lock) whether anybody else holds the opposite byte of each:
//! someone using a permission it refuses, or refusing a permission it uses. Because all
//! locks are shared read locks, holders never block each other; only the test finds
//! conflicts.
//!
//! luvisor takes what QEMU takes for a guest disk: a writer uses consistent read and write,
//! a reader consistent read, and both refuse write and resize to others. So while a VM
//! writes an image, `qemu-io` and `qemu-img` cannot write it (nor can a luvisor reader
//! open it), and a running QEMU that writes an image keeps luvisor out. Read-only opens
//! share. OFD locks belong to the open file description and go away when the file is
//! closed, so two opens in one process conflict exactly like two processes do.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::StorageError;

/// How a disk's file is locked while something uses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Readers share the image; nobody may write it meanwhile.
    Shared,
    /// One writer; nobody else may open it for writing, and luvisor readers stay out too.
    Exclusive,
}

/// The QEMU block-layer permissions, numbered as their lock bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permission {
    ConsistentRead = 0,
    Write = 1,
    Resize = 3,
}

impl Permission {
    fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::Resize => "resize",
        }
    }
}

/// Lock byte meaning "this holder uses the permission".
const USE_BASE: i64 = 100;
/// Lock byte meaning "this holder does not share the permission".
const REFUSE_BASE: i64 = 200;

/// Permissions luvisor refuses to everyone else, whether it reads or writes.
const REFUSED: &[Permission] = &[Permission::Write, Permission::Resize];

fn flock_for(byte: i64, kind: libc::c_short) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        // OFD locks require l_pid = 0.
        l_pid: 0,
    }
}

/// Takes a shared OFD lock on one byte of `file`.
fn take(file: &File, byte: i64) -> io::Result<()> {
    let lock = flock_for(byte, libc::F_RDLCK as libc::c_short);
    // SAFETY: F_OFD_SETLK reads the flock struct we pass, which lives for the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether another open file description holds a lock on `byte` of `file`.
fn held_by_another(file: &File, byte: i64) -> io::Result<bool> {
    let mut lock = flock_for(byte, libc::F_WRLCK as libc::c_short);
    // SAFETY: F_OFD_GETLK reads and overwrites the flock struct we pass, which lives for
    // the call and is a valid, initialised libc::flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
}

fn lock_failed(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::LockFailed {
        path: path.to_path_buf(),
        source,
    }
}

/// Locks `file` (the image at `path`) for `mode`, failing at once if another process, VM
/// or QEMU tool holds it in a conflicting way. The locks last as long as `file` is open;
/// on error the caller drops `file`, which releases whatever was taken.
pub fn lock_image(file: &File, path: &Path, mode: LockMode) -> Result<(), StorageError> {
    let used: &[Permission] = match mode {
        LockMode::Shared => &[Permission::ConsistentRead],
        LockMode::Exclusive => &[Permission::ConsistentRead, Permission::Write],
    };
    for p in used {
        take(file, USE_BASE + *p as i64).map_err(lock_failed(path))?;
    }
    for p in REFUSED {
        take(file, REFUSE_BASE + *p as i64).map_err(lock_failed(path))?;
    }
    // A conflict seen at once may be a ghost: a process that forks (luvisor running a
    // script's `os.execute`, a test harness starting `qemu-img`) shares every open file
    // description with its child until the child calls exec, so a lock this process has
    // just dropped can look held for a moment. Look again for a short while before
    // calling it a conflict.
    let deadline = std::time::Instant::now() + GHOST_GRACE;
    loop {
        match conflict(file, path, used)? {
            None => return Ok(()),
            Some(e) if std::time::Instant::now() >= deadline => return Err(e),
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
        }
    }
}

/// Gives up the write use of an image that `file` holds exclusively (its byte goes), while
/// still refusing write and resize to everyone else: from now on the image can be opened
/// read-only, e.g. as the backing file of a new overlay, and nobody can write it.
pub fn give_up_writing(file: &File) -> io::Result<()> {
    let lock = flock_for(
        USE_BASE + Permission::Write as i64,
        libc::F_UNLCK as libc::c_short,
    );
    // SAFETY: F_OFD_SETLK reads the flock struct we pass, which lives for the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Takes back the write use [`give_up_writing`] gave up; fails (and takes nothing) if
/// someone else now refuses writers.
pub fn take_up_writing(file: &File, path: &Path) -> Result<(), StorageError> {
    let byte = USE_BASE + Permission::Write as i64;
    take(file, byte).map_err(lock_failed(path))?;
    if held_by_another(file, REFUSE_BASE + Permission::Write as i64).map_err(lock_failed(path))? {
        let _ = give_up_writing(file);
        return Err(StorageError::Locked {
            path: path.to_path_buf(),
            reason: "another process or VM opened it meanwhile and does not share write access"
                .into(),
        });
    }
    Ok(())
}

/// Drops every lock `file` holds on the image, so that another process (the destination
/// of a live migration) can lock it for writing. The file stays open; only
/// [`lock_image`] makes it a locked image again.
pub fn release(file: &File) -> io::Result<()> {
    let lock = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: USE_BASE,
        // Through the last refuse byte: every byte either kind of lock may use.
        l_len: REFUSE_BASE + 4 - USE_BASE,
        l_pid: 0,
    };
    // SAFETY: F_OFD_SETLK reads the flock struct we pass, which lives for the call.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// How long a conflicting lock is looked at again before it counts (see `lock_image`).
const GHOST_GRACE: std::time::Duration = std::time::Duration::from_millis(100);

/// The conflict another holder's locks make with `used`, if any.
fn conflict(
    file: &File,
    path: &Path,
    used: &[Permission],
) -> Result<Option<StorageError>, StorageError> {
    for p in used {
        if held_by_another(file, REFUSE_BASE + *p as i64).map_err(lock_failed(path))? {
            return Ok(Some(StorageError::Locked {
                path: path.to_path_buf(),
                reason: format!(
                    "another process or VM (luvisor, QEMU or a QEMU tool) has it open and does \
                     not share {} access to it",
                    p.name()
                ),
            }));
        }
    }
    for p in REFUSED {
        if held_by_another(file, USE_BASE + *p as i64).map_err(lock_failed(path))? {
            return Ok(Some(StorageError::Locked {
                path: path.to_path_buf(),
                reason: format!(
                    "another process or VM (luvisor, QEMU or a QEMU tool) holds it for {}",
                    if *p == Permission::Write {
                        "writing"
                    } else {
                        "resizing"
                    }
                ),
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("luvisor-lock-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        path
    }

    fn open(path: &Path) -> File {
        File::options().read(true).write(true).open(path).unwrap()
    }

    #[test]
    fn readers_share_and_writers_exclude() {
        let path = image("modes.img");
        let (r1, r2) = (open(&path), open(&path));
        lock_image(&r1, &path, LockMode::Shared).unwrap();
        lock_image(&r2, &path, LockMode::Shared).unwrap();
        let w = open(&path);
        let err = lock_image(&w, &path, LockMode::Exclusive).unwrap_err();
        assert!(err.to_string().contains("does not share write"), "{err}");
        drop((r1, r2, w));
        let w = open(&path);
        lock_image(&w, &path, LockMode::Exclusive).unwrap();
        for mode in [LockMode::Shared, LockMode::Exclusive] {
            let other = open(&path);
            let err = lock_image(&other, &path, mode).unwrap_err();
            assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        }
        drop(w);
        lock_image(&open(&path), &path, LockMode::Exclusive).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_released_image_can_be_locked_elsewhere_and_taken_back_after() {
        let path = image("release.img");
        let source = open(&path);
        lock_image(&source, &path, LockMode::Exclusive).unwrap();
        release(&source).unwrap();
        let destination = open(&path);
        lock_image(&destination, &path, LockMode::Exclusive).unwrap();
        // While the other side holds it, it cannot be taken back.
        assert!(lock_image(&source, &path, LockMode::Exclusive).is_err());
        drop(destination);
        lock_image(&source, &path, LockMode::Exclusive).unwrap();
        assert!(lock_image(&open(&path), &path, LockMode::Shared).is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_writer_that_gives_up_writing_lets_readers_in_and_keeps_writers_out() {
        let path = image("give-up.img");
        let w = open(&path);
        lock_image(&w, &path, LockMode::Exclusive).unwrap();
        assert!(lock_image(&open(&path), &path, LockMode::Shared).is_err());
        give_up_writing(&w).unwrap();
        let reader = open(&path);
        lock_image(&reader, &path, LockMode::Shared).unwrap();
        assert!(lock_image(&open(&path), &path, LockMode::Exclusive).is_err());
        // The reader refuses writers now: taking writing back fails while it is there.
        assert!(take_up_writing(&w, &path).is_err());
        drop(reader);
        take_up_writing(&w, &path).unwrap();
        assert!(lock_image(&open(&path), &path, LockMode::Shared).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
