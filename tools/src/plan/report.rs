//! What a plan run did, step by step: the record the runner keeps, the summary printed at the
//! end and the JSON document printed instead with `--json`.

use super::runner::Mode;
use super::steps::{Stage, Step};
use std::io::Write;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepOutcome {
    Ok,
    Failed,
    /// Not run: an earlier step failed in a run that stops at failures.
    Skipped,
}

#[derive(Debug, serde::Serialize)]
pub struct StepRecord {
    pub number: usize,
    pub kind: &'static str,
    pub stage: Stage,
    pub group: String,
    pub name: String,
    pub outcome: StepOutcome,
    pub seconds: f64,
    /// Why a step failed, or how it succeeded (`answered yes (--yes)`, `point 42`).
    pub message: Option<String>,
    /// A script's stdout and stderr, captured in `--json` mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// The replica server's answer to a failover.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub answer: Option<serde_json::Value>,
    /// As the text output names the step.
    #[serde(skip)]
    pub description: String,
}

impl StepRecord {
    pub fn new(step: &Step, number: usize, outcome: StepOutcome) -> StepRecord {
        StepRecord {
            number,
            kind: step.kind(),
            stage: step.stage,
            group: step.group.name.clone(),
            name: step.name().to_owned(),
            outcome,
            seconds: 0.0,
            message: None,
            output: None,
            answer: None,
            description: step.describe(),
        }
    }
}

#[derive(Debug)]
pub struct Report {
    pub plan: String,
    pub file: PathBuf,
    pub mode: Mode,
    pub steps: Vec<StepRecord>,
    /// The step a planned or test run stopped at.
    pub stopped_at: Option<usize>,
}

impl Report {
    pub fn succeeded(&self) -> bool {
        self.steps
            .iter()
            .all(|step| step.outcome == StepOutcome::Ok)
    }

    fn count(&self, outcome: StepOutcome) -> usize {
        self.steps
            .iter()
            .filter(|step| step.outcome == outcome)
            .count()
    }

    fn vms(&self, outcome: StepOutcome) -> Vec<&str> {
        self.steps
            .iter()
            .filter(|step| step.kind == "failover" && step.outcome == outcome)
            .map(|step| step.name.as_str())
            .collect()
    }

    fn outcome(&self) -> &'static str {
        if self.stopped_at.is_some() {
            "stopped"
        } else if self.succeeded() {
            "succeeded"
        } else {
            "failed"
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut not_failed_over = self.vms(StepOutcome::Failed);
        not_failed_over.extend(self.vms(StepOutcome::Skipped));
        serde_json::json!({
            "plan": self.plan,
            "file": self.file,
            "mode": self.mode.name(),
            "outcome": self.outcome(),
            "stopped_at": self.stopped_at,
            "steps": self.steps,
            "vms_failed_over": self.vms(StepOutcome::Ok),
            "vms_not_failed_over": not_failed_over,
        })
    }

    /// The closing summary of a run in text.
    pub fn write_summary(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let total = self.steps.len();
        let failed_over = self.vms(StepOutcome::Ok);
        let all_vms = self
            .steps
            .iter()
            .filter(|step| step.kind == "failover")
            .count();
        writeln!(out)?;
        writeln!(
            out,
            "plan {:?}, {}: {}",
            self.plan,
            self.mode.description(),
            match self.outcome() {
                "succeeded" => "every step succeeded",
                "stopped" => "stopped at a failed step",
                _ => "went on past failed steps",
            }
        )?;
        writeln!(
            out,
            "  steps:           {} ok, {} failed, {} skipped (of {total})",
            self.count(StepOutcome::Ok),
            self.count(StepOutcome::Failed),
            self.count(StepOutcome::Skipped)
        )?;
        writeln!(
            out,
            "  VMs failed over: {} of {all_vms}{}",
            failed_over.len(),
            if failed_over.is_empty() {
                String::new()
            } else {
                format!(" ({})", failed_over.join(", "))
            }
        )?;
        for step in self
            .steps
            .iter()
            .filter(|step| step.outcome == StepOutcome::Failed)
        {
            writeln!(
                out,
                "  failed:          [{}/{total}] {}: {}",
                step.number,
                step.description,
                step.message.as_deref().unwrap_or("failed")
            )?;
        }
        if let Some(number) = self.stopped_at {
            writeln!(
                out,
                "  stopped at:      step {number} of {total}; a {} stops at a failed step, so the {} later steps did not run",
                self.mode.description(),
                total - number
            )?;
        }
        Ok(())
    }
}
