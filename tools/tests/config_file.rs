//! `--config FILE` on the daemons: the file's keys are flags, flags on the command line win,
//! an unknown key is refused with its name, and the example files in docs/ are accepted.

use std::path::Path;
use std::process::{Command, Output};

fn blockrep(arguments: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .env(
            "BLOCKREP_RUN_DIR",
            std::env::temp_dir().join("blockrep-config-test"),
        )
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_file_gives_the_flags_and_the_command_line_wins() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("serve.toml");
    std::fs::write(
        &config,
        "listen = \"127.0.0.1:0\"\nstore = \"store\"\nidentity = \"/nonexistent/from-file\"\n\
         allow = [\"/nonexistent/a.crt\"]\nrecovery-points = 3\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    // The identity the file names is the one looked for...
    let output = blockrep(&["serve", "--config", config]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("/nonexistent/from-file"),
        "{}",
        stderr(&output)
    );
    // ...unless the command line names another.
    let output = blockrep(&[
        "serve",
        "--config",
        config,
        "--identity",
        "/nonexistent/from-flag",
    ]);
    assert!(
        stderr(&output).contains("/nonexistent/from-flag"),
        "{}",
        stderr(&output)
    );
    assert!(
        !stderr(&output).contains("from-file"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn an_unknown_key_or_a_missing_file_is_refused_with_its_name() {
    let directory = tempfile::tempdir().unwrap();
    let config = directory.path().join("protect.toml");
    std::fs::write(&config, "name = \"vm1\"\nfrequncy = \"5m\"\n").unwrap();
    let output = blockrep(&["protect", "--config", config.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("\"frequncy\""),
        "{}",
        stderr(&output)
    );
    let output = blockrep(&["serve", "--config", "/nonexistent/serve.toml"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("/nonexistent/serve.toml"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn the_example_files_name_only_flags_the_commands_know() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    for (command, file) in [("serve", "serve.toml"), ("protect", "protect.toml")] {
        let path = examples.join(file);
        // `--help` last: every flag the file gives is parsed first, and an unknown or
        // ill-typed one fails.
        let output = blockrep(&[command, "--config", path.to_str().unwrap(), "--help"]);
        assert!(output.status.success(), "{file}: {}", stderr(&output));
    }
}
