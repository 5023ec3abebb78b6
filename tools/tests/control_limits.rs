//! What a client can cost a running daemon: megabytes streamed without an end at its control
//! socket or its metrics endpoint are cut off, its memory does not follow them, and it goes on
//! answering `status` and scrapes.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STREAMED: usize = 256 * 1024 * 1024;

fn blockrep(run: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_blockrep"));
    command.env("BLOCKREP_RUN_DIR", run);
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The most memory the process has held, in bytes (`VmHWM`).
fn peak_memory(process: &Child) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", process.id())).unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .unwrap();
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|number| number.parse().ok())
        .unwrap();
    kib * 1024
}

/// Writes up to `STREAMED` bytes of `x` after `start`, never a newline; how many were taken
/// before the daemon cut the stream off.
fn stream_without_end(stream: &mut impl Write, start: &[u8]) -> usize {
    let _ = stream.write_all(start);
    let chunk = vec![b'x'; 1024 * 1024];
    let mut sent = 0;
    while sent < STREAMED {
        match stream.write(&chunk) {
            Ok(count) => sent += count,
            Err(_) => break,
        }
    }
    sent
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn megabytes_streamed_at_a_daemon_are_cut_off_and_its_memory_stays_put() {
    let directory = tempfile::tempdir().unwrap();
    let run = directory.path().join("run");
    for name in ["rid", "pid"] {
        let made = blockrep(&run)
            .args(["identity", "create", "--name", name, "--out"])
            .arg(directory.path().join(name))
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
    }
    let (port, metrics) = (free_port(), format!("127.0.0.1:{}", free_port()));
    let daemon = Daemon(
        blockrep(&run)
            .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--store"])
            .arg(directory.path().join("store"))
            .arg("--identity")
            .arg(directory.path().join("rid"))
            .arg("--allow")
            .arg(directory.path().join("pid/identity.crt"))
            .args(["--metrics", &metrics])
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let socket = run.join(format!("serve-{port}.sock"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = peak_memory(&daemon.0);

    let mut scrape = std::net::TcpStream::connect(&metrics).unwrap();
    scrape
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sent = stream_without_end(&mut scrape, b"GET /metrics HTTP/1.1\r\nX-Filler: ");
    assert!(
        sent < STREAMED / 8,
        "the metrics endpoint took {sent} bytes"
    );
    let mut control = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    control
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let sent = stream_without_end(&mut control, b"");
    assert!(sent < STREAMED / 8, "the control socket took {sent} bytes");

    let after = peak_memory(&daemon.0);
    eprintln!(
        "serve's peak memory: {} KiB before, {} KiB after {} MiB offered to each",
        before / 1024,
        after / 1024,
        STREAMED >> 20
    );
    assert!(
        after < before + 64 * 1024 * 1024,
        "peak memory went from {before} to {after} bytes"
    );

    let status = blockrep(&run).args(["status", "--json"]).output().unwrap();
    assert!(status.status.success(), "{status:?}");
    let answers: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(answers[0]["role"], "replica", "{answers}");
    let mut scrape = std::net::TcpStream::connect(&metrics).unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    scrape.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    assert!(answer.contains("blockrep_replica_vms 0"), "{answer}");
}

/// A stand-in daemon at `socket` that gives `answer` to each request, until the test ends.
fn answering(socket: &Path, answer: &'static str) {
    let listener = std::os::unix::net::UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 64];
            let _ = stream.read(&mut request);
            let _ = stream.write_all(answer.as_bytes());
        }
    });
}

#[test]
fn status_names_a_daemon_that_answers_with_an_error_or_what_it_cannot_read() {
    let run = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        run.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    answering(
        &run.path().join("busy.sock"),
        r#"{"error":"too many connections; try again"}"#,
    );
    answering(
        &run.path().join("other.sock"),
        r#"{"role":"replica","listen":"x","vms":[{"vm":"vm1"}]}"#,
    );
    let status = blockrep(run.path()).arg("status").output().unwrap();
    let errors = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{errors}");
    assert!(
        errors.contains("busy.sock: too many connections; try again"),
        "{errors}"
    );
    assert!(
        errors.contains("other.sock: its status cannot be read")
            && errors.contains("missing field"),
        "{errors}"
    );
    // The raw answers stay available to scripts.
    let json = blockrep(run.path())
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert!(json.status.success(), "{json:?}");
    let answers: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(answers.as_array().map(Vec::len), Some(2), "{answers}");
}

#[test]
fn status_refuses_an_answer_longer_than_its_bound_and_names_the_daemon() {
    let run = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        run.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let listener = std::os::unix::net::UnixListener::bind(run.path().join("huge.sock")).unwrap();
    std::thread::spawn(move || {
        let filler = vec![b' '; 1 << 20];
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut request = [0u8; 64];
            let _ = stream.read(&mut request);
            for _ in 0..17 {
                if stream.write_all(&filler).is_err() {
                    break;
                }
            }
        }
    });
    let status = blockrep(run.path()).arg("status").output().unwrap();
    let errors = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(1), "{errors}");
    assert!(
        errors.contains("huge.sock") && errors.contains("longer than 16 MiB"),
        "{errors}"
    );
}
