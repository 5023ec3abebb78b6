//! The local control socket through which `blockrep status` asks running daemons how they are
//! (and `blockrep suspend` / `resume` tell a primary to pause or go on). Each `serve` and
//! `protect` listens on a unix socket in the private run directory; a client sends one request
//! line (`status`, `suspend`, `resume`, or a JSON request), reads one JSON document, and the
//! connection closes. The socket is removed when the daemon stops.
//!
//! A client can only cost a daemon so much: only root and the daemon's own user are answered
//! (`SO_PEERCRED`); the socket is 0600 in a 0700 directory; a request line is at most
//! `REQUEST_LIMIT` bytes and must arrive whole within `REQUEST_DEADLINE`, and the answer must be
//! taken within as long again; at most `CONNECTION_LIMIT` connections are kept, idle ones closed
//! first (see `connection_limit`).

use crate::connection_limit::{Admission, ConnectionLimit};
use crate::peer::{Peer, admit_peer};
use crate::run_directory::{check_private, effective_user, prepare_private};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use crate::run_directory::run_directory;

/// The longest request line a daemon reads: the largest request (a failover naming a directory)
/// is well under a kilobyte.
pub const REQUEST_LIMIT: usize = 64 * 1024;
/// Connections a daemon keeps at once.
pub const CONNECTION_LIMIT: usize = 64;
/// How long a client has to send its whole request, and then to take the whole answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Why a request line was not read; what is said to the client, when it is still there.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("a control request is at most {limit} bytes; this one is longer")]
    TooLong { limit: usize },
    #[error("no whole control request line arrived within {} s", deadline.as_secs())]
    TooSlow { deadline: Duration },
    #[error("a control request is UTF-8 text; this one is not")]
    NotText,
    #[error("reading a control request: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs `accept` (on a non-blocking listener) on a thread named `name`, handing each
/// connection to `handle`, until the returned flag is raised; join the thread after raising it.
pub fn accept_until_stopped<T: Send + 'static>(
    name: &str,
    accept: impl Fn() -> std::io::Result<T> + Send + 'static,
    handle: impl Fn(T) + Send + 'static,
) -> std::io::Result<(Arc<AtomicBool>, std::thread::JoinHandle<()>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let name = name.to_owned();
    let thread = std::thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match accept() {
                    Ok(connection) => handle(connection),
                    Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(error) => {
                        tracing::warn!(%error, listener = %name, "accepting a connection");
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            }
        })?;
    Ok((stop, thread))
}

type Answer = dyn Fn(&str, &Peer) -> serde_json::Value + Send + Sync;

/// A listening control socket; dropping it stops the listener and removes the socket.
pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlSocket {
    /// Listens at `path`, answering each request line with what `answer` returns for it.
    pub fn bind(
        path: &Path,
        answer: impl Fn(&str) -> serde_json::Value + Send + Sync + 'static,
    ) -> std::io::Result<ControlSocket> {
        ControlSocket::bind_for_peers(path, move |request, _| answer(request))
    }

    /// As `bind`, `answer` also told who asks (for a request that acts on the asker's behalf).
    pub fn bind_for_peers(
        path: &Path,
        answer: impl Fn(&str, &Peer) -> serde_json::Value + Send + Sync + 'static,
    ) -> std::io::Result<ControlSocket> {
        let answer: Arc<Answer> = Arc::new(answer);
        if let Some(parent) = path.parent() {
            prepare_private(parent).map_err(std::io::Error::other)?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another blockrep", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        // The directory already keeps others out; the socket's own mode says so too, whatever
        // the umask made it.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        listener.set_nonblocking(true)?;
        let limit = ConnectionLimit::new(CONNECTION_LIMIT);
        let daemon = effective_user();
        let (stop, thread) = accept_until_stopped(
            "control",
            move || listener.accept(),
            move |(stream, _)| admit(stream, &limit, daemon, &answer),
        )?;
        Ok(ControlSocket {
            path: path.to_owned(),
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes a place for a connection and answers it on a thread of its own: a long request (a
/// failover's copy) must not keep `status` waiting.
fn admit(mut stream: UnixStream, limit: &ConnectionLimit, daemon: u32, answer: &Arc<Answer>) {
    let _ = stream.set_nonblocking(false);
    let admission = match stream.try_clone() {
        Ok(closer) => limit.admit(move || {
            let _ = closer.shutdown(std::net::Shutdown::Both);
        }),
        Err(error) => return tracing::warn!(%error, "control connection"),
    };
    let admission = match admission {
        Ok(admission) => admission,
        Err(full) => {
            // Said here, without a thread: the answer is small and the socket's buffer empty.
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = stream.write_all(error_line(&full).as_bytes());
            return discard_unread(&stream);
        }
    };
    let answer = Arc::clone(answer);
    let spawned = std::thread::Builder::new()
        .name("control-request".into())
        .spawn(move || converse(stream, &admission, daemon, answer.as_ref()));
    if let Err(error) = spawned {
        tracing::warn!(%error, "control connection: no thread to answer it");
    }
}

/// Reads what the client already sent, without waiting, so that closing does not reset the
/// connection before the client reads why it was closed.
fn discard_unread(stream: &UnixStream) {
    let mut chunk = [0u8; 4096];
    if stream.set_nonblocking(true).is_ok() {
        for _ in 0..REQUEST_LIMIT / chunk.len() + 1 {
            if !matches!((&*stream).read(&mut chunk), Ok(read) if read > 0) {
                break;
            }
        }
    }
}

/// Reads one request, answers it (or refuses a user other than root and the daemon's own) and
/// closes, each within its deadline.
fn converse(mut stream: UnixStream, admission: &Admission, daemon: u32, answer: &Answer) {
    let request = read_request(&mut stream, Instant::now() + REQUEST_DEADLINE);
    let text = match (request, Peer::of(&stream)) {
        (Err(RequestError::Io(_)), _) => return,
        (Err(error), _) => error_line(&error),
        // Closed to make room for another connection while it waited.
        (Ok(_), _) if !admission.working(true) => return,
        (Ok(_), Err(error)) => error_line(&format!("no credentials for this connection: {error}")),
        (Ok(request), Ok(peer)) => match admit_peer(peer.uid, daemon) {
            Ok(()) => {
                let mut text = answer(request.trim(), &peer).to_string();
                text.push('\n');
                text
            }
            Err(refused) => {
                tracing::warn!(pid = peer.pid, "{refused}");
                error_line(&refused)
            }
        },
    };
    let _ = write_within(
        &mut stream,
        text.as_bytes(),
        Instant::now() + REQUEST_DEADLINE,
    );
    discard_unread(&stream);
}

fn error_line(error: &dyn std::fmt::Display) -> String {
    let mut line = serde_json::json!({"error": error.to_string()}).to_string();
    line.push('\n');
    line
}

/// The first line the client sends (or all it sends before closing its side), without the
/// newline; never more than `REQUEST_LIMIT` bytes held, nothing read after `deadline`.
fn read_request(stream: &mut UnixStream, deadline: Instant) -> Result<String, RequestError> {
    let mut request = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|remaining| !remaining.is_zero())
            .ok_or(RequestError::TooSlow {
                deadline: REQUEST_DEADLINE,
            })?;
        stream.set_read_timeout(Some(remaining))?;
        let read = match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(RequestError::TooSlow {
                    deadline: REQUEST_DEADLINE,
                });
            }
            Err(error) => return Err(error.into()),
        };
        let line_end = chunk[..read].iter().position(|byte| *byte == b'\n');
        request.extend_from_slice(&chunk[..line_end.unwrap_or(read)]);
        if request.len() > REQUEST_LIMIT {
            return Err(RequestError::TooLong {
                limit: REQUEST_LIMIT,
            });
        }
        if line_end.is_some() {
            break;
        }
    }
    String::from_utf8(request).map_err(|_| RequestError::NotText)
}

/// Writes all of `bytes` unless the client takes longer than until `deadline` to read them.
fn write_within(stream: &mut UnixStream, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut written = 0;
    while written < bytes.len() {
        let remaining = deadline
            .checked_duration_since(Instant::now())
            .filter(|remaining| !remaining.is_zero())
            .ok_or(std::io::ErrorKind::TimedOut)?;
        stream.set_write_timeout(Some(remaining))?;
        match stream.write(&bytes[written..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(count) => written += count,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

/// Asks every daemon with a socket in `directory` for its status: each socket with its
/// answer. Sockets nobody listens on are skipped (a daemon that was killed leaves its socket
/// behind); a daemon that answers what cannot be read, or not in time, gets an `error` answer. A directory that exists but is not private is refused: a socket in it could be
/// anyone's.
pub fn query_all(directory: &Path) -> std::io::Result<Vec<(PathBuf, serde_json::Value)>> {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return Ok(Vec::new());
    };
    check_private(directory).map_err(std::io::Error::other)?;
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "sock")
        })
        .collect();
    paths.sort();
    Ok(paths
        .into_iter()
        .filter_map(
            |path| match request(&path, "status", Some(Duration::from_secs(5))) {
                Ok(answer) => Some((path, answer)),
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                    ) =>
                {
                    None
                }
                // A daemon that answers wrongly or not in time is named, not skipped.
                Err(error) => Some((path, serde_json::json!({"error": error.to_string()}))),
            },
        )
        .collect())
}

/// The longest answer read from a daemon: a status of thousands of VMs fits many times over.
const ANSWER_BYTES: u64 = 16 << 20;

/// Sends one request to the daemon at `path` and returns its answer, waiting at most `timeout`
/// (`None`: as long as the work takes, such as copying disks for a failover). The socket's
/// directory must be private (see `run_directory`): anyone who can write there could answer.
pub fn request(
    path: &Path,
    line: &str,
    timeout: Option<Duration>,
) -> std::io::Result<serde_json::Value> {
    if let Some(parent) = path.parent().filter(|parent| parent.exists()) {
        check_private(parent).map_err(std::io::Error::other)?;
    }
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(timeout)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    // A daemon's answer is bounded like any other input: the socket is private, but what
    // answers there is still a process this one did not write.
    let mut text = String::new();
    (&mut stream)
        .take(ANSWER_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > ANSWER_BYTES {
        return Err(std::io::Error::other(format!(
            "{}: the answer is longer than {} MiB",
            path.display(),
            ANSWER_BYTES >> 20
        )));
    }
    serde_json::from_str(&text).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests;
