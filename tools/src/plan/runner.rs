//! Runs a recovery plan's steps in order. How a VM is failed over is behind `FailoverActions`,
//! so the order, the stopping rules and the report are tested without a replica server.

use super::file::{Action, ManualStep, Plan, VmEntry};
use super::report::{Report, StepOutcome, StepRecord};
use super::script::run_script;
use super::steps::{Step, Work, steps};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Each VM's copy goes to `out/VM`; replication goes on.
    Test { out: PathBuf },
    /// `reverse`: replication starts back from the recovery site once the VM is there.
    Planned { reverse: bool },
    /// `force`: fail over although the primary still replicates.
    Unplanned { force: bool },
}

impl Mode {
    /// As scripts see it in `BLOCKREP_MODE`.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Test { .. } => "test",
            Mode::Planned { .. } => "planned",
            Mode::Unplanned { .. } => "unplanned",
        }
    }

    pub fn description(&self) -> &'static str {
        match self {
            Mode::Test { .. } => "test failover",
            Mode::Planned { .. } => "planned failover",
            Mode::Unplanned { .. } => "unplanned failover",
        }
    }

    /// A planned or test failover is a choice, so a failed step stops it while the primary
    /// site is still there; an unplanned one happens because that site is lost, so it brings
    /// up every VM it can.
    fn stops_at_failure(&self) -> bool {
        !matches!(self, Mode::Unplanned { .. })
    }
}

/// Fails one VM over; the answer is the replica server's (the point, the disks).
pub trait FailoverActions {
    fn fail_over(&self, vm: &VmEntry, mode: &Mode) -> Result<serde_json::Value, String>;
}

/// Where a run talks to the operator.
pub struct Console<'a> {
    /// Steps as they start and end (a sink with `--json`).
    pub progress: Box<dyn Write + 'a>,
    /// Manual steps' instructions and questions.
    pub prompt: Box<dyn Write + 'a>,
    /// The operator's answers to manual steps.
    pub input: Box<dyn BufRead + 'a>,
    pub input_is_terminal: bool,
    /// `--yes`: manual steps are answered without asking.
    pub assume_yes: bool,
    /// Scripts' output goes into the report instead of to our stdout and stderr.
    pub capture_output: bool,
}

/// Runs every step of `plan` in order and reports each. `Err` only when the run cannot start:
/// manual steps that nobody could answer.
pub fn run(
    plan: &Plan,
    mode: &Mode,
    actions: &impl FailoverActions,
    console: &mut Console,
) -> Result<Report, String> {
    let steps = steps(plan);
    refuse_unanswerable_manual_steps(&steps, console)?;
    let total = steps.len();
    let mut report = Report {
        plan: plan.name.clone(),
        file: plan.file.clone(),
        mode: mode.clone(),
        steps: Vec::with_capacity(total),
        stopped_at: None,
    };
    for (index, step) in steps.iter().enumerate() {
        let number = index + 1;
        if report.stopped_at.is_some() {
            report
                .steps
                .push(StepRecord::new(step, number, StepOutcome::Skipped));
            continue;
        }
        let _ = writeln!(console.progress, "[{number}/{total}] {}", step.describe());
        let _ = console.progress.flush();
        let started = Instant::now();
        let mut record = StepRecord::new(step, number, StepOutcome::Ok);
        let outcome = match step.work {
            Work::Action(Action::Script(script)) => {
                let run = run_script(
                    script,
                    &plan.directory,
                    &script_environment(plan, step, mode),
                    console.capture_output,
                );
                record.output = run.output;
                run.outcome.map(|()| None)
            }
            Work::Action(Action::Manual(manual)) => confirm(manual, console).map(Some),
            Work::Failover(vm) => actions.fail_over(vm, mode).map(|answer| {
                let message = answer["point"]
                    .as_u64()
                    .map(|point| format!("point {point}"));
                record.answer = Some(answer);
                message
            }),
        };
        // Milliseconds are all a report reader needs.
        record.seconds = (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0;
        match outcome {
            Ok(message) => {
                let _ = writeln!(
                    console.progress,
                    "[{number}/{total}] ok ({:.1} s)",
                    record.seconds
                );
                record.message = message;
            }
            Err(problem) => {
                let _ = writeln!(
                    console.progress,
                    "[{number}/{total}] FAILED ({:.1} s): {problem}",
                    record.seconds
                );
                record.outcome = StepOutcome::Failed;
                record.message = Some(problem);
                if mode.stops_at_failure() {
                    report.stopped_at = Some(number);
                }
            }
        }
        report.steps.push(record);
    }
    Ok(report)
}

/// A run that would wait forever at its first manual step is refused before it starts.
fn refuse_unanswerable_manual_steps(steps: &[Step], console: &Console) -> Result<(), String> {
    if console.assume_yes || console.input_is_terminal {
        return Ok(());
    }
    let first_manual = steps
        .iter()
        .position(|step| matches!(step.work, Work::Action(Action::Manual(_))));
    match first_manual {
        Some(index) => Err(format!(
            "step {} ({}) is a manual step and standard input is not a terminal to confirm it \
             on: run the plan from a terminal, or pass --yes to answer manual steps",
            index + 1,
            steps[index].describe()
        )),
        None => Ok(()),
    }
}

/// Shows a manual step's instruction and waits for the operator to say it is done.
fn confirm(manual: &ManualStep, console: &mut Console) -> Result<String, String> {
    if console.assume_yes {
        let _ = writeln!(console.progress, "      {}", manual.instruction);
        let _ = writeln!(console.progress, "      answered yes (--yes)");
        return Ok("answered yes (--yes)".into());
    }
    let _ = writeln!(console.prompt, "      {}", manual.instruction);
    loop {
        let _ = write!(
            console.prompt,
            "      done? type yes to go on, no to fail this step: "
        );
        let _ = console.prompt.flush();
        let mut line = String::new();
        match console.input.read_line(&mut line) {
            Ok(0) => return Err("no answer (end of input)".into()),
            Err(error) => return Err(format!("cannot read the answer: {error}")),
            Ok(_) => {}
        }
        match line.trim().to_ascii_lowercase().as_str() {
            "y" | "yes" => return Ok("confirmed by the operator".into()),
            "n" | "no" => return Err("the operator answered no".into()),
            _ => {}
        }
    }
}

fn script_environment(plan: &Plan, step: &Step, mode: &Mode) -> Vec<(&'static str, String)> {
    let vms: Vec<&str> = step.group.vms.iter().map(|vm| vm.name.as_str()).collect();
    vec![
        ("BLOCKREP_PLAN", plan.name.clone()),
        ("BLOCKREP_GROUP", step.group.name.clone()),
        ("BLOCKREP_MODE", mode.name().to_owned()),
        ("BLOCKREP_VMS", vms.join(" ")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::path::Path;

    /// Records the VMs failed over; fails those named in `failing`.
    #[derive(Default)]
    struct FakeServers {
        failed_over: RefCell<Vec<String>>,
        failing: Vec<&'static str>,
    }

    impl FailoverActions for FakeServers {
        fn fail_over(&self, vm: &VmEntry, _mode: &Mode) -> Result<serde_json::Value, String> {
            if self.failing.contains(&vm.name.as_str()) {
                return Err(format!("{}: no replica server knows it", vm.name));
            }
            self.failed_over.borrow_mut().push(vm.name.clone());
            Ok(serde_json::json!({"vm": vm.name, "point": 7, "disks": []}))
        }
    }

    /// Two groups; group 2's pre script fails (it also writes a file, so a test can see
    /// whether it ran), and each group has a post script that leaves a mark.
    fn two_groups(directory: &Path, group_two_pre: &str) -> Plan {
        let text = format!(
            r#"
name = "lab"
[[group]]
name = "databases"
vms = ["db1", "db2"]
[[group.pre]]
script = "echo $BLOCKREP_MODE $BLOCKREP_GROUP $BLOCKREP_VMS > pre-1"
[[group.post]]
script = "touch post-1"

[[group]]
name = "web"
vms = ["web1", "web2"]
[[group.pre]]
name = "check-dns"
script = "{group_two_pre}"
timeout = "300ms"
[[group.post]]
script = "touch post-2"
"#
        );
        Plan::parse(&text, &directory.join("lab.toml")).unwrap()
    }

    fn console<'a>(output: &'a mut Vec<u8>, input: &'a [u8], assume_yes: bool) -> Console<'a> {
        Console {
            progress: Box::new(output),
            prompt: Box::new(std::io::sink()),
            input: Box::new(input),
            input_is_terminal: false,
            assume_yes,
            capture_output: true,
        }
    }

    fn outcomes(report: &Report) -> Vec<(String, StepOutcome)> {
        report
            .steps
            .iter()
            .map(|step| (step.name.clone(), step.outcome))
            .collect()
    }

    #[test]
    fn a_planned_run_stops_at_a_failing_pre_script_and_says_which_step() {
        let directory = tempfile::tempdir().unwrap();
        let plan = two_groups(directory.path(), "exit 1");
        let servers = FakeServers::default();
        let mut output = Vec::new();
        let report = run(
            &plan,
            &Mode::Planned { reverse: false },
            &servers,
            &mut console(&mut output, b"", false),
        )
        .unwrap();
        assert_eq!(*servers.failed_over.borrow(), ["db1", "db2"]);
        assert_eq!(report.stopped_at, Some(5));
        assert!(!report.succeeded());
        let failed = &report.steps[4];
        assert_eq!(
            (failed.kind, failed.group.as_str(), failed.name.as_str()),
            ("script", "web", "check-dns")
        );
        assert_eq!(failed.message.as_deref(), Some("exit status 1"));
        assert!(
            report.steps[5..]
                .iter()
                .all(|step| step.outcome == StepOutcome::Skipped)
        );
        assert!(directory.path().join("post-1").exists());
        assert!(
            !directory.path().join("post-2").exists(),
            "no step after the failure runs"
        );
        assert_eq!(
            std::fs::read_to_string(directory.path().join("pre-1")).unwrap(),
            "planned databases db1 db2\n"
        );
        let text = String::from_utf8(output).unwrap();
        assert!(
            text.contains("[5/8] group web: pre script check-dns"),
            "{text}"
        );
        assert!(text.contains("[5/8] FAILED"), "{text}");
        let mut summary = Vec::new();
        report.write_summary(&mut summary).unwrap();
        let summary = String::from_utf8(summary).unwrap();
        assert!(
            summary.contains("stopped at:      step 5 of 8"),
            "{summary}"
        );
        assert!(
            summary.contains("[5/8] group web: pre script check-dns: exit status 1"),
            "{summary}"
        );
        let json = report.to_json();
        assert_eq!(json["outcome"], "stopped");
        assert_eq!(
            json["vms_not_failed_over"],
            serde_json::json!(["web1", "web2"])
        );
    }

    #[test]
    fn an_unplanned_run_goes_on_past_a_failing_pre_script_and_reports_it() {
        let directory = tempfile::tempdir().unwrap();
        let plan = two_groups(directory.path(), "exit 1");
        let servers = FakeServers::default();
        let mut output = Vec::new();
        let report = run(
            &plan,
            &Mode::Unplanned { force: false },
            &servers,
            &mut console(&mut output, b"", false),
        )
        .unwrap();
        assert_eq!(
            *servers.failed_over.borrow(),
            ["db1", "db2", "web1", "web2"]
        );
        assert_eq!(report.stopped_at, None);
        assert!(!report.succeeded(), "a failed step makes the run a failure");
        let failed: Vec<_> = outcomes(&report)
            .into_iter()
            .filter(|(_, outcome)| *outcome == StepOutcome::Failed)
            .collect();
        assert_eq!(failed, [("check-dns".to_owned(), StepOutcome::Failed)]);
        assert!(directory.path().join("post-2").exists());
        assert_eq!(report.to_json()["outcome"], "failed");
    }

    #[test]
    fn a_script_past_its_timeout_fails_its_step() {
        let directory = tempfile::tempdir().unwrap();
        let plan = two_groups(directory.path(), "sleep 30");
        let mut output = Vec::new();
        let report = run(
            &plan,
            &Mode::Test {
                out: directory.path().join("copies"),
            },
            &FakeServers::default(),
            &mut console(&mut output, b"", false),
        )
        .unwrap();
        assert_eq!(report.stopped_at, Some(5));
        assert_eq!(
            report.steps[4].message.as_deref(),
            Some("timed out after 300 ms; killed")
        );
    }

    #[test]
    fn a_failed_vm_stops_a_planned_run_but_not_an_unplanned_one() {
        let directory = tempfile::tempdir().unwrap();
        let plan = two_groups(directory.path(), "true");
        let failing = || FakeServers {
            failing: vec!["db1"],
            ..FakeServers::default()
        };
        let servers = failing();
        let mut output = Vec::new();
        let planned = run(
            &plan,
            &Mode::Planned { reverse: true },
            &servers,
            &mut console(&mut output, b"", false),
        )
        .unwrap();
        assert_eq!(planned.stopped_at, Some(2));
        assert!(servers.failed_over.borrow().is_empty());

        let servers = failing();
        let unplanned = run(
            &plan,
            &Mode::Unplanned { force: true },
            &servers,
            &mut console(&mut output, b"", false),
        )
        .unwrap();
        assert_eq!(*servers.failed_over.borrow(), ["db2", "web1", "web2"]);
        assert_eq!(
            unplanned.to_json()["vms_not_failed_over"],
            serde_json::json!(["db1"])
        );
        assert_eq!(
            unplanned.steps[1].message.as_deref(),
            Some("db1: no replica server knows it")
        );
    }

    fn with_manual_step(directory: &Path) -> Plan {
        let text = r#"
[[group]]
name = "databases"
vms = ["db1"]
[[group.post]]
manual = "Confirm the load balancer points at the recovery site"
"#;
        Plan::parse(text, &directory.join("manual.toml")).unwrap()
    }

    #[test]
    fn yes_answers_manual_steps() {
        let directory = tempfile::tempdir().unwrap();
        let plan = with_manual_step(directory.path());
        let mut output = Vec::new();
        let report = run(
            &plan,
            &Mode::Unplanned { force: false },
            &FakeServers::default(),
            &mut console(&mut output, b"", true),
        )
        .unwrap();
        assert!(report.succeeded());
        assert_eq!(
            report.steps[1].message.as_deref(),
            Some("answered yes (--yes)")
        );
        let text = String::from_utf8(output).unwrap();
        assert!(text.contains("Confirm the load balancer"), "{text}");
        assert!(text.contains("answered yes (--yes)"), "{text}");
    }

    #[test]
    fn manual_steps_without_yes_need_a_terminal() {
        let directory = tempfile::tempdir().unwrap();
        let plan = with_manual_step(directory.path());
        let servers = FakeServers::default();
        let mut output = Vec::new();
        let error = run(
            &plan,
            &Mode::Planned { reverse: false },
            &servers,
            &mut console(&mut output, b"yes\n", false),
        )
        .unwrap_err();
        assert!(
            error.contains("standard input is not a terminal"),
            "{error}"
        );
        assert!(error.contains("--yes"), "{error}");
        assert!(servers.failed_over.borrow().is_empty(), "nothing runs");
    }

    #[test]
    fn the_operator_confirms_or_refuses_a_manual_step() {
        let directory = tempfile::tempdir().unwrap();
        let plan = with_manual_step(directory.path());
        for (answer, expected) in [
            (&b"maybe\nyes\n"[..], StepOutcome::Ok),
            (b"no\n", StepOutcome::Failed),
            (b"", StepOutcome::Failed),
        ] {
            let mut output = Vec::new();
            let mut console = console(&mut output, answer, false);
            console.input_is_terminal = true;
            let report = run(
                &plan,
                &Mode::Planned { reverse: false },
                &FakeServers::default(),
                &mut console,
            )
            .unwrap();
            assert_eq!(report.steps[1].outcome, expected, "answer {answer:?}");
        }
    }
}
