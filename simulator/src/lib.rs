//! `blockrep-sim`: Hyper-V Replica deployments, simulated around the real blockrep engine.
//!
//! A scenario (TOML, see `simulator/scenarios/`) describes sites, VMM servers and clouds,
//! hosts, VMs with disks and workloads, replication policies, the links between sites and the
//! faults to inject. [`run`] drives the engine's own state machines, tracking, delta spooling
//! and replica store through it on a virtual clock: the network, the guests and the disks'
//! failures are simulated, the replication is not. The same seed gives the same run, down to
//! the trace hash in the report.

pub mod agenda;
pub mod check;
pub mod content;
pub mod faulty;
pub mod fuzz;
pub mod html;
pub mod network;
pub mod random;
pub mod report;
pub mod scenario;
mod trace;
pub mod workload;
mod world;

pub use report::Report;
pub use scenario::{Scenario, ScenarioError};
pub use world::{RunOptions, SetupError};

/// Runs `scenario` with `options` (seed, length, progress) and reports.
pub fn run(scenario: Scenario, options: RunOptions) -> Result<Report, SetupError> {
    let world = world::World::new(scenario, options.seed)?;
    Ok(world.run(options))
}
