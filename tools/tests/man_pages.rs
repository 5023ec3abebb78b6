//! `blockrep man DIRECTORY` writes a man page for every command, each one groff reads without
//! a warning and whose text says what the command's `--help` says.

use std::path::Path;
use std::process::Command;

fn blockrep(arguments: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .output()
        .unwrap()
}

#[test]
fn every_command_has_a_page_that_groff_reads_cleanly() {
    let directory = tempfile::tempdir().unwrap();
    let pages = directory.path().join("man1");
    let output = blockrep(&["man", pages.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    for page in [
        "blockrep",
        "blockrep-image-create",
        "blockrep-image-convert",
        "blockrep-delta-export",
        "blockrep-identity-create",
        "blockrep-serve",
        "blockrep-protect",
        "blockrep-failover",
        "blockrep-points",
        "blockrep-resync",
        "blockrep-verify",
        "blockrep-reverse",
        "blockrep-plan-run",
        "blockrep-sim-run",
        "blockrep-status",
        "blockrep-completions",
        "blockrep-man",
    ] {
        assert!(pages.join(format!("{page}.1")).exists(), "{page}.1 missing");
    }
    let mut written = 0;
    for entry in std::fs::read_dir(&pages).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(".TH"), "{} has no title line", path.display());
        check_with_groff(&path);
        written += 1;
    }
    assert!(written >= 30, "only {written} pages");
    // A page says what `--help` says: the serve page names its flags and their help.
    let help = String::from_utf8(blockrep(&["serve", "--help"]).stdout).unwrap();
    let page = std::fs::read_to_string(pages.join("blockrep-serve.1")).unwrap();
    for flag in ["listen", "store", "identity", "allow", "metrics", "config"] {
        assert!(help.contains(&format!("--{flag}")), "--help lacks --{flag}");
        assert!(
            page.contains(&format!("\\-\\-{flag}")),
            "the page lacks --{flag}"
        );
    }
    assert!(page.contains("The UDP address to listen on"));
}

/// groff formats the page and warns of nothing (skipped, saying why, when groff is missing).
fn check_with_groff(page: &Path) {
    let Ok(output) = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(page)
        .output()
    else {
        eprintln!("skipped: groff is not installed, so the pages are not formatted");
        return;
    };
    assert!(output.status.success(), "{}: {output:?}", page.display());
    assert!(
        output.stderr.is_empty(),
        "{}: {}",
        page.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_directory_that_cannot_be_made_is_an_error() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let output = blockrep(&["man", file.join("man1").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("cannot make"), "{error}");
}
