//! The threads that serve NBD: one acceptor, and one thread per connection that answers its
//! requests one at a time, in order, with one reused buffer.
//!
//! Shutdown in three steps. The acceptor is woken (the server drops its end of a socket pair the
//! acceptor polls beside the listener), stops taking connections and closes the listener. Every
//! connection then finishes the request it is serving and answers each later request with
//! ESHUTDOWN, which tells the client to disconnect; the server waits for the clients to leave, up
//! to a grace period. Last, connections still open are shut at the socket, which wakes their
//! threads from any read or write, and every thread is joined.

use super::protocol::{
    ClientFlags, Command, ExportSummary, MAXIMUM_OPTION_LENGTH, Negotiation, OPTION_HEADER_LENGTH,
    OptionHeader, OptionOutcome, ProtocolError, REQUEST_LENGTH, ReplyError, Request,
    SIMPLE_REPLY_LENGTH, check_request, decode_client_flags, greeting, simple_reply,
};
use super::{ExportedDisk, NbdAddress, NbdError};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long [`NbdServer::shutdown`] (and dropping the server) waits for connected clients to
/// disconnect before closing their connections.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// The longest export name the protocol allows.
const MAXIMUM_NAME_LENGTH: usize = 4096;

/// Payloads that are refused are read and dropped in pieces of this size.
const SKIP_CHUNK: usize = 1 << 20;

/// A running NBD server. Dropping it stops it as [`NbdServer::shutdown`] does.
#[derive(Debug)]
pub struct NbdServer {
    address: NbdAddress,
    shared: Arc<Shared>,
    /// Dropping this end wakes the acceptor.
    alarm: Option<UnixStream>,
    acceptor: Option<JoinHandle<()>>,
    socket_file: Option<SocketFile>,
}

/// The unix socket file this server created, identified so that shutdown never removes a file
/// that replaced it.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

struct Export {
    name: String,
    disk: Arc<dyn ExportedDisk>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.disk.size())
            .finish()
    }
}

/// What the acceptor, the connections and the server handle share.
#[derive(Debug)]
struct Shared {
    address: NbdAddress,
    exports: Vec<Export>,
    shutting_down: AtomicBool,
    /// Connection threads that have not finished yet.
    active: Mutex<usize>,
    all_closed: Condvar,
    connections: Mutex<Vec<ConnectionThread>>,
    next_connection: AtomicU64,
}

#[derive(Debug)]
struct ConnectionThread {
    peer: String,
    /// Shared with the thread, so that shutdown can close a connection the client keeps open.
    socket: Arc<Socket>,
    handle: JoinHandle<()>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A connection thread that panicked leaves the counters and the list consistent: each is
    // changed in a single step under its lock.
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl NbdServer {
    /// Binds `address` and serves `exports` (name, disk) on background threads. The first export
    /// is also the default one, reached with the empty name.
    ///
    /// A unix socket path that exists is replaced only when it is a socket nobody listens on
    /// (left behind by a server that crashed).
    pub fn start(
        address: &NbdAddress,
        exports: Vec<(String, Arc<dyn ExportedDisk>)>,
    ) -> Result<NbdServer, NbdError> {
        check_exports(&exports)?;
        let (listener, address, socket_file) = match address {
            NbdAddress::Unix(path) => {
                let (listener, socket_file) = bind_unix(address, path)?;
                (Listener::Unix(listener), address.clone(), Some(socket_file))
            }
            NbdAddress::Tcp(socket_address) => {
                let listen_error = |source| NbdError::Listen {
                    address: address.clone(),
                    source,
                };
                let listener = TcpListener::bind(socket_address).map_err(listen_error)?;
                // Port 0 asks the kernel for a port: report the one it gave.
                let bound = listener.local_addr().map_err(listen_error)?;
                (Listener::Tcp(listener), NbdAddress::Tcp(bound), None)
            }
        };
        let result = Self::run(listener, address.clone(), exports, socket_file);
        if let Err(error) = &result {
            tracing::error!(%address, %error, "NBD server did not start");
        }
        result
    }

    fn run(
        listener: Listener,
        address: NbdAddress,
        exports: Vec<(String, Arc<dyn ExportedDisk>)>,
        socket_file: Option<SocketFile>,
    ) -> Result<NbdServer, NbdError> {
        let io_error = |action: &'static str, source: io::Error| NbdError::Io {
            address: address.clone(),
            action,
            source,
        };
        let prepared = listener
            .set_nonblocking()
            .map_err(|source| io_error("making the listener non-blocking", source))
            .and_then(|()| {
                UnixStream::pair().map_err(|source| io_error("creating the wake-up pair", source))
            });
        let (alarm, alarm_receiver) = match prepared {
            Ok(pair) => pair,
            Err(error) => {
                remove_socket_file(socket_file.as_ref());
                return Err(error);
            }
        };
        let shared = Arc::new(Shared {
            address: address.clone(),
            exports: exports
                .into_iter()
                .map(|(name, disk)| Export { name, disk })
                .collect(),
            shutting_down: AtomicBool::new(false),
            active: Mutex::new(0),
            all_closed: Condvar::new(),
            connections: Mutex::new(Vec::new()),
            next_connection: AtomicU64::new(1),
        });
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || accept_connections(&listener, &alarm_receiver, &acceptor_shared));
        match acceptor {
            Ok(acceptor) => {
                let names: Vec<&str> = shared
                    .exports
                    .iter()
                    .map(|export| export.name.as_str())
                    .collect();
                tracing::info!(%address, exports = ?names, "NBD server listening");
                Ok(NbdServer {
                    address,
                    shared,
                    alarm: Some(alarm),
                    acceptor: Some(acceptor),
                    socket_file,
                })
            }
            Err(source) => {
                remove_socket_file(socket_file.as_ref());
                Err(io_error("starting the acceptor thread", source))
            }
        }
    }

    /// Where the server listens; for a TCP port 0, the port the kernel chose.
    pub fn address(&self) -> &NbdAddress {
        &self.address
    }

    /// Stops taking connections; connected clients are told (requests from now on get
    /// ESHUTDOWN), and each connection is closed once the client leaves or after
    /// [`DEFAULT_SHUTDOWN_GRACE`]. Every thread is joined; a unix socket file is removed.
    pub fn shutdown(mut self) -> Result<(), NbdError> {
        self.stop(DEFAULT_SHUTDOWN_GRACE)
    }

    /// [`NbdServer::shutdown`], waiting at most `grace` for clients to disconnect.
    pub fn shutdown_within(mut self, grace: Duration) -> Result<(), NbdError> {
        self.stop(grace)
    }

    fn stop(&mut self, grace: Duration) -> Result<(), NbdError> {
        let Some(acceptor) = self.acceptor.take() else {
            return Ok(());
        };
        let panicked = |thread: &str| NbdError::ThreadPanicked {
            address: self.address.clone(),
            thread: thread.to_owned(),
        };
        let mut first_error = None;
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        drop(self.alarm.take());
        if acceptor.join().is_err() {
            first_error = Some(panicked("nbd-accept"));
        }
        remove_socket_file(self.socket_file.take().as_ref());

        let deadline = Instant::now() + grace;
        let mut active = lock(&self.shared.active);
        while *active > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::info!(address = %self.address, connections = *active,
                    "closing NBD connections still open after the shutdown grace period");
                break;
            }
            active = self
                .shared
                .all_closed
                .wait_timeout(active, deadline - now)
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0;
        }
        drop(active);
        let connections = std::mem::take(&mut *lock(&self.shared.connections));
        for connection in &connections {
            // Wakes a thread blocked reading or writing; one that already left is unaffected.
            let _ = connection.socket.shutdown();
        }
        for connection in connections {
            if connection.handle.join().is_err() {
                tracing::error!(address = %self.address, peer = %connection.peer,
                    "NBD connection thread panicked");
                first_error.get_or_insert_with(|| panicked(&connection.peer));
            }
        }
        tracing::info!(address = %self.address, "NBD server stopped");
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if let Err(error) = self.stop(DEFAULT_SHUTDOWN_GRACE) {
            tracing::error!(%error, "stopping the NBD server");
        }
    }
}

fn check_exports(exports: &[(String, Arc<dyn ExportedDisk>)]) -> Result<(), NbdError> {
    let invalid = |reason: String| Err(NbdError::InvalidExports { reason });
    if exports.is_empty() {
        return invalid("nothing to export: give at least one (name, disk)".into());
    }
    for (index, (name, _)) in exports.iter().enumerate() {
        if name.len() > MAXIMUM_NAME_LENGTH || name.contains('\0') {
            return invalid(format!(
                "export name {name:?} is longer than {MAXIMUM_NAME_LENGTH} bytes or holds NUL"
            ));
        }
        if name.is_empty() && index > 0 {
            return invalid(
                "only the first export may have the empty name (it is the default)".into(),
            );
        }
        if exports[..index].iter().any(|(earlier, _)| earlier == name) {
            return invalid(format!("export name {name:?} is given twice"));
        }
    }
    Ok(())
}

fn bind_unix(address: &NbdAddress, path: &Path) -> Result<(UnixListener, SocketFile), NbdError> {
    let listen_error = |source| NbdError::Listen {
        address: address.clone(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(NbdError::NotASocket {
                address: address.clone(),
            });
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(NbdError::SocketInUse {
                    address: address.clone(),
                });
            }
            // Nobody listens: a server that crashed left it behind.
            Err(error) if error.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(%address, "replacing a stale NBD socket");
                match std::fs::remove_file(path) {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => {
                        return Err(listen_error(error));
                    }
                    _ => {}
                }
            }
            Err(error) => return Err(listen_error(error)),
        },
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(listen_error(error)),
    }
    let listener = UnixListener::bind(path).map_err(listen_error)?;
    let metadata = std::fs::symlink_metadata(path).map_err(listen_error)?;
    Ok((
        listener,
        SocketFile {
            path: path.to_owned(),
            device: metadata.dev(),
            inode: metadata.ino(),
        },
    ))
}

fn remove_socket_file(socket_file: Option<&SocketFile>) {
    let Some(socket_file) = socket_file else {
        return;
    };
    let ours = std::fs::symlink_metadata(&socket_file.path).is_ok_and(|metadata| {
        metadata.dev() == socket_file.device && metadata.ino() == socket_file.inode
    });
    if ours && let Err(error) = std::fs::remove_file(&socket_file.path) {
        tracing::warn!(path = %socket_file.path.display(), %error, "cannot remove the NBD socket");
    }
}

#[derive(Debug)]
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    fn set_nonblocking(&self) -> io::Result<()> {
        // Polled before accepting, and non-blocking so that a connection that vanished between
        // the poll and the accept cannot block the acceptor.
        match self {
            Listener::Tcp(listener) => listener.set_nonblocking(true),
            Listener::Unix(listener) => listener.set_nonblocking(true),
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(listener) => listener.as_raw_fd(),
            Listener::Unix(listener) => listener.as_raw_fd(),
        }
    }

    /// The next connection, blocking and ready to serve, and how to name its peer in logs.
    fn accept(&self) -> io::Result<(Socket, String)> {
        match self {
            Listener::Tcp(listener) => {
                let (stream, peer) = listener.accept()?;
                stream.set_nonblocking(false)?;
                // Replies are written whole; waiting to coalesce them only adds latency.
                stream.set_nodelay(true)?;
                Ok((Socket::Tcp(stream), peer.to_string()))
            }
            Listener::Unix(listener) => {
                let (stream, _) = listener.accept()?;
                stream.set_nonblocking(false)?;
                Ok((Socket::Unix(stream), "unix".to_owned()))
            }
        }
    }
}

/// One client connection.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn shutdown(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(stream) => stream.shutdown(Shutdown::Both),
            Socket::Unix(stream) => stream.shutdown(Shutdown::Both),
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => (&*stream).read(buf),
            Socket::Unix(stream) => (&*stream).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(stream) => (&*stream).write(buf),
            Socket::Unix(stream) => (&*stream).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Waits until the listener has a connection (`true`) or the alarm rang (`false`): the server
/// dropped its end of the pair, which makes ours readable.
fn wait_for_connection(listener: RawFd, alarm: RawFd) -> io::Result<bool> {
    let mut descriptors = [
        libc::pollfd {
            fd: listener,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: alarm,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: poll writes only the `revents` fields of the array it is given, which lives
        // across the call; both descriptors are owned by the caller and open.
        let ready = unsafe {
            libc::poll(
                descriptors.as_mut_ptr(),
                descriptors.len() as libc::nfds_t,
                -1,
            )
        };
        if ready >= 0 {
            return Ok(descriptors[1].revents == 0);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn accept_connections(listener: &Listener, alarm: &UnixStream, shared: &Arc<Shared>) {
    while !shared.shutting_down.load(Ordering::SeqCst) {
        match wait_for_connection(listener.as_raw_fd(), alarm.as_raw_fd()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(error) => {
                tracing::error!(address = %shared.address, %error, "NBD server: poll failed");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        match listener.accept() {
            Ok((socket, peer)) => shared.start_connection(socket, peer),
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(error) => {
                tracing::warn!(address = %shared.address, %error, "NBD server: accept failed");
                // Out of descriptors or memory: let connections finish rather than spin.
                thread::sleep(Duration::from_millis(100));
            }
        }
        shared.join_finished();
    }
}

impl Shared {
    fn start_connection(self: &Arc<Self>, socket: Socket, peer: String) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let peer = format!("#{id} {peer}");
        let socket = Arc::new(socket);
        *lock(&self.active) += 1;
        let shared = Arc::clone(self);
        let thread_socket = Arc::clone(&socket);
        let thread_peer = peer.clone();
        let spawned = thread::Builder::new()
            .name(format!("nbd-conn-{id}"))
            .spawn(move || serve_connection(&shared, &thread_socket, &thread_peer));
        match spawned {
            Ok(handle) => lock(&self.connections).push(ConnectionThread {
                peer,
                socket,
                handle,
            }),
            Err(error) => {
                self.connection_finished();
                tracing::warn!(address = %self.address, %peer, %error,
                    "cannot start a thread for an NBD client; closing its connection");
            }
        }
    }

    fn connection_finished(&self) {
        *lock(&self.active) -= 1;
        self.all_closed.notify_all();
    }

    /// Joins the threads of connections that ended, releasing their sockets.
    fn join_finished(&self) {
        let finished: Vec<ConnectionThread> = lock(&self.connections)
            .extract_if(.., |connection| connection.handle.is_finished())
            .collect();
        for connection in finished {
            if connection.handle.join().is_err() {
                tracing::error!(address = %self.address, peer = %connection.peer,
                    "NBD connection thread panicked");
            }
        }
    }
}

/// Counts the connection out when its thread ends, even by a panic.
struct Leaving<'a>(&'a Shared);

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        self.0.connection_finished();
    }
}

fn serve_connection(shared: &Shared, socket: &Socket, peer: &str) {
    let _leaving = Leaving(shared);
    let mut connection = Connection {
        shared,
        socket,
        peer,
        buffer: Vec::new(),
    };
    let result = connection.run();
    // The server keeps a handle on the socket until it joins this thread: shut it now so that
    // the client sees the connection end.
    let _ = socket.shutdown();
    let stopping = shared.shutting_down.load(Ordering::SeqCst);
    match result {
        Ok(()) => tracing::debug!(%peer, "NBD client disconnected"),
        Err(ConnectionError::Io(error)) if stopping || client_left(&error) => {
            tracing::info!(%peer, %error, "NBD connection ended");
        }
        Err(error) => tracing::warn!(%peer, %error, "NBD connection closed"),
    }
}

fn client_left(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

struct Connection<'a> {
    shared: &'a Shared,
    socket: &'a Socket,
    peer: &'a str,
    /// Option data and request payloads, reused for every request. A READ's data goes after
    /// room for the reply header, so that header and data leave in one write.
    buffer: Vec<u8>,
}

impl Connection<'_> {
    fn run(&mut self) -> Result<(), ConnectionError> {
        self.write_all(&greeting())?;
        let mut flags = [0u8; 4];
        if !self.read_or_hang_up(&mut flags)? {
            return Ok(());
        }
        let client = decode_client_flags(flags)?;
        match self.negotiate(client)? {
            Some(export) => self.transmit(export),
            None => Ok(()),
        }
    }

    /// Answers options until the client picks an export (its index) or leaves (`None`).
    fn negotiate(&mut self, client: ClientFlags) -> Result<Option<usize>, ConnectionError> {
        let shared = self.shared;
        let exports: Vec<ExportSummary<'_>> = shared
            .exports
            .iter()
            .map(|export| ExportSummary {
                name: &export.name,
                size: export.disk.size(),
            })
            .collect();
        let mut replies = Vec::new();
        loop {
            let mut header = [0u8; OPTION_HEADER_LENGTH];
            if !self.read_or_hang_up(&mut header)? {
                return Ok(None);
            }
            let header = OptionHeader::decode(&header)?;
            let negotiation = Negotiation {
                exports: &exports,
                client,
                shutting_down: shared.shutting_down.load(Ordering::SeqCst),
            };
            replies.clear();
            let outcome = if header.length > MAXIMUM_OPTION_LENGTH {
                self.skip(u64::from(header.length))?;
                negotiation.refuse_oversized(header.option, &mut replies)
            } else {
                let data = self.read_into_buffer(0, header.length as usize)?;
                negotiation.answer(header.option, data, &mut replies)
            };
            self.write_all(&replies)?;
            match outcome {
                OptionOutcome::Continue => {}
                OptionOutcome::Transmit { export } => return Ok(Some(export)),
                OptionOutcome::Abort => return Ok(None),
                OptionOutcome::Refuse { reason } => return Err(ConnectionError::Refused(reason)),
            }
        }
    }

    /// Serves requests on export `index` until the client disconnects.
    fn transmit(&mut self, index: usize) -> Result<(), ConnectionError> {
        let shared = self.shared;
        let export = &shared.exports[index];
        let size = export.disk.size();
        tracing::info!(peer = %self.peer, export = %export.name, size, "NBD client connected");
        loop {
            let mut header = [0u8; REQUEST_LENGTH];
            if !self.read_or_hang_up(&mut header)? {
                return Ok(());
            }
            let request = Request::decode(&header)?;
            if request.command == Command::Disconnect {
                return Ok(());
            }
            let refusal = if shared.shutting_down.load(Ordering::SeqCst) {
                Some(ReplyError::Shutdown)
            } else {
                check_request(&request, size).err()
            };
            match refusal {
                Some(error) => {
                    tracing::debug!(peer = %self.peer, ?request, ?error, "NBD request refused");
                    self.skip(u64::from(request.payload_length()))?;
                    self.write_all(&simple_reply(Some(error), request.handle))?;
                }
                None => self.execute(export, &request)?,
            }
        }
    }

    /// Carries out a request that passed [`check_request`] and replies.
    fn execute(&mut self, export: &Export, request: &Request) -> Result<(), ConnectionError> {
        let disk = &*export.disk;
        let offset = request.offset;
        let length = request.length as usize;
        let with_fua = |result: crate::Result<()>| {
            result.and_then(|()| {
                if request.force_unit_access() {
                    disk.flush()
                } else {
                    Ok(())
                }
            })
        };
        let result = match request.command {
            Command::Read => {
                let end = SIMPLE_REPLY_LENGTH + length;
                let buffer = self.buffer(end);
                let result = disk.read_at(&mut buffer[SIMPLE_REPLY_LENGTH..end], offset);
                if result.is_ok() {
                    buffer[..SIMPLE_REPLY_LENGTH]
                        .copy_from_slice(&simple_reply(None, request.handle));
                    let mut socket = self.socket;
                    socket.write_all(&self.buffer[..end])?;
                    return Ok(());
                }
                result
            }
            Command::Write => {
                let data = self.read_into_buffer(0, length)?;
                with_fua(disk.write_at(data, offset))
            }
            Command::Flush => disk.flush(),
            // TRIM may leave anything behind; zeros are a valid answer, and WRITE_ZEROES'
            // NO_HOLE only asks not to deallocate, which costs us nothing to ignore.
            Command::Trim | Command::WriteZeroes => {
                with_fua(disk.zero_range(offset, u64::from(request.length)))
            }
            Command::Disconnect | Command::Other(_) => Ok(()),
        };
        let error = result.err().map(|error| {
            tracing::error!(peer = %self.peer, export = %export.name, command = ?request.command,
                offset, length, %error, "NBD request failed");
            reply_error(&error)
        });
        self.write_all(&simple_reply(error, request.handle))?;
        Ok(())
    }

    /// The first `length` bytes of the buffer, growing it if needed.
    fn buffer(&mut self, length: usize) -> &mut [u8] {
        if self.buffer.len() < length {
            self.buffer.resize(length, 0);
        }
        &mut self.buffer[..length]
    }

    /// Reads `length` bytes from the client into the buffer at `start`.
    fn read_into_buffer(&mut self, start: usize, length: usize) -> io::Result<&[u8]> {
        let mut socket = self.socket;
        let buffer = self.buffer(start + length);
        socket.read_exact(&mut buffer[start..])?;
        Ok(&buffer[start..])
    }

    /// Reads and drops `length` bytes the client sent with a refused request.
    fn skip(&mut self, mut length: u64) -> io::Result<()> {
        while length > 0 {
            let step = length.min(SKIP_CHUNK as u64) as usize;
            self.read_into_buffer(0, step)?;
            length -= step as u64;
        }
        Ok(())
    }

    /// Fills `buf`; `Ok(false)` when the client hung up before sending any of it.
    fn read_or_hang_up(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let mut socket = self.socket;
        let mut filled = 0;
        while filled < buf.len() {
            match socket.read(&mut buf[filled..]) {
                Ok(0) if filled == 0 => return Ok(false),
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(count) => filled += count,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        let mut socket = self.socket;
        socket.write_all(bytes)
    }
}

/// The NBD error for an engine error: what the client can act on, EIO when nothing fits better.
fn reply_error(error: &crate::Error) -> ReplyError {
    match error {
        crate::Error::OutOfRange { .. } | crate::Error::InvalidArgument { .. } => {
            ReplyError::Invalid
        }
        crate::Error::ReadOnly { .. } => ReplyError::Permission,
        crate::Error::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG)
            ) =>
        {
            ReplyError::NoSpace
        }
        _ => ReplyError::Io,
    }
}
