//! One owner per file: a daemon holds an exclusive lock on every disk image, journal and
//! replica store it uses, and a second user is refused with the holder named.
//!
//! The lock is an open file description lock (`F_OFD_SETLK`), written on one byte:
//! - the kernel drops it when its holder dies, however it dies, so nothing stale is left;
//! - closing some other handle to the file in this process does not drop it, as it would a
//!   classic POSIX lock (the engine opens images more than once);
//! - the byte is 101, where qemu's image locking says "a writer holds this image" (qemu takes
//!   a shared lock at 100 + the bit of each permission it holds, and the write permission's
//!   bit is 1). So qemu-io and qemu-img refuse to write a disk blockrep holds, and refuse to
//!   read it unless told to share it (`-U`), as they do for a disk a running VM holds; with
//!   `-U` they read it (a copy of a live disk, as for any running VM).
//!
//! A directory (a replica store) cannot be opened for writing, which an OFD write lock needs:
//! it is locked with `flock`, which has the same lifetime and leaves no file behind.
//!
//! The kernel does not report who holds an OFD lock (`F_OFD_GETLK` answers pid -1), so a
//! refusal finds the holder in `/proc/PID/fdinfo`, where each held lock is listed.

use crate::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// qemu's lock byte for "holds the write permission": 100 + bit 1.
const QEMU_WRITE_PERMISSION_BYTE: libc::off_t = 101;

/// An exclusive lock on a file, held until dropped (or until the process ends).
#[derive(Debug)]
pub struct FileLock {
    /// The lock belongs to this open file description: closing it releases the lock.
    _file: File,
}

impl FileLock {
    /// Locks `file` (opened by the caller for writing: a write lock needs it) for this process
    /// alone.
    /// `name` is what a refusal calls the file.
    pub fn exclusive(file: File, name: &str) -> Result<Self> {
        // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
        let mut request: libc::flock = unsafe { std::mem::zeroed() };
        request.l_type = libc::F_WRLCK as libc::c_short;
        request.l_whence = libc::SEEK_SET as libc::c_short;
        request.l_start = QEMU_WRITE_PERMISSION_BYTE;
        request.l_len = 1;
        // SAFETY: fcntl reads the `flock` it is given; the descriptor is open for this call.
        let lock = || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
        match wait_while_busy(lock) {
            Ok(()) => Ok(FileLock { _file: file }),
            Err(error) => Err(refusal(&file, name, error)),
        }
    }

    /// Locks the directory at `path` for this process alone; `name` is what a refusal calls it.
    pub fn directory(path: &Path, name: &str) -> Result<Self> {
        let directory =
            File::open(path).map_err(|error| Error::file(name, "open to lock", error))?;
        // SAFETY: flock takes an open descriptor and integer flags.
        let lock = || unsafe { libc::flock(directory.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        match wait_while_busy(lock) {
            Ok(()) => Ok(FileLock { _file: directory }),
            Err(error) => Err(refusal(&directory, name, error)),
        }
    }

    /// Opens `path` (which must exist) and locks it (see [`FileLock::exclusive`]).
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|error| Error::file(&name, "open", error))?;
        Self::exclusive(file, &name)
    }
}

/// How long a lock held by someone else is waited for before the refusal: a few tries, 20 ms
/// apart (a fork's child execs within milliseconds; a caller that retries a refused lock, as
/// onward replication does at each delta, pays at most 100 ms each time).
const BUSY_WAITS: u32 = 5;
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a lock request failed because someone holds the lock.
fn is_busy(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAGAIN) | Some(libc::EACCES)
    )
}

/// Runs a lock request (a call answering 0, or -1 with `errno`) until it succeeds, fails for
/// another reason, or the lock stayed held through a short wait. A lock let go of by its
/// holder can outlive it for an instant: a child another thread forked holds every open file
/// description until it execs (Rust opens files close-on-exec, which acts at exec, not at
/// fork), and the wait tells that apart from a real holder.
fn wait_while_busy(mut request: impl FnMut() -> libc::c_int) -> std::io::Result<()> {
    let mut waited = 0;
    loop {
        if request() == 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if !is_busy(&error) || waited >= BUSY_WAITS {
            return Err(error);
        }
        waited += 1;
        std::thread::sleep(BUSY_WAIT);
    }
}

/// What a failed lock request means: held by someone (named when they can be seen), or an
/// error of its own.
fn refusal(file: &File, name: &str, error: std::io::Error) -> Error {
    if is_busy(&error) {
        Error::InUse {
            name: name.to_owned(),
            holder: holder(file).unwrap_or_else(|| "another process".to_owned()),
        }
    } else {
        Error::file(name, "lock", error)
    }
}

/// The process holding a lock on `file`, as "process PID (COMMAND LINE)", when it can be seen.
fn holder(file: &File) -> Option<String> {
    let metadata = file.metadata().ok()?;
    let device = metadata.dev();
    // /proc/locks names a file as MAJOR:MINOR:INODE, in hex, hex and decimal.
    let key = format!(
        "{:02x}:{:02x}:{} ",
        libc::major(device),
        libc::minor(device),
        metadata.ino()
    );
    for process in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = process.file_name();
        let Some(pid) = pid.to_str().filter(|pid| pid.parse::<u32>().is_ok()) else {
            continue;
        };
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fdinfo")) else {
            continue;
        };
        for descriptor in descriptors.flatten() {
            let info = read_bounded(&descriptor.path(), 64 << 10);
            if info.lines().any(|line| {
                line.starts_with("lock:") && line.contains("WRITE") && line.contains(&key)
            }) {
                let command = read_bounded(&process.path().join("cmdline"), 4096)
                    .split('\0')
                    .filter(|word| !word.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ");
                let command = command.escape_debug().to_string();
                return Some(if pid == std::process::id().to_string() {
                    format!("this process ({command})")
                } else {
                    format!("process {pid} ({command})")
                });
            }
        }
    }
    None
}

/// At most `limit` bytes of a small kernel file, as text; empty when it cannot be read.
fn read_bounded(path: &Path, limit: u64) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let _ = file.take(limit).read_to_string(&mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_freed_on_drop() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("disk.raw");
        std::fs::write(&path, b"disk").unwrap();
        let first = FileLock::open(&path).unwrap();
        let refused = FileLock::open(&path).unwrap_err();
        let message = refused.to_string();
        assert!(matches!(refused, Error::InUse { .. }), "{message}");
        assert!(message.contains("this process"), "{message}");
        drop(first);
        FileLock::open(&path).expect("the lock is released when its holder drops it");
    }

    #[test]
    fn a_lock_let_go_of_within_the_short_wait_is_taken() {
        // As a child between fork and exec holds a lock its parent let go of for an instant.
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("disk.raw");
        std::fs::write(&path, b"disk").unwrap();
        let held = FileLock::open(&path).unwrap();
        let letting_go = std::thread::spawn(move || {
            std::thread::sleep(BUSY_WAIT);
            drop(held);
        });
        FileLock::open(&path).expect("a lock released within the wait is taken");
        letting_go.join().unwrap();
    }

    #[test]
    fn a_directory_is_locked_once_and_nothing_is_written_in_it() {
        let directory = tempfile::tempdir().unwrap();
        let first = FileLock::directory(directory.path(), "store").unwrap();
        let message = FileLock::directory(directory.path(), "store")
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("store: in use by this process"),
            "{message}"
        );
        assert!(
            std::fs::read_dir(directory.path())
                .unwrap()
                .next()
                .is_none()
        );
        drop(first);
        FileLock::directory(directory.path(), "store").unwrap();
    }
}
