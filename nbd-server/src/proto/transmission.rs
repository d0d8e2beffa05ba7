//! The transmission phase: decoding requests, validating them against what
//! was negotiated, and encoding replies.
//!
//! Reply encoders write headers only. Read data is never copied into the
//! output buffer: the caller writes it straight after the header with a
//! vectored write, so a 32 MiB read costs no memcpy here.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::consts::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, FLAG_READ_ONLY, FLAG_SEND_DF, FLAG_SEND_FAST_ZERO,
    FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, MAX_STRING_LEN,
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_NONE,
    REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, REQUEST_HEADER_LEN, REQUEST_MAGIC,
    SIMPLE_REPLY_LEN, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};
use super::{truncate_str, Errno, Negotiated, Reader};

/// A request type (`NBD_CMD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    /// A type this server does not know; answered `EINVAL`.
    Unknown(u16),
}

impl Command {
    pub fn from_code(code: u16) -> Command {
        match code {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            other => Command::Unknown(other),
        }
    }

    pub fn code(self) -> u16 {
        match self {
            Command::Read => CMD_READ,
            Command::Write => CMD_WRITE,
            Command::Disc => CMD_DISC,
            Command::Flush => CMD_FLUSH,
            Command::Trim => CMD_TRIM,
            Command::Cache => CMD_CACHE,
            Command::WriteZeroes => CMD_WRITE_ZEROES,
            Command::BlockStatus => CMD_BLOCK_STATUS,
            Command::Unknown(code) => code,
        }
    }
}

/// The 16-bit command flags of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CommandFlags(pub u16);

impl CommandFlags {
    pub const FUA: u16 = CMD_FLAG_FUA;
    pub const NO_HOLE: u16 = CMD_FLAG_NO_HOLE;
    pub const DF: u16 = CMD_FLAG_DF;
    pub const REQ_ONE: u16 = CMD_FLAG_REQ_ONE;
    pub const FAST_ZERO: u16 = CMD_FLAG_FAST_ZERO;
    pub const PAYLOAD_LEN: u16 = CMD_FLAG_PAYLOAD_LEN;

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }
    /// Force unit access: reply only once the data is durable.
    pub fn fua(self) -> bool {
        self.has(Self::FUA)
    }
    /// Write-zeroes must not deallocate.
    pub fn no_hole(self) -> bool {
        self.has(Self::NO_HOLE)
    }
    /// Read: send at most one content chunk.
    pub fn df(self) -> bool {
        self.has(Self::DF)
    }
    /// Block status: one extent is enough.
    pub fn req_one(self) -> bool {
        self.has(Self::REQ_ONE)
    }
    /// Write-zeroes: fail with `ENOTSUP` rather than zero slowly.
    pub fn fast_zero(self) -> bool {
        self.has(Self::FAST_ZERO)
    }
}

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: CommandFlags,
    pub command: Command,
    /// Opaque to the server ("handle" in older versions of the spec);
    /// echoed in every reply.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// Format (request): magic u32 = 0x25609513, command flags u16, type
    /// u16, cookie u64, offset u64, length u32; an `NBD_CMD_WRITE` is
    /// followed by `length` bytes of data.
    ///
    /// Appends the 28-byte header to `out`. The server never sends
    /// requests; this exists for tests, fuzzing and benchmarks.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags.0);
        out.put_u16(self.command.code());
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }

    /// Parses a header from the first 28 bytes of `buf` without consuming
    /// anything. `Ok(None)` when fewer than 28 bytes are there.
    fn peek(buf: &[u8]) -> Result<Option<RequestHeader>, RequestError> {
        let mut r = Reader::new(buf);
        let (Some(magic), Some(flags), Some(ty), Some(cookie), Some(offset), Some(length)) =
            (r.u32(), r.u16(), r.u16(), r.u64(), r.u64(), r.u32())
        else {
            return Ok(None);
        };
        if magic != REQUEST_MAGIC {
            return Err(RequestError::BadMagic(magic));
        }
        Ok(Some(RequestHeader {
            flags: CommandFlags(flags),
            command: Command::from_code(ty),
            cookie,
            offset,
            length,
        }))
    }
}

/// One step of request decoding.
#[derive(Debug)]
pub enum Decoded {
    /// A complete request. `payload` is empty unless the command is
    /// `NBD_CMD_WRITE`, in which case it holds exactly `header.length`
    /// bytes.
    Request {
        header: RequestHeader,
        payload: Bytes,
    },
    /// A write whose payload exceeds the decoder's `max_payload`. Answer it
    /// `EOVERFLOW`; the decoder drops the payload bytes itself as they
    /// arrive (over the following `decode` calls), without buffering them,
    /// and the connection continues.
    Oversized { header: RequestHeader },
}

/// Fatal decoding errors: the stream cannot be resynchronised, so the
/// connection must close.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

/// Splits the client's byte stream into requests.
#[derive(Debug)]
pub struct RequestDecoder {
    max_payload: u32,
    /// Payload bytes of an oversized write still to be dropped.
    skipping: u64,
}

impl RequestDecoder {
    /// `max_payload` is the largest write payload buffered; larger writes
    /// come out as [`Decoded::Oversized`].
    pub fn new(max_payload: u32) -> Self {
        RequestDecoder {
            max_payload,
            skipping: 0,
        }
    }

    /// The most bytes the caller ever needs to buffer for one request.
    pub fn max_frame_len(&self) -> usize {
        REQUEST_HEADER_LEN + self.max_payload as usize
    }

    /// Whether the decoder is in the middle of dropping an oversized write
    /// payload.
    pub fn is_skipping(&self) -> bool {
        self.skipping > 0
    }

    /// Parses one request from the front of `buf`, consuming it.
    /// `Ok(None)` means more bytes are needed (anything already consumed
    /// was oversized payload being dropped). Never consumes a partial
    /// request, and never asks for more than one header plus
    /// `max_payload` bytes to be buffered.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Decoded>, RequestError> {
        if self.skipping > 0 {
            let n = usize::try_from(self.skipping)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            buf.advance(n);
            self.skipping -= n as u64;
            if self.skipping > 0 {
                return Ok(None);
            }
        }
        let Some(header) = RequestHeader::peek(buf)? else {
            return Ok(None);
        };
        if header.command != Command::Write {
            buf.advance(REQUEST_HEADER_LEN);
            return Ok(Some(Decoded::Request {
                header,
                payload: Bytes::new(),
            }));
        }
        if header.length > self.max_payload {
            buf.advance(REQUEST_HEADER_LEN);
            self.skipping = u64::from(header.length);
            return Ok(Some(Decoded::Oversized { header }));
        }
        let total = REQUEST_HEADER_LEN + header.length as usize;
        if buf.len() < total {
            // Bounded by max_frame_len: the check above ensured it.
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        buf.advance(REQUEST_HEADER_LEN);
        let payload = buf.split_to(header.length as usize).freeze();
        Ok(Some(Decoded::Request { header, payload }))
    }
}

/// Checks a request against the spec and what was negotiated, before
/// anything runs. `Err` carries the errno to answer with.
///
/// `NBD_CMD_DISC` is accepted as is: the caller handles it (there is no
/// reply to it).
pub fn validate(header: &RequestHeader, negotiated: &Negotiated) -> Result<(), Errno> {
    let tflags = negotiated.transmission_flags;
    let advertised = |bit: u16| tflags & bit != 0;
    let flags = header.flags;
    let info = &negotiated.export.device;

    // 1. The command must be known and advertised.
    let write_like = match header.command {
        Command::Unknown(_) => return Err(Errno::Inval),
        Command::Disc => return Ok(()),
        Command::Flush if !advertised(FLAG_SEND_FLUSH) => return Err(Errno::Inval),
        Command::Trim if !advertised(FLAG_SEND_TRIM) && !advertised(FLAG_READ_ONLY) => {
            return Err(Errno::Inval)
        }
        Command::WriteZeroes
            if !advertised(FLAG_SEND_WRITE_ZEROES) && !advertised(FLAG_READ_ONLY) =>
        {
            return Err(Errno::Inval)
        }
        Command::BlockStatus if negotiated.base_allocation.is_none() => return Err(Errno::Inval),
        Command::Write | Command::Trim | Command::WriteZeroes => true,
        Command::Read | Command::Flush | Command::Cache | Command::BlockStatus => false,
    };

    // 2. Every flag must be defined for this command (the spec: EINVAL for
    // unknown flags and flags "not explicitly documented as applicable").
    // FUA is valid on every command once advertised.
    let mut allowed = 0;
    if advertised(FLAG_SEND_FUA) {
        allowed |= CMD_FLAG_FUA;
    }
    match header.command {
        Command::Read if advertised(FLAG_SEND_DF) => allowed |= CMD_FLAG_DF,
        Command::WriteZeroes => {
            allowed |= CMD_FLAG_NO_HOLE;
            if advertised(FLAG_SEND_FAST_ZERO) {
                allowed |= CMD_FLAG_FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if flags.0 & !allowed != 0 {
        return Err(Errno::Inval);
    }

    // 3. Writes to a read-only export.
    if write_like && advertised(FLAG_READ_ONLY) {
        return Err(Errno::Perm);
    }

    // 4. Offset and length.
    if header.command == Command::Flush {
        // Reserved fields that must be zero.
        return if header.offset == 0 && header.length == 0 {
            Ok(())
        } else {
            Err(Errno::Inval)
        };
    }
    let length = u64::from(header.length);
    if length == 0 && header.command != Command::Cache {
        // The spec leaves zero lengths unspecified; none can do anything
        // useful and a zero-length block-status cannot even be answered
        // (descriptors must have nonzero length).
        return Err(Errno::Inval);
    }
    let min = u64::from(info.block_sizes.min.max(1));
    if !header.offset.is_multiple_of(min) || !length.is_multiple_of(min) {
        return Err(Errno::Inval);
    }
    if matches!(header.command, Command::Read | Command::Write)
        && header.length > info.block_sizes.max
    {
        // Only payload-carrying commands are bound by the maximum; the
        // spec suggests EOVERFLOW for them.
        return Err(Errno::Overflow);
    }
    match header.offset.checked_add(length) {
        Some(end) if end <= info.size => Ok(()),
        // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
        _ if matches!(header.command, Command::Write | Command::WriteZeroes) => Err(Errno::NoSpc),
        _ => Err(Errno::Inval),
    }
}

/// Format (simple reply): magic u32 = 0x67446698, error u32 (0 = success),
/// cookie u64. A successful read is followed by `length` bytes of data,
/// which the caller writes itself.
pub fn encode_simple_reply(out: &mut BytesMut, cookie: u64, error: Option<Errno>) {
    // Assembled on the stack and appended once: one capacity check instead
    // of three (this runs once per request).
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    h[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.map_or(0, Errno::code).to_be_bytes());
    h[8..].copy_from_slice(&cookie.to_be_bytes());
    out.put_slice(&h);
}

/// Format (structured reply chunk header): magic u32 = 0x668e33ef, flags
/// u16 (bit 0 DONE), type u16, cookie u64, payload length u32.
fn structured_header(out: &mut BytesMut, cookie: u64, ty: u16, done: bool, len: u32) {
    let mut h = [0u8; STRUCTURED_REPLY_HEADER_LEN];
    h[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&(if done { REPLY_FLAG_DONE } else { 0 }).to_be_bytes());
    h[6..8].copy_from_slice(&ty.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..].copy_from_slice(&len.to_be_bytes());
    out.put_slice(&h);
}

/// Format (NBD_REPLY_TYPE_OFFSET_DATA payload): offset u64, then
/// `data_len` bytes of data (which the caller appends).
///
/// `data_len` must be nonzero and at most `u32::MAX - 8`; server reads are
/// capped far below that by the maximum block size.
pub fn encode_offset_data_header(
    out: &mut BytesMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    let len = data_len
        .checked_add(8)
        .expect("read chunk larger than a structured reply can carry");
    structured_header(out, cookie, REPLY_TYPE_OFFSET_DATA, done, len);
    out.put_u64(offset);
}

/// Format (NBD_REPLY_TYPE_OFFSET_HOLE payload): offset u64, hole size u32
/// (nonzero).
pub fn encode_offset_hole(out: &mut BytesMut, cookie: u64, offset: u64, len: u32, done: bool) {
    structured_header(out, cookie, REPLY_TYPE_OFFSET_HOLE, done, 12);
    out.put_u64(offset);
    out.put_u32(len);
}

/// NBD_REPLY_TYPE_NONE: no payload; always the final chunk.
pub fn encode_structured_none(out: &mut BytesMut, cookie: u64) {
    structured_header(out, cookie, REPLY_TYPE_NONE, true, 0);
}

/// Format (NBD_REPLY_TYPE_ERROR payload): error u32 (nonzero), message
/// length u16, message (UTF-8, at most 4096 bytes; longer messages are
/// cut at a character boundary).
pub fn encode_structured_error(
    out: &mut BytesMut,
    cookie: u64,
    errno: Errno,
    message: &str,
    done: bool,
) {
    let message = truncate_str(message, MAX_STRING_LEN);
    // At most 4096, so both casts are lossless.
    let msg_len = u16::try_from(message.len()).unwrap_or(0);
    structured_header(out, cookie, REPLY_TYPE_ERROR, done, 6 + u32::from(msg_len));
    out.put_u32(errno.code());
    out.put_u16(msg_len);
    out.put_slice(
        message
            .as_bytes()
            .get(..usize::from(msg_len))
            .unwrap_or(&[]),
    );
}

/// Format (NBD_REPLY_TYPE_BLOCK_STATUS payload): metadata context id u32,
/// then per extent: length u32 (nonzero), status flags u32
/// (`NBD_STATE_HOLE` = 1, `NBD_STATE_ZERO` = 2 for `base:allocation`).
///
/// The spec requires at least one extent; the caller provides it.
pub fn encode_block_status(
    out: &mut BytesMut,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    let len = extents
        .len()
        .checked_mul(8)
        .and_then(|n| n.checked_add(4))
        .and_then(|n| u32::try_from(n).ok())
        .expect("too many extents for one block-status chunk");
    structured_header(out, cookie, REPLY_TYPE_BLOCK_STATUS, done, len);
    out.reserve(len as usize);
    out.put_u32(context_id);
    for &(length, flags) in extents {
        out.put_u32(length);
        out.put_u32(flags);
    }
}

#[cfg(test)]
mod tests;
