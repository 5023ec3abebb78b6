//! The io_uring store: writes are copied into a pool of registered, page-aligned buffers and
//! submitted in batches, and the call returns while they are in flight, so the caller prepares
//! the next batch while the disk takes this one. Aligned writes can go through a second,
//! O_DIRECT descriptor that bypasses the page cache. Reads and the rare metadata operations
//! (size changes, hole punching) run synchronously on the ordinary descriptor, after the
//! in-flight writes they could race with have completed.
//!
//! The same flush semantics as every [`Storage`]: a write is visible to reads at once (a read
//! waits for the in-flight writes it overlaps) and durable after `flush`, which waits for every
//! write in flight and then syncs the file. A write that fails after its call returned makes
//! every later call fail, so the failure cannot go unnoticed before the next flush.

use super::{FileStorage, Storage};
use io_uring::{IoUring, opcode, squeue, types};
use memmap2::MmapMut;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// Alignment of O_DIRECT transfers (offset, length and buffer address).
const DIRECT_ALIGNMENT: u64 = 4096;

/// How an io_uring store is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UringOptions {
    /// Writes in flight at most (and buffers in the pool).
    pub queue_depth: u16,
    /// Size of each pool buffer; longer writes are split into several.
    pub buffer_size: usize,
    /// Send aligned writes through an O_DIRECT descriptor.
    pub direct: bool,
}

impl Default for UringOptions {
    fn default() -> Self {
        UringOptions {
            queue_depth: 32,
            buffer_size: 1 << 20,
            direct: false,
        }
    }
}

/// Descriptor slots registered with the ring.
const BUFFERED_SLOT: u32 = 0;
const DIRECT_SLOT: u32 = 1;

#[derive(Debug, Clone, Copy)]
struct InFlight {
    offset: u64,
    length: usize,
    direct: bool,
}

impl InFlight {
    fn overlaps(&self, range: &Range<u64>) -> bool {
        self.offset < range.end && range.start < self.offset + self.length as u64
    }
}

struct Ring {
    // Field order matters: the ring is dropped (and its fd closed) before the buffers it
    // may still reference; `UringStorage::drop` drains it first anyway.
    ring: IoUring,
    pool: MmapMut,
    buffer_size: usize,
    /// Whether the pool is registered with the kernel (WriteFixed) and the files are (Fixed).
    registered_buffers: bool,
    registered_files: bool,
    free: Vec<u16>,
    in_flight: Vec<Option<InFlight>>,
    in_flight_count: usize,
    /// The first error of a write that completed after its call returned.
    failure: Option<(io::ErrorKind, String)>,
    /// Completions are copied here before handling, so the ring is not borrowed meanwhile.
    completions: Vec<(u64, i32)>,
}

/// A file written through io_uring.
pub struct UringStorage {
    file: FileStorage,
    /// The same file reopened with O_DIRECT, when asked for and allowed by the filesystem.
    direct: Option<File>,
    ring: Mutex<Ring>,
}

impl std::fmt::Debug for UringStorage {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("UringStorage")
            .field("direct", &self.direct.is_some())
            .finish_non_exhaustive()
    }
}

impl UringStorage {
    /// Sets up a ring for `file`. Fails when the kernel does not allow io_uring.
    pub fn from_file(file: File, options: UringOptions) -> io::Result<Self> {
        let depth = options.queue_depth.max(1);
        let ring = IoUring::new(u32::from(depth).next_power_of_two())?;
        let direct = if options.direct {
            // Reopening through /proc gives a second descriptor on the same open file's inode.
            let path = format!("/proc/self/fd/{}", file.as_raw_fd());
            match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(Path::new(&path))
            {
                Ok(direct) => Some(direct),
                Err(error) => {
                    tracing::warn!(%error, "O_DIRECT is not available for this file; writing through the page cache");
                    None
                }
            }
        } else {
            None
        };
        let buffer_size = options.buffer_size.max(DIRECT_ALIGNMENT as usize);
        let buffer_size = buffer_size.next_multiple_of(DIRECT_ALIGNMENT as usize);
        let mut pool = MmapMut::map_anon(buffer_size * usize::from(depth))?;
        let iovecs: Vec<libc::iovec> = pool
            .chunks_mut(buffer_size)
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: chunk.len(),
            })
            .collect();
        // SAFETY: the iovecs describe the pool, which lives as long as the ring (both are owned
        // by `Ring`, and the ring is drained before either is dropped).
        let registered_buffers = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        let descriptors: Vec<i32> = std::iter::once(file.as_raw_fd())
            .chain(direct.as_ref().map(AsRawFd::as_raw_fd))
            .collect();
        let registered_files = ring.submitter().register_files(&descriptors).is_ok();
        Ok(UringStorage {
            file: FileStorage::from_file(file),
            direct,
            ring: Mutex::new(Ring {
                ring,
                pool,
                buffer_size,
                registered_buffers,
                registered_files,
                free: (0..depth).rev().collect(),
                in_flight: vec![None; usize::from(depth)],
                in_flight_count: 0,
                failure: None,
                completions: Vec::with_capacity(usize::from(depth)),
            }),
        })
    }

    /// Opens an existing file.
    pub fn open(path: &Path, writable: bool, options: UringOptions) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        Self::from_file(file, options)
    }

    /// Whether aligned writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Ring> {
        // The ring's bookkeeping is updated before anything that can panic, so a poisoned lock
        // still holds consistent state.
        self.ring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn descriptor(&self, direct: bool) -> &File {
        match (&self.direct, direct) {
            (Some(file), true) => file,
            _ => self.file.file(),
        }
    }

    /// Handles every completion that has arrived.
    fn reap(&self, ring: &mut Ring) {
        let mut completions = std::mem::take(&mut ring.completions);
        completions.extend(
            ring.ring
                .completion()
                .map(|entry| (entry.user_data(), entry.result())),
        );
        for &(user_data, result) in &completions {
            let index = user_data as usize;
            let Some(write) = ring.in_flight.get_mut(index).and_then(Option::take) else {
                continue;
            };
            ring.in_flight_count -= 1;
            let outcome = if result < 0 {
                Err(io::Error::from_raw_os_error(-result))
            } else if (result as usize) < write.length {
                // A short write (rare on regular files): finish it synchronously.
                let start = index * ring.buffer_size;
                let written = result as usize;
                let rest = &ring.pool[start + written..start + write.length];
                let descriptor = self
                    .descriptor(write.direct && (written as u64).is_multiple_of(DIRECT_ALIGNMENT));
                descriptor.write_all_at(rest, write.offset + written as u64)
            } else {
                Ok(())
            };
            if let Err(error) = outcome
                && ring.failure.is_none()
            {
                ring.failure = Some((
                    error.kind(),
                    format!(
                        "write of {} bytes at {} failed: {error}",
                        write.length, write.offset
                    ),
                ));
            }
            ring.free.push(index as u16);
        }
        completions.clear();
        ring.completions = completions;
    }

    /// Waits for one completion and handles what arrived.
    fn wait_one(&self, ring: &mut Ring) -> io::Result<()> {
        loop {
            match ring.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
        self.reap(ring);
        Ok(())
    }

    /// Waits until no write in flight overlaps `range`.
    fn wait_for_overlapping(&self, ring: &mut Ring, range: Range<u64>) -> io::Result<()> {
        while ring
            .in_flight
            .iter()
            .flatten()
            .any(|write| write.overlaps(&range))
        {
            self.wait_one(ring)?;
        }
        Ok(())
    }

    /// Waits until nothing is in flight.
    fn drain(&self, ring: &mut Ring) -> io::Result<()> {
        while ring.in_flight_count > 0 {
            self.wait_one(ring)?;
        }
        Ok(())
    }

    fn check_failure(ring: &Ring) -> io::Result<()> {
        match &ring.failure {
            Some((kind, message)) => Err(io::Error::new(*kind, message.clone())),
            None => Ok(()),
        }
    }

    fn submit(ring: &mut Ring) -> io::Result<()> {
        loop {
            match ring.ring.submit() {
                Ok(_) => return Ok(()),
                Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Copies one piece (at most a buffer long) into a free buffer and queues its write.
    fn queue_piece(&self, ring: &mut Ring, piece: &[u8], offset: u64) -> io::Result<()> {
        while ring.free.is_empty() {
            self.wait_one(ring)?;
        }
        let Some(index) = ring.free.pop() else {
            return Err(io::Error::other("io_uring buffer pool exhausted"));
        };
        let start = usize::from(index) * ring.buffer_size;
        ring.pool[start..start + piece.len()].copy_from_slice(piece);
        let direct = self.direct.is_some()
            && offset.is_multiple_of(DIRECT_ALIGNMENT)
            && (piece.len() as u64).is_multiple_of(DIRECT_ALIGNMENT);
        let pointer = ring.pool[start..].as_ptr();
        let length = piece.len() as u32;
        let entry = match (ring.registered_files, ring.registered_buffers) {
            (true, true) => {
                let slot = types::Fixed(if direct { DIRECT_SLOT } else { BUFFERED_SLOT });
                opcode::WriteFixed::new(slot, pointer, length, index)
                    .offset(offset)
                    .build()
            }
            (true, false) => {
                let slot = types::Fixed(if direct { DIRECT_SLOT } else { BUFFERED_SLOT });
                opcode::Write::new(slot, pointer, length)
                    .offset(offset)
                    .build()
            }
            (false, true) => {
                let descriptor = types::Fd(self.descriptor(direct).as_raw_fd());
                opcode::WriteFixed::new(descriptor, pointer, length, index)
                    .offset(offset)
                    .build()
            }
            (false, false) => {
                let descriptor = types::Fd(self.descriptor(direct).as_raw_fd());
                opcode::Write::new(descriptor, pointer, length)
                    .offset(offset)
                    .build()
            }
        };
        self.push(ring, &entry.user_data(u64::from(index)))?;
        ring.in_flight[usize::from(index)] = Some(InFlight {
            offset,
            length: piece.len(),
            direct,
        });
        ring.in_flight_count += 1;
        Ok(())
    }

    fn push(&self, ring: &mut Ring, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the entry points into the pool, which outlives the operation: the buffer
            // is not handed out again until its completion is reaped, and the ring is drained
            // before the pool is dropped.
            if unsafe { ring.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and retry.
            Self::submit(ring)?;
        }
    }
}

impl Storage for UringStorage {
    fn file_stamp(&self) -> io::Result<Option<super::FileStamp>> {
        self.file.file_stamp()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut ring = self.lock();
        Self::check_failure(&ring)?;
        self.wait_for_overlapping(&mut ring, offset..offset + buf.len() as u64)?;
        drop(ring);
        match self.file.read_at(buf, offset) {
            // A write in flight past this range may be what extends the file over it.
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                let mut ring = self.lock();
                self.drain(&mut ring)?;
                Self::check_failure(&ring)?;
                drop(ring);
                self.file.read_at(buf, offset)
            }
            outcome => outcome,
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut ring = self.lock();
        Self::check_failure(&ring)?;
        self.wait_for_overlapping(&mut ring, offset..offset + buf.len() as u64)?;
        let buffer_size = ring.buffer_size;
        for (index, piece) in buf.chunks(buffer_size).enumerate() {
            self.queue_piece(&mut ring, piece, offset + (index * buffer_size) as u64)?;
        }
        // One submission for the whole call: the batch.
        Self::submit(&mut ring)
    }

    fn flush(&self) -> io::Result<()> {
        let mut ring = self.lock();
        self.drain(&mut ring)?;
        Self::check_failure(&ring)?;
        // fdatasync on either descriptor covers the inode, O_DIRECT writes included.
        self.file.flush()
    }

    fn set_len(&self, size: u64) -> io::Result<()> {
        let mut ring = self.lock();
        Self::check_failure(&ring)?;
        self.wait_for_overlapping(&mut ring, size..u64::MAX)?;
        self.file.set_len(size)
    }

    fn size(&self) -> io::Result<u64> {
        // Writes in flight may still extend the file.
        let mut ring = self.lock();
        self.drain(&mut ring)?;
        self.file.size()
    }

    fn write_zeroes(&self, offset: u64, length: u64) -> io::Result<()> {
        let mut ring = self.lock();
        Self::check_failure(&ring)?;
        self.wait_for_overlapping(&mut ring, offset..offset + length)?;
        self.file.write_zeroes(offset, length)
    }

    fn preallocate(&self, offset: u64, length: u64) -> io::Result<()> {
        let mut ring = self.lock();
        Self::check_failure(&ring)?;
        self.wait_for_overlapping(&mut ring, offset..offset + length)?;
        self.file.preallocate(offset, length)
    }

    fn will_need(&self, offset: u64, length: u64) {
        self.file.will_need(offset, length)
    }

    fn data_ranges(&self) -> io::Result<Vec<Range<u64>>> {
        let mut ring = self.lock();
        self.drain(&mut ring)?;
        self.file.data_ranges()
    }
}

impl Drop for UringStorage {
    fn drop(&mut self) {
        let mut ring = self.lock();
        if let Err(error) = self.drain(&mut ring) {
            tracing::error!(%error, "io_uring: waiting for writes in flight failed");
        }
        if let Err(error) = Self::check_failure(&ring) {
            tracing::error!(%error, "io_uring: a write failed after the last flush");
        }
    }
}
