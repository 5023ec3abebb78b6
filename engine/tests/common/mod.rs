//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use blockrep::image::vhdx::{BlockSize, SectorSize, VhdxCreateOptions};
use blockrep::image::{Access, BlockImage, VhdxImage};
use blockrep::io::MemoryStorage;
use std::process::Command;
use std::sync::Arc;

pub type SharedMemory = Arc<MemoryStorage>;

pub fn options(virtual_size: u64, block_size: u64, sector: u64, fixed: bool) -> VhdxCreateOptions {
    VhdxCreateOptions {
        virtual_size,
        block_size: BlockSize::new(block_size).unwrap(),
        fixed,
        logical_sector_size: SectorSize::new(sector).unwrap(),
        physical_sector_size: SectorSize::Bytes4096,
        disk_id: None,
    }
}

pub fn create(options: &VhdxCreateOptions) -> (SharedMemory, VhdxImage<SharedMemory>) {
    let storage = Arc::new(MemoryStorage::new());
    let image = VhdxImage::create(storage.clone(), "test.vhdx", options).unwrap();
    (storage, image)
}

pub fn reopen(storage: &SharedMemory, access: Access) -> VhdxImage<SharedMemory> {
    VhdxImage::open(storage.clone(), "test.vhdx", access).unwrap()
}

pub fn read_all(image: &dyn BlockImage) -> Vec<u8> {
    let mut bytes = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut bytes, 0).unwrap();
    bytes
}

/// Deterministic filler that differs by seed and position.
pub fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// True when qemu-io, qemu-img and qemu-nbd are installed; otherwise says why the test skips
/// (and fails under CI, where the test script installs them).
pub fn have_qemu(test: &str) -> bool {
    for tool in ["qemu-io", "qemu-img", "qemu-nbd"] {
        let present = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|output| output.status.success());
        if !present {
            assert!(
                std::env::var_os("CI").is_none(),
                "{test}: {tool} missing under CI"
            );
            eprintln!("SKIPPED {test}: {tool} is not installed (apt-get install qemu-utils)");
            return false;
        }
    }
    true
}

pub fn run_ok(program: &str, arguments: &[&str]) -> String {
    let output = Command::new(program)
        .args(arguments)
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed: {text}"
    );
    text
}
