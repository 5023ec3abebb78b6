//! `--metrics ADDR`: the statistics of `blockrep status`, served as Prometheus text exposition
//! (format 0.0.4) at `http://ADDR/metrics`. Each scrape asks the daemon's own control socket for
//! its status, so the figures are exactly those `blockrep status --json` prints. A replica's
//! apply throughput is `rate(blockrep_replica_staged_bytes_total)` over
//! `rate(blockrep_replica_apply_seconds_total)`.
//!
//! HTTP is hyper's, on the daemon's tokio runtime; the exposition is the Prometheus project's
//! own client's (`prometheus-client`). This module only says what a status becomes, and bounds
//! what a client may cost: request headers of at most `HEADER_LIMIT` bytes read within
//! `HEADER_DEADLINE`, no body, one request a connection done within `CONNECTION_DEADLINE`, and
//! at most `CONNECTION_LIMIT` connections, idle ones closed first.

use crate::connection_limit::{Admission, ConnectionLimit};
use crate::control;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The most a request's line and headers may take (a scrape's take a few hundred bytes; hyper
/// will not go below 8 KiB).
pub const HEADER_LIMIT: usize = 16 * 1024;
/// How long a client has to send its request's headers.
pub const HEADER_DEADLINE: Duration = Duration::from_secs(10);
/// How long a connection may last, its request, the daemon's status (at most 5 s) and the
/// answer included.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// Connections served at once.
pub const CONNECTION_LIMIT: usize = 64;

/// A listening metrics endpoint; dropping it stops the listener and its connections.
pub struct MetricsServer {
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// Serves the status of the daemon whose control socket is `control` at `address`; runs on
    /// the tokio runtime it is called in, and refuses to start outside one.
    pub fn bind(address: SocketAddr, control: &Path) -> std::io::Result<MetricsServer> {
        let runtime = tokio::runtime::Handle::try_current().map_err(std::io::Error::other)?;
        let listener = std::net::TcpListener::bind(address).map_err(|error| {
            std::io::Error::new(error.kind(), format!("--metrics {address}: {error}"))
        })?;
        listener.set_nonblocking(true)?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let control = Arc::new(control.to_owned());
        let task = runtime.spawn(serve(listener, control));
        Ok(MetricsServer { task })
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        // The connections are tasks of a set the listener's task owns: they go with it.
        self.task.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, control: Arc<PathBuf>) {
    let limit = ConnectionLimit::new(CONNECTION_LIMIT);
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of descriptors, say: wait rather than spin.
                tracing::warn!(%error, "metrics: accepting a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let admission = match limit.admit(move || {
            let _ = close.send(());
        }) {
            Ok(admission) => Arc::new(admission),
            Err(full) => {
                tracing::warn!("metrics: {full}");
                continue;
            }
        };
        connections.spawn(connection(stream, Arc::clone(&control), admission, closed));
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    control: Arc<PathBuf>,
    admission: Arc<Admission>,
    closed: tokio::sync::oneshot::Receiver<()>,
) {
    let service = hyper::service::service_fn(move |request| {
        let (control, admission) = (Arc::clone(&control), Arc::clone(&admission));
        async move {
            admission.working(true);
            Ok::<_, std::convert::Infallible>(respond(&request, control).await)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_DEADLINE)
        .max_buf_size(HEADER_LIMIT)
        .max_headers(64)
        // One request a connection, as before: a scraper opens one per scrape.
        .keep_alive(false);
    let serving = builder.serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        served = tokio::time::timeout(CONNECTION_DEADLINE, serving) => {
            if let Ok(Err(error)) = served {
                tracing::debug!(%error, "metrics: a connection");
            }
        }
        // Closed to make room for another while it had not asked anything.
        _ = closed => {}
    }
}

async fn respond(request: &Request<Incoming>, control: Arc<PathBuf>) -> Response<Full<Bytes>> {
    let has_body = request.headers().contains_key(header::TRANSFER_ENCODING)
        || request
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|length| length.as_bytes() != b"0");
    if has_body {
        // Never read: the connection closes after the answer.
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a scrape has no body\n".into(),
        );
    }
    if request.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    if request.uri().path() != "/metrics" {
        return text(StatusCode::NOT_FOUND, "metrics are at /metrics\n".into());
    }
    let status = tokio::task::spawn_blocking(move || {
        control::request(&control, "status", Some(Duration::from_secs(5)))
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|status| status);
    match status {
        Ok(status) => {
            let mut response = text(StatusCode::OK, exposition(&status));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            response
        }
        Err(error) => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the daemon's status is unavailable: {error}\n"),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
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

type Labels = Vec<(String, String)>;

/// One metric family as a status gives it: its help, whether it counts, its samples.
struct Samples {
    help: String,
    counter: bool,
    samples: Vec<(Labels, f64)>,
}

/// The samples of a status, by metric name (a counter's with its `_total`).
fn samples(status: &serde_json::Value) -> BTreeMap<String, Samples> {
    let role = metric_name(status["role"].as_str().unwrap_or("unknown"));
    let mut families: BTreeMap<String, Samples> = BTreeMap::new();
    let mut sample = |name: String, help: &str, counter: bool, labels: Labels, value: f64| {
        families
            .entry(name)
            .or_insert_with(|| Samples {
                help: help.to_owned(),
                counter,
                samples: Vec::new(),
            })
            .samples
            .push((labels, value));
    };
    let vms = status["vms"].as_array().cloned().unwrap_or_default();
    let mut connected = 0u64;
    for vm in &vms {
        let name = vm["vm"].as_str().unwrap_or("?").to_owned();
        let by_vm = || vec![("vm".to_owned(), name.clone())];
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
                metric,
                &format!("{field} of each VM, as `blockrep status --json` gives it"),
                counter,
                by_vm(),
                number,
            );
        }
        let (state, health) = (
            vm["state"].as_str().unwrap_or(""),
            vm["health"].as_str().unwrap_or(""),
        );
        if !health.is_empty() {
            let level = match health {
                "normal" => 0.0,
                "warning" => 1.0,
                _ => 2.0,
            };
            sample(
                format!("blockrep_{role}_health"),
                "replication health: 0 normal, 1 warning, 2 critical",
                false,
                by_vm(),
                level,
            );
        }
        // A replica server's VMs have neither: they are a primary's words.
        if state.is_empty() && health.is_empty() {
            continue;
        }
        let mut labels = by_vm();
        labels.push(("state".into(), state.into()));
        labels.push(("health".into(), health.into()));
        // Why a resynchronization is required, named where alerts see it; one value a VM at a
        // time, cut short so that a long reason cannot bloat a scrape.
        if state == "resynchronization_required" {
            let reason: String = vm["last_error"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(REASON_LABEL_CHARACTERS)
                .collect();
            labels.push(("reason".into(), reason));
        }
        sample(
            format!("blockrep_{role}_info"),
            "each VM, with its state and health as labels (and the reason, when a resynchronization is required)",
            false,
            labels,
            1.0,
        );
    }
    sample(
        format!("blockrep_{role}_vms"),
        "VMs this daemon replicates",
        false,
        Vec::new(),
        vms.len() as f64,
    );
    sample(
        format!("blockrep_{role}_connections"),
        "VMs with a connection up",
        false,
        Vec::new(),
        connected as f64,
    );
    families
}

/// The most of a reason an info metric's label carries.
const REASON_LABEL_CHARACTERS: usize = 200;

/// The daemon's status as exposition text: per VM, every number of its status as a gauge
/// `blockrep_ROLE_FIELD{vm="..."}` (counters of cycles and bytes as `_total` counters); for a
/// primary, its state and health as an info metric (with the reason when a resynchronization
/// is required), health also as a number (0 normal, 1 warning, 2 critical); per daemon, the
/// VMs it serves and those connected.
pub fn exposition(status: &serde_json::Value) -> String {
    let mut registry = Registry::default();
    for (name, family) in samples(status) {
        if family.counter {
            let counters = Family::<Labels, Counter<f64, AtomicU64>>::default();
            for (labels, value) in &family.samples {
                counters.get_or_create(labels).inc_by(*value);
            }
            // The library adds the `_total` a counter's name ends in.
            let name = name.strip_suffix("_total").unwrap_or(&name);
            registry.register(name, family.help, counters);
        } else {
            let gauges = Family::<Labels, Gauge<f64, AtomicU64>>::default();
            for (labels, value) in &family.samples {
                gauges.get_or_create(labels).set(*value);
            }
            registry.register(name, family.help, gauges);
        }
    }
    let mut text = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut text, &registry);
    text
}

#[cfg(test)]
mod tests;
