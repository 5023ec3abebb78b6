//! The NBD wire format, from the protocol specification (fixed newstyle handshake, simple
//! replies): its constants, pure functions that encode and decode the greeting, options, requests
//! and replies, and the decisions that need no socket (which replies an option gets, whether a
//! request is valid). It never touches a socket, a disk or a clock: `server` does.
//!
//! Every number on the wire is big-endian.

/// "NBDMAGIC", first in the greeting.
pub(crate) const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": second in the greeting, and first in every option the client sends.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// First in every reply to an option.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

// Handshake flags (server) and client flags.
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
const FLAG_HAS_FLAGS: u16 = 1 << 0;
const FLAG_SEND_FLUSH: u16 = 1 << 2;
const FLAG_SEND_FUA: u16 = 1 << 3;
const FLAG_SEND_TRIM: u16 = 1 << 5;
const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// What every export offers. Multiple connections are safe because every connection writes to
/// the same disk object, so a flush on one covers the writes of all.
pub(crate) const TRANSMISSION_FLAGS: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

// Options.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

// Option reply types; errors have bit 31 set.
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// Information types in NBD_REP_INFO.
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

// Command flags.
const CMD_FLAG_FUA: u16 = 1 << 0;
const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Any offset and length is served: the disks do their own read-modify-write.
pub(crate) const MINIMUM_BLOCK_SIZE: u32 = 1;
pub(crate) const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// The largest READ or WRITE payload, advertised in NBD_INFO_BLOCK_SIZE. It is the size every
/// client keeps to for interoperability, and it bounds the buffer of each connection.
pub(crate) const MAXIMUM_PAYLOAD: u32 = 32 << 20;

/// Option data larger than this is skipped unread and refused: no option we understand needs
/// more than an export name (at most 4096 bytes) and a short list.
pub(crate) const MAXIMUM_OPTION_LENGTH: u32 = 64 << 10;

pub(crate) const GREETING_LENGTH: usize = 18;
pub(crate) const OPTION_HEADER_LENGTH: usize = 16;
pub(crate) const REQUEST_LENGTH: usize = 28;
pub(crate) const SIMPLE_REPLY_LENGTH: usize = 16;

/// A client broke the protocol so badly that the connection cannot continue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ProtocolError {
    #[error("client flags {0:#x} include flags this server did not offer")]
    UnknownClientFlags(u32),
    #[error("option starts with {0:#018x}, not the IHAVEOPT magic")]
    BadOptionMagic(u64),
    #[error("request starts with {0:#010x}, not the request magic")]
    BadRequestMagic(u32),
}

/// The server's greeting: NBDMAGIC, IHAVEOPT, then the handshake flags.
pub(crate) fn greeting() -> [u8; GREETING_LENGTH] {
    let mut bytes = [0u8; GREETING_LENGTH];
    bytes[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    bytes[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    bytes[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    bytes
}

/// What the client answered to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientFlags {
    /// The 124 bytes of zeros after an NBD_OPT_EXPORT_NAME reply are left out.
    pub no_zeroes: bool,
}

pub(crate) fn decode_client_flags(bytes: [u8; 4]) -> Result<ClientFlags, ProtocolError> {
    let flags = u32::from_be_bytes(bytes);
    // The specification says to drop a client that sets a flag we did not offer. A client
    // without FIXED_NEWSTYLE is served as a fixed one anyway: it only ever sends EXPORT_NAME.
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The fixed part of an option the client sends; `length` bytes of data follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OptionHeader {
    pub option: u32,
    pub length: u32,
}

impl OptionHeader {
    pub(crate) fn decode(bytes: &[u8; OPTION_HEADER_LENGTH]) -> Result<Self, ProtocolError> {
        let magic = u64::from_be_bytes(field(bytes, 0));
        if magic != IHAVEOPT {
            return Err(ProtocolError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            option: u32::from_be_bytes(field(bytes, 8)),
            length: u32::from_be_bytes(field(bytes, 12)),
        })
    }
}

/// Appends one option reply: magic, the option it answers, the reply type, and its data.
pub(crate) fn push_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Our replies are at most a name of 4096 bytes and a few fields, far below u32::MAX.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// What the server offers under one name, as the handshake sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExportSummary<'a> {
    pub name: &'a str,
    pub size: u64,
}

/// Where the handshake stands when answering an option.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Negotiation<'a> {
    /// The exports; the first is also the default, reached with the empty name.
    pub exports: &'a [ExportSummary<'a>],
    pub client: ClientFlags,
    /// The server is stopping: options are refused with NBD_REP_ERR_SHUTDOWN.
    pub shutting_down: bool,
}

/// What happens after the replies to an option are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OptionOutcome {
    /// Wait for the client's next option.
    Continue,
    /// The transmission phase starts, on the export with this index.
    Transmit { export: usize },
    /// The client asked to end the session (NBD_OPT_ABORT).
    Abort,
    /// The session must end without a reply (NBD_OPT_EXPORT_NAME cannot carry an error).
    Refuse { reason: String },
}

impl Negotiation<'_> {
    /// The export a name selects: the empty name is the default export.
    fn find(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() && !self.exports.is_empty() {
            return Some(0);
        }
        self.exports
            .iter()
            .position(|export| export.name.as_bytes() == name)
    }

    /// Answers one option with its `data`, appending the replies to `out`.
    pub(crate) fn answer(&self, option: u32, data: &[u8], out: &mut Vec<u8>) -> OptionOutcome {
        if option == OPT_ABORT {
            push_option_reply(out, option, REP_ACK, &[]);
            return OptionOutcome::Abort;
        }
        if self.shutting_down {
            if option == OPT_EXPORT_NAME {
                return OptionOutcome::Refuse {
                    reason: "the server is shutting down".into(),
                };
            }
            push_option_reply(
                out,
                option,
                REP_ERR_SHUTDOWN,
                b"the server is shutting down",
            );
            return OptionOutcome::Continue;
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(data, out),
            OPT_LIST => {
                if !data.is_empty() {
                    push_option_reply(out, option, REP_ERR_INVALID, b"LIST takes no data");
                    return OptionOutcome::Continue;
                }
                for export in self.exports {
                    let mut entry = Vec::with_capacity(4 + export.name.len());
                    entry.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    entry.extend_from_slice(export.name.as_bytes());
                    push_option_reply(out, option, REP_SERVER, &entry);
                }
                push_option_reply(out, option, REP_ACK, &[]);
                OptionOutcome::Continue
            }
            OPT_INFO | OPT_GO => self.info(option, data, out),
            // STARTTLS, STRUCTURED_REPLY, the metadata contexts, EXTENDED_HEADERS and anything
            // newer: clients fall back to plain transmission with simple replies.
            _ => {
                push_option_reply(out, option, REP_ERR_UNSUP, &[]);
                OptionOutcome::Continue
            }
        }
    }

    fn export_name(&self, name: &[u8], out: &mut Vec<u8>) -> OptionOutcome {
        let Some(export) = self.find(name) else {
            return OptionOutcome::Refuse {
                reason: format!(
                    "the client asked for export {:?}, which does not exist",
                    String::from_utf8_lossy(name)
                ),
            };
        };
        out.extend_from_slice(&self.exports[export].size.to_be_bytes());
        out.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        if !self.client.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        OptionOutcome::Transmit { export }
    }

    fn info(&self, option: u32, data: &[u8], out: &mut Vec<u8>) -> OptionOutcome {
        let Some(request) = InfoRequest::decode(data) else {
            push_option_reply(
                out,
                option,
                REP_ERR_INVALID,
                b"malformed INFO or GO: name and information requests do not fit the length",
            );
            return OptionOutcome::Continue;
        };
        let Some(export) = self.find(request.name) else {
            push_option_reply(out, option, REP_ERR_UNKNOWN, b"no export of that name");
            return OptionOutcome::Continue;
        };
        let summary = self.exports[export];
        let mut information = Vec::with_capacity(14);
        information.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        information.extend_from_slice(&summary.size.to_be_bytes());
        information.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
        push_option_reply(out, option, REP_INFO, &information);
        // Sent whether asked or not: our maximum payload is not the default (unlimited), and
        // the specification lets a server send information the client did not ask for.
        information.clear();
        information.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        information.extend_from_slice(&MINIMUM_BLOCK_SIZE.to_be_bytes());
        information.extend_from_slice(&PREFERRED_BLOCK_SIZE.to_be_bytes());
        information.extend_from_slice(&MAXIMUM_PAYLOAD.to_be_bytes());
        push_option_reply(out, option, REP_INFO, &information);
        if request.asks_for(INFO_NAME) {
            information.clear();
            information.extend_from_slice(&INFO_NAME.to_be_bytes());
            information.extend_from_slice(summary.name.as_bytes());
            push_option_reply(out, option, REP_INFO, &information);
        }
        push_option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            OptionOutcome::Transmit { export }
        } else {
            OptionOutcome::Continue
        }
    }

    /// Answers an option whose data was too large to read (and was skipped).
    pub(crate) fn refuse_oversized(&self, option: u32, out: &mut Vec<u8>) -> OptionOutcome {
        if option == OPT_EXPORT_NAME {
            return OptionOutcome::Refuse {
                reason: "export name longer than any export".into(),
            };
        }
        push_option_reply(out, option, REP_ERR_TOO_BIG, b"option data too large");
        OptionOutcome::Continue
    }
}

/// The data of NBD_OPT_INFO and NBD_OPT_GO: a name, then a list of information types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoRequest<'a> {
    pub name: &'a [u8],
    /// The big-endian 16-bit information types, as sent.
    pub requests: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// `None` when the lengths inside do not add up to the option's length.
    pub(crate) fn decode(data: &'a [u8]) -> Option<Self> {
        let name_length = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
        let name_end = 4usize.checked_add(name_length)?;
        let name = data.get(4..name_end)?;
        let count = u16::from_be_bytes(data.get(name_end..name_end + 2)?.try_into().ok()?);
        let requests = &data[name_end + 2..];
        if requests.len() != 2 * usize::from(count) {
            return None;
        }
        Some(InfoRequest { name, requests })
    }

    fn asks_for(&self, information: u16) -> bool {
        self.requests
            .chunks_exact(2)
            .any(|pair| pair == information.to_be_bytes())
    }
}

/// A transmission command, as the request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    WriteZeroes,
    /// CACHE, BLOCK_STATUS (needs structured replies), RESIZE, or anything unknown: refused.
    Other(u16),
}

impl Command {
    fn from_wire(value: u16) -> Self {
        match value {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disconnect,
            3 => Command::Flush,
            4 => Command::Trim,
            6 => Command::WriteZeroes,
            other => Command::Other(other),
        }
    }
}

/// One transmission request; a WRITE is followed by `length` bytes of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Request {
    pub flags: u16,
    pub command: Command,
    /// Echoed in the reply so the client can match it.
    pub handle: u64,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub(crate) fn decode(bytes: &[u8; REQUEST_LENGTH]) -> Result<Self, ProtocolError> {
        let magic = u32::from_be_bytes(field(bytes, 0));
        if magic != REQUEST_MAGIC {
            return Err(ProtocolError::BadRequestMagic(magic));
        }
        Ok(Request {
            flags: u16::from_be_bytes(field(bytes, 4)),
            command: Command::from_wire(u16::from_be_bytes(field(bytes, 6))),
            handle: u64::from_be_bytes(field(bytes, 8)),
            offset: u64::from_be_bytes(field(bytes, 16)),
            length: u32::from_be_bytes(field(bytes, 24)),
        })
    }

    /// The bytes of data that follow the request on the wire.
    pub(crate) fn payload_length(&self) -> u32 {
        match self.command {
            Command::Write => self.length,
            _ => 0,
        }
    }

    /// The change must be durable before the reply (Force Unit Access).
    pub(crate) fn force_unit_access(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
}

/// The errors a reply can carry, with the values the specification fixes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyError {
    Permission,
    Io,
    Invalid,
    NoSpace,
    Shutdown,
}

impl ReplyError {
    pub(crate) fn code(self) -> u32 {
        match self {
            ReplyError::Permission => 1,
            ReplyError::Io => 5,
            ReplyError::Invalid => 22,
            ReplyError::NoSpace => 28,
            ReplyError::Shutdown => 108,
        }
    }
}

/// Whether the server can carry out `request` on an export of `export_size` bytes, and if not,
/// the error it answers with (the connection goes on either way).
pub(crate) fn check_request(request: &Request, export_size: u64) -> Result<(), ReplyError> {
    // FUA is accepted on every command, as the specification requires once SEND_FUA is offered;
    // NO_HOLE only on WRITE_ZEROES. Anything else (DF, REQ_ONE, FAST_ZERO) was never offered.
    let allowed = match request.command {
        Command::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        Command::Other(_) => return Err(ReplyError::Invalid),
        _ => CMD_FLAG_FUA,
    };
    if request.flags & !allowed != 0 {
        return Err(ReplyError::Invalid);
    }
    match request.command {
        Command::Read | Command::Write if request.length > MAXIMUM_PAYLOAD => {
            Err(ReplyError::Invalid)
        }
        Command::Read | Command::Write | Command::Trim | Command::WriteZeroes => {
            let fits = request
                .offset
                .checked_add(u64::from(request.length))
                .is_some_and(|end| end <= export_size);
            match (fits, request.command) {
                (true, _) => Ok(()),
                // The specification's choice: ENOSPC for writes past the end, EINVAL otherwise.
                (false, Command::Write | Command::WriteZeroes) => Err(ReplyError::NoSpace),
                (false, _) => Err(ReplyError::Invalid),
            }
        }
        // Offset and length of FLUSH and DISC are reserved; they are not looked at. (Other
        // commands were refused above.)
        Command::Flush | Command::Disconnect | Command::Other(_) => Ok(()),
    }
}

/// The header of a simple reply; a successful READ's data follows it.
pub(crate) fn simple_reply(error: Option<ReplyError>, handle: u64) -> [u8; SIMPLE_REPLY_LENGTH] {
    let mut bytes = [0u8; SIMPLE_REPLY_LENGTH];
    bytes[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    bytes[4..8].copy_from_slice(&error.map_or(0, ReplyError::code).to_be_bytes());
    bytes[8..16].copy_from_slice(&handle.to_be_bytes());
    bytes
}

/// `N` bytes of `bytes` from `at`; the callers' fixed-size arrays always hold them.
fn field<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPORTS: [ExportSummary<'static>; 2] = [
        ExportSummary {
            name: "system",
            size: 1 << 30,
        },
        ExportSummary {
            name: "data",
            size: 4096,
        },
    ];

    fn negotiation(shutting_down: bool) -> Negotiation<'static> {
        Negotiation {
            exports: &EXPORTS,
            client: ClientFlags { no_zeroes: true },
            shutting_down,
        }
    }

    /// Splits option replies back into (option, type, data), checking each magic.
    fn replies(mut bytes: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            assert_eq!(&bytes[0..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
            let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap());
            let reply = u32::from_be_bytes(bytes[12..16].try_into().unwrap());
            let length = u32::from_be_bytes(bytes[16..20].try_into().unwrap()) as usize;
            out.push((option, reply, bytes[20..20 + length].to_vec()));
            bytes = &bytes[20 + length..];
        }
        out
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        data
    }

    #[test]
    fn the_greeting_is_nbdmagic_ihaveopt_and_fixed_newstyle_with_no_zeroes() {
        assert_eq!(&greeting(), b"NBDMAGICIHAVEOPT\x00\x03");
    }

    #[test]
    fn client_flags_beyond_fixed_newstyle_and_no_zeroes_are_refused() {
        assert_eq!(
            decode_client_flags([0, 0, 0, 3]),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            decode_client_flags([0, 0, 0, 1]),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            decode_client_flags([0, 0, 0, 4]),
            Err(ProtocolError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn an_option_header_needs_the_ihaveopt_magic() {
        let mut bytes = *b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0c";
        assert_eq!(
            OptionHeader::decode(&bytes),
            Ok(OptionHeader {
                option: 7,
                length: 12
            })
        );
        bytes[0] = b'X';
        assert!(matches!(
            OptionHeader::decode(&bytes),
            Err(ProtocolError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn go_answers_export_information_block_sizes_and_ack_then_transmits() {
        let mut out = Vec::new();
        let outcome = negotiation(false).answer(7, &go_data("data", &[3]), &mut out);
        assert_eq!(outcome, OptionOutcome::Transmit { export: 1 });
        let replies = replies(&out);
        assert_eq!(replies.len(), 3);
        // NBD_INFO_EXPORT: type 0, size, flags HAS_FLAGS|FLUSH|FUA|TRIM|WRITE_ZEROES|MULTI_CONN.
        assert_eq!(
            replies[0],
            (7, 3, vec![0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x01, 0x6d])
        );
        // NBD_INFO_BLOCK_SIZE: minimum 1, preferred 4096, maximum 32 MiB.
        assert_eq!(
            replies[1],
            (7, 3, vec![0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0])
        );
        assert_eq!(replies[2], (7, 1, vec![]));
    }

    #[test]
    fn info_with_the_empty_name_describes_the_first_export_and_stays_in_the_handshake() {
        let mut out = Vec::new();
        let outcome = negotiation(false).answer(6, &go_data("", &[1]), &mut out);
        assert_eq!(outcome, OptionOutcome::Continue);
        let replies = replies(&out);
        assert_eq!(&replies[0].2[2..10], &(1u64 << 30).to_be_bytes());
        // The name was asked for: the canonical name of the default export comes back.
        assert!(replies.contains(&(6, 3, b"\x00\x01system".to_vec())));
        assert_eq!(replies.last(), Some(&(6, 1, vec![])));
    }

    #[test]
    fn go_for_an_unknown_export_is_answered_with_err_unknown() {
        let mut out = Vec::new();
        let outcome = negotiation(false).answer(7, &go_data("missing", &[]), &mut out);
        assert_eq!(outcome, OptionOutcome::Continue);
        let replies = replies(&out);
        assert_eq!(replies.len(), 1);
        assert_eq!(replies[0].1, 0x8000_0006);
    }

    #[test]
    fn go_whose_lengths_do_not_add_up_is_invalid() {
        for data in [
            vec![0, 0, 0],
            vec![0, 0, 0, 9, b'a', 0, 0],
            vec![0xff, 0xff, 0xff, 0xff, 0, 0],
            {
                let mut data = go_data("data", &[3]);
                data.push(0);
                data
            },
            go_data("data", &[3])[..9].to_vec(),
        ] {
            let mut out = Vec::new();
            assert_eq!(
                negotiation(false).answer(7, &data, &mut out),
                OptionOutcome::Continue
            );
            assert_eq!(replies(&out)[0].1, 0x8000_0003, "{data:?}");
        }
    }

    #[test]
    fn list_names_every_export_then_acks() {
        let mut out = Vec::new();
        assert_eq!(
            negotiation(false).answer(3, &[], &mut out),
            OptionOutcome::Continue
        );
        assert_eq!(
            replies(&out),
            vec![
                (3, 2, b"\x00\x00\x00\x06system".to_vec()),
                (3, 2, b"\x00\x00\x00\x04data".to_vec()),
                (3, 1, vec![]),
            ]
        );
    }

    #[test]
    fn structured_replies_tls_and_unknown_options_are_unsupported() {
        for option in [5, 8, 9, 10, 11, 1000] {
            let mut out = Vec::new();
            assert_eq!(
                negotiation(false).answer(option, &[], &mut out),
                OptionOutcome::Continue
            );
            assert_eq!(replies(&out), vec![(option, 0x8000_0001, vec![])]);
        }
    }

    #[test]
    fn abort_is_acknowledged_even_while_shutting_down() {
        let mut out = Vec::new();
        assert_eq!(
            negotiation(true).answer(2, &[], &mut out),
            OptionOutcome::Abort
        );
        assert_eq!(replies(&out), vec![(2, 1, vec![])]);
    }

    #[test]
    fn options_during_shutdown_get_err_shutdown_and_export_name_closes() {
        let mut out = Vec::new();
        assert_eq!(
            negotiation(true).answer(7, &go_data("data", &[]), &mut out),
            OptionOutcome::Continue
        );
        assert_eq!(replies(&out)[0].1, 0x8000_0007);
        out.clear();
        assert!(matches!(
            negotiation(true).answer(1, b"data", &mut out),
            OptionOutcome::Refuse { .. }
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn export_name_replies_size_and_flags_with_zeros_unless_the_client_declined_them() {
        let mut out = Vec::new();
        assert_eq!(
            negotiation(false).answer(1, b"data", &mut out),
            OptionOutcome::Transmit { export: 1 }
        );
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0x10, 0, 0x01, 0x6d]);
        let with_zeros = Negotiation {
            client: ClientFlags { no_zeroes: false },
            ..negotiation(false)
        };
        out.clear();
        with_zeros.answer(1, b"", &mut out);
        assert_eq!(out.len(), 8 + 2 + 124);
        assert_eq!(&out[0..8], &(1u64 << 30).to_be_bytes());
        assert!(out[10..].iter().all(|&byte| byte == 0));
    }

    #[test]
    fn export_name_for_an_unknown_export_ends_the_session_without_a_reply() {
        let mut out = Vec::new();
        assert!(matches!(
            negotiation(false).answer(1, b"nope", &mut out),
            OptionOutcome::Refuse { .. }
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn a_request_decodes_field_by_field() {
        let mut bytes = [0u8; REQUEST_LENGTH];
        bytes[0..4].copy_from_slice(&[0x25, 0x60, 0x95, 0x13]);
        bytes[4..6].copy_from_slice(&[0, 1]);
        bytes[6..8].copy_from_slice(&[0, 1]);
        bytes[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        bytes[16..24].copy_from_slice(&(1u64 << 40).to_be_bytes());
        bytes[24..28].copy_from_slice(&65536u32.to_be_bytes());
        let request = Request::decode(&bytes).unwrap();
        assert_eq!(
            request,
            Request {
                flags: 1,
                command: Command::Write,
                handle: 0x0102_0304_0506_0708,
                offset: 1 << 40,
                length: 65536,
            }
        );
        assert!(request.force_unit_access());
        assert_eq!(request.payload_length(), 65536);
        bytes[6..8].copy_from_slice(&[0, 6]);
        assert_eq!(
            Request::decode(&bytes).unwrap().command,
            Command::WriteZeroes
        );
        assert_eq!(Request::decode(&bytes).unwrap().payload_length(), 0);
        bytes[0] = 0;
        assert_eq!(
            Request::decode(&bytes),
            Err(ProtocolError::BadRequestMagic(0x0060_9513))
        );
    }

    fn request(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            handle: 1,
            offset,
            length,
        }
    }

    #[test]
    fn requests_inside_the_export_are_accepted_up_to_the_last_byte() {
        let size = 1 << 20;
        for command in [
            Command::Read,
            Command::Write,
            Command::Trim,
            Command::WriteZeroes,
        ] {
            assert_eq!(
                check_request(&request(command, 0, 0, 1 << 20), size),
                Ok(())
            );
            assert_eq!(
                check_request(&request(command, 1, size - 1, 1), size),
                Ok(())
            );
            assert_eq!(check_request(&request(command, 0, size, 0), size), Ok(()));
        }
        assert_eq!(
            check_request(&request(Command::Flush, 1, 7, 7), size),
            Ok(())
        );
    }

    #[test]
    fn reads_and_trims_past_the_end_are_invalid_and_writes_past_it_have_no_space() {
        let size = 1 << 20;
        let past = |command| check_request(&request(command, 0, size - 512, 4096), size);
        assert_eq!(past(Command::Read), Err(ReplyError::Invalid));
        assert_eq!(past(Command::Trim), Err(ReplyError::Invalid));
        assert_eq!(past(Command::Write), Err(ReplyError::NoSpace));
        assert_eq!(past(Command::WriteZeroes), Err(ReplyError::NoSpace));
        // An offset so large that offset + length wraps around is past the end too.
        assert_eq!(
            check_request(&request(Command::Read, 0, u64::MAX, 2), size),
            Err(ReplyError::Invalid)
        );
    }

    #[test]
    fn reads_and_writes_over_32_mib_are_invalid_but_zeroing_that_much_is_not() {
        let size = 1 << 30;
        let over = MAXIMUM_PAYLOAD + 1;
        assert_eq!(
            check_request(&request(Command::Read, 0, 0, over), size),
            Err(ReplyError::Invalid)
        );
        assert_eq!(
            check_request(&request(Command::Write, 0, 0, over), size),
            Err(ReplyError::Invalid)
        );
        assert_eq!(
            check_request(&request(Command::Read, 0, 0, MAXIMUM_PAYLOAD), size),
            Ok(())
        );
        assert_eq!(
            check_request(&request(Command::WriteZeroes, 0, 0, over), size),
            Ok(())
        );
        assert_eq!(
            check_request(&request(Command::Trim, 0, 0, over), size),
            Ok(())
        );
    }

    #[test]
    fn unknown_commands_and_flags_never_offered_are_invalid() {
        let size = 1 << 20;
        for command in [5, 7, 8, 0xffff] {
            assert_eq!(
                check_request(&request(Command::from_wire(command), 0, 0, 0), size),
                Err(ReplyError::Invalid)
            );
        }
        // NO_HOLE belongs to WRITE_ZEROES only; DF needs structured replies.
        assert_eq!(
            check_request(&request(Command::WriteZeroes, 2 | 1, 0, 512), size),
            Ok(())
        );
        assert_eq!(
            check_request(&request(Command::Write, 2, 0, 512), size),
            Err(ReplyError::Invalid)
        );
        assert_eq!(
            check_request(&request(Command::Read, 4, 0, 512), size),
            Err(ReplyError::Invalid)
        );
    }

    #[test]
    fn a_simple_reply_carries_magic_error_and_handle() {
        assert_eq!(
            simple_reply(None, 0x1122_3344_5566_7788),
            [
                0x67, 0x44, 0x66, 0x98, 0, 0, 0, 0, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88
            ]
        );
        assert_eq!(
            &simple_reply(Some(ReplyError::Shutdown), 9)[4..8],
            &[0, 0, 0, 108]
        );
        assert_eq!(
            &simple_reply(Some(ReplyError::Invalid), 9)[4..8],
            &[0, 0, 0, 22]
        );
    }
}
