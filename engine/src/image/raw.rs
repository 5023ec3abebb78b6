//! Raw images: the virtual disk is the file, byte for byte. Holes in a sparse file are the
//! unallocated ranges.

use super::{Access, BlockImage, check_range};
use crate::io::Storage;
use crate::{Error, Result};
use std::ops::Range;

/// A raw disk image over any [`Storage`].
#[derive(Debug)]
pub struct RawImage<S: Storage> {
    storage: S,
    name: String,
    virtual_size: u64,
    access: Access,
}

impl<S: Storage> RawImage<S> {
    /// Opens a raw image; its virtual size is the store's size.
    pub fn open(storage: S, name: &str, access: Access) -> Result<Self> {
        let virtual_size = storage
            .size()
            .map_err(|source| Error::file(name, "stat", source))?;
        Ok(RawImage {
            storage,
            name: name.to_owned(),
            virtual_size,
            access,
        })
    }

    /// Makes a raw image of `virtual_size` bytes, all zeros (sparse where the store allows).
    pub fn create(storage: S, name: &str, virtual_size: u64) -> Result<Self> {
        storage
            .set_len(virtual_size)
            .map_err(|source| Error::io(name, "resize", virtual_size, source))?;
        Ok(RawImage {
            storage,
            name: name.to_owned(),
            virtual_size,
            access: Access::ReadWrite,
        })
    }

    fn require_writable(&self) -> Result<()> {
        match self.access {
            Access::ReadWrite => Ok(()),
            Access::ReadOnly => Err(Error::ReadOnly {
                name: self.name.clone(),
            }),
        }
    }
}

impl<S: Storage> BlockImage for RawImage<S> {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(&self.name, offset, buf.len() as u64, self.virtual_size)?;
        self.storage
            .read_at(buf, offset)
            .map_err(|source| Error::io(&self.name, "read", offset, source))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.require_writable()?;
        check_range(&self.name, offset, buf.len() as u64, self.virtual_size)?;
        self.storage
            .write_at(buf, offset)
            .map_err(|source| Error::io(&self.name, "write", offset, source))
    }

    fn content_stamp(&self) -> Result<super::ContentStamp> {
        let stamp = self
            .storage
            .file_stamp()
            .map_err(|source| Error::file(&self.name, "stat", source))?;
        Ok(stamp.map_or(super::ContentStamp::Unknown, super::ContentStamp::File))
    }

    fn zero_range(&mut self, offset: u64, length: u64) -> Result<()> {
        self.require_writable()?;
        check_range(&self.name, offset, length, self.virtual_size)?;
        self.storage
            .write_zeroes(offset, length)
            .map_err(|source| Error::io(&self.name, "zero", offset, source))
    }

    fn flush(&mut self) -> Result<()> {
        self.storage
            .flush()
            .map_err(|source| Error::file(&self.name, "flush", source))
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>> {
        let ranges = self
            .storage
            .data_ranges()
            .map_err(|source| Error::io(&self.name, "find data in", 0, source))?;
        Ok(ranges
            .into_iter()
            .map(|range| range.start..range.end.min(self.virtual_size))
            .filter(|range| range.start < range.end)
            .collect())
    }

    fn will_need(&self, offset: u64, length: u64) {
        self.storage.will_need(offset, length)
    }
}
