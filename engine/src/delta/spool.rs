//! Chunks: a replication cycle's delta cut into small, self-contained deltas (each a complete
//! delta of format v1 covering at most about a mebibyte of one disk), so that they can travel
//! on several streams at once, be verified one by one, and be resent one by one after a
//! dropped link. The spool keeps a cycle's chunks in a file on the primary until the replica
//! has applied them; it holds only an index in memory.

use super::encode::{Compression, DeltaEncoder};
use super::format::DeltaHeader;
use crate::image::BlockImage;
use crate::io::{FileStorage, Storage, StorageOptions};
use crate::{Error, Result};
use bytes::Bytes;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A window of a disk held in memory, seen as an image: lets the delta encoder read blocks
/// that were copied out of the disk (a snapshot read, a preserved block) rather than the disk.
struct Window<'a> {
    offset: u64,
    data: &'a [u8],
    virtual_size: u64,
}

impl BlockImage for Window<'_> {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let start = offset
            .checked_sub(self.offset)
            .map(|start| start as usize)
            .filter(|start| start + buf.len() <= self.data.len())
            .ok_or_else(|| Error::OutOfRange {
                name: "chunk window".into(),
                offset,
                length: buf.len() as u64,
                virtual_size: self.offset + self.data.len() as u64,
            })?;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::ReadOnly {
            name: "chunk window".into(),
        })
    }

    fn zero_range(&mut self, _offset: u64, _length: u64) -> Result<()> {
        Err(Error::ReadOnly {
            name: "chunk window".into(),
        })
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn allocated_ranges(&self) -> Result<Vec<Range<u64>>> {
        Ok(std::iter::once(self.offset..self.offset + self.data.len() as u64).collect())
    }
}

impl DeltaEncoder {
    /// Encodes one chunk: the `ranges` (disk offsets, in order) of `data`, which holds the disk's
    /// bytes from `offset`.
    pub fn encode_chunk(
        &mut self,
        header: &DeltaHeader,
        offset: u64,
        data: &[u8],
        ranges: &[Range<u64>],
        compression: Compression,
    ) -> Result<Vec<u8>> {
        let window = Window {
            offset,
            data,
            virtual_size: header.virtual_size,
        };
        let mut chunk = Vec::with_capacity(data.len() / 2 + 256);
        self.encode(&window, ranges, header, &mut chunk, "chunk", compression)?;
        Ok(chunk)
    }
}

#[derive(Debug, Clone, Copy)]
struct SpooledChunk {
    disk: u16,
    offset: u64,
    length: u32,
    disk_bytes: u64,
}

/// A cycle's chunks in a file, appended by any thread, read back by index.
pub(crate) struct Spool {
    path: PathBuf,
    storage: Box<dyn Storage>,
    chunks: Mutex<(u64, Vec<SpooledChunk>)>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Spool")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Spool {
    /// Creates (or empties) the spool file at `path`, written through `options`' layer.
    pub(crate) fn create(path: &Path, options: &StorageOptions) -> Result<Spool> {
        let storage = FileStorage::create(path)
            .map(|file| options.layered(Box::new(file)))
            .map_err(|source| Error::file(&path.display().to_string(), "create spool", source))?;
        Ok(Spool {
            path: path.to_owned(),
            storage,
            chunks: Mutex::new((0, Vec::new())),
        })
    }

    /// Adds a chunk for `disk` that covers `disk_bytes` of it.
    pub(crate) fn append(&self, disk: u16, chunk: &[u8], disk_bytes: u64) -> Result<()> {
        let mut state = self
            .chunks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let offset = state.0;
        self.storage.write_at(chunk, offset).map_err(|source| {
            Error::io(
                &self.path.display().to_string(),
                "write spool",
                offset,
                source,
            )
        })?;
        state.0 += chunk.len() as u64;
        state.1.push(SpooledChunk {
            disk,
            offset,
            length: chunk.len() as u32,
            disk_bytes,
        });
        Ok(())
    }

    /// Chunk `index`: its disk and its bytes.
    pub(crate) fn chunk(&self, index: u32) -> Result<(u16, Bytes)> {
        let entry = {
            let state = self
                .chunks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            state.1.get(index as usize).copied()
        };
        let entry = entry.ok_or_else(|| Error::InvalidArgument {
            what: "chunk index",
            reason: format!("{index} is not in {}", self.path.display()),
        })?;
        let mut bytes = vec![0u8; entry.length as usize];
        self.storage
            .read_at(&mut bytes, entry.offset)
            .map_err(|source| {
                Error::io(
                    &self.path.display().to_string(),
                    "read spool",
                    entry.offset,
                    source,
                )
            })?;
        Ok((entry.disk, Bytes::from(bytes)))
    }

    /// Disk bytes each chunk covers, in index order.
    pub(crate) fn chunk_disk_bytes(&self) -> Vec<u64> {
        let state = self
            .chunks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.1.iter().map(|chunk| chunk.disk_bytes).collect()
    }

    /// Deletes the spool file (chunks already read stay readable until the spool is dropped).
    pub(crate) fn remove(&self) -> Result<()> {
        let name = self.path.display().to_string();
        match std::fs::remove_file(&self.path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                Err(Error::file(&name, "remove spool", error))
            }
            _ => Ok(()),
        }
    }
}

/// Splits `extents` (in order) into pieces of at most `limit` bytes, never across an extent
/// boundary gap larger than the piece: consecutive small extents share a piece.
pub(crate) fn chunk_pieces(extents: &[Range<u64>], limit: u64) -> Vec<Vec<Range<u64>>> {
    let mut pieces: Vec<Vec<Range<u64>>> = Vec::new();
    let mut current: Vec<Range<u64>> = Vec::new();
    let mut start = 0;
    for extent in extents {
        let mut position = extent.start;
        while position < extent.end {
            if current.is_empty() {
                start = position;
            }
            // A piece spans at most `limit` bytes of disk, first byte to last.
            let room = (start + limit).saturating_sub(position);
            if room == 0 {
                pieces.push(std::mem::take(&mut current));
                continue;
            }
            let end = extent.end.min(position + room);
            current.push(position..end);
            position = end;
        }
    }
    if !current.is_empty() {
        pieces.push(current);
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delta::{TargetState, apply_delta};
    use crate::image::{Access, RawImage};
    use crate::io::MemoryStorage;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn pieces_cover_every_extent_once_and_span_at_most_the_limit(
            lengths in prop::collection::vec((0u64..5000, 1u64..9000), 0..40),
            limit in 1u64..20_000,
        ) {
            let mut extents = Vec::new();
            let mut position = 0;
            for (gap, length) in lengths {
                position += gap;
                extents.push(position..position + length);
                position += length;
            }
            let pieces = chunk_pieces(&extents, limit);
            let flattened: Vec<u64> = pieces.iter().flatten().flat_map(|range| range.clone()).collect();
            let expected: Vec<u64> = extents.iter().flat_map(|range| range.clone()).collect();
            prop_assert_eq!(flattened, expected);
            for piece in &pieces {
                let span = piece.last().unwrap().end - piece[0].start;
                prop_assert!(span <= limit, "piece {:?} spans {}", piece, span);
            }
        }
    }

    #[test]
    fn a_chunk_encoded_from_memory_applies_like_the_disk_it_came_from() {
        let mut data = vec![0u8; 256 << 10];
        data[70_000..90_000].fill(7);
        let header = DeltaHeader {
            disk_id: uuid::Uuid::nil(),
            virtual_size: 1 << 20,
            block_size: 64 << 10,
            source_generation: 1,
            sequence: 1,
            recovery_point: true,
            full: false,
        };
        let mut encoder = DeltaEncoder::new();
        let chunk = encoder
            .encode_chunk(
                &header,
                512 << 10,
                &data,
                std::slice::from_ref(&((512 << 10)..(768 << 10))),
                Compression::Lz4,
            )
            .unwrap();
        let mut target = RawImage::open(
            MemoryStorage::from_bytes(vec![9u8; 1 << 20]),
            "target",
            Access::ReadWrite,
        )
        .unwrap();
        apply_delta(
            std::io::Cursor::new(&chunk),
            "chunk",
            &mut target,
            TargetState::default(),
        )
        .unwrap();
        let mut bytes = vec![0u8; 1 << 20];
        target.read_at(&mut bytes, 0).unwrap();
        assert!(bytes[..512 << 10].iter().all(|&byte| byte == 9));
        assert!(bytes[512 << 10..768 << 10] == data[..]);
        assert!(bytes[768 << 10..].iter().all(|&byte| byte == 9));
    }

    #[test]
    fn spooled_chunks_read_back_by_index() {
        let directory = tempfile::tempdir().unwrap();
        let spool = Spool::create(
            &directory.path().join("spool"),
            &crate::io::StorageOptions::default(),
        )
        .unwrap();
        spool.append(0, b"first", 10).unwrap();
        spool.append(1, b"second chunk", 20).unwrap();
        assert_eq!(
            spool.chunk(1).unwrap(),
            (1, Bytes::from_static(b"second chunk"))
        );
        assert_eq!(spool.chunk(0).unwrap(), (0, Bytes::from_static(b"first")));
        assert!(spool.chunk(2).is_err());
        assert_eq!(spool.chunk_disk_bytes(), vec![10, 20]);
        spool.remove().unwrap();
        assert!(!directory.path().join("spool").exists());
    }
}
