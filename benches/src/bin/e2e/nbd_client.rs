//! Just enough of an NBD client to write changes into a protected disk the way a VM would:
//! the fixed newstyle handshake with NBD_OPT_EXPORT_NAME, then WRITE, FLUSH and DISC with
//! simple replies. Written here (not a crate) because the harness needs only these three
//! requests and no maintained Rust NBD client crate offers a small synchronous one.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
const OPTION_MAGIC: u64 = 0x4948_4156_454f_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u32 = 1;
const FLAG_NO_ZEROES: u32 = 2;
const OPTION_EXPORT_NAME: u32 = 1;
const COMMAND_WRITE: u16 = 1;
const COMMAND_DISCONNECT: u16 = 2;
const COMMAND_FLUSH: u16 = 3;

pub struct NbdClient {
    stream: UnixStream,
    handle: u64,
}

fn read_u64(stream: &mut UnixStream) -> io::Result<u64> {
    let mut bytes = [0u8; 8];
    stream.read_exact(&mut bytes)?;
    Ok(u64::from_be_bytes(bytes))
}

impl NbdClient {
    /// Connects to the default export of the server at `socket`.
    pub fn connect(socket: &Path) -> io::Result<Self> {
        let mut stream = UnixStream::connect(socket)?;
        let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_owned());
        if read_u64(&mut stream)? != NBD_MAGIC || read_u64(&mut stream)? != OPTION_MAGIC {
            return Err(invalid("not an NBD server"));
        }
        let mut flags = [0u8; 2];
        stream.read_exact(&mut flags)?;
        let zeroes_skipped = u16::from_be_bytes(flags) & 2 != 0;
        let client_flags = FLAG_FIXED_NEWSTYLE | if zeroes_skipped { FLAG_NO_ZEROES } else { 0 };
        stream.write_all(&client_flags.to_be_bytes())?;
        let mut option = Vec::with_capacity(16);
        option.extend_from_slice(&OPTION_MAGIC.to_be_bytes());
        option.extend_from_slice(&OPTION_EXPORT_NAME.to_be_bytes());
        option.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&option)?;
        let _size = read_u64(&mut stream)?;
        let mut transmission_flags = [0u8; 2];
        stream.read_exact(&mut transmission_flags)?;
        if !zeroes_skipped {
            let mut zeroes = [0u8; 124];
            stream.read_exact(&mut zeroes)?;
        }
        Ok(NbdClient { stream, handle: 0 })
    }

    fn request(&mut self, command: u16, offset: u64, data: &[u8], length: u32) -> io::Result<()> {
        self.handle += 1;
        let mut header = Vec::with_capacity(28);
        header.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&command.to_be_bytes());
        header.extend_from_slice(&self.handle.to_be_bytes());
        header.extend_from_slice(&offset.to_be_bytes());
        header.extend_from_slice(&length.to_be_bytes());
        self.stream.write_all(&header)?;
        self.stream.write_all(data)?;
        if command == COMMAND_DISCONNECT {
            return Ok(());
        }
        let mut reply = [0u8; 16];
        self.stream.read_exact(&mut reply)?;
        let magic = u32::from_be_bytes([reply[0], reply[1], reply[2], reply[3]]);
        let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
        if magic != REPLY_MAGIC || reply[8..16] != self.handle.to_be_bytes() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "bad NBD reply"));
        }
        if error != 0 {
            return Err(io::Error::other(format!(
                "NBD request failed with error {error}"
            )));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.request(COMMAND_WRITE, offset, data, data.len() as u32)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.request(COMMAND_FLUSH, 0, &[], 0)
    }

    pub fn disconnect(mut self) -> io::Result<()> {
        self.request(COMMAND_DISCONNECT, 0, &[], 0)
    }
}
