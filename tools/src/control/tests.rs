use super::*;
use std::os::unix::fs::MetadataExt;

/// A directory for sockets, private as a daemon would make it (a temporary directory's mode
/// follows the umask).
fn private_directory() -> tempfile::TempDir {
    let directory = tempfile::tempdir().unwrap();
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    directory
}

fn echo_socket(directory: &Path) -> (PathBuf, ControlSocket) {
    let path = directory.join("serve-1.sock");
    let socket = ControlSocket::bind(&path, |request| serde_json::json!({"asked": request}))
        .expect("binding the control socket");
    (path, socket)
}

fn threads_of_this_process() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

#[test]
fn a_request_is_answered_and_the_socket_is_private_to_its_user() {
    let directory = private_directory();
    let (path, _socket) = echo_socket(directory.path());
    let answer = request(&path, "status", Some(Duration::from_secs(5))).unwrap();
    assert_eq!(answer["asked"], "status");
    let metadata = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(
        metadata.mode() & 0o777,
        0o600,
        "socket mode {:o}",
        metadata.mode()
    );
    assert_eq!(metadata.uid(), effective_user());
}

#[test]
fn a_socket_in_a_directory_others_may_write_is_neither_made_nor_asked() {
    let directory = tempfile::tempdir().unwrap();
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let error = echo_socket_error(directory.path());
    assert!(error.contains("mode 0777"), "{error}");
    let error = request(
        &directory.path().join("serve-1.sock"),
        "status",
        Some(Duration::from_secs(1)),
    )
    .unwrap_err()
    .to_string();
    assert!(
        error.contains("mode 0777") && error.contains(&directory.path().display().to_string()),
        "{error}"
    );
    let error = query_all(directory.path()).unwrap_err().to_string();
    assert!(error.contains("mode 0777"), "{error}");
}

fn echo_socket_error(directory: &Path) -> String {
    match ControlSocket::bind(&directory.join("serve-1.sock"), |_| serde_json::json!({})) {
        Ok(_) => panic!("bound in {}", directory.display()),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_request_streamed_without_a_newline_is_cut_off_at_the_limit() {
    let directory = private_directory();
    let (path, _socket) = echo_socket(directory.path());
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let offered = 64 * 1024 * 1024;
    let mut sent = 0;
    let outcome = loop {
        if sent >= offered {
            break None;
        }
        match stream.write(&chunk) {
            Ok(count) => sent += count,
            Err(error) => break Some(error),
        }
    };
    // The daemon stopped reading at the limit and closed: the stream is cut off with at most
    // the limit and what the socket buffers took, never the 64 MiB offered.
    let error = outcome.expect("the daemon read 64 MiB without a newline");
    assert!(
        matches!(
            error.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        ),
        "{error}"
    );
    assert!(sent < 16 * 1024 * 1024, "{sent} bytes taken");
    // What it said before closing, when the kernel kept it for us.
    let mut answer = String::new();
    if stream.read_to_string(&mut answer).is_ok() && !answer.is_empty() {
        assert!(answer.contains("at most 65536 bytes"), "{answer}");
    }
    // And it still answers.
    let answer = request(&path, "status", Some(Duration::from_secs(5))).unwrap();
    assert_eq!(answer["asked"], "status");
}

#[test]
fn a_request_over_the_limit_is_refused_naming_the_limit() {
    let directory = private_directory();
    let (path, _socket) = echo_socket(directory.path());
    let mut stream = UnixStream::connect(&path).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Just over the limit, with the newline: it fits the socket's buffers, so the daemon's
    // answer is there to read.
    let mut line = vec![b'x'; REQUEST_LIMIT + 1];
    line.push(b'\n');
    stream.write_all(&line).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains("at most 65536 bytes"), "{error}");
    // At the limit, it is a request like any other.
    let line = "y".repeat(REQUEST_LIMIT);
    let answer = request(&path, &line, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(answer["asked"].as_str().map(str::len), Some(REQUEST_LIMIT));
}

#[test]
fn many_idle_connections_neither_keep_a_request_out_nor_take_a_thread_each() {
    let directory = private_directory();
    let (path, _socket) = echo_socket(directory.path());
    let before = threads_of_this_process();
    let idle: Vec<UnixStream> = (0..400)
        .map(|_| UnixStream::connect(&path).unwrap())
        .collect();
    // Let the daemon accept them all.
    std::thread::sleep(Duration::from_millis(1500));
    let during = threads_of_this_process();
    let answer = request(&path, "status", Some(Duration::from_secs(5))).unwrap();
    assert_eq!(answer["asked"], "status");
    // A thread per connection would be 400 more; the limit holds it to 64 (and other tests of
    // this process run threads of their own meanwhile: the bound is generous).
    assert!(
        during < before + CONNECTION_LIMIT + 60,
        "{before} threads before, {during} with 400 idle connections"
    );
    drop(idle);
}

#[test]
fn a_client_that_sends_nothing_is_dropped_after_the_deadline() {
    let directory = private_directory();
    let (path, _socket) = echo_socket(directory.path());
    let mut stream = UnixStream::connect(&path).unwrap();
    // Half a request, then nothing.
    stream.write_all(b"stat").unwrap();
    stream
        .set_read_timeout(Some(REQUEST_DEADLINE + Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("within 10 s"), "{answer}");
    assert!(started.elapsed() < REQUEST_DEADLINE + Duration::from_secs(10));
}

/// Run by `another_user_is_refused_by_its_uid` as user 65534: connects to the socket it is
/// given and prints the answer. Does nothing in an ordinary run.
#[test]
fn connect_as_another_user_when_asked() {
    let Some(path) = std::env::var_os("BLOCKREP_TEST_CONTROL_CLIENT") else {
        return;
    };
    let mut stream = UnixStream::connect(path).unwrap();
    stream.write_all(b"status\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    println!("answer: {answer}");
}

#[test]
fn another_user_is_refused_by_its_uid() {
    use std::os::unix::process::CommandExt;
    if effective_user() != 0 {
        eprintln!("skipped: connecting as another user needs root");
        return;
    }
    let directory = private_directory();
    let (path, _socket) = echo_socket(directory.path());
    // Opened up for the test only, so that the kernel lets the other user reach the socket and
    // the daemon's own check is what refuses them.
    std::fs::set_permissions(directory.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "control::tests::connect_as_another_user_when_asked",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BLOCKREP_TEST_CONTROL_CLIENT", &path)
        .uid(65534)
        .gid(65534)
        .output();
    let output = match output {
        Ok(output) => output,
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            eprintln!("skipped: user 65534 cannot run this test binary here: {error}");
            return;
        }
        Err(error) => panic!("running the test binary as user 65534: {error}"),
    };
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("user 65534 may not use this blockrep control socket"),
        "{printed}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!printed.contains("{\"asked\""), "{printed}");
}
