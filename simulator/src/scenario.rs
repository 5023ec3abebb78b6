//! Scenarios: a Hyper-V Replica deployment (sites, VMM servers and their clouds, hosts, VMs,
//! replication policies, links, network mappings) and what happens to it, read from TOML.
//! Reading checks every name against what it refers to and rejects unknown keys, so a typo
//! is an error with the key's name rather than a silently different run.

use crate::network::LinkSpec;
use crate::workload::WorkloadSpec;
use blockrep::units::{parse_duration, parse_rate, parse_size};
use serde::Deserialize;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{file}: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// A scenario as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Run length unless the command line says otherwise.
    #[serde(default = "default_duration")]
    pub duration: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    #[serde(default, rename = "site")]
    pub sites: Vec<SiteFile>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostFile>,
    #[serde(default, rename = "cloud")]
    pub clouds: Vec<CloudFile>,
    #[serde(default, rename = "policy")]
    pub policies: Vec<PolicyFile>,
    #[serde(default, rename = "vm")]
    pub vms: Vec<VmFile>,
    #[serde(default, rename = "link")]
    pub links: Vec<LinkFile>,
    #[serde(default, rename = "network_mapping")]
    pub network_mappings: Vec<NetworkMappingFile>,
    #[serde(default, rename = "event")]
    pub events: Vec<EventFile>,
}

fn default_duration() -> String {
    "1h".into()
}

fn default_seed() -> u64 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    pub name: String,
    /// The VMM server managing the site's clouds, if it has its own.
    #[serde(default)]
    pub vmm: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFile {
    pub name: String,
    pub site: String,
    /// A host of a cluster stretched across sites (its VMM server fails over by itself).
    #[serde(default)]
    pub cluster: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudFile {
    pub name: String,
    /// The VMM server that manages the cloud.
    pub vmm: String,
    pub hosts: Vec<String>,
    /// The cloud its VMs replicate to: set on a protected cloud.
    #[serde(default)]
    pub replicate_to: Option<String>,
    /// The replication policy for its VMs (protected clouds only).
    #[serde(default)]
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    pub name: String,
    /// Copy frequency: 30s, 5m or 15m.
    pub frequency: String,
    /// Older recovery points kept, one an hour.
    #[serde(default = "default_points")]
    pub recovery_points: usize,
    #[serde(default = "default_true")]
    pub compression: bool,
}

fn default_points() -> usize {
    4
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmFile {
    pub name: String,
    pub host: String,
    /// Disk sizes (`64M`, `1G`).
    pub disks: Vec<String>,
    #[serde(default = "default_workload")]
    pub workload: WorkloadSpec,
    /// The VM networks its adapters attach to.
    #[serde(default)]
    pub networks: Vec<String>,
    /// Host-level replication straight to this host, outside any protected cloud (a VMM
    /// server's own VM). With `policy`.
    #[serde(default)]
    pub replica_host: Option<String>,
    #[serde(default)]
    pub policy: Option<String>,
    /// Runs a VMM server (it must then not sit in a protected cloud).
    #[serde(default)]
    pub vmm: Option<String>,
    /// Runs highly available in its host's failover cluster: the cluster restarts it on
    /// another node (at the other site of a stretched cluster) and its database replicates
    /// by its own availability groups, so blockrep does not replicate it.
    #[serde(default)]
    pub clustered: bool,
}

fn default_workload() -> WorkloadSpec {
    WorkloadSpec::Idle
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFile {
    pub sites: [String; 2],
    /// `100Mbit`, `1Gbit`, `50M` (bytes).
    pub bandwidth: String,
    #[serde(default = "default_latency")]
    pub latency: String,
    #[serde(default)]
    pub jitter: Option<String>,
    #[serde(default)]
    pub loss: f64,
}

fn default_latency() -> String {
    "5ms".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkMappingFile {
    pub source: String,
    pub target: String,
}

/// Something that happens during the run, `at` a time from its start.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum EventFile {
    /// The link between two sites goes down for `length` (under 10 s: a flap).
    Partition {
        at: String,
        sites: [String; 2],
        length: String,
    },
    /// A host loses power (mid-operation when `during_io`), and restarts after `down_for`;
    /// with `journals_lost` it comes back without its VMs' tracking journals (restored from a
    /// copy that lacks them), and with `again_on_restart` it loses power once more within the
    /// first storage steps of its restart.
    CrashHost {
        at: String,
        host: String,
        #[serde(default = "default_down_for")]
        down_for: String,
        #[serde(default)]
        during_io: bool,
        #[serde(default)]
        journals_lost: bool,
        #[serde(default)]
        again_on_restart: bool,
        /// Not at `at` but at the host's next planned failover after it: `recorded` right
        /// after it records the handover, `taken-over` once the other site took the VM over.
        #[serde(default)]
        at_handover: Option<HandoverCrash>,
    },
    /// A host's disk is full for `length`.
    DiskFull {
        at: String,
        host: String,
        length: String,
        /// The disk fills in the middle of the host's next commit rather than at once.
        #[serde(default)]
        during_io: bool,
    },
    /// Every host of a site loses power, and comes back after `length`.
    SiteOutage {
        at: String,
        site: String,
        length: String,
    },
    /// Unplanned failover of VMs to their replica hosts, at the latest recovery point, committed:
    /// the VMs at the old site are off, the replicas become the VMs (unprotected until reversed).
    UnplannedFailover { at: String, vms: Vec<String> },
    /// A recovery plan failed over unplanned: its groups in order, each group's VMs together.
    RecoveryPlan {
        at: String,
        name: String,
        groups: Vec<Vec<String>>,
    },
    /// Reverse replication: VMs that failed over replicate back to their old hosts, which
    /// compare their copies by hash and take only what differs.
    Reverse { at: String, vms: Vec<String> },
    /// A bit flips, silently, in a replica disk kept on `host` (one VM's, at random).
    BitFlip { at: String, host: String },
    /// Compare replicas with their primaries by hash, shipping nothing (`blockrep verify`).
    Verify { at: String, vms: Vec<String> },
    /// Resynchronize by hand (`blockrep resync`): compare by hash, ship what differs.
    Resync { at: String, vms: Vec<String> },
    /// Planned failover where the VMs run (failback, when they run at the replica site): their
    /// writes stop, the last changes ship, both sides compare, the other site runs them;
    /// `reverse` replicates them back at once.
    PlannedFailover {
        at: String,
        vms: Vec<String>,
        #[serde(default)]
        reverse: bool,
    },
}

fn default_down_for() -> String {
    "1m".into()
}

/// A scenario read and checked: names resolved to indexes.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    pub duration: Duration,
    pub seed: u64,
    pub sites: Vec<Site>,
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub links: Vec<(usize, usize, LinkSpec)>,
    pub events: Vec<Event>,
    pub mappings: Vec<(String, String)>,
    /// VMs the cluster keeps running, not replicated.
    pub clustered: Vec<ClusteredVm>,
}

#[derive(Debug, Clone)]
pub struct ClusteredVm {
    pub name: String,
    pub host: usize,
    pub cluster: String,
}

#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    pub vmm: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub site: usize,
    pub cluster: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub frequency: Duration,
    pub recovery_points: usize,
    pub compression: bool,
}

#[derive(Debug, Clone)]
pub struct Vm {
    pub name: String,
    pub host: usize,
    pub replica_host: usize,
    pub disks: Vec<u64>,
    pub workload: WorkloadSpec,
    pub policy: Policy,
    pub networks: Vec<String>,
    /// The cloud it is protected in; `None` for host-level replication.
    pub cloud: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Event {
    pub at: Duration,
    pub action: Action,
}

/// Where in a planned failover a host loses power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandoverCrash {
    /// Right after the host whose VM is handed over recorded the handover.
    Recorded,
    /// Once the other site took the VM over, before the host heard.
    TakenOver,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Partition {
        sites: (usize, usize),
        length: Duration,
    },
    CrashHost {
        host: usize,
        down_for: Duration,
        during_io: bool,
        journals_lost: bool,
        again_on_restart: bool,
        at_handover: Option<HandoverCrash>,
    },
    DiskFull {
        host: usize,
        length: Duration,
        during_io: bool,
    },
    SiteOutage {
        site: usize,
        length: Duration,
    },
    /// Groups of VMs failed over in order (one group each for a plain failover).
    UnplannedFailover {
        plan: Option<String>,
        groups: Vec<Vec<usize>>,
    },
    Reverse {
        vms: Vec<usize>,
    },
    PlannedFailover {
        vms: Vec<usize>,
        reverse: bool,
    },
    BitFlip {
        host: usize,
    },
    Verify {
        vms: Vec<usize>,
    },
    Resync {
        vms: Vec<usize>,
    },
}

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            file: file.clone(),
            source,
        })?;
        Scenario::parse(&text, &file)
    }

    pub fn parse(text: &str, file: &str) -> Result<Scenario, ScenarioError> {
        let written: ScenarioFile = toml::from_str(text).map_err(|error| ScenarioError::Parse {
            file: file.to_owned(),
            message: error.to_string(),
        })?;
        written.resolve().map_err(|message| ScenarioError::Invalid {
            file: file.to_owned(),
            message,
        })
    }
}

fn find<T>(
    items: &[T],
    name: &str,
    what: &str,
    name_of: impl Fn(&T) -> &str,
) -> Result<usize, String> {
    items
        .iter()
        .position(|item| name_of(item) == name)
        .ok_or_else(|| format!("no {what} named {name:?}"))
}

fn duration(text: &str, what: &str) -> Result<Duration, String> {
    parse_duration(text).map_err(|error| format!("{what}: {error}"))
}

fn unique<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for name in names {
        if !seen.insert(name) {
            return Err(format!("two {what}s are named {name:?}"));
        }
    }
    Ok(())
}

impl ScenarioFile {
    fn resolve(self) -> Result<Scenario, String> {
        unique(self.sites.iter().map(|site| site.name.as_str()), "site")?;
        unique(self.hosts.iter().map(|host| host.name.as_str()), "host")?;
        unique(self.clouds.iter().map(|cloud| cloud.name.as_str()), "cloud")?;
        unique(self.vms.iter().map(|vm| vm.name.as_str()), "VM")?;
        unique(
            self.policies.iter().map(|policy| policy.name.as_str()),
            "policy",
        )?;
        let site = |name: &str| find(&self.sites, name, "site", |site| &site.name);
        let host = |name: &str| find(&self.hosts, name, "host", |host| &host.name);
        let hosts = self
            .hosts
            .iter()
            .map(|written| {
                Ok(Host {
                    cluster: written.cluster.clone(),
                    name: written.name.clone(),
                    site: site(&written.site)
                        .map_err(|error| format!("host {}: {error}", written.name))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let policy = |name: &str| -> Result<Policy, String> {
            let written = &self.policies[find(&self.policies, name, "policy", |p| &p.name)?];
            let frequency = duration(&written.frequency, "frequency")?;
            if ![30, 300, 900].contains(&frequency.as_secs()) || frequency.subsec_nanos() != 0 {
                return Err(format!(
                    "policy {}: frequency {} is not one Hyper-V Replica offers (30s, 5m, 15m)",
                    written.name, written.frequency
                ));
            }
            Ok(Policy {
                name: written.name.clone(),
                frequency,
                recovery_points: written.recovery_points,
                compression: written.compression,
            })
        };
        for cloud in &self.clouds {
            for member in &cloud.hosts {
                host(member).map_err(|error| format!("cloud {}: {error}", cloud.name))?;
            }
            if cloud.hosts.is_empty() {
                return Err(format!("cloud {} has no hosts", cloud.name));
            }
        }
        let mut vms = Vec::new();
        let mut clustered = Vec::new();
        let mut placed = vec![0usize; self.clouds.len()];
        for written in &self.vms {
            let context = |error: String| format!("VM {}: {error}", written.name);
            let home = host(&written.host).map_err(context)?;
            if written.clustered {
                let cluster = hosts[home].cluster.clone().ok_or_else(|| {
                    context(format!(
                        "is clustered but host {} is in no cluster",
                        written.host
                    ))
                })?;
                if written.replica_host.is_some() {
                    return Err(context(
                        "a clustered VM is not replicated by blockrep: drop replica_host".into(),
                    ));
                }
                clustered.push(ClusteredVm {
                    name: written.name.clone(),
                    host: home,
                    cluster,
                });
                continue;
            }
            let cloud = self
                .clouds
                .iter()
                .position(|cloud| cloud.hosts.contains(&written.host));
            let (replica_host, policy, cloud_name) = match (&written.replica_host, cloud) {
                (Some(replica), _) => {
                    if let (Some(_), Some(cloud)) = (&written.vmm, cloud)
                        && self.clouds[cloud].replicate_to.is_some()
                    {
                        return Err(context(format!(
                            "runs a VMM server yet sits in protected cloud {}; protect it at the host level outside any protected cloud",
                            self.clouds[cloud].name
                        )));
                    }
                    let name = written
                        .policy
                        .as_deref()
                        .ok_or_else(|| context("host-level replication needs a policy".into()))?;
                    (
                        host(replica).map_err(context)?,
                        policy(name).map_err(context)?,
                        None,
                    )
                }
                (None, Some(index)) => {
                    let source = &self.clouds[index];
                    let target_name = source.replicate_to.as_deref().ok_or_else(|| {
                        context(format!(
                            "cloud {} is not protected and no replica_host is set",
                            source.name
                        ))
                    })?;
                    let target = &self.clouds
                        [find(&self.clouds, target_name, "cloud", |c| &c.name).map_err(context)?];
                    // VMs are spread over the target cloud's hosts in turn.
                    let chosen = &target.hosts[placed[index] % target.hosts.len()];
                    placed[index] += 1;
                    let name = source.policy.as_deref().ok_or_else(|| {
                        context(format!("protected cloud {} has no policy", source.name))
                    })?;
                    (
                        host(chosen).map_err(context)?,
                        policy(name).map_err(context)?,
                        Some(source.name.clone()),
                    )
                }
                (None, None) => {
                    return Err(context(
                        "its host is in no cloud and no replica_host is set".into(),
                    ));
                }
            };
            if replica_host == home {
                return Err(context("replicates to its own host".into()));
            }
            let disks = written
                .disks
                .iter()
                .map(|size| parse_size(size).map_err(|error| context(error.to_string())))
                .collect::<Result<Vec<_>, String>>()?;
            if disks.is_empty() || disks.iter().any(|size| *size == 0 || size % (1 << 20) != 0) {
                return Err(context("disks must be whole MiB, at least one".into()));
            }
            vms.push(Vm {
                name: written.name.clone(),
                host: home,
                replica_host,
                disks,
                workload: written.workload.clone(),
                policy,
                networks: written.networks.clone(),
                cloud: cloud_name,
            });
        }
        let links = self
            .links
            .iter()
            .map(|written| {
                let ends = (site(&written.sites[0])?, site(&written.sites[1])?);
                let rate = parse_rate(&written.bandwidth).map_err(|error| error.to_string())?;
                if !(0.0..1.0).contains(&written.loss) {
                    return Err(format!("link loss {} is not in [0, 1)", written.loss));
                }
                Ok((
                    ends.0,
                    ends.1,
                    LinkSpec {
                        bandwidth: rate as f64,
                        latency: duration(&written.latency, "latency")?,
                        jitter: written
                            .jitter
                            .as_deref()
                            .map(|jitter| duration(jitter, "jitter"))
                            .transpose()?
                            .unwrap_or_default(),
                        loss: written.loss,
                    },
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let vm_indexes = |names: &Vec<String>| -> Result<Vec<usize>, String> {
            names
                .iter()
                .map(|name| {
                    if clustered.iter().any(|vm: &ClusteredVm| vm.name == *name) {
                        return Err(format!(
                            "VM {name} is clustered: its cluster fails it over, not blockrep"
                        ));
                    }
                    find(&vms, name, "VM", |vm| &vm.name)
                })
                .collect()
        };
        let events = self
            .events
            .iter()
            .map(|written| {
                let (at, action) = match written {
                    EventFile::Partition { at, sites, length } => (
                        at,
                        Action::Partition {
                            sites: (site(&sites[0])?, site(&sites[1])?),
                            length: duration(length, "length")?,
                        },
                    ),
                    EventFile::CrashHost {
                        at,
                        host: name,
                        down_for,
                        during_io,
                        journals_lost,
                        again_on_restart,
                        at_handover,
                    } => (
                        at,
                        Action::CrashHost {
                            host: host(name)?,
                            down_for: duration(down_for, "down_for")?,
                            during_io: *during_io,
                            journals_lost: *journals_lost,
                            again_on_restart: *again_on_restart,
                            at_handover: *at_handover,
                        },
                    ),
                    EventFile::DiskFull {
                        at,
                        host: name,
                        length,
                        during_io,
                    } => (
                        at,
                        Action::DiskFull {
                            host: host(name)?,
                            length: duration(length, "length")?,
                            during_io: *during_io,
                        },
                    ),
                    EventFile::SiteOutage {
                        at,
                        site: name,
                        length,
                    } => (
                        at,
                        Action::SiteOutage {
                            site: site(name)?,
                            length: duration(length, "length")?,
                        },
                    ),
                    EventFile::UnplannedFailover { at, vms } => (
                        at,
                        Action::UnplannedFailover {
                            plan: None,
                            groups: vec![vm_indexes(vms)?],
                        },
                    ),
                    EventFile::RecoveryPlan { at, name, groups } => (
                        at,
                        Action::UnplannedFailover {
                            plan: Some(name.clone()),
                            groups: groups.iter().map(&vm_indexes).collect::<Result<_, _>>()?,
                        },
                    ),
                    EventFile::PlannedFailover { at, vms, reverse } => (
                        at,
                        Action::PlannedFailover {
                            vms: vm_indexes(vms)?,
                            reverse: *reverse,
                        },
                    ),
                    EventFile::BitFlip { at, host: name } => {
                        (at, Action::BitFlip { host: host(name)? })
                    }
                    EventFile::Verify { at, vms } => (
                        at,
                        Action::Verify {
                            vms: vm_indexes(vms)?,
                        },
                    ),
                    EventFile::Resync { at, vms } => (
                        at,
                        Action::Resync {
                            vms: vm_indexes(vms)?,
                        },
                    ),
                    EventFile::Reverse { at, vms } => (
                        at,
                        Action::Reverse {
                            vms: vm_indexes(vms)?,
                        },
                    ),
                };
                Ok(Event {
                    at: duration(at, "event time")?,
                    action,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Scenario {
            name: self.name,
            description: self.description,
            duration: duration(&self.duration, "duration")?,
            seed: self.seed,
            sites: self
                .sites
                .iter()
                .map(|site| Site {
                    name: site.name.clone(),
                    vmm: site.vmm.clone(),
                })
                .collect(),
            hosts,
            vms,
            links,
            events,
            clustered,
            mappings: self
                .network_mappings
                .iter()
                .map(|mapping| (mapping.source.clone(), mapping.target.clone()))
                .collect(),
        })
    }
}
