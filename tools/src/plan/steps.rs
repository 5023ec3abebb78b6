//! A plan as the ordered list of steps it takes, and how a step is named in the output: for
//! each group its pre actions, then its VMs' failovers, then its post actions.

use super::file::{Action, Group, Plan, VmEntry};

/// Where in its group a step falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stage {
    Pre,
    Failover,
    Post,
}

#[derive(Clone, Copy, Debug)]
pub enum Work<'a> {
    Action(&'a Action),
    Failover(&'a VmEntry),
}

#[derive(Clone, Copy, Debug)]
pub struct Step<'a> {
    pub group: &'a Group,
    pub stage: Stage,
    pub work: Work<'a>,
}

impl Step<'_> {
    /// `script`, `manual` or `failover`, as the JSON report says.
    pub fn kind(&self) -> &'static str {
        match self.work {
            Work::Action(Action::Script(_)) => "script",
            Work::Action(Action::Manual(_)) => "manual",
            Work::Failover(_) => "failover",
        }
    }

    pub fn name(&self) -> &str {
        match self.work {
            Work::Action(action) => action.name(),
            Work::Failover(vm) => &vm.name,
        }
    }

    /// `group databases: pre script check-dns`, `group databases: fail over db1`.
    pub fn describe(&self) -> String {
        let group = &self.group.name;
        let stage = match self.stage {
            Stage::Pre => "pre",
            Stage::Post => "post",
            Stage::Failover => "",
        };
        match self.work {
            Work::Action(Action::Script(script)) => {
                format!("group {group}: {stage} script {}", script.name)
            }
            Work::Action(Action::Manual(step)) => {
                format!("group {group}: {stage} manual step: {}", step.name)
            }
            Work::Failover(vm) => format!("group {group}: fail over {}", vm.name),
        }
    }
}

/// Every step of the plan, in the order a run takes them.
pub fn steps(plan: &Plan) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for group in &plan.groups {
        let action = |stage, action| Step {
            group,
            stage,
            work: Work::Action(action),
        };
        steps.extend(group.pre.iter().map(|pre| action(Stage::Pre, pre)));
        steps.extend(group.vms.iter().map(|vm| Step {
            group,
            stage: Stage::Failover,
            work: Work::Failover(vm),
        }));
        steps.extend(group.post.iter().map(|post| action(Stage::Post, post)));
    }
    steps
}
