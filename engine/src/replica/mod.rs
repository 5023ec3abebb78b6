//! The replica side's storage: applying deltas crash-safely to replica disks. (Recovery
//! points and failover build on this.) It knows nothing of transport.

mod bundle;
mod copy;
mod points;
mod store;

pub use bundle::apply_bundle;
pub use copy::{ReplicaAccess, copy_point};
pub use points::PointPolicy;
pub(crate) use store::crash_point;
pub use store::{FailoverRecord, PointInfo, ReplicaStore, VmReplica, WallClock, fence_for};
