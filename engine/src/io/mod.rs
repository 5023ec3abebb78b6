//! How bytes reach a file. Everything in the engine that touches bytes on disk goes through the
//! [`Storage`] trait, so that io_uring, the portable `pread`/`pwrite` path and the simulator's
//! fault-injecting store are interchangeable. This module knows nothing of image formats.
//!
//! Flush semantics, the same for every implementation: a write that returned is visible to later
//! reads at once, but only survives a crash (power loss, kernel panic) once a later `flush` has
//! returned. A crash may keep any subset of the writes made since the last flush.

mod directory;
mod file;
mod lock;
mod memory;
mod uring;

pub use file::FileStorage;
pub use lock::FileLock;
pub use memory::MemoryStorage;
pub use uring::{UringOptions, UringStorage};

use std::fs::File;
use std::io;
use std::ops::Range;

/// Which way a file's bytes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// io_uring when the kernel allows it, else the portable path (saying why, once).
    #[default]
    Auto,
    /// io_uring, or an error when the kernel does not allow it.
    Uring,
    /// The portable `pread`/`pwrite` path.
    Sync,
}

/// How to open a file for image I/O.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StorageOptions {
    pub engine: IoEngine,
    /// With io_uring: send aligned writes through O_DIRECT, bypassing the page cache.
    pub direct: bool,
    /// Wraps every store opened with these options (images and journals): the simulator's
    /// fault injection. `None` in the daemons.
    pub layer: Option<StorageLayer>,
}

/// A wrapper put around each store as it is opened, so that every byte the engine writes to
/// images and journals passes through it (the simulator loses unflushed writes there), and a
/// check asked before each change to a directory (see [`StorageOptions::powered`]).
#[derive(Clone)]
pub struct StorageLayer {
    wrap: std::sync::Arc<WrapStorage>,
    power: Option<std::sync::Arc<PowerCheck>>,
}

type WrapStorage = dyn Fn(Box<dyn Storage>) -> Box<dyn Storage> + Send + Sync;
type PowerCheck = dyn Fn() -> io::Result<()> + Send + Sync;

impl StorageLayer {
    pub fn new(
        wrap: impl Fn(Box<dyn Storage>) -> Box<dyn Storage> + Send + Sync + 'static,
    ) -> Self {
        StorageLayer {
            wrap: std::sync::Arc::new(wrap),
            power: None,
        }
    }

    /// Asks `check` before each name the engine creates, renames or removes, and before each
    /// directory flush: an error stops the change, as a power cut stops a host.
    pub fn with_power_check(
        self,
        check: impl Fn() -> io::Result<()> + Send + Sync + 'static,
    ) -> Self {
        StorageLayer {
            power: Some(std::sync::Arc::new(check)),
            ..self
        }
    }
}

impl std::fmt::Debug for StorageLayer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("StorageLayer")
    }
}

/// Two layers are the same when they are one closure.
impl PartialEq for StorageLayer {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.wrap, &other.wrap)
    }
}

impl Eq for StorageLayer {}

impl StorageOptions {
    /// `storage` with this options' layer around it, if any.
    pub fn layered(&self, storage: Box<dyn Storage>) -> Box<dyn Storage> {
        match &self.layer {
            Some(layer) => (layer.wrap)(storage),
            None => storage,
        }
    }
}

/// Wraps an open file in the store `options` ask for.
pub fn file_storage(file: File, options: &StorageOptions) -> io::Result<Box<dyn Storage>> {
    Ok(options.layered(engine_storage(file, options)?))
}

fn engine_storage(file: File, options: &StorageOptions) -> io::Result<Box<dyn Storage>> {
    let uring = UringOptions {
        direct: options.direct,
        ..UringOptions::default()
    };
    match options.engine {
        IoEngine::Sync => Ok(Box::new(FileStorage::from_file(file))),
        IoEngine::Uring => match UringStorage::from_file(file.try_clone()?, uring) {
            Ok(storage) => Ok(Box::new(storage)),
            Err(error) => Err(io::Error::new(
                error.kind(),
                format!("io_uring is not available: {error} (use --io sync)"),
            )),
        },
        IoEngine::Auto => match UringStorage::from_file(file.try_clone()?, uring) {
            Ok(storage) => Ok(Box::new(storage)),
            Err(error) => {
                tracing::warn!(%error, "io_uring is not available; using the portable pread/pwrite path");
                Ok(Box::new(FileStorage::from_file(file)))
            }
        },
    }
}

/// A file-like store of bytes addressed by offset.
///
/// Methods take `&self` so that one store can serve concurrent readers and writers; an
/// implementation that needs exclusive access locks inside.
pub trait Storage: Send + Sync {
    /// Fills all of `buf` from `offset`; reading past the end is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at `offset`, growing the store when the write ends past its size.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes every write that returned before this call durable.
    fn flush(&self) -> io::Result<()>;

    /// Grows (with zeros) or shrinks the store to `size` bytes.
    fn set_len(&self, size: u64) -> io::Result<()>;

    /// The current size in bytes.
    fn size(&self) -> io::Result<u64>;

    /// Makes `length` bytes at `offset` read as zeros, releasing the space where the store can.
    /// The range must lie inside the store.
    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(length) as usize];
        let mut done = 0;
        while done < length {
            let step = CHUNK.min(length - done);
            self.write_at(&zeros[..step as usize], offset + done)?;
            done += step;
        }
        Ok(())
    }

    /// Reserves space for `length` bytes at `offset`, growing the store if needed, so that later
    /// writes there cannot fail for lack of space. The bytes read as zeros unless written before.
    fn preallocate(&self, offset: u64, length: u64) -> io::Result<()> {
        let end = offset + length;
        if end > self.size()? {
            self.set_len(end)?;
        }
        Ok(())
    }

    /// Hints that `length` bytes at `offset` will be read soon, so the store can start fetching
    /// them (readahead). Only a hint: the default does nothing.
    fn will_need(&self, _offset: u64, _length: u64) {}

    /// Byte ranges that may hold data, in order; everything outside them reads as zeros.
    /// The default is the whole store; a sparse file answers with its holes left out.
    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let size = self.size()?;
        Ok(std::iter::once(0..size)
            .filter(|range| !range.is_empty())
            .collect())
    }

    /// The identity and times of the file under the store, when there is one (a store in
    /// memory has none): what tells a raw image changed or replaced by another program.
    fn file_stamp(&self) -> io::Result<Option<FileStamp>> {
        Ok(None)
    }
}

/// A file's identity and times, as `fstat` gives them. Any write through any handle moves the
/// modification and change times; a copy put in the file's place has another inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FileStamp {
    pub device: u64,
    pub inode: u64,
    pub size: u64,
    /// Seconds and nanoseconds since the Unix epoch.
    pub modified: (i64, u32),
    pub changed: (i64, u32),
}

impl FileStamp {
    /// The stamp of an open file.
    pub fn of(file: &File) -> io::Result<Self> {
        use std::os::unix::fs::MetadataExt;
        let metadata = file.metadata()?;
        // Nanoseconds are below 10^9, so they fit in a u32.
        Ok(FileStamp {
            device: metadata.dev(),
            inode: metadata.ino(),
            size: metadata.size(),
            modified: (metadata.mtime(), metadata.mtime_nsec() as u32),
            changed: (metadata.ctime(), metadata.ctime_nsec() as u32),
        })
    }

    /// The same file (not a copy put in its place) at the same size; times aside. The device
    /// is not compared: a device-mapper, NVMe or btrfs device may be numbered differently after
    /// a reboot, and a copy put back on the same filesystem has another inode all the same.
    pub fn same_file(&self, other: &FileStamp) -> bool {
        (self.inode, self.size) == (other.inode, other.size)
    }

    /// Unwritten since: the modification and change times are the same to the nanosecond.
    pub fn same_times(&self, other: &FileStamp) -> bool {
        (self.modified, self.changed) == (other.modified, other.changed)
    }
}

impl std::fmt::Display for FileStamp {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "inode {} on device {:#x}, {} bytes, modified {}.{:09}, changed {}.{:09}",
            self.inode,
            self.device,
            self.size,
            self.modified.0,
            self.modified.1,
            self.changed.0,
            self.changed.1
        )
    }
}

/// Smart pointers to a store are stores: `Box<dyn Storage>` for a store chosen at run time,
/// `Arc<S>` for one shared with a test or a second user.
macro_rules! forward_storage {
    ($($pointer:ident)::+) => {
        impl<S: Storage + ?Sized> Storage for $($pointer)::+<S> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
                (**self).read_at(buf, offset)
            }
            fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
                (**self).write_at(buf, offset)
            }
            fn flush(&self) -> io::Result<()> {
                (**self).flush()
            }
            fn set_len(&self, size: u64) -> io::Result<()> {
                (**self).set_len(size)
            }
            fn size(&self) -> io::Result<u64> {
                (**self).size()
            }
            fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
                (**self).write_zeroes(offset, length)
            }
            fn preallocate(&self, offset: u64, length: u64) -> io::Result<()> {
                (**self).preallocate(offset, length)
            }
            fn will_need(&self, offset: u64, length: u64) {
                (**self).will_need(offset, length)
            }
            fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
                (**self).data_ranges()
            }
            fn file_stamp(&self) -> io::Result<Option<FileStamp>> {
                (**self).file_stamp()
            }
        }
    };
}

forward_storage!(Box);
forward_storage!(std::sync::Arc);

/// Flushes a directory, so that the names created, renamed or removed in it are durable.
pub(crate) fn sync_directory(directory: &std::path::Path) -> crate::Result<()> {
    let directory = if directory.as_os_str().is_empty() {
        std::path::Path::new(".")
    } else {
        directory
    };
    std::fs::File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|error| {
            crate::Error::file(&directory.display().to_string(), "flush directory", error)
        })
}

/// Removes a file; one that is not there is fine.
pub(crate) fn remove_if_present(path: &std::path::Path) -> crate::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(crate::Error::file(
            &path.display().to_string(),
            "remove",
            error,
        )),
    }
}
