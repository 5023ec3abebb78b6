//! `--metrics ADDR`: the statistics of `blockrep status`, served as Prometheus text exposition
//! (format 0.0.4) at `http://ADDR/metrics`. Each scrape asks the daemon's own control socket for
//! its status, so the figures are exactly those `blockrep status --json` prints. A replica's
//! apply throughput is `rate(blockrep_replica_staged_bytes_total)` over
//! `rate(blockrep_replica_apply_seconds_total)`.
//!
//! The HTTP side is written here: a scrape is one `GET` answered with one body, and an HTTP
//! server crate would bring a second async stack for that.

use crate::control;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A listening metrics endpoint; dropping it stops the listener.
pub struct MetricsServer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves the status of the daemon whose control socket is `control` at `address`.
    pub fn bind(address: SocketAddr, control: &Path) -> std::io::Result<MetricsServer> {
        let listener = TcpListener::bind(address).map_err(|error| {
            std::io::Error::new(error.kind(), format!("--metrics {address}: {error}"))
        })?;
        listener.set_nonblocking(true)?;
        let control: PathBuf = control.to_owned();
        let (stop, thread) = control::accept_until_stopped(
            "metrics",
            move || listener.accept(),
            // One thread per scrape: a slow one (waiting on a busy daemon) holds up no other.
            move |(stream, _)| {
                let control = control.clone();
                std::thread::spawn(move || {
                    let _ = answer(stream, &control);
                });
            },
        )?;
        Ok(MetricsServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn answer(stream: std::net::TcpStream, control: &Path) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers are read and ignored.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut words = request_line.split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, body) = if method != "GET" {
        ("405 Method Not Allowed", "only GET\n".to_owned())
    } else if target != "/metrics" {
        ("404 Not Found", "metrics are at /metrics\n".to_owned())
    } else {
        match control::request(control, "status", Some(Duration::from_secs(5))) {
            Ok(status) => ("200 OK", exposition(&status)),
            Err(error) => (
                "503 Service Unavailable",
                format!("the daemon's status is unavailable: {error}\n"),
            ),
        }
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Quotes a label value as the exposition format asks.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric name part from a status field: lower case letters, digits and underscores.
fn metric_name(field: &str) -> String {
    field
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The daemon's status as exposition text: per VM, every number of its status as a gauge
/// `blockrep_ROLE_FIELD{vm="..."}` (counters of cycles and bytes as `_total` counters); for a
/// primary, its state and health as an info metric, health also as a number (0 normal, 1
/// warning, 2 critical); per daemon, the VMs it serves and those connected.
pub fn exposition(status: &serde_json::Value) -> String {
    use std::collections::BTreeMap;
    use std::fmt::Write as _;
    let role = status["role"].as_str().unwrap_or("unknown");
    let role = metric_name(role);
    // name -> (help, type, samples)
    let mut families: BTreeMap<String, (String, &str, Vec<String>)> = BTreeMap::new();
    let mut sample = |name: String, help: String, kind: &'static str, line: String| {
        families
            .entry(name)
            .or_insert_with(|| (help, kind, Vec::new()))
            .2
            .push(line);
    };
    let vms = status["vms"].as_array().cloned().unwrap_or_default();
    let mut connected = 0u64;
    for vm in &vms {
        let name = label(vm["vm"].as_str().unwrap_or("?"));
        if vm["connected"].as_bool() == Some(true) {
            connected += 1;
        }
        let Some(fields) = vm.as_object() else {
            continue;
        };
        for (field, value) in fields {
            let number = match value {
                serde_json::Value::Number(number) => number.as_f64(),
                serde_json::Value::Bool(flag) => Some(f64::from(u8::from(*flag))),
                _ => None,
            };
            let Some(number) = number else {
                continue;
            };
            let field = metric_name(field);
            let counter = field.ends_with("_cycles")
                || field.starts_with("bytes_")
                || field.ends_with("_total");
            let metric = if counter && !field.ends_with("_total") {
                format!("blockrep_{role}_{field}_total")
            } else {
                format!("blockrep_{role}_{field}")
            };
            sample(
                metric.clone(),
                format!("{field} of each VM, as `blockrep status --json` gives it"),
                if counter { "counter" } else { "gauge" },
                format!("{metric}{{vm=\"{name}\"}} {number}"),
            );
        }
        let (state, health) = (
            vm["state"].as_str().unwrap_or(""),
            vm["health"].as_str().unwrap_or(""),
        );
        if !health.is_empty() {
            let level = match health {
                "normal" => 0,
                "warning" => 1,
                _ => 2,
            };
            sample(
                format!("blockrep_{role}_health"),
                "replication health: 0 normal, 1 warning, 2 critical".into(),
                "gauge",
                format!("blockrep_{role}_health{{vm=\"{name}\"}} {level}"),
            );
        }
        // A replica server's VMs have neither: they are a primary's words.
        if state.is_empty() && health.is_empty() {
            continue;
        }
        sample(
            format!("blockrep_{role}_info"),
            "each VM, with its state and health as labels".into(),
            "gauge",
            format!(
                "blockrep_{role}_info{{vm=\"{name}\",state=\"{}\",health=\"{}\"}} 1",
                label(state),
                label(health)
            ),
        );
    }
    sample(
        format!("blockrep_{role}_vms"),
        "VMs this daemon replicates".into(),
        "gauge",
        format!("blockrep_{role}_vms {}", vms.len()),
    );
    sample(
        format!("blockrep_{role}_connections"),
        "VMs with a connection up".into(),
        "gauge",
        format!("blockrep_{role}_connections {connected}"),
    );
    let mut out = String::new();
    for (name, (help, kind, lines)) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for line in lines {
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_status_becomes_labelled_gauges_and_counters() {
        let status = serde_json::json!({
            "role": "primary",
            "vms": [{
                "vm": "vm\"1",
                "replica": "site-b:4433",
                "state": "replicating",
                "health": "warning",
                "connected": true,
                "pending_bytes": 4096,
                "successful_cycles": 12,
                "bytes_before_compression": 1048576,
                "resync": null
            }]
        });
        let text = exposition(&status);
        assert!(
            text.contains("blockrep_primary_pending_bytes{vm=\"vm\\\"1\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE blockrep_primary_successful_cycles_total counter"),
            "{text}"
        );
        assert!(
            text.contains(
                "blockrep_primary_bytes_before_compression_total{vm=\"vm\\\"1\"} 1048576"
            )
        );
        assert!(text.contains("blockrep_primary_health{vm=\"vm\\\"1\"} 1"));
        assert!(text.contains("blockrep_primary_connections 1"));
        assert!(text.contains("state=\"replicating\""));
        // Every sample line belongs to a family declared before it.
        let mut declared = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                declared.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert!(declared.contains(name), "{name} undeclared");
            }
        }
    }

    #[test]
    fn a_replica_server_status_has_no_empty_info_series_but_says_busy() {
        let status = serde_json::json!({
            "role": "replica",
            "vms": [{"vm": "vm1", "connected": true, "busy": true, "staged_bytes_total": 10}]
        });
        let text = exposition(&status);
        assert!(!text.contains("blockrep_replica_info"), "{text}");
        assert!(!text.contains("blockrep_replica_health"), "{text}");
        assert!(
            text.contains("blockrep_replica_busy{vm=\"vm1\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("blockrep_replica_staged_bytes_total{vm=\"vm1\"} 10"),
            "{text}"
        );
    }
}
