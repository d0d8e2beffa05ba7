//! The client side of the transmission phase: request encoding and reply
//! decoding, matched by cookie.
//!
//! [`ClientTransmission`] remembers every request in flight (command, range)
//! because the wire needs it: a simple reply to a read carries no length,
//! and structured chunks must be checked against the range they answer.
//! Chunks of one request are assembled here; the caller only sees a
//! [`Completion`] once the request's last reply arrived.
//!
//! Anything the server sends that cannot be matched or framed (bad magic, an
//! unknown cookie, a chunk outside its request, structured replies that were
//! never negotiated) is a [`ProtocolError`]: the stream cannot be trusted
//! any more and the connection must be dropped.

use std::collections::{BTreeMap, HashMap};

use bytes::{Buf, Bytes, BytesMut};

use crate::proto::consts::{
    REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET,
    REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE, SIMPLE_REPLY_LEN,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_HEADER_LEN, STRUCTURED_REPLY_MAGIC,
};
use crate::proto::{Command, CommandFlags, Reader, RequestHeader};

/// The largest structured chunk accepted that is not read data (block
/// status lists, error messages). Read data is bounded by its request.
pub const MAX_METADATA_CHUNK: u32 = 16 * 1024 * 1024;

/// A request to send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub flags: CommandFlags,
    pub offset: u64,
    pub length: u32,
}

/// What a successful request produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Read data, exactly the requested length (holes filled with zeroes).
    Data(Bytes),
    /// Block status: `(length, flags)` descriptors of the negotiated
    /// `base:allocation` context, in order from the request offset.
    Extents(Vec<(u32, u32)>),
    /// Any other command.
    Done,
}

/// An error reply: the server's errno and, with structured replies, its
/// message and the offset it concerns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplyError {
    pub errno: u32,
    pub message: String,
    pub offset: Option<u64>,
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    pub cookie: u64,
    pub request: Request,
    pub result: Result<Outcome, ReplyError>,
}

/// A reply that breaks the protocol; the connection is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("bad reply magic {0:#010x}")]
    BadMagic(u32),
    #[error("reply for cookie {0:#x}, which is not in flight")]
    UnknownCookie(u64),
    #[error("structured reply chunk, but structured replies were not negotiated")]
    UnexpectedStructured,
    #[error("structured reply chunk type {ty:#06x} of {len} bytes is malformed for {command:?}")]
    BadChunk { ty: u16, len: u32, command: Command },
    #[error("chunk at offset {offset} ({len} bytes) lies outside the read of {req_len} bytes at {req_offset}")]
    ChunkOutOfRange {
        offset: u64,
        len: u64,
        req_offset: u64,
        req_len: u32,
    },
    #[error("read data overlaps an earlier chunk at offset {0}")]
    Overlap(u64),
    #[error("a successful read reply left {missing} of {len} bytes unanswered")]
    Incomplete { missing: u64, len: u32 },
    #[error("block status for context {got}, but {expected:?} was negotiated")]
    WrongContext { got: u32, expected: Option<u32> },
    #[error("successful block status without any extent")]
    NoExtents,
    #[error("error reply with errno 0")]
    ZeroErrno,
}

/// Per-request assembly state.
#[derive(Debug)]
struct InFlight {
    request: Request,
    /// Read data assembled from several chunks, or one chunk covering the
    /// whole request kept as is (the common case: no copy).
    data: ReadData,
    /// Received byte ranges of a read, start -> end, to catch overlaps and
    /// gaps.
    covered: BTreeMap<u64, u64>,
    covered_bytes: u64,
    extents: Option<Vec<(u32, u32)>>,
    error: Option<ReplyError>,
}

#[derive(Debug)]
enum ReadData {
    None,
    Whole(Bytes),
    Assembled(BytesMut),
}

/// The transmission phase of one connection, for the client.
#[derive(Debug)]
pub struct ClientTransmission {
    structured: bool,
    base_allocation: Option<u32>,
    next_cookie: u64,
    in_flight: HashMap<u64, InFlight>,
}

impl ClientTransmission {
    /// `structured` and `base_allocation` as negotiated (see
    /// [`ClientNegotiated`](super::ClientNegotiated)).
    pub fn new(structured: bool, base_allocation: Option<u32>) -> Self {
        ClientTransmission {
            structured,
            base_allocation,
            next_cookie: 1,
            in_flight: HashMap::new(),
        }
    }

    /// Number of requests awaiting their reply.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Appends the request header to `out` and remembers the request;
    /// returns its cookie. The caller sends a write's payload right after
    /// the header. `NBD_CMD_DISC` is not remembered: it has no reply.
    pub fn start(&mut self, request: Request, out: &mut BytesMut) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
        RequestHeader {
            flags: request.flags,
            command: request.command,
            cookie,
            offset: request.offset,
            length: request.length,
        }
        .encode(out);
        if request.command != Command::Disc {
            self.in_flight.insert(
                cookie,
                InFlight {
                    request,
                    data: ReadData::None,
                    covered: BTreeMap::new(),
                    covered_bytes: 0,
                    extents: None,
                    error: None,
                },
            );
        }
        cookie
    }

    /// Decodes the next complete reply message in `input`, consuming it.
    /// Call repeatedly until it asks for more input.
    pub fn decode(&mut self, input: &mut BytesMut) -> Result<Progress, ProtocolError> {
        let Some(magic) = Reader::new(input).u32() else {
            return Ok(Progress::NeedInput(4));
        };
        match magic {
            SIMPLE_REPLY_MAGIC => self.decode_simple(input),
            STRUCTURED_REPLY_MAGIC if self.structured => self.decode_chunk(input),
            STRUCTURED_REPLY_MAGIC => Err(ProtocolError::UnexpectedStructured),
            other => Err(ProtocolError::BadMagic(other)),
        }
    }

    /// Format (simple reply): magic u32 = 0x67446698, error u32, cookie
    /// u64; a successful read's data (the request's length) follows.
    fn decode_simple(&mut self, input: &mut BytesMut) -> Result<Progress, ProtocolError> {
        let mut r = Reader::new(input);
        let (Some(_), Some(errno), Some(cookie)) = (r.u32(), r.u32(), r.u64()) else {
            return Ok(Progress::NeedInput(SIMPLE_REPLY_LEN));
        };
        let entry = self
            .in_flight
            .get(&cookie)
            .ok_or(ProtocolError::UnknownCookie(cookie))?;
        let request = entry.request;
        let data_len = if errno == 0 && request.command == Command::Read {
            request.length as usize
        } else {
            0
        };
        let total = SIMPLE_REPLY_LEN + data_len;
        if input.len() < total {
            return Ok(Progress::NeedInput(total));
        }
        input.advance(SIMPLE_REPLY_LEN);
        let data = input.split_to(data_len).freeze();
        self.in_flight.remove(&cookie);
        let result = if errno != 0 {
            Err(ReplyError {
                errno,
                message: String::new(),
                offset: None,
            })
        } else if request.command == Command::Read {
            Ok(Outcome::Data(data))
        } else if request.command == Command::BlockStatus {
            // Block status is only ever answered with structured chunks.
            return Err(ProtocolError::NoExtents);
        } else {
            Ok(Outcome::Done)
        };
        Ok(Progress::Complete(Completion {
            cookie,
            request,
            result,
        }))
    }

    /// Format (structured reply chunk): magic u32 = 0x668e33ef, flags u16
    /// (bit 0: DONE), type u16, cookie u64, payload length u32, payload.
    fn decode_chunk(&mut self, input: &mut BytesMut) -> Result<Progress, ProtocolError> {
        let mut r = Reader::new(input);
        let (Some(_), Some(flags), Some(ty), Some(cookie), Some(len)) =
            (r.u32(), r.u16(), r.u16(), r.u64(), r.u32())
        else {
            return Ok(Progress::NeedInput(STRUCTURED_REPLY_HEADER_LEN));
        };
        let entry = self
            .in_flight
            .get(&cookie)
            .ok_or(ProtocolError::UnknownCookie(cookie))?;
        let command = entry.request.command;
        let bad = || ProtocolError::BadChunk { ty, len, command };
        // Check the declared length before buffering that many bytes.
        let ok = match ty {
            REPLY_TYPE_NONE => len == 0,
            REPLY_TYPE_OFFSET_DATA => {
                command == Command::Read && len > 8 && len - 8 <= entry.request.length
            }
            REPLY_TYPE_OFFSET_HOLE => command == Command::Read && len == 12,
            REPLY_TYPE_BLOCK_STATUS => {
                command == Command::BlockStatus
                    && len >= 12
                    && (len - 4).is_multiple_of(8)
                    && len <= MAX_METADATA_CHUNK
            }
            REPLY_TYPE_ERROR => (6..=MAX_METADATA_CHUNK).contains(&len),
            REPLY_TYPE_ERROR_OFFSET => (14..=MAX_METADATA_CHUNK).contains(&len),
            // Unknown error types still start with errno and message.
            t if t & (1 << 15) != 0 => (6..=MAX_METADATA_CHUNK).contains(&len),
            _ => false,
        };
        if !ok {
            return Err(bad());
        }
        let total = STRUCTURED_REPLY_HEADER_LEN + len as usize;
        if input.len() < total {
            return Ok(Progress::NeedInput(total));
        }
        input.advance(STRUCTURED_REPLY_HEADER_LEN);
        let payload = input.split_to(len as usize);
        let done = flags & REPLY_FLAG_DONE != 0;
        let base_allocation = self.base_allocation;
        let Some(entry) = self.in_flight.get_mut(&cookie) else {
            return Err(ProtocolError::UnknownCookie(cookie));
        };
        match ty {
            REPLY_TYPE_NONE => {
                if !done {
                    return Err(bad());
                }
            }
            REPLY_TYPE_OFFSET_DATA => {
                // Payload: offset u64, data.
                let mut payload = payload;
                let offset = payload.get_u64();
                let data = payload.freeze();
                entry.place(offset, data.len() as u64)?;
                entry.store(offset, data);
            }
            REPLY_TYPE_OFFSET_HOLE => {
                // Payload: offset u64, hole length u32 (nonzero).
                let mut payload = payload;
                let offset = payload.get_u64();
                let hole = payload.get_u32();
                if hole == 0 {
                    return Err(bad());
                }
                entry.place(offset, u64::from(hole))?;
                entry.zero(offset, hole as usize);
            }
            REPLY_TYPE_BLOCK_STATUS => {
                // Payload: context id u32, then (length u32, flags u32)*.
                let mut payload = payload;
                let id = payload.get_u32();
                if Some(id) != base_allocation {
                    return Err(ProtocolError::WrongContext {
                        got: id,
                        expected: base_allocation,
                    });
                }
                let mut extents = Vec::with_capacity(payload.len() / 8);
                while payload.len() >= 8 {
                    extents.push((payload.get_u32(), payload.get_u32()));
                }
                // Only one context is negotiated, so only one chunk may
                // describe it; keep the first if a server repeats itself.
                entry.extents.get_or_insert(extents);
            }
            _ => {
                // Error chunks: errno u32, message length u16, message,
                // and for ERROR_OFFSET the offset u64 after the message.
                let mut r = Reader::new(&payload);
                let (Some(errno), Some(msg_len)) = (r.u32(), r.u16()) else {
                    return Err(bad());
                };
                let Some(msg) = r.take(usize::from(msg_len)) else {
                    return Err(bad());
                };
                let offset = if ty == REPLY_TYPE_ERROR_OFFSET {
                    Some(r.u64().ok_or_else(bad)?)
                } else {
                    None
                };
                if errno == 0 {
                    return Err(ProtocolError::ZeroErrno);
                }
                entry.error.get_or_insert(ReplyError {
                    errno,
                    message: String::from_utf8_lossy(msg).into_owned(),
                    offset,
                });
            }
        }
        if !done {
            return Ok(Progress::Chunk);
        }
        let Some(entry) = self.in_flight.remove(&cookie) else {
            return Err(ProtocolError::UnknownCookie(cookie));
        };
        let request = entry.request;
        let result = entry.finish()?;
        Ok(Progress::Complete(Completion {
            cookie,
            request,
            result,
        }))
    }
}

/// One step of [`ClientTransmission::decode`].
#[derive(Debug)]
pub enum Progress {
    /// `input` must hold at least this many bytes for the next message.
    NeedInput(usize),
    /// A chunk was consumed; its request is still open.
    Chunk,
    /// A request finished.
    Complete(Completion),
}

impl InFlight {
    /// Checks that `[offset, offset + len)` lies inside the read and does
    /// not overlap anything received before, then records it.
    fn place(&mut self, offset: u64, len: u64) -> Result<(), ProtocolError> {
        let req = self.request;
        let out_of_range = || ProtocolError::ChunkOutOfRange {
            offset,
            len,
            req_offset: req.offset,
            req_len: req.length,
        };
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if offset < req.offset || end > req.offset + u64::from(req.length) {
            return Err(out_of_range());
        }
        // The range starting at or before `offset` must end at or before it;
        // the next one must start at or after `end`.
        if let Some((_, &prev_end)) = self.covered.range(..=offset).next_back() {
            if prev_end > offset {
                return Err(ProtocolError::Overlap(offset));
            }
        }
        if let Some((&next_start, _)) = self.covered.range(offset..).next() {
            if next_start < end {
                return Err(ProtocolError::Overlap(offset));
            }
        }
        self.covered.insert(offset, end);
        self.covered_bytes += len;
        Ok(())
    }

    fn buffer(&mut self) -> &mut BytesMut {
        if !matches!(self.data, ReadData::Assembled(_)) {
            let mut buf = BytesMut::zeroed(self.request.length as usize);
            if let ReadData::Whole(ref whole) = self.data {
                // Only possible if a whole-request chunk came first, which
                // `place` then rejects any further chunk for; kept for
                // robustness.
                let n = whole.len().min(buf.len());
                buf[..n].copy_from_slice(&whole[..n]);
            }
            self.data = ReadData::Assembled(buf);
        }
        match self.data {
            ReadData::Assembled(ref mut buf) => buf,
            ReadData::None | ReadData::Whole(_) => unreachable!("just assembled"),
        }
    }

    fn store(&mut self, offset: u64, data: Bytes) {
        // `place` checked the range, so these conversions are lossless.
        let at = usize::try_from(offset - self.request.offset).unwrap_or(usize::MAX);
        if at == 0
            && data.len() == self.request.length as usize
            && matches!(self.data, ReadData::None)
        {
            self.data = ReadData::Whole(data);
            return;
        }
        let buf = self.buffer();
        if let Some(dst) = buf.get_mut(at..at + data.len()) {
            dst.copy_from_slice(&data);
        }
    }

    fn zero(&mut self, offset: u64, len: usize) {
        let at = usize::try_from(offset - self.request.offset).unwrap_or(usize::MAX);
        // The assembly buffer starts zeroed; holes only force it to exist.
        let buf = self.buffer();
        if let Some(dst) = buf.get_mut(at..at + len) {
            dst.fill(0);
        }
    }

    fn finish(self) -> Result<Result<Outcome, ReplyError>, ProtocolError> {
        if let Some(e) = self.error {
            return Ok(Err(e));
        }
        Ok(Ok(match self.request.command {
            Command::Read => {
                let len = self.request.length;
                if self.covered_bytes != u64::from(len) {
                    return Err(ProtocolError::Incomplete {
                        missing: u64::from(len) - self.covered_bytes,
                        len,
                    });
                }
                Outcome::Data(match self.data {
                    ReadData::None => Bytes::new(),
                    ReadData::Whole(b) => b,
                    ReadData::Assembled(b) => b.freeze(),
                })
            }
            Command::BlockStatus => match self.extents {
                Some(e) if !e.is_empty() => Outcome::Extents(e),
                _ => return Err(ProtocolError::NoExtents),
            },
            _ => Outcome::Done,
        }))
    }
}
