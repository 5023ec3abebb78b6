//! The recovery plan file (TOML): groups of VMs failed over in order, each with actions to run
//! before and after it. This module reads and validates a plan; it never runs anything.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a script may run when its action gives no `timeout`.
pub const DEFAULT_SCRIPT_TIMEOUT: Duration = Duration::from_secs(600);

/// A validated recovery plan.
#[derive(Debug)]
pub struct Plan {
    pub name: String,
    /// The plan file, as given on the command line.
    pub file: PathBuf,
    /// The plan file's directory: scripts run there, so their relative paths resolve there.
    pub directory: PathBuf,
    pub groups: Vec<Group>,
}

#[derive(Debug)]
pub struct Group {
    pub name: String,
    pub vms: Vec<VmEntry>,
    pub pre: Vec<Action>,
    pub post: Vec<Action>,
}

/// A VM to fail over, and optionally the control socket of the replica server that holds it
/// (relative paths are in the run directory); without one every local replica server is asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmEntry {
    pub name: String,
    pub server: Option<PathBuf>,
}

#[derive(Debug)]
pub enum Action {
    Script(Script),
    Manual(ManualStep),
}

/// A command line run with `sh -c`, killed when it outlasts its timeout.
#[derive(Debug)]
pub struct Script {
    pub name: String,
    pub command: String,
    pub timeout: Duration,
}

/// An instruction for the operator, who confirms it is done.
#[derive(Debug)]
pub struct ManualStep {
    pub name: String,
    pub instruction: String,
}

impl Action {
    pub fn name(&self) -> &str {
        match self {
            Action::Script(script) => &script.name,
            Action::Manual(step) => &step.name,
        }
    }
}

// The file as written; `Plan::parse` turns it into the checked types above.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    name: Option<String>,
    #[serde(default)]
    group: Vec<GroupFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    name: String,
    #[serde(default)]
    vms: Vec<VmEntry>,
    #[serde(default)]
    pre: Vec<ActionFile>,
    #[serde(default)]
    post: Vec<ActionFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionFile {
    name: Option<String>,
    script: Option<String>,
    manual: Option<String>,
    timeout: Option<Timeout>,
}

/// A duration written as `"30s"`, `"5m"`, `"1h"`, `"500ms"`, `"600"` or `600` (seconds).
struct Timeout(Duration);

impl<'de> Deserialize<'de> for Timeout {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TimeoutVisitor;
        impl Visitor<'_> for TimeoutVisitor {
            type Value = Timeout;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a duration such as \"30s\", \"5m\", \"1h\" or 600 (seconds)")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Timeout, E> {
                blockrep::units::parse_duration(text)
                    .map(Timeout)
                    .map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, seconds: i64) -> Result<Timeout, E> {
                match u64::try_from(seconds) {
                    Ok(seconds) if seconds > 0 => Ok(Timeout(Duration::from_secs(seconds))),
                    _ => Err(E::custom(format!(
                        "invalid duration: {seconds} (a timeout is at least 1 second)"
                    ))),
                }
            }
        }
        deserializer.deserialize_any(TimeoutVisitor)
    }
}

impl<'de> Deserialize<'de> for VmEntry {
    /// A bare name, or a table `{ name = "db1", server = "serve-7000.sock" }` whose unknown
    /// keys are refused by name like everywhere else in the file.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            name: String,
            server: Option<PathBuf>,
        }
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = VmEntry;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a VM name or a table { name = \"vm\", server = \"socket\" }")
            }
            fn visit_str<E: de::Error>(self, name: &str) -> Result<VmEntry, E> {
                Ok(VmEntry {
                    name: name.to_owned(),
                    server: None,
                })
            }
            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<VmEntry, M::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(VmEntry {
                    name: table.name,
                    server: table.server,
                })
            }
        }
        deserializer.deserialize_any(EntryVisitor)
    }
}

impl Plan {
    /// Reads and validates the plan at `file`.
    pub fn load(file: &Path) -> Result<Plan, String> {
        let text = std::fs::read_to_string(file)
            .map_err(|error| format!("{}: {error}", file.display()))?;
        Plan::parse(&text, file).map_err(|error| format!("{}: {error}", file.display()))
    }

    /// Parses and validates plan text; `file` names the plan and places its scripts.
    pub fn parse(text: &str, file: &Path) -> Result<Plan, String> {
        let parsed: PlanFile =
            toml::from_str(text).map_err(|error| error.to_string().trim_end().to_owned())?;
        if parsed.group.is_empty() {
            return Err("the plan has no [[group]]: give at least one group of VMs".into());
        }
        let mut seen_vms = HashSet::new();
        let mut groups = Vec::with_capacity(parsed.group.len());
        for group in parsed.group {
            groups.push(check_group(group, &mut seen_vms)?);
        }
        let name = parsed.name.unwrap_or_else(|| {
            file.file_stem()
                .map(|stem| stem.to_string_lossy().into_owned())
                .unwrap_or_else(|| "plan".into())
        });
        let directory = match file.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
            _ => PathBuf::from("."),
        };
        Ok(Plan {
            name,
            file: file.to_owned(),
            directory,
            groups,
        })
    }
}

fn check_group(group: GroupFile, seen_vms: &mut HashSet<String>) -> Result<Group, String> {
    let label = format!("group {:?}", group.name);
    if group.vms.is_empty() {
        return Err(format!("{label} has no VMs (vms = [\"vm1\", ...])"));
    }
    for vm in &group.vms {
        check_vm_name(&vm.name)
            .map_err(|problem| format!("{label}: VM {:?} {problem}", vm.name))?;
        if !seen_vms.insert(vm.name.clone()) {
            return Err(format!(
                "{label}: VM {:?} appears more than once in the plan",
                vm.name
            ));
        }
    }
    let actions = |stage: &str, actions: Vec<ActionFile>| {
        actions
            .into_iter()
            .enumerate()
            .map(|(index, action)| {
                check_action(action)
                    .map_err(|problem| format!("{label}: {stage} action {}: {problem}", index + 1))
            })
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Group {
        pre: actions("pre", group.pre)?,
        post: actions("post", group.post)?,
        name: group.name,
        vms: group.vms,
    })
}

/// A VM's name is also a directory name (a test failover's copy goes to OUT/VM).
fn check_vm_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err("is not a usable VM name (empty, `.`, `..` or containing `/`)");
    }
    Ok(())
}

fn check_action(action: ActionFile) -> Result<Action, String> {
    match (action.script, action.manual) {
        (Some(command), None) => {
            if command.trim().is_empty() {
                return Err("script is empty".into());
            }
            Ok(Action::Script(Script {
                name: action.name.unwrap_or_else(|| script_name(&command)),
                command,
                timeout: action
                    .timeout
                    .map_or(DEFAULT_SCRIPT_TIMEOUT, |timeout| timeout.0),
            }))
        }
        (None, Some(instruction)) => {
            if action.timeout.is_some() {
                return Err(
                    "timeout applies to scripts; a manual step waits for the operator".into(),
                );
            }
            Ok(Action::Manual(ManualStep {
                name: action.name.unwrap_or_else(|| instruction.clone()),
                instruction,
            }))
        }
        (Some(_), Some(_)) => Err("give either script or manual, not both".into()),
        (None, None) => Err("give script = \"COMMAND\" or manual = \"INSTRUCTION\"".into()),
    }
}

/// What a script is called in the output: its program's file name (`check-dns` for
/// `/usr/local/bin/check-dns --zone lab`).
fn script_name(command: &str) -> String {
    let program = command.split_whitespace().next().unwrap_or(command);
    Path::new(program)
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| program.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Plan, String> {
        Plan::parse(text, Path::new("/srv/plans/web.toml"))
    }

    const GOOD: &str = r#"
name = "web tier"

[[group]]
name = "databases"
vms = ["db1", { name = "db2", server = "/run/blockrep/serve-7000.sock" }]

[[group.pre]]
script = "/usr/local/bin/check-dns --zone lab"
timeout = "60s"

[[group.post]]
manual = "Confirm the load balancer points at the recovery site"

[[group]]
name = "web"
vms = ["web1"]

[[group.pre]]
name = "warm caches"
script = "./warm-caches"
timeout = 90
"#;

    #[test]
    fn a_good_plan_keeps_its_groups_in_order_with_their_actions() {
        let plan = parse(GOOD).unwrap();
        assert_eq!(plan.name, "web tier");
        assert_eq!(plan.directory, Path::new("/srv/plans"));
        let names: Vec<&str> = plan
            .groups
            .iter()
            .map(|group| group.name.as_str())
            .collect();
        assert_eq!(names, ["databases", "web"]);
        let databases = &plan.groups[0];
        assert_eq!(
            databases.vms[0],
            VmEntry {
                name: "db1".into(),
                server: None
            }
        );
        assert_eq!(
            databases.vms[1].server.as_deref(),
            Some(Path::new("/run/blockrep/serve-7000.sock"))
        );
        let Action::Script(check) = &databases.pre[0] else {
            panic!("the pre action is a script")
        };
        assert_eq!(check.name, "check-dns");
        assert_eq!(check.timeout, Duration::from_secs(60));
        assert!(
            matches!(&databases.post[0], Action::Manual(step) if step.instruction.starts_with("Confirm"))
        );
        let Action::Script(warm) = &plan.groups[1].pre[0] else {
            panic!("the pre action is a script")
        };
        assert_eq!(warm.name, "warm caches");
        assert_eq!(warm.timeout, Duration::from_secs(90));
    }

    #[test]
    fn a_script_without_a_timeout_gets_ten_minutes_and_a_plan_without_a_name_its_file_name() {
        let plan =
            parse("[[group]]\nname = \"g\"\nvms = [\"vm1\"]\n[[group.pre]]\nscript = \"true\"\n")
                .unwrap();
        assert_eq!(plan.name, "web");
        let Action::Script(script) = &plan.groups[0].pre[0] else {
            panic!("the pre action is a script")
        };
        assert_eq!(script.timeout, DEFAULT_SCRIPT_TIMEOUT);
    }

    #[test]
    fn an_unknown_key_is_refused_by_its_name() {
        let error = parse("[[group]]\nname = \"g\"\nvms = [\"vm1\"]\norder = 2\n").unwrap_err();
        assert!(error.contains("order"), "{error}");
        let error = parse("[[group]]\nname = \"g\"\nvms = [{ name = \"vm1\", host = \"b\" }]\n")
            .unwrap_err();
        assert!(error.contains("host"), "{error}");
        let error =
            parse("[[group]]\nname = \"g\"\nvms = [\"vm1\"]\n[[group.pre]]\nscript = \"x\"\nretries = 3\n").unwrap_err();
        assert!(error.contains("retries"), "{error}");
    }

    #[test]
    fn a_vm_in_two_groups_is_refused() {
        let error = parse(
            "[[group]]\nname = \"a\"\nvms = [\"vm1\"]\n[[group]]\nname = \"b\"\nvms = [\"vm2\", \"vm1\"]\n",
        )
        .unwrap_err();
        assert!(error.contains("\"vm1\" appears more than once"), "{error}");
        assert!(error.contains("group \"b\""), "{error}");
    }

    #[test]
    fn a_group_without_vms_and_a_plan_without_groups_are_refused() {
        let error = parse("[[group]]\nname = \"empty\"\nvms = []\n").unwrap_err();
        assert!(error.contains("group \"empty\" has no VMs"), "{error}");
        let error = parse("name = \"nothing\"\n").unwrap_err();
        assert!(error.contains("no [[group]]"), "{error}");
    }

    #[test]
    fn a_bad_duration_is_refused_with_the_text_given() {
        let error =
            parse("[[group]]\nname = \"g\"\nvms = [\"vm1\"]\n[[group.pre]]\nscript = \"x\"\ntimeout = \"soon\"\n").unwrap_err();
        assert!(
            error.contains("invalid duration") && error.contains("soon"),
            "{error}"
        );
        let error =
            parse("[[group]]\nname = \"g\"\nvms = [\"vm1\"]\n[[group.pre]]\nscript = \"x\"\ntimeout = 0\n").unwrap_err();
        assert!(error.contains("invalid duration"), "{error}");
    }

    #[test]
    fn an_action_is_exactly_one_of_script_or_manual() {
        let both = parse(
            "[[group]]\nname = \"g\"\nvms = [\"vm1\"]\n[[group.post]]\nscript = \"x\"\nmanual = \"y\"\n",
        )
        .unwrap_err();
        assert!(
            both.contains("group \"g\": post action 1: give either script or manual"),
            "{both}"
        );
        let neither =
            parse("[[group]]\nname = \"g\"\nvms = [\"vm1\"]\n[[group.post]]\nname = \"x\"\n")
                .unwrap_err();
        assert!(neither.contains("give script"), "{neither}");
    }

    #[test]
    fn a_vm_name_that_cannot_be_a_directory_is_refused() {
        let error = parse("[[group]]\nname = \"g\"\nvms = [\"../etc\"]\n").unwrap_err();
        assert!(error.contains("not a usable VM name"), "{error}");
    }
}
