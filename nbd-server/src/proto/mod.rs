//! The NBD protocol as a pure, sans-IO codec: no sockets, no runtime.
//!
//! The connection loop owns the socket and two buffers. During the
//! handshake it feeds whatever it read into [`Handshake::advance`] and
//! writes out what that appended to its output buffer; during transmission
//! it feeds [`RequestDecoder::decode`], checks each request with
//! [`validate`], runs it against the device and encodes the answer with the
//! `encode_*` functions. Keeping the protocol free of I/O is what lets the
//! unit tests, the proptests and the fuzz targets drive it byte by byte.
//!
//! Only fixed newstyle negotiation with compact (non-extended) headers is
//! spoken; oldstyle and plain newstyle clients are refused at the first
//! step, and `NBD_OPT_EXTENDED_HEADERS` is answered `NBD_REP_ERR_UNSUP`.

pub mod consts;
pub mod handshake;
pub mod transmission;

#[cfg(test)]
pub(crate) mod testutil;

pub use handshake::{
    transmission_flags, ExportCatalog, ExportInfo, Handshake, HandshakeError, Negotiated, Step,
    TlsMode, BASE_ALLOCATION, BASE_ALLOCATION_ID,
};
pub use transmission::{
    encode_block_status, encode_offset_data_header, encode_offset_hole, encode_simple_reply,
    encode_structured_error, encode_structured_none, validate, Command, CommandFlags, Decoded,
    RequestDecoder, RequestError, RequestHeader,
};

use blockcore::{BlockError, Op};

/// The error values a reply may carry. The spec restricts replies to this
/// set (whatever the server's own `errno` values are), so this is the whole
/// vocabulary the server has for failures during transmission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Errno {
    /// `NBD_EPERM`: a write to a read-only export.
    Perm,
    /// `NBD_EIO`: the backing store failed.
    Io,
    /// `NBD_ENOMEM`: the spec asks servers to avoid it; kept for
    /// completeness.
    NoMem,
    /// `NBD_EINVAL`: a malformed request, or any request the client was not
    /// allowed to send.
    Inval,
    /// `NBD_ENOSPC`: out of space, including a write past the end of the
    /// export.
    NoSpc,
    /// `NBD_EOVERFLOW`: a payload larger than the server accepts.
    Overflow,
    /// `NBD_ENOTSUP`: a fast zero that would not be fast.
    NotSup,
    /// `NBD_ESHUTDOWN`: the server is going away; the client must
    /// disconnect.
    Shutdown,
}

impl Errno {
    /// The value sent in the reply's error field.
    pub const fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// The inverse of [`Errno::code`]; `None` for values outside the set the
    /// spec allows (a client must treat those as generic failures).
    pub fn from_code(code: u32) -> Option<Errno> {
        Some(match code {
            1 => Errno::Perm,
            5 => Errno::Io,
            12 => Errno::NoMem,
            22 => Errno::Inval,
            28 => Errno::NoSpc,
            75 => Errno::Overflow,
            95 => Errno::NotSup,
            108 => Errno::Shutdown,
            _ => return None,
        })
    }
}

impl From<&BlockError> for Errno {
    /// The one place block-layer errors become NBD errors. Exhaustive on
    /// purpose (no `_` arm): a new [`BlockError`] variant must be mapped
    /// here before the crate builds again.
    fn from(e: &BlockError) -> Self {
        match e {
            // The spec asks for ENOSPC on a write past the end, EINVAL for
            // every other out-of-range request.
            BlockError::OutOfRange { op, .. } => match op {
                Op::Write | Op::WriteZeroes => Errno::NoSpc,
                Op::Read | Op::Flush | Op::Trim | Op::Extents | Op::Prefetch => Errno::Inval,
            },
            BlockError::Misaligned { .. } => Errno::Inval,
            BlockError::TooLarge { .. } => Errno::Overflow,
            BlockError::ReadOnly { .. } => Errno::Perm,
            // The spec reserves ENOTSUP for a write-zeroes that cannot be
            // fast; anything else a device cannot do is an invalid request.
            BlockError::Unsupported { op } => match op {
                Op::WriteZeroes => Errno::NotSup,
                Op::Read | Op::Write | Op::Flush | Op::Trim | Op::Extents | Op::Prefetch => {
                    Errno::Inval
                }
            },
            BlockError::NoSpace { .. } => Errno::NoSpc,
            BlockError::Io { .. } => Errno::Io,
            BlockError::ShuttingDown { .. } => Errno::Shutdown,
        }
    }
}

/// A bounds-checked big-endian cursor over option data. Every read returns
/// `None` instead of panicking when the data runs out, which is how
/// malformed client payloads turn into `NBD_REP_ERR_INVALID`.
#[derive(Debug)]
pub(crate) struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader(data)
    }

    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `s` cut to at most `max` bytes, on a character boundary so the result is
/// still valid UTF-8 (the spec requires UTF-8 strings on the wire).
pub(crate) fn truncate_str(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_codes_round_trip() {
        for e in [
            Errno::Perm,
            Errno::Io,
            Errno::NoMem,
            Errno::Inval,
            Errno::NoSpc,
            Errno::Overflow,
            Errno::NotSup,
            Errno::Shutdown,
        ] {
            assert_eq!(Errno::from_code(e.code()), Some(e));
        }
        assert_eq!(Errno::from_code(0), None);
        assert_eq!(Errno::from_code(2), None);
    }

    #[test]
    fn block_errors_map_to_spec_errnos() {
        let oor = |op| BlockError::OutOfRange {
            op,
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(Errno::from(&oor(Op::Write)), Errno::NoSpc);
        assert_eq!(Errno::from(&oor(Op::WriteZeroes)), Errno::NoSpc);
        assert_eq!(Errno::from(&oor(Op::Read)), Errno::Inval);
        assert_eq!(
            Errno::from(&BlockError::ReadOnly { op: Op::Trim }),
            Errno::Perm
        );
        assert_eq!(
            Errno::from(&BlockError::Unsupported {
                op: Op::WriteZeroes
            }),
            Errno::NotSup
        );
        assert_eq!(
            Errno::from(&BlockError::ShuttingDown { op: Op::Read }),
            Errno::Shutdown
        );
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_str("abc", 10), "abc");
        assert_eq!(truncate_str("abc", 2), "ab");
        // 'é' is two bytes: cutting at 1 must drop it entirely.
        assert_eq!(truncate_str("é", 1), "");
        assert_eq!(truncate_str("aé", 2), "a");
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[0, 1, 2]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
        assert_eq!(r.take(1), Some(&[2u8][..]));
        assert!(r.is_empty());
        assert_eq!(r.u64(), None);
        assert_eq!(r.u32(), None);
    }
}
