//! Wire format of the NBD protocol: constants and pure encode/parse functions.
//!
//! Everything here works on byte slices: no sockets, no allocation beyond the
//! parsed values, and no panics on any input (the parsers are fuzzed, see
//! `fuzz/`). Numbers are big-endian on the wire.
//!
//! Constants follow the protocol document of the reference implementation
//! (`doc/proto.md` of NetworkBlockDevice/nbd): fixed newstyle negotiation,
//! `NBD_OPT_INFO`/`NBD_OPT_GO` (the former `INFO` extension), structured replies
//! and `NBD_CMD_WRITE_ZEROES`.

use std::fmt;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle magic, also the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export refuses writes.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` is supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` is supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: rotational medium hint.
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag: `NBD_CMD_TRIM` is supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) are supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: `NBD_CMD_FLAG_DF` is supported.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flush/FUA effects are visible across connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: `NBD_CMD_CACHE` is understood.
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: `NBD_CMD_FLAG_FAST_ZERO` is supported.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option: choose an export and enter transmission (cannot report errors).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of an `NBD_OPT_LIST`.
pub const REP_SERVER: u32 = 2;
/// Option reply: one item of information for `NBD_OPT_INFO`/`NBD_OPT_GO`.
pub const REP_INFO: u32 = 3;
/// Bit set in every option error reply.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
/// Option error: syntactically or semantically invalid.
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
/// Option error: not supported on this platform.
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
/// Option error: TLS required.
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
/// Option error: the server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
/// Option error: block size constraints must be requested.
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
/// Option error: request or reply too large.
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// Information type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information type: canonical export name.
pub const INFO_NAME: u16 = 1;
/// Information type: human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: `NBD_CMD_WRITE_ZEROES` must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: do not fragment a structured read reply.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: one extent only (block status).
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: fail write-zeroes unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply chunk: 64-bit offset then data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply chunk: a hole (offset, length) reading as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Structured reply chunk: error (32-bit error, 16-bit message length, message).
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Structured reply chunk: error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Size of the server's initial greeting (magic, `IHAVEOPT`, handshake flags).
pub const HANDSHAKE_LEN: usize = 18;
/// Size of a client option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header (magic, option, type, length).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a transmission request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// A malformed message. Pure: carries no I/O error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtoError {
    /// Fewer bytes than the message needs.
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        /// Which message.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// A magic number did not match.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which magic.
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A length field is inconsistent with the data around it.
    #[error("bad length in {what}")]
    BadLength {
        /// Which message.
        what: &'static str,
    },
    /// A string is longer than the protocol allows.
    #[error("{what} longer than {MAX_STRING_LEN} bytes")]
    StringTooLong {
        /// Which string.
        what: &'static str,
    },
    /// A string is not UTF-8 or contains NUL.
    #[error("{what} is not a valid NBD string")]
    BadString {
        /// Which string.
        what: &'static str,
    },
    /// Data where the option takes none.
    #[error("unexpected data with option {option}")]
    UnexpectedData {
        /// The option.
        option: u32,
    },
    /// A field carries a value this implementation does not know.
    #[error("unexpected {what} {value:#x}")]
    Unexpected {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: u64,
    },
}

fn need(what: &'static str, buf: &[u8], n: usize) -> Result<(), ProtoError> {
    if buf.len() < n {
        Err(ProtoError::Truncated {
            what,
            need: n,
            have: buf.len(),
        })
    } else {
        Ok(())
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn nbd_string(what: &'static str, b: &[u8]) -> Result<String, ProtoError> {
    if b.len() > MAX_STRING_LEN {
        return Err(ProtoError::StringTooLong { what });
    }
    if b.contains(&0) {
        return Err(ProtoError::BadString { what });
    }
    String::from_utf8(b.to_vec()).map_err(|_| ProtoError::BadString { what })
}

/// Widens a wire `u32` length to `usize` (lossless on the 32/64-bit targets we build for).
pub fn len_usize(n: u32) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

// ---------------------------------------------------------------------------
// Handshake

/// The server greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_handshake(flags: u16) -> [u8; HANDSHAKE_LEN] {
    let mut b = [0u8; HANDSHAKE_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Parses the server greeting; returns the handshake flags. Oldstyle servers are
/// rejected (their second magic differs).
pub fn parse_handshake(b: &[u8]) -> Result<u16, ProtoError> {
    need("handshake", b, HANDSHAKE_LEN)?;
    let magic = u64_at(b, 0);
    if magic != NBD_MAGIC {
        return Err(ProtoError::BadMagic {
            what: "NBDMAGIC",
            got: magic,
        });
    }
    let opt = u64_at(b, 8);
    if opt != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            what: "IHAVEOPT",
            got: opt,
        });
    }
    Ok(u16_at(b, 16))
}

// ---------------------------------------------------------------------------
// Options (client -> server)

/// Header of a client option: `IHAVEOPT`, option number, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number (`OPT_*`).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Parses the 16-byte option header.
    pub fn parse(b: &[u8]) -> Result<OptionHeader, ProtoError> {
        need("option header", b, OPTION_HEADER_LEN)?;
        let magic = u64_at(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                got: magic,
            });
        }
        Ok(OptionHeader {
            option: u32_at(b, 8),
            length: u32_at(b, 12),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; OPTION_HEADER_LEN] {
        let mut b = [0u8; OPTION_HEADER_LEN];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&self.option.to_be_bytes());
        b[12..16].copy_from_slice(&self.length.to_be_bytes());
        b
    }
}

/// The data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Requested information types (`INFO_*`).
    pub requests: Vec<u16>,
}

impl InfoRequest {
    /// Encodes the option data.
    pub fn encode(&self) -> Vec<u8> {
        let name = self.name.as_bytes();
        let mut v = Vec::with_capacity(6 + name.len() + 2 * self.requests.len());
        v.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
        v.extend_from_slice(name);
        v.extend_from_slice(
            &u16::try_from(self.requests.len())
                .unwrap_or(u16::MAX)
                .to_be_bytes(),
        );
        for r in &self.requests {
            v.extend_from_slice(&r.to_be_bytes());
        }
        v
    }
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`.
    ExportName(String),
    /// `NBD_OPT_ABORT` (any data is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// Any other option; the server answers `NBD_REP_ERR_UNSUP`.
    Unsupported(u32),
}

impl ClientOption {
    /// Parses the data of option `option`. `data` must be exactly the option's data.
    pub fn parse(option: u32, data: &[u8]) -> Result<ClientOption, ProtoError> {
        match option {
            OPT_EXPORT_NAME => Ok(ClientOption::ExportName(nbd_string("export name", data)?)),
            OPT_ABORT => Ok(ClientOption::Abort),
            OPT_LIST => {
                if data.is_empty() {
                    Ok(ClientOption::List)
                } else {
                    Err(ProtoError::UnexpectedData { option })
                }
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    Ok(ClientOption::StructuredReply)
                } else {
                    Err(ProtoError::UnexpectedData { option })
                }
            }
            OPT_INFO | OPT_GO => {
                let req = parse_info_request(data)?;
                Ok(if option == OPT_GO {
                    ClientOption::Go(req)
                } else {
                    ClientOption::Info(req)
                })
            }
            other => Ok(ClientOption::Unsupported(other)),
        }
    }
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    const WHAT: &str = "NBD_OPT_INFO/GO";
    need(WHAT, data, 6)?;
    let name_len = len_usize(u32_at(data, 0));
    // name_len <= data.len() - 6, written so that it cannot overflow.
    if name_len > data.len() - 6 {
        return Err(ProtoError::BadLength { what: WHAT });
    }
    let name = nbd_string("export name", &data[4..4 + name_len])?;
    let rest = &data[4 + name_len..];
    let n = usize::from(u16_at(rest, 0));
    let list = &rest[2..];
    if list.len() != n * 2 {
        return Err(ProtoError::BadLength { what: WHAT });
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok(InfoRequest { name, requests })
}

// ---------------------------------------------------------------------------
// Option replies (server -> client)

/// Appends an option reply (header and data) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of an `NBD_REP_SERVER` reply for export `name`.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&u32::try_from(name.len()).unwrap_or(u32::MAX).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v
}

/// Data of an `NBD_REP_INFO` reply of type `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Data of an `NBD_REP_INFO` reply of type `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, and unless
/// `no_zeroes` the 124 reserved zero bytes.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size: u64, flags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// Header of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers.
    pub option: u32,
    /// `REP_*`.
    pub reply_type: u32,
    /// Length of the data that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Parses the 20-byte option reply header.
    pub fn parse(b: &[u8]) -> Result<OptionReplyHeader, ProtoError> {
        need("option reply", b, OPTION_REPLY_HEADER_LEN)?;
        let magic = u64_at(b, 0);
        if magic != OPT_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "option reply",
                got: magic,
            });
        }
        Ok(OptionReplyHeader {
            option: u32_at(b, 8),
            reply_type: u32_at(b, 12),
            length: u32_at(b, 16),
        })
    }

    /// Whether this is an error reply.
    pub fn is_error(&self) -> bool {
        self.reply_type & REP_FLAG_ERROR != 0
    }
}

/// One `NBD_REP_INFO` item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InfoReply {
    /// Size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// Block size constraints.
    BlockSize {
        /// Minimum block size.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum block size.
        max: u32,
    },
    /// Any other information type (ignored by clients, as the spec asks).
    Other(u16),
}

impl InfoReply {
    /// Parses the data of an `NBD_REP_INFO` reply.
    pub fn parse(b: &[u8]) -> Result<InfoReply, ProtoError> {
        need("NBD_REP_INFO", b, 2)?;
        match u16_at(b, 0) {
            INFO_EXPORT => {
                if b.len() != 12 {
                    return Err(ProtoError::BadLength {
                        what: "NBD_INFO_EXPORT",
                    });
                }
                Ok(InfoReply::Export {
                    size: u64_at(b, 2),
                    flags: u16_at(b, 10),
                })
            }
            INFO_BLOCK_SIZE => {
                if b.len() != 14 {
                    return Err(ProtoError::BadLength {
                        what: "NBD_INFO_BLOCK_SIZE",
                    });
                }
                Ok(InfoReply::BlockSize {
                    min: u32_at(b, 2),
                    preferred: u32_at(b, 6),
                    max: u32_at(b, 10),
                })
            }
            other => Ok(InfoReply::Other(other)),
        }
    }
}

// ---------------------------------------------------------------------------
// Transmission

/// A transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `NBD_CMD_READ` (0).
    Read,
    /// `NBD_CMD_WRITE` (1): *length* bytes of data follow the header.
    Write,
    /// `NBD_CMD_DISC` (2).
    Disc,
    /// `NBD_CMD_FLUSH` (3).
    Flush,
    /// `NBD_CMD_TRIM` (4).
    Trim,
    /// `NBD_CMD_CACHE` (5).
    Cache,
    /// `NBD_CMD_WRITE_ZEROES` (6).
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS` (7).
    BlockStatus,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// The wire value.
    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Unknown(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_wire(v: u16) -> Command {
        match v {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            v => Command::Unknown(v),
        }
    }
}

/// A transmission request header (the 28 bytes before any write payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for writes).
    pub length: u32,
}

impl Request {
    /// Parses the 28-byte header at the start of `b`; extra bytes are ignored.
    pub fn parse(b: &[u8]) -> Result<Request, ProtoError> {
        need("request", b, REQUEST_LEN)?;
        let magic = u32_at(b, 0);
        if magic != REQUEST_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "request",
                got: u64::from(magic),
            });
        }
        Ok(Request {
            flags: u16_at(b, 4),
            command: Command::from_wire(u16_at(b, 6)),
            handle: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: u32_at(b, 24),
        })
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_wire().to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// The end of the byte range, or `None` if `offset + length` overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(u64::from(self.length))
    }

    /// Whether a payload of `length` bytes follows this header.
    pub fn has_payload(&self) -> bool {
        self.command == Command::Write
    }
}

/// A simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 on success, else an NBD error value.
    pub error: u32,
    /// The request's handle.
    pub handle: u64,
}

impl SimpleReply {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; SIMPLE_REPLY_LEN] {
        let mut b = [0u8; SIMPLE_REPLY_LEN];
        encode_simple_reply_into(&mut b, self.error, self.handle);
        b
    }

    /// Parses a 16-byte simple reply header.
    pub fn parse(b: &[u8]) -> Result<SimpleReply, ProtoError> {
        need("simple reply", b, SIMPLE_REPLY_LEN)?;
        let magic = u32_at(b, 0);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "simple reply",
                got: u64::from(magic),
            });
        }
        Ok(SimpleReply {
            error: u32_at(b, 4),
            handle: u64_at(b, 8),
        })
    }
}

/// Writes a simple reply header into the first 16 bytes of `b` (which must be that long).
pub fn encode_simple_reply_into(b: &mut [u8], error: u32, handle: u64) {
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StructuredReply {
    /// `REPLY_FLAG_*`.
    pub flags: u16,
    /// `REPLY_TYPE_*`.
    pub reply_type: u16,
    /// The request's handle.
    pub handle: u64,
    /// Payload length.
    pub length: u32,
}

impl StructuredReply {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; STRUCTURED_REPLY_LEN] {
        let mut b = [0u8; STRUCTURED_REPLY_LEN];
        encode_structured_reply_into(&mut b, self);
        b
    }

    /// Parses a 20-byte structured reply chunk header.
    pub fn parse(b: &[u8]) -> Result<StructuredReply, ProtoError> {
        need("structured reply", b, STRUCTURED_REPLY_LEN)?;
        let magic = u32_at(b, 0);
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ProtoError::BadMagic {
                what: "structured reply",
                got: u64::from(magic),
            });
        }
        Ok(StructuredReply {
            flags: u16_at(b, 4),
            reply_type: u16_at(b, 6),
            handle: u64_at(b, 8),
            length: u32_at(b, 16),
        })
    }
}

/// Writes a structured reply chunk header into the first 20 bytes of `b`.
pub fn encode_structured_reply_into(b: &mut [u8], r: &StructuredReply) {
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.reply_type.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..20].copy_from_slice(&r.length.to_be_bytes());
}

/// Appends a structured `NBD_REPLY_TYPE_ERROR` chunk (final) with `message`.
pub fn encode_structured_error(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(msg_len)];
    let hdr = StructuredReply {
        flags: REPLY_FLAG_DONE,
        reply_type: REPLY_TYPE_ERROR,
        handle,
        length: 6 + u32::from(msg_len),
    };
    out.extend_from_slice(&hdr.encode());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg);
}

// ---------------------------------------------------------------------------
// Errors

/// The error values a server may put in a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// `NBD_EPERM` (1): write to a read-only export.
    Perm,
    /// `NBD_EIO` (5).
    Io,
    /// `NBD_ENOMEM` (12).
    NoMem,
    /// `NBD_EINVAL` (22): bad request.
    Inval,
    /// `NBD_ENOSPC` (28): write beyond the end.
    NoSpc,
    /// `NBD_EOVERFLOW` (75).
    Overflow,
    /// `NBD_ENOTSUP` (95).
    NotSup,
    /// `NBD_ESHUTDOWN` (108).
    Shutdown,
    /// A value outside the list (from a non-conforming server).
    Other(u32),
}

impl ErrorCode {
    /// The wire value.
    pub fn to_wire(self) -> u32 {
        match self {
            ErrorCode::Perm => 1,
            ErrorCode::Io => 5,
            ErrorCode::NoMem => 12,
            ErrorCode::Inval => 22,
            ErrorCode::NoSpc => 28,
            ErrorCode::Overflow => 75,
            ErrorCode::NotSup => 95,
            ErrorCode::Shutdown => 108,
            ErrorCode::Other(v) => v,
        }
    }

    /// From a wire value.
    pub fn from_wire(v: u32) -> ErrorCode {
        match v {
            1 => ErrorCode::Perm,
            5 => ErrorCode::Io,
            12 => ErrorCode::NoMem,
            22 => ErrorCode::Inval,
            28 => ErrorCode::NoSpc,
            75 => ErrorCode::Overflow,
            95 => ErrorCode::NotSup,
            108 => ErrorCode::Shutdown,
            v => ErrorCode::Other(v),
        }
    }

    /// Maps a device error to the closest NBD error (EDQUOT/EFBIG become ENOSPC as
    /// the spec asks; anything unknown becomes EIO).
    pub fn from_io(err: &std::io::Error) -> ErrorCode {
        match err.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => ErrorCode::Perm,
            Some(libc::ENOMEM) => ErrorCode::NoMem,
            Some(libc::EINVAL) => ErrorCode::Inval,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ErrorCode::NoSpc,
            Some(libc::EOVERFLOW) => ErrorCode::Overflow,
            Some(libc::EOPNOTSUPP) => ErrorCode::NotSup,
            Some(libc::ESHUTDOWN) => ErrorCode::Shutdown,
            _ => match err.kind() {
                std::io::ErrorKind::PermissionDenied => ErrorCode::Perm,
                std::io::ErrorKind::InvalidInput => ErrorCode::Inval,
                std::io::ErrorKind::Unsupported => ErrorCode::NotSup,
                std::io::ErrorKind::OutOfMemory => ErrorCode::NoMem,
                _ => ErrorCode::Io,
            },
        }
    }

    /// The matching `io::Error` for a client caller.
    pub fn to_io(self) -> std::io::Error {
        let errno = match self {
            ErrorCode::Perm => libc::EPERM,
            ErrorCode::Io => libc::EIO,
            ErrorCode::NoMem => libc::ENOMEM,
            ErrorCode::Inval => libc::EINVAL,
            ErrorCode::NoSpc => libc::ENOSPC,
            ErrorCode::Overflow => libc::EOVERFLOW,
            ErrorCode::NotSup => libc::EOPNOTSUPP,
            ErrorCode::Shutdown => libc::ESHUTDOWN,
            ErrorCode::Other(_) => libc::EIO,
        };
        std::io::Error::from_raw_os_error(errno)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorCode::Perm => "EPERM",
            ErrorCode::Io => "EIO",
            ErrorCode::NoMem => "ENOMEM",
            ErrorCode::Inval => "EINVAL",
            ErrorCode::NoSpc => "ENOSPC",
            ErrorCode::Overflow => "EOVERFLOW",
            ErrorCode::NotSup => "ENOTSUP",
            ErrorCode::Shutdown => "ESHUTDOWN",
            ErrorCode::Other(v) => return write!(f, "error {v}"),
        };
        f.write_str(name)
    }
}

/// Name of an option number, for logs and error messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME",
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_LIST => "NBD_OPT_LIST",
        OPT_STARTTLS => "NBD_OPT_STARTTLS",
        OPT_INFO => "NBD_OPT_INFO",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "unknown option",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: Command::Write,
            handle: 0xdead_beef,
            offset: 4096,
            length: 512,
        };
        let b = r.encode();
        assert_eq!(Request::parse(&b).unwrap(), r);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
    }

    #[test]
    fn request_rejects_bad_magic_and_short_input() {
        let mut b = Request {
            flags: 0,
            command: Command::Read,
            handle: 1,
            offset: 0,
            length: 1,
        }
        .encode();
        b[0] = 0;
        assert!(matches!(
            Request::parse(&b),
            Err(ProtoError::BadMagic { .. })
        ));
        assert!(matches!(
            Request::parse(&b[..27]),
            Err(ProtoError::Truncated { .. })
        ));
        assert!(matches!(
            Request::parse(&[]),
            Err(ProtoError::Truncated { .. })
        ));
    }

    #[test]
    fn request_end_overflow() {
        let r = Request {
            flags: 0,
            command: Command::Read,
            handle: 1,
            offset: u64::MAX - 1,
            length: 4,
        };
        assert_eq!(r.end(), None);
    }

    #[test]
    fn unknown_command_is_kept() {
        let r = Request {
            flags: 0,
            command: Command::Unknown(99),
            handle: 1,
            offset: 0,
            length: 0,
        };
        assert_eq!(
            Request::parse(&r.encode()).unwrap().command,
            Command::Unknown(99)
        );
    }

    #[test]
    fn handshake_roundtrip() {
        let b = encode_handshake(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&b[0..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(parse_handshake(&b).unwrap(), 3);
    }

    #[test]
    fn info_request_roundtrip() {
        let req = InfoRequest {
            name: "disk-1".into(),
            requests: vec![INFO_EXPORT, INFO_BLOCK_SIZE],
        };
        let data = req.encode();
        assert_eq!(
            ClientOption::parse(OPT_GO, &data).unwrap(),
            ClientOption::Go(req.clone())
        );
        assert_eq!(
            ClientOption::parse(OPT_INFO, &data).unwrap(),
            ClientOption::Info(req)
        );
    }

    #[test]
    fn info_request_rejects_bad_lengths() {
        // name length larger than the data
        let mut d = vec![0xff, 0xff, 0xff, 0xff, 0, 0];
        assert!(ClientOption::parse(OPT_GO, &d).is_err());
        // count says 2 requests, only one present
        d = vec![0, 0, 0, 0, 0, 2, 0, 3];
        assert!(ClientOption::parse(OPT_GO, &d).is_err());
        assert!(ClientOption::parse(OPT_GO, &[0, 0]).is_err());
        // NUL in a name
        d = vec![0, 0, 0, 1, 0, 0, 0];
        assert!(ClientOption::parse(OPT_GO, &d).is_err());
    }

    #[test]
    fn list_with_data_is_invalid() {
        assert_eq!(
            ClientOption::parse(OPT_LIST, b"x"),
            Err(ProtoError::UnexpectedData { option: OPT_LIST })
        );
        assert_eq!(
            ClientOption::parse(OPT_ABORT, b"x"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            ClientOption::parse(42, b"x"),
            Ok(ClientOption::Unsupported(42))
        );
    }

    #[test]
    fn option_reply_roundtrip() {
        let mut out = Vec::new();
        encode_option_reply(
            &mut out,
            OPT_GO,
            REP_INFO,
            &encode_info_export(1 << 20, FLAG_HAS_FLAGS),
        );
        let h = OptionReplyHeader::parse(&out).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_GO,
                reply_type: REP_INFO,
                length: 12
            }
        );
        assert_eq!(
            InfoReply::parse(&out[20..]).unwrap(),
            InfoReply::Export {
                size: 1 << 20,
                flags: 1
            }
        );
        assert!(!h.is_error());
    }

    #[test]
    fn replies_roundtrip() {
        let s = SimpleReply {
            error: 22,
            handle: 7,
        };
        assert_eq!(SimpleReply::parse(&s.encode()).unwrap(), s);
        let st = StructuredReply {
            flags: REPLY_FLAG_DONE,
            reply_type: REPLY_TYPE_OFFSET_DATA,
            handle: 9,
            length: 8 + 4096,
        };
        assert_eq!(StructuredReply::parse(&st.encode()).unwrap(), st);
        let mut out = Vec::new();
        encode_structured_error(&mut out, 3, 22, "bad");
        let h = StructuredReply::parse(&out).unwrap();
        assert_eq!((h.reply_type, h.length), (REPLY_TYPE_ERROR, 9));
    }

    #[test]
    fn error_codes() {
        for v in [1, 5, 12, 22, 28, 75, 95, 108, 7] {
            assert_eq!(ErrorCode::from_wire(v).to_wire(), v);
        }
        assert_eq!(
            ErrorCode::from_io(&std::io::Error::from_raw_os_error(libc::EDQUOT)),
            ErrorCode::NoSpc
        );
    }
}
