//! Silent damage and how blockrep finds and repairs it: a bit flipped on a replica's disk
//! behind the engine's back, `blockrep verify` comparing by hash, and a resynchronization
//! shipping what differs.

use super::World;
use crate::content::PAGE;
use crate::report::VerifyReport;
use blockrep::image::{Access, ImageFormat, open_path};
use blockrep::resync::Verification;

impl World {
    /// Flips one bit of a page a replica on `host` holds data in, writing the disk file
    /// directly (the medium, not the engine, is at fault).
    pub(super) fn flip_a_bit(&mut self, host: usize) {
        let candidates: Vec<usize> = (0..self.vms.len())
            .filter(|&vm| {
                self.vms[vm].spec.replica_host == host
                    && self.vms[vm].replicating
                    && self.hosts[host].slots.contains_key(&vm)
            })
            .collect();
        if candidates.is_empty() {
            self.note_fault(format!(
                "host {}: no replica to flip a bit in",
                self.hosts[host].name
            ));
            return;
        }
        let vm = candidates[self.random.below(candidates.len() as u64) as usize];
        let written: Vec<u64> = match &self.vms[vm].acknowledged {
            Some((_, Some(versions))) => versions[0]
                .iter()
                .enumerate()
                .filter(|(_, version)| **version > 0)
                .map(|(page, _)| page as u64)
                .collect(),
            _ => Vec::new(),
        };
        if written.is_empty() {
            return;
        }
        let page = written[self.random.below(written.len() as u64) as usize];
        let byte = page * PAGE + self.random.below(PAGE);
        let bit = 1u8 << self.random.below(8);
        let Some(slot) = self.hosts[host].slots.get_mut(&vm) else {
            return;
        };
        let Some(path) = slot.replica.disk_paths().first().cloned() else {
            return;
        };
        // The store opens the disk again when it next needs it, and sees the damage.
        slot.replica.release_disks();
        let format = ImageFormat::from_extension(&path).unwrap_or(ImageFormat::Vhdx);
        let flipped = open_path(&path, format, Access::ReadWrite).and_then(|mut image| {
            let mut value = [0u8; 1];
            image.read_at(&mut value, byte)?;
            value[0] ^= bit;
            image.write_at(&value, byte)?;
            image.flush()
        });
        let name = self.vms[vm].spec.name.clone();
        match flipped {
            Ok(()) => {
                self.vms[vm].flipped.insert((0, page));
                self.note_fault(format!(
                    "host {}: a bit flipped in {name}'s replica disk 0 at byte {byte}",
                    self.hosts[host].name
                ));
            }
            Err(error) => {
                self.note_fault(format!("cannot flip a bit in {name}'s replica: {error}"))
            }
        }
    }

    /// Compares the VM's replica with its primary by hash, as `blockrep verify` does.
    pub(super) fn verify(&mut self, vm: usize) {
        let now = self.agenda.now();
        let outcome = self.compare_only(vm);
        let (differing, pending_bytes, problem) = match outcome {
            Ok(verification) => (
                Some(
                    verification
                        .differing
                        .iter()
                        .map(|(disk, range)| (*disk, range.start, range.end))
                        .collect(),
                ),
                verification.pending_bytes,
                None,
            ),
            Err(problem) => (None, 0, Some(problem)),
        };
        self.verifications.push(VerifyReport {
            seconds: now.as_secs_f64(),
            vm: self.vms[vm].spec.name.clone(),
            differing,
            pending_bytes,
            problem,
        });
    }

    fn compare_only(&mut self, vm: usize) -> Result<Verification, String> {
        let replica_host = self.vms[vm].spec.replica_host;
        if !self.hosts[replica_host].up || !self.vms[vm].replicating {
            return Err("not replicating".into());
        }
        let seed = self.random.draw();
        let disks = self.hosts[replica_host].disks.clone();
        let theirs = disks.observing(|| {
            let slot = self.slot(replica_host, vm)?;
            if slot.replica.applied() == 0 {
                return Err("the replica holds no copy yet".to_string());
            }
            slot.replica
                .block_hashes(seed)
                .map_err(|error| error.to_string())
        })?;
        let primary = self.vms[vm]
            .primary
            .as_ref()
            .ok_or("the VM is not running")?;
        let ours = primary
            .vm
            .block_hashes(seed)
            .map_err(|error| error.to_string())?;
        let differing = ours
            .iter()
            .zip(&theirs)
            .map(|(ours, theirs)| ours.differing(theirs))
            .collect::<blockrep::Result<Vec<_>>>()
            .map_err(|error| error.to_string())?;
        Ok(Verification::new(
            ours.iter().map(|hashes| hashes.virtual_size()),
            &differing,
            &primary.vm.pending_extents(),
        ))
    }
}
