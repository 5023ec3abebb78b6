//! Bad input to `blockrep image` gets a clear message and a non-zero exit, never a panic, and
//! never a half-written output.

use std::path::Path;
use std::process::{Command, Output};

const MIB: usize = 1 << 20;

fn blockrep(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .output()
        .expect("run blockrep")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn assert_clean_failure(output: &Output, code: i32, message: &str) {
    let error = stderr(output);
    assert_eq!(output.status.code(), Some(code), "{error}");
    assert!(error.contains(message), "expected {message:?} in: {error}");
    assert!(!error.contains("panicked"), "{error}");
}

fn made_image(directory: &Path) -> std::path::PathBuf {
    let image = directory.join("good.vhdx");
    let raw = directory.join("good.raw");
    std::fs::write(&raw, vec![0x5Au8; 3 * MIB]).unwrap();
    assert!(
        blockrep(&[
            "image",
            "convert",
            text(&raw),
            text(&image),
            "--block-size",
            "1M"
        ])
        .status
        .success()
    );
    image
}

#[test]
fn a_truncated_image_is_refused_and_leaves_no_output() {
    let directory = tempfile::tempdir().unwrap();
    let image = made_image(directory.path());
    let bytes = std::fs::read(&image).unwrap();
    let cut = directory.path().join("cut.vhdx");
    std::fs::write(&cut, &bytes[..bytes.len() - MIB]).unwrap();
    let out = directory.path().join("out.raw");
    assert_clean_failure(
        &blockrep(&["image", "convert", text(&cut), text(&out)]),
        1,
        "past the end of the file",
    );
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(directory.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary output left behind: {leftovers:?}"
    );
    let check = blockrep(&["image", "check", text(&cut)]);
    assert_eq!(check.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&check.stdout).contains("past the end of the file"));
}

#[test]
fn garbage_named_vhdx_is_not_a_vhdx_image() {
    let directory = tempfile::tempdir().unwrap();
    let garbage = directory.path().join("garbage.vhdx");
    std::fs::write(&garbage, b"this is not a disk image at all".repeat(5000)).unwrap();
    assert_clean_failure(
        &blockrep(&["image", "info", text(&garbage)]),
        1,
        "not a VHDX image",
    );
    let out = directory.path().join("x.raw");
    assert_clean_failure(
        &blockrep(&["image", "convert", text(&garbage), text(&out)]),
        1,
        "not a VHDX image",
    );
    let check = blockrep(&["image", "check", text(&garbage)]);
    assert_eq!(check.status.code(), Some(1));
}

#[test]
fn a_bit_flip_in_a_header_and_a_region_table_is_listed_by_check() {
    let directory = tempfile::tempdir().unwrap();
    let image = made_image(directory.path());
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[(256 << 10) + 40] ^= 0x04; // region table 2
    std::fs::write(&image, &bytes).unwrap();
    let check = blockrep(&["image", "check", text(&image)]);
    assert_eq!(check.status.code(), Some(1));
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(
        report.contains("region table 2 is not valid: checksum mismatch"),
        "{report}"
    );
    let json = blockrep(&["image", "check", "--json", text(&image)]);
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(value["problems"].as_array().unwrap().len(), 1);
}

#[test]
fn missing_files_and_bad_arguments_are_explained() {
    let directory = tempfile::tempdir().unwrap();
    let missing = directory.path().join("missing.vhdx");
    assert_clean_failure(
        &blockrep(&["image", "info", text(&missing)]),
        1,
        "missing.vhdx",
    );
    let new = directory.path().join("new.vhdx");
    assert_clean_failure(
        &blockrep(&["image", "create", text(&new), "--size", "12Q"]),
        2,
        "invalid size",
    );
    assert_clean_failure(
        &blockrep(&[
            "image",
            "create",
            text(&new),
            "--size",
            "1G",
            "--block-size",
            "3M",
        ]),
        2,
        "power of two",
    );
    assert_clean_failure(
        &blockrep(&["image", "create", text(&new), "--size", "1000"]),
        1,
        "multiple of the 512-byte logical sector",
    );
    assert!(!new.exists());
    let odd = directory.path().join("disk.qcow2");
    assert_clean_failure(
        &blockrep(&["image", "create", text(&odd), "--size", "1G"]),
        1,
        "--format",
    );
}

#[test]
fn an_existing_output_is_kept_unless_forced() {
    let directory = tempfile::tempdir().unwrap();
    let image = made_image(directory.path());
    let before = std::fs::read(&image).unwrap();
    assert_clean_failure(
        &blockrep(&["image", "create", text(&image), "--size", "1G"]),
        1,
        "already exists",
    );
    assert!(std::fs::read(&image).unwrap() == before);
    assert!(
        blockrep(&["image", "create", text(&image), "--size", "1G", "--force"])
            .status
            .success()
    );
}

#[test]
fn images_with_4096_byte_sectors_round_trip() {
    // qemu cannot open these; our own reader checks them.
    let directory = tempfile::tempdir().unwrap();
    let raw = directory.path().join("in.raw");
    let data: Vec<u8> = (0..5 * MIB + 8192).map(|i| (i % 251) as u8).collect();
    std::fs::write(&raw, &data).unwrap();
    let image = directory.path().join("4k.vhdx");
    let convert = blockrep(&[
        "image",
        "convert",
        text(&raw),
        text(&image),
        "--logical-sector",
        "4096",
        "--block-size",
        "1M",
    ]);
    assert!(convert.status.success(), "{}", stderr(&convert));
    assert!(blockrep(&["image", "check", text(&image)]).status.success());
    let info: serde_json::Value =
        serde_json::from_slice(&blockrep(&["image", "info", "--json", text(&image)]).stdout)
            .unwrap();
    assert_eq!(info["vhdx"]["logical_sector_size"], 4096);
    assert_eq!(info["vhdx"]["chunk_ratio"], 32768);
    let back = directory.path().join("back.raw");
    assert!(
        blockrep(&["image", "convert", text(&image), text(&back)])
            .status
            .success()
    );
    assert!(std::fs::read(&back).unwrap() == data);
}
