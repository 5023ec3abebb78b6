//! `blockrep completions SHELL` prints a script each shell accepts, naming every command.

use std::process::Command;

fn completions(shell: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["completions", shell])
        .output()
        .unwrap();
    assert!(output.status.success(), "{shell}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn each_shell_gets_a_script_naming_every_command() {
    let commands = [
        "image",
        "delta",
        "identity",
        "serve",
        "protect",
        "suspend",
        "resume",
        "points",
        "failover",
        "seed",
        "resync",
        "verify",
        "reverse",
        "plan",
        "sim",
        "completions",
        "man",
        "status",
    ];
    for shell in ["bash", "zsh", "fish"] {
        let script = completions(shell);
        for command in commands {
            assert!(script.contains(command), "{shell}: {command} missing");
        }
    }
    // bash parses its script.
    let path =
        std::env::temp_dir().join(format!("blockrep-completion-{}.bash", std::process::id()));
    std::fs::write(&path, completions("bash")).unwrap();
    let checked = Command::new("bash").arg("-n").arg(&path).status().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(checked.success(), "bash -n refused the script");
}

#[test]
fn an_unknown_shell_is_refused_with_the_choices() {
    let output = Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("bash") && error.contains("fish"), "{error}");
}
