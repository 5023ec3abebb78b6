//! What a daemon's control socket answers a status request, as one type for both ends: the
//! daemons serialize it and `blockrep status` reads it back, so a field one side renames is a
//! compile error rather than a figure silently shown as 0. (The metrics endpoint turns every
//! number in the answer into a metric, and reads it untyped on purpose.)

use super::{PrimaryReport, ReplicaReport};

/// A daemon's answer to a status request.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "role", rename_all = "kebab-case")]
pub enum DaemonStatus {
    /// A VM's agent while the VM runs on its host.
    Primary { vms: Vec<PrimaryReport> },
    /// A replica server (`listen`: its address), or a first host's agent keeping the replica
    /// of its VM while the VM runs at the other site.
    Replica {
        listen: String,
        vms: Vec<ReplicaReport>,
    },
}

impl DaemonStatus {
    /// The answer as the control socket sends it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_else(
            |error| serde_json::json!({"error": format!("cannot encode the status: {error}")}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_servers_status_reads_back_as_it_was_sent() {
        let status = DaemonStatus::Replica {
            listen: "127.0.0.1:4433".into(),
            vms: vec![ReplicaReport {
                vm: "vm1".into(),
                applied_sequence: 7,
                staging: Some((8, 2, 5)),
                ..ReplicaReport::default()
            }],
        };
        let text = serde_json::to_string(&status.to_json()).unwrap();
        assert!(text.contains(r#""role":"replica""#), "{text}");
        match serde_json::from_str::<DaemonStatus>(&text).unwrap() {
            DaemonStatus::Replica { listen, vms } => {
                assert_eq!(listen, "127.0.0.1:4433");
                assert_eq!(vms[0].applied_sequence, 7);
                assert_eq!(vms[0].staging, Some((8, 2, 5)));
            }
            other => panic!("read back as {other:?}"),
        }
    }

    #[test]
    fn an_answer_missing_a_figure_is_refused_not_read_as_zero() {
        let answer = r#"{"role":"replica","listen":"x","vms":[{"vm":"vm1"}]}"#;
        let error = serde_json::from_str::<DaemonStatus>(answer).unwrap_err();
        assert!(error.to_string().contains("missing field"), "{error}");
    }
}
