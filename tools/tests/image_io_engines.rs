//! The io_uring path (with and without O_DIRECT) and the portable path write the same images.

use std::path::Path;
use std::process::Command;

const MIB: usize = 1 << 20;

fn blockrep(arguments: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .output()
        .expect("run blockrep");
    assert!(
        output.status.success(),
        "blockrep {arguments:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The image's bytes with what is random per file blanked: the headers' checksums and write
/// GUIDs, and the virtual disk id (blockrep's layout puts it 16 bytes into the metadata items).
fn without_random_ids(mut bytes: Vec<u8>) -> Vec<u8> {
    for header in [64 << 10, 128 << 10] {
        bytes[header + 4..header + 8].fill(0);
        bytes[header + 16..header + 64].fill(0);
    }
    let disk_id = 2 * MIB + (64 << 10) + 16;
    bytes[disk_id..disk_id + 16].fill(0);
    bytes
}

/// False (with the reason printed) where the kernel refuses io_uring, outside CI.
fn io_uring_allowed(directory: &Path) -> bool {
    let probe = directory.join("probe.vhdx");
    let output = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args([
            "image",
            "create",
            text(&probe),
            "--size",
            "1M",
            "--io",
            "uring",
        ])
        .output()
        .expect("run blockrep");
    let refused = String::from_utf8_lossy(&output.stderr).contains("io_uring is not available");
    if refused {
        assert!(
            std::env::var_os("CI").is_none(),
            "io_uring refused under CI"
        );
        eprintln!(
            "SKIPPED io_uring_and_sync_write_byte_identical_images: the kernel refuses io_uring"
        );
    }
    !refused
}

#[test]
fn io_uring_and_sync_write_byte_identical_images() {
    let directory = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    if !io_uring_allowed(directory.path()) {
        return;
    }
    let source = directory.path().join("source.raw");
    // Unaligned data at odd offsets, whole blocks, zero runs and a short last block.
    let mut data = vec![0u8; 37 * MIB + 3 * 512];
    for (index, byte) in data.iter_mut().enumerate() {
        let chunk = index / (MIB / 2);
        if !chunk.is_multiple_of(3) {
            *byte = (index.wrapping_mul(2654435761) >> 13) as u8;
        }
    }
    data[5 * MIB + 4097] = 0;
    std::fs::write(&source, &data).unwrap();
    for block in ["1M", "32M"] {
        let mut images = Vec::new();
        for (name, io) in [
            ("sync", &["--io", "sync"][..]),
            ("uring", &["--io", "uring"]),
            ("page-cache", &["--io", "uring", "--page-cache"]),
        ] {
            let output = directory.path().join(format!("{name}-{block}.vhdx"));
            let mut arguments = vec![
                "image",
                "convert",
                text(&source),
                text(&output),
                "--block-size",
                block,
            ];
            arguments.extend_from_slice(io);
            blockrep(&arguments);
            images.push((name, without_random_ids(std::fs::read(&output).unwrap())));
            let back = directory.path().join(format!("{name}-{block}.raw"));
            let mut arguments = vec!["image", "convert", text(&output), text(&back)];
            arguments.extend_from_slice(io);
            blockrep(&arguments);
            assert!(
                std::fs::read(&back).unwrap() == data,
                "{name}: round trip differs"
            );
        }
        let (first_name, first) = &images[0];
        for (name, image) in &images[1..] {
            assert!(
                image == first,
                "{block}: {name} and {first_name} wrote different images"
            );
        }
    }
}
