//! The replica side's storage: applying deltas crash-safely to replica disks. (Recovery
//! points and failover build on this.) It knows nothing of transport.

mod bundle;
mod copy;
mod failback;
mod limits;
mod points;
mod site;
mod store;

pub use bundle::apply_bundle;
pub use copy::{ReplicaAccess, copy_point};
pub use failback::{FailbackEnd, Hosted};
pub use limits::Limits;
pub use points::PointPolicy;
pub use site::{CopyPurpose, PointCopy, ReplicaSite, SiteEffect};
/// For the lab tests, in debug builds only: the process kills itself at the point
/// `BLOCKREP_CRASH_POINT` names.
#[doc(hidden)]
pub use store::crash_point;
pub use store::{FailoverRecord, PointInfo, ReplicaStore, VmReplica, WallClock, fence_for};
