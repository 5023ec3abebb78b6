//! The NBD server against the clients people already use: qemu-io, qemu-img and qemu-nbd write,
//! zero, discard and read tracked disks through it, byte for byte, and every write lands in the
//! change tracking. A small client written here, independent of the server's code, covers what
//! qemu never sends: requests past the end, garbage, and a server shutting down under a client.
//!
//! The qemu tools come from Debian's qemu-utils. Where they are missing, the tests that need them
//! say so and skip, except under CI, where a missing tool is a failure.

mod common;

use blockrep::image::{Access, RawImage};
use blockrep::io::{FileStorage, MemoryStorage};
use blockrep::nbd::{ExportedDisk, NbdAddress, NbdError, NbdServer};
use blockrep::track::{DEFAULT_GRANULARITY, TrackedDisk};
use common::{have_qemu, pattern, run_ok};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

type FileDisk = TrackedDisk<RawImage<FileStorage>>;
type MemoryDisk = TrackedDisk<RawImage<MemoryStorage>>;

/// Runs qemu-io on `uri` with `commands`; qemu-io fails when a command or a pattern check fails.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut arguments = vec!["-f", "raw", uri];
    for command in commands {
        arguments.extend(["-c", command]);
    }
    run_ok("qemu-io", &arguments)
}

/// A raw image file of `bytes`, tracked.
fn file_disk(directory: &Path, name: &str, bytes: &[u8]) -> (Arc<FileDisk>, PathBuf) {
    let path = directory.join(name);
    std::fs::write(&path, bytes).unwrap();
    let storage = FileStorage::open(&path, true).unwrap();
    let image = RawImage::open(storage, name, Access::ReadWrite).unwrap();
    (
        Arc::new(TrackedDisk::new(image, DEFAULT_GRANULARITY).unwrap()),
        path,
    )
}

fn memory_disk(bytes: Vec<u8>) -> Arc<MemoryDisk> {
    let image = RawImage::open(
        MemoryStorage::from_bytes(bytes),
        "memory",
        Access::ReadWrite,
    )
    .unwrap();
    Arc::new(TrackedDisk::new(image, DEFAULT_GRANULARITY).unwrap())
}

fn unix_server(
    directory: &Path,
    exports: Vec<(&str, Arc<dyn ExportedDisk>)>,
) -> (NbdServer, PathBuf) {
    let socket = directory.join("nbd.sock");
    let exports = exports
        .into_iter()
        .map(|(name, disk)| (name.to_owned(), disk))
        .collect();
    let server = NbdServer::start(&NbdAddress::Unix(socket.clone()), exports).unwrap();
    (server, socket)
}

fn contents(disk: &dyn ExportedDisk) -> Vec<u8> {
    let mut bytes = vec![0u8; disk.size() as usize];
    disk.read_at(&mut bytes, 0).unwrap();
    bytes
}

fn fill(model: &mut [u8], offset: u64, length: u64, byte: u8) {
    model[offset as usize..(offset + length) as usize].fill(byte);
}

#[test]
fn qemu_writes_zeroes_discards_and_reads_through_the_server_and_every_write_is_tracked() {
    if !have_qemu(
        "qemu_writes_zeroes_discards_and_reads_through_the_server_and_every_write_is_tracked",
    ) {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    // Non-zero everywhere, so that zeroing and discarding show.
    let mut model = vec![0x5a; (4 * MIB) as usize];
    let (disk, image_path) = file_disk(directory.path(), "vm1.raw", &model);
    let (server, socket) = unix_server(directory.path(), vec![("vm1", disk.clone())]);
    let uri = server.address().uri("vm1");
    assert_eq!(
        uri,
        format!("nbd+unix:///vm1?socket={}", socket.to_str().unwrap())
    );

    let output = qemu_io(
        &uri,
        &[
            "write -P 0xab 4096 65536",
            "write -z 1M 128k",
            "discard 2M 64k",
            "flush",
            "read -P 0xab 4096 65536",
            "read -P 0 1M 128k",
            "read -P 0x5a 3M 64k",
        ],
    );
    assert!(
        output.contains("read 65536/65536 bytes at offset 4096"),
        "{output}"
    );
    fill(&mut model, 4096, 65536, 0xab);
    fill(&mut model, MIB, 128 * KIB, 0);
    fill(&mut model, 2 * MIB, 64 * KIB, 0);
    assert!(std::fs::read(&image_path).unwrap() == model);

    // The default export (empty name) is the first one.
    let copy = directory.path().join("copy.raw");
    let default_uri = server.address().uri("");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &default_uri,
            copy.to_str().unwrap(),
        ],
    );
    assert!(std::fs::read(&copy).unwrap() == model);

    // 4096..69632 touches the first two 64 KiB blocks; the zeroed and discarded ranges theirs.
    assert_eq!(
        disk.cut().extents(),
        vec![
            0..128 * KIB,
            MIB..MIB + 128 * KIB,
            2 * MIB..2 * MIB + 64 * KIB
        ]
    );
    server.shutdown().unwrap();
    assert!(!socket.exists());
}

/// What reached a disk, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Operation {
    Write { offset: u64, length: u64 },
    Zero { offset: u64, length: u64 },
    Flush,
}

/// Records every change and flush on its way to the disk.
struct Recording {
    disk: Arc<dyn ExportedDisk>,
    operations: Mutex<Vec<Operation>>,
}

impl Recording {
    fn new(disk: Arc<dyn ExportedDisk>) -> Arc<Self> {
        Arc::new(Recording {
            disk,
            operations: Mutex::new(Vec::new()),
        })
    }

    fn take(&self) -> Vec<Operation> {
        std::mem::take(&mut *self.operations.lock().unwrap())
    }

    fn record(&self, operation: Operation) {
        self.operations.lock().unwrap().push(operation);
    }
}

impl ExportedDisk for Recording {
    fn size(&self) -> u64 {
        self.disk.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> blockrep::Result<()> {
        self.disk.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> blockrep::Result<()> {
        let result = self.disk.write_at(buf, offset);
        self.record(Operation::Write {
            offset,
            length: buf.len() as u64,
        });
        result
    }
    fn zero_range(&self, offset: u64, length: u64) -> blockrep::Result<()> {
        let result = self.disk.zero_range(offset, length);
        self.record(Operation::Zero { offset, length });
        result
    }
    fn flush(&self) -> blockrep::Result<()> {
        let result = self.disk.flush();
        self.record(Operation::Flush);
        result
    }
}

#[test]
fn a_write_with_force_unit_access_is_flushed_before_its_reply() {
    let directory = tempfile::tempdir().unwrap();
    let disk = memory_disk(vec![0; MIB as usize]);
    let recording = Recording::new(disk.clone());
    let (server, socket) = unix_server(directory.path(), vec![("disk", recording.clone())]);

    // Our own client sends FUA and no FLUSH command: the flush can only come from the server.
    let mut client = Client::connect(&socket);
    client.go("disk");
    assert_eq!(client.write(FUA, 8192, &[0xcd; 4096]), 0);
    assert_eq!(
        recording.take(),
        vec![
            Operation::Write {
                offset: 8192,
                length: 4096
            },
            Operation::Flush
        ]
    );
    assert_eq!(client.write(0, 0, &[0xce; 512]), 0);
    assert_eq!(
        recording.take(),
        vec![Operation::Write {
            offset: 0,
            length: 512
        }]
    );
    client.request(FUA, CMD_WRITE_ZEROES, 7, 65536, 4096, &[]);
    assert_eq!(client.reply(7), 0);
    assert_eq!(
        recording.take(),
        vec![
            Operation::Zero {
                offset: 65536,
                length: 4096
            },
            Operation::Flush
        ]
    );
    client.disconnect();

    if have_qemu("a_write_with_force_unit_access_is_flushed_before_its_reply (qemu part)") {
        qemu_io(
            &server.address().uri("disk"),
            &["write -f -P 0x11 12288 4096", "read -P 0x11 12288 4096"],
        );
        let operations = recording.take();
        let write = operations
            .iter()
            .position(|operation| {
                *operation
                    == Operation::Write {
                        offset: 12288,
                        length: 4096,
                    }
            })
            .unwrap_or_else(|| panic!("qemu's write is missing: {operations:?}"));
        assert!(
            operations[write + 1..].contains(&Operation::Flush),
            "{operations:?}"
        );
        assert!(
            contents(&*disk)[12288..16384]
                .iter()
                .all(|&byte| byte == 0x11)
        );
    }
    server.shutdown().unwrap();
}

#[test]
fn exports_are_listed_and_reached_by_name_and_an_unknown_name_is_refused() {
    if !have_qemu("exports_are_listed_and_reached_by_name_and_an_unknown_name_is_refused") {
        return;
    }
    let directory = tempfile::tempdir().unwrap();
    let alpha = memory_disk(vec![0; MIB as usize]);
    let beta = memory_disk(vec![0; (2 * MIB) as usize]);
    let (server, socket) = unix_server(
        directory.path(),
        vec![("alpha", alpha.clone()), ("beta", beta.clone())],
    );

    let listing = run_ok("qemu-nbd", &["--list", "-k", socket.to_str().unwrap()]);
    assert!(listing.contains("exports available: 2"), "{listing}");
    assert!(listing.contains("export: 'alpha'"), "{listing}");
    assert!(listing.contains("export: 'beta'"), "{listing}");
    assert!(listing.contains("size:  2097152"), "{listing}");
    assert!(listing.contains("max block: 33554432"), "{listing}");

    let info = run_ok("qemu-img", &["info", &server.address().uri("beta")]);
    assert!(info.contains("virtual size: 2 MiB"), "{info}");

    qemu_io(&server.address().uri("beta"), &["write -P 0x42 1M 64k"]);
    assert!(
        contents(&*beta)[MIB as usize..(MIB + 64 * KIB) as usize]
            .iter()
            .all(|&byte| byte == 0x42)
    );
    assert!(contents(&*alpha).iter().all(|&byte| byte == 0));
    assert!(alpha.cut().extents().is_empty());
    assert_eq!(beta.cut().extents(), vec![MIB..MIB + 64 * KIB]);

    let unknown = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            &server.address().uri("gamma"),
            "-c",
            "read 0 512",
        ])
        .output()
        .unwrap();
    assert!(!unknown.status.success());
    // The server goes on serving.
    qemu_io(&server.address().uri("alpha"), &["read -P 0 0 64k"]);
    server.shutdown().unwrap();
}

#[test]
fn qemu_reaches_an_export_over_tcp_on_a_port_the_kernel_chose() {
    if !have_qemu("qemu_reaches_an_export_over_tcp_on_a_port_the_kernel_chose") {
        return;
    }
    let disk = memory_disk(vec![0; MIB as usize]);
    let address: NbdAddress = "tcp:127.0.0.1:0".parse().unwrap();
    let server = NbdServer::start(&address, vec![("disk".into(), disk.clone() as _)]).unwrap();
    let NbdAddress::Tcp(bound) = server.address() else {
        panic!("a TCP server reports {}", server.address());
    };
    assert!(bound.ip().is_loopback());
    assert_ne!(bound.port(), 0);
    let uri = server.address().uri("disk");
    assert_eq!(uri, format!("nbd://127.0.0.1:{}/disk", bound.port()));
    qemu_io(
        &uri,
        &["write -P 0x77 100000 5000", "read -P 0x77 100000 5000"],
    );
    let bytes = contents(&*disk);
    assert!(bytes[100_000..105_000].iter().all(|&byte| byte == 0x77));
    assert!(bytes[..100_000].iter().all(|&byte| byte == 0));
    assert_eq!(disk.cut().extents(), vec![64 * KIB..128 * KIB]);
    server.shutdown().unwrap();
}

#[test]
fn requests_the_server_cannot_serve_get_errors_and_the_connection_keeps_working() {
    let directory = tempfile::tempdir().unwrap();
    let size = MIB;
    let original = pattern(1, size as usize);
    let disk = memory_disk(original.clone());
    let (server, socket) = unix_server(directory.path(), vec![("disk", disk.clone())]);
    let mut client = Client::connect(&socket);
    assert_eq!(client.go("disk"), size);

    assert_eq!(client.read(size - 512, 4096), Err(EINVAL));
    assert_eq!(client.read(0, 4096), Ok(original[..4096].to_vec()));
    // The refused write's data is read and dropped: the next request is understood.
    assert_eq!(client.write(0, size - 512, &[1; 4096]), ENOSPC);
    assert_eq!(
        client.read(size - 512, 512),
        Ok(original[size as usize - 512..].to_vec())
    );
    assert_eq!(client.read(u64::MAX - 100, 200), Err(EINVAL));
    assert_eq!(client.read(0, (32 * MIB + 1) as u32), Err(EINVAL));
    client.request(0, CMD_TRIM, 9, size, 1, &[]);
    assert_eq!(client.reply(9), EINVAL);
    client.request(0, 42, 10, 0, 512, &[]);
    assert_eq!(client.reply(10), EINVAL);
    // DF needs structured replies, which were not negotiated.
    client.request(4, CMD_READ, 11, 0, 512, &[]);
    assert_eq!(client.reply(11), EINVAL);
    // A zero-length read at the very end is inside the disk.
    assert_eq!(client.read(size, 0), Ok(Vec::new()));
    assert_eq!(client.read(4096, 8192), Ok(original[4096..12288].to_vec()));

    assert!(disk.cut().extents().is_empty());
    client.disconnect();
    server.shutdown().unwrap();
}

#[test]
fn garbage_in_the_handshake_or_a_request_closes_only_that_connection() {
    let directory = tempfile::tempdir().unwrap();
    let disk = memory_disk(pattern(2, MIB as usize));
    let (server, socket) = unix_server(directory.path(), vec![("disk", disk.clone())]);

    let mut healthy = Client::connect(&socket);
    healthy.go("disk");

    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(b"GARBAGE! not NBD at all").unwrap();
    assert!(is_closed(&mut stream));

    let mut bad_option = Client::connect(&socket);
    bad_option.stream.write_all(&[0xee; 16]).unwrap();
    assert!(bad_option.is_closed());

    let mut bad_request = Client::connect(&socket);
    bad_request.go("disk");
    bad_request.stream.write_all(&[0x55; 28]).unwrap();
    assert!(bad_request.is_closed());

    // The export name option cannot carry an error: an unknown name closes the connection.
    let mut unknown = Client::connect(&socket);
    unknown.option(1, b"no such export");
    assert!(unknown.is_closed());

    assert_eq!(healthy.read(0, 512), Ok(pattern(2, 512)));
    let mut another = Client::connect(&socket);
    another.go("");
    assert_eq!(another.read(512, 512), Ok(pattern(2, 1024)[512..].to_vec()));
    healthy.disconnect();
    another.disconnect();
    server.shutdown().unwrap();
}

#[test]
fn options_are_answered_as_the_specification_says() {
    let directory = tempfile::tempdir().unwrap();
    let (server, socket) = unix_server(
        directory.path(),
        vec![
            ("first", memory_disk(vec![0; 4096])),
            ("second", memory_disk(vec![0; 8192])),
        ],
    );
    let mut client = Client::connect(&socket);
    client.option(OPT_LIST, &[]);
    assert_eq!(
        client.option_reply(),
        (OPT_LIST, 2, b"\0\0\0\x05first".to_vec())
    );
    assert_eq!(
        client.option_reply(),
        (OPT_LIST, 2, b"\0\0\0\x06second".to_vec())
    );
    assert_eq!(client.option_reply(), (OPT_LIST, REP_ACK, vec![]));
    for unsupported in [5, 8, 10, 11] {
        client.option(unsupported, &[]);
        assert_eq!(client.option_reply().1, 0x8000_0001);
    }
    client.option(OPT_GO, &go_data("third"));
    assert_eq!(client.option_reply().1, 0x8000_0006);
    // After errors the client may still choose an export.
    assert_eq!(client.go("second"), 8192);
    client.disconnect();

    // The old way in: NBD_OPT_EXPORT_NAME, with the 124 zeros because NO_ZEROES was not set.
    let mut old = Client::connect_with_flags(&socket, 1);
    old.option(1, b"first");
    let mut reply = [0u8; 8 + 2 + 124];
    old.stream.read_exact(&mut reply).unwrap();
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().unwrap()), 4096);
    assert_eq!(u16::from_be_bytes([reply[8], reply[9]]), 0x016d);
    assert!(reply[10..].iter().all(|&byte| byte == 0));
    assert_eq!(old.read(0, 4096), Ok(vec![0; 4096]));
    old.disconnect();

    let mut aborting = Client::connect(&socket);
    aborting.option(2, &[]);
    assert_eq!(aborting.option_reply(), (2, REP_ACK, vec![]));
    assert!(aborting.is_closed());
    server.shutdown().unwrap();
}

#[test]
fn shutdown_answers_later_requests_with_eshutdown_and_joins_every_thread() {
    let directory = tempfile::tempdir().unwrap();
    let disk = memory_disk(pattern(3, MIB as usize));
    let (server, socket) = unix_server(directory.path(), vec![("disk", disk.clone())]);
    let mut transmitting = Client::connect(&socket);
    transmitting.go("disk");
    assert_eq!(transmitting.read(0, 512), Ok(pattern(3, 512)));
    let mut negotiating = Client::connect(&socket);

    // Generous grace: both clients leave as soon as they are told, well before it ends.
    let stopping = std::thread::spawn(move || server.shutdown_within(Duration::from_secs(60)));
    let waiting = Instant::now();
    while socket.exists() {
        assert!(
            waiting.elapsed() < Duration::from_secs(30),
            "the socket stays"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(UnixStream::connect(&socket).is_err());

    assert_eq!(transmitting.read(0, 512), Err(ESHUTDOWN));
    assert_eq!(transmitting.write(0, 0, &[9; 4096]), ESHUTDOWN);
    transmitting.disconnect();
    assert!(transmitting.is_closed());

    negotiating.option(OPT_LIST, &[]);
    assert_eq!(negotiating.option_reply().1, 0x8000_0007);
    negotiating.option(2, &[]);
    assert_eq!(negotiating.option_reply(), (2, REP_ACK, vec![]));
    assert!(negotiating.is_closed());

    stopping.join().unwrap().unwrap();
    assert_eq!(contents(&*disk), pattern(3, MIB as usize));
}

#[test]
fn a_client_that_stays_silent_is_disconnected_when_the_grace_period_ends() {
    let directory = tempfile::tempdir().unwrap();
    let (server, socket) =
        unix_server(directory.path(), vec![("disk", memory_disk(vec![0; 4096]))]);
    let mut idle = Client::connect(&socket);
    idle.go("disk");
    let mut silent = Client::connect(&socket);
    server.shutdown_within(Duration::from_millis(50)).unwrap();
    assert!(idle.is_closed());
    assert!(silent.is_closed());
}

#[test]
fn a_stale_socket_is_replaced_but_a_live_one_or_a_regular_file_is_not() {
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("nbd.sock");
    let address = NbdAddress::Unix(path.clone());
    let exports = || {
        vec![(
            "disk".to_owned(),
            memory_disk(vec![0; 4096]) as Arc<dyn ExportedDisk>,
        )]
    };

    std::fs::write(&path, b"precious").unwrap();
    assert!(matches!(
        NbdServer::start(&address, exports()),
        Err(NbdError::NotASocket { .. })
    ));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();

    // A server that died leaves its socket file behind.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let server = NbdServer::start(&address, exports()).unwrap();
    assert!(matches!(
        NbdServer::start(&address, exports()),
        Err(NbdError::SocketInUse { .. })
    ));
    let mut client = Client::connect(&path);
    client.go("disk");
    client.disconnect();
    server.shutdown().unwrap();
    assert!(!path.exists());
}

#[test]
fn dropping_the_server_stops_it_and_removes_its_socket() {
    let directory = tempfile::tempdir().unwrap();
    let (server, socket) =
        unix_server(directory.path(), vec![("disk", memory_disk(vec![0; 4096]))]);
    let mut client = Client::connect(&socket);
    client.go("disk");
    client.disconnect();
    drop(server);
    assert!(!socket.exists());
    assert!(UnixStream::connect(&socket).is_err());
}

#[test]
fn exports_without_a_disk_or_with_clashing_names_are_refused() {
    let address: NbdAddress = "tcp:127.0.0.1:0".parse().unwrap();
    let disk = || memory_disk(vec![0; 4096]) as Arc<dyn ExportedDisk>;
    for exports in [
        vec![],
        vec![("a".to_owned(), disk()), ("a".to_owned(), disk())],
        vec![("a".to_owned(), disk()), (String::new(), disk())],
        vec![("a\0b".to_owned(), disk())],
    ] {
        assert!(matches!(
            NbdServer::start(&address, exports),
            Err(NbdError::InvalidExports { .. })
        ));
    }
}

// A client written from the specification, sharing nothing with the server's code.

const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FUA: u16 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ESHUTDOWN: u32 = 108;

fn go_data(name: &str) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    // One information request: NBD_INFO_BLOCK_SIZE.
    data.extend_from_slice(&[0, 1, 0, 3]);
    data
}

fn is_closed(stream: &mut UnixStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(error) if error.kind() == ErrorKind::ConnectionReset => true,
        Ok(_) => false,
        Err(error) => panic!("waiting for the server to close: {error}"),
    }
}

struct Client {
    stream: UnixStream,
    next_handle: u64,
}

impl Client {
    /// Connects and answers the greeting with FIXED_NEWSTYLE and NO_ZEROES.
    fn connect(socket: &Path) -> Self {
        Self::connect_with_flags(socket, 3)
    }

    fn connect_with_flags(socket: &Path, flags: u32) -> Self {
        let mut stream = UnixStream::connect(socket).unwrap();
        // A server that stops answering fails the test instead of hanging it.
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(u16::from_be_bytes([greeting[16], greeting[17]]), 3);
        stream.write_all(&flags.to_be_bytes()).unwrap();
        Client {
            stream,
            next_handle: 1000,
        }
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut bytes = b"IHAVEOPT".to_vec();
        bytes.extend_from_slice(&option.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.stream.write_all(&bytes).unwrap();
    }

    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut header = [0u8; 20];
        self.stream.read_exact(&mut header).unwrap();
        assert_eq!(
            u64::from_be_bytes(header[..8].try_into().unwrap()),
            0x0003_e889_0455_65a9
        );
        let option = u32::from_be_bytes(header[8..12].try_into().unwrap());
        let reply = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(header[16..20].try_into().unwrap()) as usize];
        self.stream.read_exact(&mut data).unwrap();
        (option, reply, data)
    }

    /// Enters transmission on `name` with NBD_OPT_GO; returns the export's size.
    fn go(&mut self, name: &str) -> u64 {
        self.option(OPT_GO, &go_data(name));
        let mut size = None;
        let mut block_sizes = None;
        loop {
            let (option, reply, data) = self.option_reply();
            assert_eq!(option, OPT_GO);
            match reply {
                REP_ACK => break,
                REP_INFO if data[..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    assert_eq!(u16::from_be_bytes([data[10], data[11]]), 0x016d);
                }
                REP_INFO if data[..2] == [0, 3] => block_sizes = Some(data[2..].to_vec()),
                REP_INFO => {}
                error => panic!("GO {name:?} answered with {error:#x}"),
            }
        }
        assert_eq!(
            block_sizes,
            Some(
                [1u32, 4096, 32 << 20]
                    .iter()
                    .flat_map(|value| value.to_be_bytes())
                    .collect()
            )
        );
        size.expect("GO succeeded without NBD_INFO_EXPORT")
    }

    fn request(
        &mut self,
        flags: u16,
        command: u16,
        handle: u64,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut bytes = vec![0x25, 0x60, 0x95, 0x13];
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&handle.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(payload);
        self.stream.write_all(&bytes).unwrap();
    }

    /// Reads a simple reply for `handle`; returns its error (0 for success).
    fn reply(&mut self, handle: u64) -> u32 {
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), handle);
        u32::from_be_bytes(reply[4..8].try_into().unwrap())
    }

    fn handle(&mut self) -> u64 {
        self.next_handle += 1;
        self.next_handle
    }

    fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        let handle = self.handle();
        self.request(0, CMD_READ, handle, offset, length, &[]);
        match self.reply(handle) {
            0 => {
                let mut data = vec![0u8; length as usize];
                self.stream.read_exact(&mut data).unwrap();
                Ok(data)
            }
            error => Err(error),
        }
    }

    fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let handle = self.handle();
        self.request(flags, CMD_WRITE, handle, offset, data.len() as u32, data);
        self.reply(handle)
    }

    fn disconnect(&mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
    }

    fn is_closed(&mut self) -> bool {
        is_closed(&mut self.stream)
    }
}
