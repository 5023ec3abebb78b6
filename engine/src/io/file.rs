//! The portable store: a file driven by positioned reads and writes (`pread`/`pwrite`), which
//! work on every kernel and filesystem. Holes are punched and found with `fallocate` and
//! `lseek(SEEK_DATA/SEEK_HOLE)` where the filesystem has them, with plain writes as the fallback.

use super::Storage;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A file accessed with positioned system calls.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
}

impl FileStorage {
    /// Opens an existing file, for writing too when `writable`.
    pub fn open(path: &Path, writable: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Ok(FileStorage { file })
    }

    /// Creates a new, empty file; fails if `path` exists.
    pub fn create_new(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        Ok(FileStorage { file })
    }

    /// Creates a file, or empties the one at `path`: scratch and spool files.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(FileStorage { file })
    }

    /// Wraps a file that is already open.
    pub fn from_file(file: File) -> Self {
        FileStorage { file }
    }

    /// The open file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
        let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by `self`.
        let result = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, length) };
        if result == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE; `None` when there is no such position (ENXIO).
    fn seek_to(&self, whence: libc::c_int, from: u64) -> io::Result<Option<u64>> {
        let from = i64::try_from(from).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: lseek only reads its integer arguments; the descriptor is owned by `self`.
        let position = unsafe { libc::lseek(self.file.as_raw_fd(), from, whence) };
        if position >= 0 {
            return Ok(Some(position as u64));
        }
        let error = io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(error)
        }
    }
}

fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

impl Storage for FileStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn file_stamp(&self) -> io::Result<Option<super::FileStamp>> {
        super::FileStamp::of(&self.file).map(Some)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        // fdatasync also persists a size change, which is all the metadata a reader needs.
        self.file.sync_data()
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        self.file.set_len(size)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        if length == 0 {
            return Ok(());
        }
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(punch, offset, length) {
            Ok(()) => Ok(()),
            Err(error) if unsupported(&error) => {
                // Not every filesystem punches holes; zeros written by hand read the same.
                let zeros = vec![0u8; (1 << 20).min(length) as usize];
                let mut done = 0;
                while done < length {
                    let step = (zeros.len() as u64).min(length - done);
                    self.write_at(&zeros[..step as usize], offset + done)?;
                    done += step;
                }
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    fn preallocate(&self, offset: u64, length: u64) -> io::Result<()> {
        match self.fallocate(0, offset, length) {
            Err(error) if unsupported(&error) => {
                let end = offset + length;
                if end > self.size()? {
                    self.set_len(end)?;
                }
                Ok(())
            }
            other => other,
        }
    }

    fn will_need(&self, offset: u64, length: u64) {
        let (Ok(offset), Ok(length)) = (i64::try_from(offset), i64::try_from(length)) else {
            return;
        };
        // SAFETY: posix_fadvise only reads its integer arguments. A failed hint changes nothing.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset,
                length,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let size = self.size()?;
        let mut ranges = Vec::new();
        let mut position = 0;
        while position < size {
            let start = match self.seek_to(libc::SEEK_DATA, position) {
                Ok(Some(start)) => start,
                Ok(None) => break,
                Err(error) if unsupported(&error) => {
                    // No hole support: everything from here on may hold data.
                    ranges.push(position..size);
                    return Ok(ranges);
                }
                Err(error) => return Err(error),
            };
            let end = self
                .seek_to(libc::SEEK_HOLE, start)?
                .unwrap_or(size)
                .min(size);
            if end > start {
                ranges.push(start..end);
            }
            position = end.max(start + 1);
        }
        Ok(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punched_ranges_read_as_zeros_and_leave_holes() {
        let directory = tempfile::tempdir().unwrap();
        let storage = FileStorage::create_new(&directory.path().join("f")).unwrap();
        storage.write_at(&vec![7u8; 4 << 20], 0).unwrap();
        storage.write_zeroes(1 << 20, 2 << 20).unwrap();
        let mut buf = vec![1u8; 4 << 20];
        storage.read_at(&mut buf, 0).unwrap();
        assert!(buf[..1 << 20].iter().all(|&b| b == 7));
        assert!(buf[1 << 20..3 << 20].iter().all(|&b| b == 0));
        assert!(buf[3 << 20..].iter().all(|&b| b == 7));
        let ranges = storage.data_ranges().unwrap();
        let covered: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        assert!((2 << 20..=4 << 20).contains(&covered), "{ranges:?}");
    }

    #[test]
    fn reading_past_the_end_is_an_error() {
        let directory = tempfile::tempdir().unwrap();
        let storage = FileStorage::create_new(&directory.path().join("f")).unwrap();
        storage.write_at(&[1, 2, 3], 0).unwrap();
        let mut buf = [0u8; 4];
        let error = storage.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
