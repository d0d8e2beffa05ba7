//! Wire constants of the NBD protocol, named as in the specification
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).
//!
//! Everything on the wire is big-endian ("network byte order"); flag bits
//! are numbered from the least significant bit.

// ---------------------------------------------------------------------------
// Handshake magics and flags
// ---------------------------------------------------------------------------

/// `NBDMAGIC`: the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting magic, and the magic in front of every
/// option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic in front of every option reply (fixed newstyle).
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Server handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the server can omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;
/// Every client flag this server understands; anything else is fatal.
pub const FLAG_C_KNOWN: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------
// Options (`NBD_OPT_*`)
// ---------------------------------------------------------------------------

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
/// Withdrawn; answered like any unknown option.
pub const OPT_PEEK_EXPORT: u32 = 4;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Not supported by this server (answered `NBD_REP_ERR_UNSUP`), so clients
/// stay on compact headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------
// Option replies (`NBD_REP_*`)
// ---------------------------------------------------------------------------

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;

/// Error replies all have bit 31 set.
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------
// `NBD_REP_INFO` information types (`NBD_INFO_*`)
// ---------------------------------------------------------------------------

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------
// Transmission flags (`NBD_FLAG_*`, 16 bits, sent at the end of the handshake)
// ---------------------------------------------------------------------------

pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------
// Transmission phase
// ---------------------------------------------------------------------------

/// Magic of every request (compact headers).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Only meaningful with extended headers, which this server never
/// negotiates: always rejected.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: this is the final chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// `base:allocation` extent flag: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` extent flag: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

// ---------------------------------------------------------------------------
// Sizes and limits
// ---------------------------------------------------------------------------

/// Request header: magic(4) flags(2) type(2) cookie(8) offset(8) length(4).
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply: magic(4) error(4) cookie(8).
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header: magic(4) flags(2) type(2) cookie(8)
/// length(4).
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Option header: magic(8) option(4) length(4).
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic(8) option(4) type(4) length(4).
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Greeting: NBDMAGIC(8) IHAVEOPT(8) handshake flags(2).
pub const GREETING_LEN: usize = 18;
/// Reserved zero bytes after the `NBD_OPT_EXPORT_NAME` reply, unless the
/// client set `NBD_FLAG_C_NO_ZEROES`.
pub const EXPORT_NAME_ZEROES: usize = 124;

/// The spec's hard limit on any string (export names, queries, messages).
pub const MAX_STRING_LEN: usize = 4096;
/// Option data up to this size is buffered and parsed; anything larger is
/// discarded as it arrives and answered `NBD_REP_ERR_TOO_BIG`. No option
/// this server understands comes close (the largest, a meta-context
/// request, is dominated by a few 4 KiB strings).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Option data beyond this is treated as an attack and disconnects: even
/// discarding it would let a client hold the connection in the handshake
/// for as long as it likes while pushing bytes at us.
pub const MAX_SKIPPABLE_OPTION_LEN: u32 = 64 * 1024 * 1024;
/// Options accepted before the client must have picked an export. Real
/// clients need a handful; a client that haggles forever is a
/// denial-of-service (nbdkit uses a similar cap).
pub const MAX_OPTIONS: u32 = 256;
