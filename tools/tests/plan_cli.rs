//! `blockrep plan`: a plan file is checked before anything runs, and an unplanned run with no
//! replica server reports every VM's failure, still runs the post scripts and exits 1.

use std::path::Path;
use std::process::{Command, Output, Stdio};

fn blockrep(arguments: &[&str], run_directory: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockrep"))
        .args(arguments)
        .env("BLOCKREP_RUN_DIR", run_directory)
        .stdin(Stdio::null())
        .output()
        .expect("run blockrep")
}

fn text(path: &Path) -> &str {
    path.to_str().unwrap()
}

const TWO_GROUPS: &str = r#"
name = "lab"

[[group]]
name = "databases"
vms = ["db1", "db2"]
[[group.pre]]
name = "check-dns"
script = "exit 1"
[[group.post]]
script = "echo $BLOCKREP_MODE $BLOCKREP_GROUP > post-databases"

[[group]]
name = "web"
vms = ["web1"]
[[group.post]]
script = "touch post-web"
[[group.post]]
manual = "Point the load balancer at the recovery site"
"#;

#[test]
fn check_lists_the_steps_of_a_good_plan_in_order() {
    let directory = tempfile::tempdir().unwrap();
    let plan = directory.path().join("lab.toml");
    std::fs::write(&plan, TWO_GROUPS).unwrap();
    let output = blockrep(&["plan", "check", text(&plan)], directory.path());
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("2 groups, 3 VMs, 7 steps"), "{stdout}");
    let steps: Vec<&str> = stdout
        .lines()
        .filter(|line| line.starts_with('['))
        .collect();
    assert_eq!(steps.len(), 7, "{stdout}");
    assert!(
        steps[0].starts_with("[1/7] group databases: pre script check-dns"),
        "{stdout}"
    );
    assert!(
        steps[1].starts_with("[2/7] group databases: fail over db1"),
        "{stdout}"
    );
    assert!(
        steps[6].starts_with("[7/7] group web: post manual step"),
        "{stdout}"
    );
    assert!(
        !directory.path().join("post-web").exists(),
        "check runs nothing"
    );
}

#[test]
fn check_names_an_unknown_key_and_exits_1() {
    let directory = tempfile::tempdir().unwrap();
    let plan = directory.path().join("bad.toml");
    std::fs::write(
        &plan,
        "[[group]]\nname = \"g\"\nvms = [\"vm1\"]\nordering = 1\n",
    )
    .unwrap();
    let output = blockrep(&["plan", "check", text(&plan)], directory.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(stderr.contains("unknown field `ordering`"), "{stderr}");
    assert!(stderr.contains("bad.toml"), "{stderr}");
}

#[test]
fn the_example_plan_in_the_docs_is_valid() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/plan.toml");
    let directory = tempfile::tempdir().unwrap();
    let output = blockrep(&["plan", "check", text(&example)], directory.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn an_unplanned_run_without_replica_servers_reports_each_vm_and_still_runs_post_scripts() {
    let directory = tempfile::tempdir().unwrap();
    let run_directory = tempfile::tempdir().unwrap();
    // Private, as blockrep requires of a run directory.
    let private = std::os::unix::fs::PermissionsExt::from_mode(0o700);
    std::fs::set_permissions(run_directory.path(), private).unwrap();
    let plan = directory.path().join("lab.toml");
    std::fs::write(&plan, TWO_GROUPS).unwrap();
    let output = blockrep(
        &["plan", "run", text(&plan), "--unplanned", "--yes"],
        run_directory.path(),
    );
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    for vm in ["db1", "db2", "web1"] {
        assert!(
            stdout.contains(&format!(
                "fail over {vm}: {vm}: no replica server is running here"
            )),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("pre script check-dns: exit status 1"),
        "{stdout}"
    );
    assert!(stdout.contains("4 failed"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(directory.path().join("post-databases")).unwrap(),
        "unplanned databases\n"
    );
    assert!(directory.path().join("post-web").exists());

    let output = blockrep(
        &["plan", "run", text(&plan), "--unplanned", "--yes", "--json"],
        run_directory.path(),
    );
    assert_eq!(output.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["outcome"], "failed");
    assert_eq!(
        report["vms_not_failed_over"],
        serde_json::json!(["db1", "db2", "web1"])
    );
    let outcomes: Vec<&str> = report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|step| step["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["failed", "failed", "failed", "ok", "failed", "ok", "ok"]
    );
}

#[test]
fn a_planned_run_stops_at_the_failing_pre_script() {
    let directory = tempfile::tempdir().unwrap();
    let plan = directory.path().join("lab.toml");
    std::fs::write(&plan, TWO_GROUPS).unwrap();
    let output = blockrep(
        &["plan", "run", text(&plan), "--planned", "--yes"],
        directory.path(),
    );
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("stopped at:      step 1 of 7"), "{stdout}");
    assert!(!stdout.contains("fail over db1"), "{stdout}");
    assert!(!directory.path().join("post-databases").exists());
}

#[test]
fn manual_steps_without_yes_or_a_terminal_are_refused_before_anything_runs() {
    let directory = tempfile::tempdir().unwrap();
    let plan = directory.path().join("lab.toml");
    std::fs::write(&plan, TWO_GROUPS.replace("exit 1", "true")).unwrap();
    let output = blockrep(
        &["plan", "run", text(&plan), "--unplanned"],
        directory.path(),
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("not a terminal") && stderr.contains("--yes"),
        "{stderr}"
    );
    assert!(!directory.path().join("post-databases").exists());
}

#[test]
fn a_run_needs_exactly_one_mode() {
    let directory = tempfile::tempdir().unwrap();
    for arguments in [
        &["plan", "run", "lab.toml"][..],
        &["plan", "run", "lab.toml", "--planned", "--unplanned"],
        &["plan", "run", "lab.toml", "--test"],
        &["plan", "run", "lab.toml", "--planned", "--force"],
    ] {
        let output = blockrep(arguments, directory.path());
        assert_eq!(output.status.code(), Some(2), "{arguments:?}");
    }
}
