//! What one primary may make a replica server hold: VMs, disks per VM, and bytes of disk. A
//! primary is allowed by certificate, but an allowed primary is not trusted with the whole
//! server: each new VM it names creates files that stay open, so the count and size of what it
//! may create are bounded, and a refusal names the limit and the flag that raises it.

use crate::proto::DiskDescription;

/// Per-primary limits of a replica store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// VMs replicated here from one primary.
    pub vms_per_primary: usize,
    /// Disks of one VM.
    pub disks_per_vm: usize,
    /// The virtual size of every disk of every VM of one primary, together.
    pub bytes_per_primary: u64,
}

impl Default for Limits {
    /// Room for a busy lab host (Hyper-V runs a few hundred VMs a host at most, with up to 64
    /// disks on a SCSI controller), far below what exhausts a server's open files.
    fn default() -> Self {
        Limits {
            vms_per_primary: 128,
            disks_per_vm: 64,
            bytes_per_primary: 256 << 40,
        }
    }
}

/// What one primary holds in a store already.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) vms: usize,
    pub(crate) bytes: u64,
}

impl Limits {
    /// Why a new VM with `disks` may not be added to `usage`, if it may not.
    pub(crate) fn refusal(&self, usage: Usage, disks: &[DiskDescription]) -> Option<String> {
        if disks.len() > self.disks_per_vm {
            return Some(format!(
                "{} disks; this server takes at most {} a VM (--max-disks-per-vm)",
                disks.len(),
                self.disks_per_vm
            ));
        }
        if usage.vms >= self.vms_per_primary {
            return Some(format!(
                "the primary has {} VMs here, the most this server takes from one primary (--max-vms-per-primary)",
                usage.vms
            ));
        }
        let adding: u64 = disks.iter().map(|disk| disk.virtual_size).sum();
        if usage.bytes.saturating_add(adding) > self.bytes_per_primary {
            return Some(format!(
                "{adding} bytes of disks would bring the primary's to {} bytes here, over the {} this server takes from one primary (--max-bytes-per-primary)",
                usage.bytes.saturating_add(adding),
                self.bytes_per_primary
            ));
        }
        None
    }
}
