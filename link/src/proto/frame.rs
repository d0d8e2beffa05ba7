//! Frames: the header, the [`Encoder`] (compressing data messages when it
//! pays) and the incremental [`Decoder`].

use bytes::{Buf, BufMut, Bytes, BytesMut};
use zstd::bulk::{Compressor, Decompressor};
use zstd::zstd_safe;

use super::message::{Kind, Message};
use super::{ProtoError, HEADER_LEN, MAX_PAYLOAD_LEN};

// Format (frame header, 16 bytes, big-endian):
//   len      u32  bytes after this field: 12 + payload bytes as sent
//   kind     u8   message kind (Kind::code); 0 is never valid
//   flags    u8   bit 0 COMPRESSED: the payload is one zstd frame that
//                 declares its content size; bits 1-7 must be 0
//   class    u8   0 demand, 1 background (Class::code)
//   reserved u8   must be 0
//   id       u64  the request the frame belongs to; 0 if unsolicited
//   payload  len - 12 bytes: the message (message.rs), or its zstd frame

/// Flag bit 0: the payload is a zstd frame.
pub const FLAG_COMPRESSED: u8 = 0x01;

/// `len` counts the header bytes after itself too.
const LEN_FIELD: usize = 4;
const HEADER_AFTER_LEN: usize = HEADER_LEN - LEN_FIELD;

/// A frame's scheduling class. The receiver counts background frames
/// against the credit it granted; demand frames are never held back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    /// Someone is waiting: requests, replies to them, control messages.
    Demand,
    /// Speculative bulk data: prefetch and group pushes.
    Background,
}

impl Class {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            Class::Demand => 0,
            Class::Background => 1,
        }
    }

    /// The inverse of [`Class::code`].
    pub fn from_code(code: u8) -> Option<Class> {
        match code {
            0 => Some(Class::Demand),
            1 => Some(Class::Background),
            _ => None,
        }
    }
}

/// A frame's header, as decoded (or as encoded by [`Encoder::encode`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    /// Whether the payload travelled as a zstd frame.
    pub compressed: bool,
    pub class: Class,
    pub id: u64,
    /// The whole frame's size on the wire, header included: what a
    /// background frame costs in credit.
    pub wire_len: usize,
}

/// When the encoder compresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompressOptions {
    /// Off: every frame goes raw.
    pub enabled: bool,
    /// zstd level; 1 is already several hundred MB/s per core.
    pub level: i32,
    /// Payloads shorter than this go raw: the zstd frame overhead eats the
    /// gain.
    pub min_len: usize,
    /// Payloads longer than this are probed first: the first `sample_len`
    /// bytes are compressed, and unless they shrink to `sample_percent` of
    /// their size the whole payload goes raw. Encrypted or already
    /// compressed disk data thus costs one small probe, not a full pass.
    pub sample_len: usize,
    /// See `sample_len`.
    pub sample_percent: u8,
}

impl Default for CompressOptions {
    fn default() -> Self {
        CompressOptions {
            enabled: true,
            level: 1,
            min_len: 512,
            sample_len: 4096,
            sample_percent: 90,
        }
    }
}

impl CompressOptions {
    /// Never compress.
    pub fn disabled() -> Self {
        CompressOptions {
            enabled: false,
            ..CompressOptions::default()
        }
    }
}

/// Encodes messages into frames. Holds a zstd context and a scratch buffer
/// so compressing does not allocate per frame.
pub struct Encoder {
    options: CompressOptions,
    compressor: Option<Compressor<'static>>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Default for Encoder {
    fn default() -> Self {
        Encoder::new(CompressOptions::default())
    }
}

impl Encoder {
    pub fn new(options: CompressOptions) -> Self {
        // Without a zstd context (out of memory) frames simply go raw.
        let compressor = if options.enabled {
            Compressor::new(options.level).ok()
        } else {
            None
        };
        Encoder {
            options,
            compressor,
            scratch: Vec::new(),
        }
    }

    pub fn options(&self) -> &CompressOptions {
        &self.options
    }

    /// Appends one frame holding `msg` to `out`. On error `out` is left as
    /// it was. Compresses `ReadData`, `Push` and `WriteBatch` payloads when
    /// enabled and worthwhile; the result is never larger than raw.
    pub fn encode(
        &mut self,
        id: u64,
        class: Class,
        msg: &Message,
        out: &mut BytesMut,
    ) -> Result<FrameHeader, ProtoError> {
        msg.validate()?;
        let payload_len = msg.payload_len();
        if payload_len > MAX_PAYLOAD_LEN {
            return Err(ProtoError::FrameTooLarge {
                len: (HEADER_AFTER_LEN + payload_len) as u64,
                max: (HEADER_AFTER_LEN + MAX_PAYLOAD_LEN) as u64,
            });
        }
        let kind = msg.kind();
        let start = out.len();
        out.reserve(HEADER_LEN + payload_len);
        out.put_bytes(0, HEADER_LEN);
        msg.encode_payload(out);
        debug_assert_eq!(out.len() - start - HEADER_LEN, payload_len);

        let compressed = kind.compressible() && self.compress(&out[start + HEADER_LEN..]);
        if compressed {
            out.truncate(start + HEADER_LEN);
            out.extend_from_slice(&self.scratch);
        }
        let wire_len = out.len() - start;
        let len = u32::try_from(wire_len - LEN_FIELD).expect("payload length checked above");
        let header = &mut out[start..start + HEADER_LEN];
        header[..4].copy_from_slice(&len.to_be_bytes());
        header[4] = kind.code();
        header[5] = if compressed { FLAG_COMPRESSED } else { 0 };
        header[6] = class.code();
        header[7] = 0;
        header[8..].copy_from_slice(&id.to_be_bytes());
        Ok(FrameHeader {
            kind,
            compressed,
            class,
            id,
            wire_len,
        })
    }

    /// Compresses `payload` into `self.scratch`; false (send raw) unless
    /// that came out smaller.
    fn compress(&mut self, payload: &[u8]) -> bool {
        let o = self.options;
        let Some(zstd) = self.compressor.as_mut() else {
            return false;
        };
        if !o.enabled || payload.len() < o.min_len {
            return false;
        }
        let mut attempt = |src: &[u8], scratch: &mut Vec<u8>| {
            scratch.clear();
            scratch.reserve(zstd_safe::compress_bound(src.len()));
            zstd.compress_to_buffer(src, scratch).is_ok()
        };
        if payload.len() > o.sample_len {
            let sample = &payload[..o.sample_len];
            if !attempt(sample, &mut self.scratch)
                || self.scratch.len() * 100 >= sample.len() * usize::from(o.sample_percent)
            {
                return false;
            }
        }
        attempt(payload, &mut self.scratch) && self.scratch.len() < payload.len()
    }
}

/// The incremental frame decoder: feed it whatever arrived, take out whole
/// messages.
pub struct Decoder {
    max_payload: usize,
    decompressor: Decompressor<'static>,
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decoder")
            .field("max_payload", &self.max_payload)
            .finish_non_exhaustive()
    }
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder accepting payloads up to [`MAX_PAYLOAD_LEN`].
    pub fn new() -> Self {
        Decoder::with_max_payload(MAX_PAYLOAD_LEN)
    }

    /// A decoder accepting payloads (as sent and after decompression) up to
    /// `max_payload` bytes, at most [`MAX_PAYLOAD_LEN`].
    pub fn with_max_payload(max_payload: usize) -> Self {
        Decoder {
            max_payload: max_payload.min(MAX_PAYLOAD_LEN),
            decompressor: Decompressor::default(),
        }
    }

    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// The largest frame on the wire this decoder accepts, header included.
    pub fn max_frame_len(&self) -> usize {
        HEADER_LEN + self.max_payload
    }

    /// Decodes the first frame in `buf`.
    ///
    /// - `Ok(Some(_))`: exactly that frame was consumed from `buf`.
    /// - `Ok(None)`: no whole frame yet; `buf` holds the same bytes (room
    ///   for the rest of the frame may have been reserved).
    /// - `Err(_)`: the peer broke the protocol; close the link. Header
    ///   errors are reported as soon as the header is in, without waiting
    ///   for the payload; a bad payload's frame may have been consumed.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
    ) -> Result<Option<(FrameHeader, Message)>, ProtoError> {
        let Some(len) = buf
            .first_chunk::<LEN_FIELD>()
            .map(|b| u32::from_be_bytes(*b))
        else {
            return Ok(None);
        };
        let len64 = u64::from(len);
        if len64 < HEADER_AFTER_LEN as u64 {
            return Err(ProtoError::FrameTooShort { len });
        }
        if len64 > (HEADER_AFTER_LEN + self.max_payload) as u64 {
            return Err(ProtoError::FrameTooLarge {
                len: len64,
                max: (HEADER_AFTER_LEN + self.max_payload) as u64,
            });
        }
        let Some(head) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let (kind, compressed, class, id) = parse_header(head)?;
        // Bounded by `max_payload` above.
        let wire_len = LEN_FIELD + usize::try_from(len).unwrap_or(usize::MAX);
        if buf.len() < wire_len {
            buf.reserve(wire_len - buf.len());
            return Ok(None);
        }
        let mut frame = buf.split_to(wire_len).freeze();
        frame.advance(HEADER_LEN);
        let payload = if compressed {
            self.inflate(&frame)?
        } else {
            frame
        };
        let msg = Message::decode_payload(kind, payload)?;
        let header = FrameHeader {
            kind,
            compressed,
            class,
            id,
            wire_len,
        };
        Ok(Some((header, msg)))
    }

    /// Decompresses one zstd frame, allocating no more than it declares
    /// and refusing declarations over the payload limit.
    fn inflate(&mut self, src: &[u8]) -> Result<Bytes, ProtoError> {
        let bad = |reason| ProtoError::BadCompression { reason };
        let size = match zstd_safe::get_frame_content_size(src) {
            Ok(Some(size)) => size,
            Ok(None) => return Err(bad("no content size")),
            Err(_) => return Err(bad("not a zstd frame")),
        };
        if size > self.max_payload as u64 {
            return Err(ProtoError::InflatesTooLarge {
                size,
                max: self.max_payload as u64,
            });
        }
        // Skippable frames or a second frame after the first would
        // otherwise be accepted silently.
        match zstd_safe::find_frame_compressed_size(src) {
            Ok(n) if n == src.len() => {}
            Ok(_) => return Err(bad("trailing bytes after the zstd frame")),
            Err(_) => return Err(bad("corrupt zstd frame")),
        }
        let size = usize::try_from(size).unwrap_or(usize::MAX);
        let mut out = Vec::with_capacity(size);
        match self.decompressor.decompress_to_buffer(src, &mut out) {
            Ok(n) if n == size => Ok(Bytes::from(out)),
            Ok(_) => Err(bad("content size mismatch")),
            Err(_) => Err(bad("corrupt zstd frame")),
        }
    }
}

/// Validates the fixed header fields.
fn parse_header(head: &[u8; HEADER_LEN]) -> Result<(Kind, bool, Class, u64), ProtoError> {
    let kind = Kind::from_code(head[4]).ok_or(ProtoError::UnknownKind(head[4]))?;
    let flags = head[5];
    if flags & !FLAG_COMPRESSED != 0 {
        return Err(ProtoError::BadFlags(flags));
    }
    let compressed = flags & FLAG_COMPRESSED != 0;
    if compressed && !kind.compressible() {
        return Err(ProtoError::CompressionNotAllowed { kind });
    }
    let class = Class::from_code(head[6]).ok_or(ProtoError::BadClass(head[6]))?;
    if head[7] != 0 {
        return Err(ProtoError::BadReserved(head[7]));
    }
    let mut id = [0; 8];
    id.copy_from_slice(&head[8..]);
    Ok((kind, compressed, class, u64::from_be_bytes(id)))
}
