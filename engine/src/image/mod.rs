//! Disk image formats behind one trait. This layer owns the layout of bytes in an image file
//! (raw, VHDX) and nothing else: it knows no networks, no policies, no tracking. It reaches files
//! only through [`crate::io::Storage`].

mod copy;
mod raw;
pub mod vhdx;
mod zero;

pub use copy::{CopyStatistics, copy_image};
pub use raw::RawImage;
pub use vhdx::VhdxImage;
pub use zero::is_zero;

use crate::io::{FileStorage, Storage};
use crate::{Error, Result};
use std::ops::Range;
use std::path::Path;

/// A virtual disk: a fixed number of bytes that can be read and written at any offset.
///
/// Reads of never-written ranges return zeros. Writes are visible to reads at once and durable
/// after [`BlockImage::flush`] returns.
pub trait BlockImage: Send + Sync {
    /// Size of the virtual disk in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` with the virtual disk's bytes from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()>;

    /// Makes `length` bytes at `offset` read as zeros, releasing their space where the format can
    /// (this is both "discard" and "write zeroes": a discarded range always reads back as zeros).
    fn zero_range(&mut self, offset: u64, length: u64) -> Result<()>;

    /// Makes every completed write durable, image metadata included.
    fn flush(&mut self) -> Result<()>;

    /// Ranges of the virtual disk that may hold data, in order and not overlapping; everything
    /// outside them reads as zeros.
    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>>;

    /// Hints that `length` bytes at virtual `offset` will be read soon (readahead). Only a hint:
    /// the default does nothing.
    fn will_need(&self, _offset: u64, _length: u64) {}

    /// What tells whether the image changed since it was last seen, without reading it.
    fn content_stamp(&self) -> Result<ContentStamp> {
        Ok(ContentStamp::Unknown)
    }

    /// Makes the change a first write would make to the image's stamp now (a VHDX writer
    /// stamps a new DataWriteGuid), so that the stamp then holds until the image is closed.
    fn begin_writes(&mut self) -> Result<()> {
        Ok(())
    }

    /// What [`BlockImage::content_stamp`] will say once `begin_writes` has run, known before:
    /// a caller records it first, so that a failure in between cannot leave the image with a
    /// stamp nobody recorded.
    fn stamp_after_begin_writes(&self) -> Result<ContentStamp> {
        self.content_stamp()
    }
}

/// What changes whenever an image's content may have changed, read without reading the disk:
/// a VHDX image's DataWriteGuid (MS-VHDX: a conforming writer changes it before its first
/// user-visible write after opening), or a raw image file's identity and times. Recorded when
/// blockrep stops using a disk and compared when it starts again, it shows a disk written,
/// reverted or replaced by another program in between (docs/formats/journal.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContentStamp {
    /// Nothing to compare: a store with no file under it (the simulator's memory).
    Unknown,
    DataWrite(uuid::Uuid),
    File(crate::io::FileStamp),
}

impl ContentStamp {
    /// Why the disk as `found` now may hold other content than when this stamp was recorded,
    /// or `None` when it cannot. After a crash (`times_moved`) a raw image's times may have
    /// moved with blockrep's own last writes, so only its inode and size are compared.
    pub fn changed_since(&self, found: &ContentStamp, times_moved: bool) -> Option<String> {
        match (self, found) {
            (ContentStamp::File(recorded), ContentStamp::File(now))
                if recorded.same_file(now) && (times_moved || recorded.same_times(now)) =>
            {
                None
            }
            (recorded, now) if recorded == now => None,
            (ContentStamp::DataWrite(recorded), ContentStamp::DataWrite(now)) => Some(format!(
                "the disk was written by another program while blockrep did not track it, or replaced by another copy (its DataWriteGuid was {recorded}, it is {now})"
            )),
            (ContentStamp::File(recorded), ContentStamp::File(now)) => Some(format!(
                "the disk was written by another program while blockrep did not track it, or replaced by another copy (it was {recorded}; it is {now})"
            )),
            (ContentStamp::Unknown, _) => Some(
                "no stamp of the disk was recorded when blockrep last let it go (another program wrote it during that session, or blockrep stopped before it recorded one)".into(),
            ),
            (recorded, now) => Some(format!(
                "the disk is not the one tracked (recorded {}, found {})",
                recorded.kind(),
                now.kind()
            )),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ContentStamp::Unknown => "no stamp",
            ContentStamp::DataWrite(_) => "a VHDX DataWriteGuid",
            ContentStamp::File(_) => "a raw file's identity",
        }
    }
}

impl<I: BlockImage + ?Sized> BlockImage for Box<I> {
    fn virtual_size(&self) -> u64 {
        (**self).virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        (**self).write_at(buf, offset)
    }
    fn zero_range(&mut self, offset: u64, length: u64) -> Result<()> {
        (**self).zero_range(offset, length)
    }
    fn flush(&mut self) -> Result<()> {
        (**self).flush()
    }
    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>> {
        (**self).allocated_ranges()
    }
    fn will_need(&self, offset: u64, length: u64) {
        (**self).will_need(offset, length)
    }
    fn content_stamp(&self) -> Result<ContentStamp> {
        (**self).content_stamp()
    }
    fn begin_writes(&mut self) -> Result<()> {
        (**self).begin_writes()
    }
    fn stamp_after_begin_writes(&self) -> Result<ContentStamp> {
        (**self).stamp_after_begin_writes()
    }
}

/// The image formats blockrep reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Raw,
    Vhdx,
}

impl ImageFormat {
    /// The format a file name implies: `.vhdx` is VHDX; `.raw`, `.img` and `.bin` are raw.
    pub fn from_extension(path: &Path) -> Option<Self> {
        let extension = path.extension()?.to_str()?.to_ascii_lowercase();
        match extension.as_str() {
            "vhdx" => Some(ImageFormat::Vhdx),
            "raw" | "img" | "bin" => Some(ImageFormat::Raw),
            _ => None,
        }
    }

    /// The format of an existing file, from its content: VHDX files start with `vhdxfile`;
    /// anything else is taken as raw.
    pub fn detect(storage: &dyn Storage) -> std::io::Result<Self> {
        let mut signature = [0u8; 8];
        if storage.size()? >= 8 {
            storage.read_at(&mut signature, 0)?;
        }
        Ok(if &signature == vhdx::FILE_SIGNATURE {
            ImageFormat::Vhdx
        } else {
            ImageFormat::Raw
        })
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Vhdx => "vhdx",
        })
    }
}

/// Whether an image may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Opens the image at `path` in the given format through the portable file store.
pub fn open_path(path: &Path, format: ImageFormat, access: Access) -> Result<Box<dyn BlockImage>> {
    let name = path.display().to_string();
    let storage = FileStorage::open(path, access == Access::ReadWrite)
        .map_err(|source| Error::file(&name, "open", source))?;
    Ok(match format {
        ImageFormat::Raw => Box::new(RawImage::open(storage, &name, access)?),
        ImageFormat::Vhdx => Box::new(VhdxImage::open(storage, &name, access)?),
    })
}

/// Checks that `length` bytes at `offset` fit inside a disk of `virtual_size` bytes.
pub(crate) fn check_range(name: &str, offset: u64, length: u64, virtual_size: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= virtual_size => Ok(()),
        _ => Err(Error::OutOfRange {
            name: name.to_owned(),
            offset,
            length,
            virtual_size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::ContentStamp;
    use crate::io::FileStamp;

    fn raw(device: u64, inode: u64, modified: i64) -> ContentStamp {
        ContentStamp::File(FileStamp {
            device,
            inode,
            size: 1 << 20,
            modified: (modified, 5),
            changed: (modified, 7),
        })
    }

    #[test]
    fn a_raw_stamp_survives_a_renumbered_device_but_not_another_inode_or_a_write() {
        let recorded = raw(0x801, 12, 100);
        for times_moved in [false, true] {
            assert_eq!(
                recorded.changed_since(&raw(0xfd00, 12, 100), times_moved),
                None
            );
            assert!(
                recorded
                    .changed_since(&raw(0x801, 13, 100), times_moved)
                    .is_some()
            );
        }
        // Written: caught after a clean stop; after a crash blockrep's own writes moved them.
        assert!(
            recorded
                .changed_since(&raw(0x801, 12, 101), false)
                .is_some()
        );
        assert_eq!(recorded.changed_since(&raw(0x801, 12, 101), true), None);
    }
}
