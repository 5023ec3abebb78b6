//! What reads or tracks the replica's disks besides the store: hashes for a comparison or a
//! handover, and the onward primary of extended replication.

use super::*;

impl VmReplica {
    /// Every disk's block hashes under `seed`.
    pub fn block_hashes(&mut self, seed: u64) -> Result<Vec<crate::resync::BlockHashes>> {
        self.open_disks()?;
        self.disks
            .iter()
            .map(|disk| crate::resync::BlockHashes::compute(&**disk, seed, &|_| {}))
            .collect()
    }

    /// Every disk's digest under `seed` (the root of its block hashes).
    pub fn digests(&mut self, seed: u64) -> Result<Vec<u128>> {
        Ok(self
            .block_hashes(seed)?
            .iter()
            .map(crate::resync::BlockHashes::digest)
            .collect())
    }

    /// Applies through `disks` (the same files, tracked by whoever replicates them onward)
    /// from now on, instead of opening the files itself.
    pub(crate) fn track_with(&mut self, disks: Vec<Arc<ProtectedDisk>>) -> Result<()> {
        self.close_disks();
        self.tracked = Some(disks);
        // Onward tracking stamped them anew as it opened them.
        self.stamp_disks(None)
    }

    /// Stops applying through tracked disks.
    pub(crate) fn untrack(&mut self) {
        self.close_disks();
        self.tracked = None;
    }

    /// Held around each apply: a cut taken while holding it falls between two deltas.
    pub(crate) fn apply_gate(&self) -> Arc<Mutex<()>> {
        Arc::clone(&self.gate)
    }

    /// Whether an initial replication replaced the files under the tracked disks since last
    /// asked (onward replication must start again from the new files).
    pub(crate) fn take_detached(&mut self) -> bool {
        std::mem::take(&mut self.detached)
    }
}
