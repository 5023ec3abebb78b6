//! The test disk: a deterministic, disk-like mix of 1 MiB chunks.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What the test disk holds, for the report.
pub const MIX: &str = "1 MiB chunks: 30% zeros, 30% text, 40% random bytes";

/// The kind of chunk `index`, spread evenly but not periodically over the disk.
fn kind(index: u64) -> u64 {
    let mut mixed = index.wrapping_add(0x9E37_79B9_7F4A_7C15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (mixed ^ (mixed >> 31)) % 10
}

/// Writes the test disk to `path` (sparse where it is zeros) unless it is already there.
pub fn make_disk_like(path: &Path, size: u64) -> io::Result<()> {
    if path.metadata().is_ok_and(|metadata| metadata.len() == size) {
        return Ok(());
    }
    let chunk = 1usize << 20;
    let text =
        b"The replica keeps recovery points; the primary ships deltas every thirty seconds.\n";
    let file = File::create(path)?;
    // Zero chunks are left as holes of the sparse file.
    file.set_len(size)?;
    let mut buffer = vec![0u8; chunk];
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for index in 0..size / chunk as u64 {
        match kind(index) {
            0..=2 => continue,
            3..=5 => {
                for (position, byte) in buffer.iter_mut().enumerate() {
                    *byte = text[position % text.len()];
                }
            }
            _ => {
                for word in buffer.chunks_exact_mut(8) {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    word.copy_from_slice(&state.to_le_bytes());
                }
            }
        }
        file.write_all_at(&buffer, index * chunk as u64)?;
    }
    file.sync_all()
}
