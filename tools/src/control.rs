//! The local control socket through which `blockrep status` asks running daemons how they are
//! (and `blockrep suspend` / `resume` tell a primary to pause or go on). Each `serve` and
//! `protect` listens on a unix socket in the run directory; a client sends one request line
//! (`status`, `suspend`, `resume`), reads one JSON document, and the connection closes. The
//! socket is removed when the daemon stops.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Where daemons put their sockets: `$BLOCKREP_RUN_DIR`, else `/run/blockrep` for root and
/// `/tmp/blockrep-UID` for anyone else.
pub fn run_directory() -> PathBuf {
    if let Some(directory) = std::env::var_os("BLOCKREP_RUN_DIR") {
        return PathBuf::from(directory);
    }
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        PathBuf::from("/run/blockrep")
    } else {
        PathBuf::from(format!("/tmp/blockrep-{uid}"))
    }
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
        let answer = Arc::new(answer);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another blockrep", path.display()),
            ));
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        let (stop, thread) = accept_until_stopped(
            "control",
            move || listener.accept(),
            move |(mut stream, _)| {
                // A thread per request: a long one (a failover's copy) must not keep `status`
                // waiting.
                let answer = Arc::clone(&answer);
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut request = String::new();
                    if let Ok(reader) = stream.try_clone() {
                        let _ = BufReader::new(reader).read_line(&mut request);
                    }
                    let mut text = answer(request.trim()).to_string();
                    text.push('\n');
                    let _ = stream.write_all(text.as_bytes());
                });
            },
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

/// Asks every daemon with a socket in `directory`; sockets nobody answers on are skipped
/// (a daemon that was killed leaves its socket behind).
pub fn query_all(directory: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(directory) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|extension| extension == "sock")
        })
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|path| request(path, "status", Some(Duration::from_secs(5))).ok())
        .collect()
}

/// Sends one request to the daemon at `path` and returns its answer, waiting at most `timeout`
/// (`None`: as long as the work takes, such as copying disks for a failover).
pub fn request(
    path: &Path,
    line: &str,
    timeout: Option<Duration>,
) -> std::io::Result<serde_json::Value> {
    let mut stream = UnixStream::connect(path)?;
    stream.set_read_timeout(timeout)?;
    stream.write_all(format!("{line}\n").as_bytes())?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(std::io::Error::other)
}
