//! The replica side's storage: applying deltas crash-safely to replica disks. (Recovery
//! points and failover build on this.) It knows nothing of transport.

mod store;

pub use store::{ReplicaStore, VmReplica};
