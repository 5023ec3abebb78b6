use super::*;
use crate::control::ControlSocket;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpStream;

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
    let series = series(&text);
    assert_eq!(
        series.get("blockrep_primary_pending_bytes{vm=\"vm\\\"1\"}"),
        Some(&4096.0),
        "{text}"
    );
    assert!(
        text.contains("# TYPE blockrep_primary_successful_cycles_total counter"),
        "{text}"
    );
    assert_eq!(
        series.get("blockrep_primary_bytes_before_compression_total{vm=\"vm\\\"1\"}"),
        Some(&1048576.0),
        "{text}"
    );
    assert_eq!(
        series.get("blockrep_primary_health{vm=\"vm\\\"1\"}"),
        Some(&1.0)
    );
    assert_eq!(series.get("blockrep_primary_connections"), Some(&1.0));
    assert!(text.contains("state=\"replicating\""));
    // Every sample line belongs to a family declared before it.
    let mut declared = BTreeSet::new();
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
fn a_resynchronization_required_is_labelled_with_its_reason() {
    let status = serde_json::json!({
        "role": "primary",
        "vms": [{
            "vm": "vm1",
            "state": "resynchronization_required",
            "health": "critical",
            "last_error": "resynchronization required: vm1.vhdx: the disk was written by another program",
        }]
    });
    let text = exposition(&status);
    let info = text
        .lines()
        .find(|line| line.starts_with("blockrep_primary_info{"))
        .unwrap_or_default();
    assert!(
        info.contains("health=\"critical\"")
            && info.contains("reason=\"resynchronization required: vm1.vhdx: the disk was written by another program\""),
        "{text}"
    );
}

#[test]
fn a_replica_server_status_has_no_empty_info_series_but_says_busy() {
    let status = serde_json::json!({
        "role": "replica",
        "vms": [{"vm": "vm1", "connected": true, "busy": true, "staged_bytes_total": 10}]
    });
    let text = exposition(&status);
    let series = series(&text);
    assert!(!text.contains("blockrep_replica_info"), "{text}");
    assert!(!text.contains("blockrep_replica_health"), "{text}");
    assert_eq!(
        series.get("blockrep_replica_busy{vm=\"vm1\"}"),
        Some(&1.0),
        "{text}"
    );
    assert_eq!(
        series.get("blockrep_replica_staged_bytes_total{vm=\"vm1\"}"),
        Some(&10.0),
        "{text}"
    );
}

/// A sample line's series (name and labels, labels in the order written) and value.
fn series(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}

fn rich_primary_status() -> serde_json::Value {
    serde_json::json!({"role": "primary", "vms": [
        {"vm": "vm\"1", "replica": "site-b:4433", "state": "replicating", "health": "warning",
         "connected": true, "applied_sequence": 7, "pending_bytes": 4096, "in_flight_bytes": 0,
         "average_delta_bytes": 1024.5, "maximum_delta_bytes": 65536,
         "average_latency_seconds": 0.25, "seconds_since_replication": 3.5,
         "successful_cycles": 12, "missed_cycles": 1, "bytes_before_compression": 1048576,
         "bytes_after_compression": 524288, "resync": null, "last_error": "none"},
        {"vm": "vm2", "replica": "site-b:4433", "state": "initial-replication",
         "health": "critical", "connected": false, "pending_bytes": 0, "successful_cycles": 0}]})
}

fn replica_status() -> serde_json::Value {
    serde_json::json!({"role": "replica", "listen": "0.0.0.0:4433", "vms": [
        {"vm": "vm1", "connected": true, "busy": false, "applied_sequence": 7,
         "staged_bytes_total": 10, "applied_deltas_total": 3, "apply_seconds_total": 0.5,
         "recovery_points": 2, "disks": ["a"]}]})
}

/// What the hand-written exposition gave for `rich_primary_status` and `replica_status`.
const SERIES_BEFORE: [&str; 30] = [
    "blockrep_primary_applied_sequence{vm=\"vm\\\"1\"} 7",
    "blockrep_primary_average_delta_bytes{vm=\"vm\\\"1\"} 1024.5",
    "blockrep_primary_average_latency_seconds{vm=\"vm\\\"1\"} 0.25",
    "blockrep_primary_bytes_after_compression_total{vm=\"vm\\\"1\"} 524288",
    "blockrep_primary_bytes_before_compression_total{vm=\"vm\\\"1\"} 1048576",
    "blockrep_primary_connected{vm=\"vm\\\"1\"} 1",
    "blockrep_primary_connected{vm=\"vm2\"} 0",
    "blockrep_primary_connections 1",
    "blockrep_primary_health{vm=\"vm\\\"1\"} 1",
    "blockrep_primary_health{vm=\"vm2\"} 2",
    "blockrep_primary_in_flight_bytes{vm=\"vm\\\"1\"} 0",
    "blockrep_primary_info{vm=\"vm\\\"1\",state=\"replicating\",health=\"warning\"} 1",
    "blockrep_primary_info{vm=\"vm2\",state=\"initial-replication\",health=\"critical\"} 1",
    "blockrep_primary_maximum_delta_bytes{vm=\"vm\\\"1\"} 65536",
    "blockrep_primary_missed_cycles_total{vm=\"vm\\\"1\"} 1",
    "blockrep_primary_pending_bytes{vm=\"vm\\\"1\"} 4096",
    "blockrep_primary_pending_bytes{vm=\"vm2\"} 0",
    "blockrep_primary_seconds_since_replication{vm=\"vm\\\"1\"} 3.5",
    "blockrep_primary_successful_cycles_total{vm=\"vm\\\"1\"} 12",
    "blockrep_primary_successful_cycles_total{vm=\"vm2\"} 0",
    "blockrep_primary_vms 2",
    "blockrep_replica_applied_deltas_total{vm=\"vm1\"} 3",
    "blockrep_replica_applied_sequence{vm=\"vm1\"} 7",
    "blockrep_replica_apply_seconds_total{vm=\"vm1\"} 0.5",
    "blockrep_replica_busy{vm=\"vm1\"} 0",
    "blockrep_replica_connected{vm=\"vm1\"} 1",
    "blockrep_replica_connections 1",
    "blockrep_replica_recovery_points{vm=\"vm1\"} 2",
    "blockrep_replica_staged_bytes_total{vm=\"vm1\"} 10",
    "blockrep_replica_vms 1",
];

#[test]
fn the_exposition_has_the_series_and_values_the_hand_written_one_had() {
    let mut now = series(&exposition(&rich_primary_status()));
    now.extend(series(&exposition(&replica_status())));
    let before = series(&SERIES_BEFORE.join("\n"));
    assert_eq!(now, before);
}

/// A daemon's control socket answering `status`, and its metrics endpoint, on a runtime of
/// their own.
struct Daemon {
    _directory: tempfile::TempDir,
    _control: ControlSocket,
    metrics: Option<MetricsServer>,
    runtime: tokio::runtime::Runtime,
    address: SocketAddr,
}

impl Daemon {
    fn start(status: serde_json::Value) -> Daemon {
        let directory = tempfile::tempdir().unwrap();
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o700);
        std::fs::set_permissions(directory.path(), private).unwrap();
        let socket = directory.path().join("protect-vm1.sock");
        let control = ControlSocket::bind(&socket, move |_| status.clone()).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // A free port: the endpoint is bound to a fixed address, as a daemon's is.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let metrics = {
            let _entered = runtime.enter();
            MetricsServer::bind(address, &socket).unwrap()
        };
        Daemon {
            _directory: directory,
            _control: control,
            metrics: Some(metrics),
            runtime,
            address,
        }
    }

    /// Sends `request` as it is and returns all the endpoint answers (or the error reading it).
    fn exchange(&self, request: &[u8]) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(self.address)?;
        stream.set_read_timeout(Some(Duration::from_secs(40)))?;
        // The endpoint may answer and close before taking all of a large request.
        let _ = stream.write_all(request);
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer)?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _entered = self.runtime.enter();
        self.metrics.take();
    }
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

const SCRAPE: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";

#[test]
fn a_scrape_over_http_answers_the_series_of_the_daemons_status() {
    let daemon = Daemon::start(rich_primary_status());
    let answer = daemon.exchange(SCRAPE).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    let expected = series(&SERIES_BEFORE[..21].join("\n"));
    assert_eq!(series(body), expected);
    let answer = daemon
        .exchange(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = daemon
        .exchange(b"DELETE /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
}

#[test]
fn an_oversized_request_is_refused_and_a_body_is_never_read() {
    let daemon = Daemon::start(replica_status());
    // Headers of 1 MiB: refused once past the limit, never all read.
    let mut request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Filler: ".to_vec();
    request.resize(request.len() + 1024 * 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    match daemon.exchange(&request) {
        Ok(answer) => assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}"),
        // The endpoint closed with our bytes unread, which resets the connection; what it
        // never does is answer the scrape.
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    let answer = daemon
        .exchange(
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 300000000\r\n\r\nxxxx",
        )
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // And it goes on answering scrapes.
    let answer = daemon.exchange(SCRAPE).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
}

#[test]
fn many_idle_connections_neither_keep_a_scrape_out_nor_take_a_thread_each() {
    let daemon = Daemon::start(replica_status());
    let before = threads_of_this_process();
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(daemon.address).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    let during = threads_of_this_process();
    let answer = daemon.exchange(SCRAPE).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(
        during < before + 60,
        "{before} threads before, {during} with 300 idle connections"
    );
    drop(idle);
}

#[test]
fn a_client_that_sends_no_request_is_dropped_after_the_header_deadline() {
    let daemon = Daemon::start(replica_status());
    let started = std::time::Instant::now();
    let answer = daemon.exchange(b"GET /metrics HTTP/1.1\r\n");
    // Closed (hyper may say 408 first) well before our own 40 s read timeout.
    assert!(
        answer
            .as_ref()
            .map_or(true, |answer| !answer.contains("200 OK")),
        "{answer:?}"
    );
    assert!(started.elapsed() < HEADER_DEADLINE + Duration::from_secs(10));
}
