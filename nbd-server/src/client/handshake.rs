//! The client side of the fixed newstyle handshake, as a state machine that
//! consumes the server's bytes and produces the client's.
//!
//! ```text
//!   greeting ─> client flags ─> OPT_STRUCTURED_REPLY ─> OPT_SET_META_CONTEXT
//!                                   (ACK or error)        (base:allocation)
//!            ─> OPT_GO + INFO_BLOCK_SIZE ─> INFO_EXPORT/INFO_BLOCK_SIZE ─> ACK
//!               └ ERR_UNSUP: OPT_EXPORT_NAME (old servers) ─> size, flags
//! ```
//!
//! Options are sent one at a time and each is answered before the next:
//! whether `base:allocation` may be asked for depends on the structured
//! reply answer, and one round trip per option is nothing next to a
//! connection's lifetime.

use bytes::{Buf, BufMut, BytesMut};

use crate::proto::consts::{
    EXPORT_NAME_ZEROES, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES, GREETING_LEN, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, MAX_STRING_LEN, NBDMAGIC,
    OPTION_REPLY_HEADER_LEN, OPTION_REPLY_MAGIC, OPT_EXPORT_NAME, OPT_GO, OPT_SET_META_CONTEXT,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_TLS_REQD, REP_ERR_UNSUP, REP_FLAG_ERROR, REP_INFO,
    REP_META_CONTEXT,
};
use crate::proto::{Reader, BASE_ALLOCATION};

/// Option replies larger than this are a broken or hostile server: nothing
/// this client asks for is answered with more than a few strings.
pub const MAX_OPTION_REPLY_LEN: u32 = 1024 * 1024;

/// What the client wants from the handshake.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The export to open (`""`: the server's default export).
    pub export: String,
    /// Ask for structured replies (sparse reads, error messages, block
    /// status).
    pub structured_replies: bool,
    /// Ask for the `base:allocation` metadata context (needs structured
    /// replies).
    pub base_allocation: bool,
}

impl ClientOptions {
    /// Everything this client can use, for `export`.
    pub fn new(export: impl Into<String>) -> Self {
        ClientOptions {
            export: export.into(),
            structured_replies: true,
            base_allocation: true,
        }
    }
}

/// The server's block-size constraints (`NBD_INFO_BLOCK_SIZE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerBlockSizes {
    pub min: u32,
    pub preferred: u32,
    pub max: u32,
}

/// The outcome of a successful client handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientNegotiated {
    /// Export size in bytes.
    pub size: u64,
    /// `NBD_FLAG_*` transmission flags.
    pub transmission_flags: u16,
    /// `None` when the server sent no `NBD_INFO_BLOCK_SIZE` (then any
    /// alignment works and 32 MiB is the conventional maximum).
    pub block_sizes: Option<ServerBlockSizes>,
    /// Replies may be structured (the server acknowledged
    /// `NBD_OPT_STRUCTURED_REPLY`).
    pub structured_replies: bool,
    /// The context id of `base:allocation`, when the server selected it.
    pub base_allocation: Option<u32>,
}

/// What the caller does after [`ClientHandshake::advance`].
#[derive(Debug)]
pub enum ClientStep {
    /// Send the output, read more input, call `advance` again.
    NeedInput,
    /// Send the output; the connection is in the transmission phase. Bytes
    /// left in the input buffer are the start of the first reply (none in
    /// practice: the server only speaks when asked).
    Done(ClientNegotiated),
}

/// Fatal handshake errors: the connection is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ClientHandshakeError {
    #[error("not an NBD server (magic {0:#018x})")]
    BadMagic(u64),
    #[error("the server speaks oldstyle NBD, which is not supported")]
    Oldstyle,
    #[error("the server does not speak fixed newstyle NBD (flags {0:#06x})")]
    NotFixedNewstyle(u16),
    #[error("bad option reply magic {0:#018x}")]
    BadReplyMagic(u64),
    #[error("option reply of {0} bytes is over the limit")]
    ReplyTooLarge(u32),
    #[error("reply to option {got} while waiting for option {expected}")]
    WrongOption { expected: u32, got: u32 },
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("the server requires TLS, which this client does not speak")]
    TlsRequired,
    #[error("the server refused export {export:?} (reply {code:#010x}): {message}")]
    ExportRefused {
        export: String,
        code: u32,
        message: String,
    },
    #[error("the server finished OPT_GO without describing the export")]
    NoExportInfo,
    #[error("invalid block sizes from the server: min {min}, preferred {preferred}, max {max}")]
    BadBlockSizes { min: u32, preferred: u32, max: u32 },
    #[error("export name of {0} bytes is longer than the protocol allows")]
    ExportNameTooLong(usize),
    #[error("advance called after the handshake finished")]
    Finished,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Greeting,
    StructuredReply,
    SetMetaContext,
    Go,
    /// Waiting for the `NBD_OPT_EXPORT_NAME` answer: size u64, flags u16,
    /// then 124 zero bytes unless both sides agreed to `NO_ZEROES`.
    ExportName,
    Done,
}

/// The client's handshake state machine.
#[derive(Debug)]
pub struct ClientHandshake {
    opts: ClientOptions,
    state: State,
    no_zeroes: bool,
    structured: bool,
    base_allocation: Option<u32>,
    export: Option<(u64, u16)>,
    block_sizes: Option<ServerBlockSizes>,
}

impl ClientHandshake {
    /// Starts the handshake. Nothing is sent before the server's greeting.
    pub fn new(opts: ClientOptions) -> Result<Self, ClientHandshakeError> {
        if opts.export.len() > MAX_STRING_LEN {
            return Err(ClientHandshakeError::ExportNameTooLong(opts.export.len()));
        }
        Ok(ClientHandshake {
            opts,
            state: State::Greeting,
            no_zeroes: false,
            structured: false,
            base_allocation: None,
            export: None,
            block_sizes: None,
        })
    }

    /// Consumes whatever complete messages `input` holds and appends the
    /// client's answers to `out`.
    pub fn advance(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<ClientStep, ClientHandshakeError> {
        loop {
            match self.state {
                State::Greeting => {
                    // Format (greeting): NBDMAGIC u64, then IHAVEOPT u64
                    // (newstyle; oldstyle sends 0x00420281861253 instead)
                    // and handshake flags u16.
                    let mut r = Reader::new(input);
                    let (Some(magic), Some(opt_magic), Some(flags)) = (r.u64(), r.u64(), r.u16())
                    else {
                        return Ok(ClientStep::NeedInput);
                    };
                    if magic != NBDMAGIC {
                        return Err(ClientHandshakeError::BadMagic(magic));
                    }
                    if opt_magic != IHAVEOPT {
                        return Err(ClientHandshakeError::Oldstyle);
                    }
                    if flags & FLAG_FIXED_NEWSTYLE == 0 {
                        return Err(ClientHandshakeError::NotFixedNewstyle(flags));
                    }
                    input.advance(GREETING_LEN);
                    self.no_zeroes = flags & FLAG_NO_ZEROES != 0;
                    // Format (client flags): u32; only bits the server
                    // advertised may be set.
                    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
                    if self.no_zeroes {
                        cflags |= FLAG_C_NO_ZEROES;
                    }
                    out.put_u32(cflags);
                    if self.opts.structured_replies {
                        put_option(out, OPT_STRUCTURED_REPLY, &[]);
                        self.state = State::StructuredReply;
                    } else {
                        self.send_go(out);
                    }
                }
                State::StructuredReply | State::SetMetaContext | State::Go => {
                    let Some(reply) = take_option_reply(input)? else {
                        return Ok(ClientStep::NeedInput);
                    };
                    if let Some(done) = self.on_reply(&reply, out)? {
                        return Ok(done);
                    }
                }
                State::ExportName => {
                    let need = 10
                        + if self.no_zeroes {
                            0
                        } else {
                            EXPORT_NAME_ZEROES
                        };
                    if input.len() < need {
                        return Ok(ClientStep::NeedInput);
                    }
                    let size = input.get_u64();
                    let flags = input.get_u16();
                    input.advance(need - 10);
                    self.export = Some((size, flags));
                    return self.finish();
                }
                State::Done => return Err(ClientHandshakeError::Finished),
            }
        }
    }

    /// Handles one option reply; `Some` when it ended the handshake.
    fn on_reply(
        &mut self,
        reply: &OptionReply,
        out: &mut BytesMut,
    ) -> Result<Option<ClientStep>, ClientHandshakeError> {
        let expected = match self.state {
            State::StructuredReply => OPT_STRUCTURED_REPLY,
            State::SetMetaContext => OPT_SET_META_CONTEXT,
            _ => OPT_GO,
        };
        if reply.option != expected {
            return Err(ClientHandshakeError::WrongOption {
                expected,
                got: reply.option,
            });
        }
        if reply.ty == REP_ERR_TLS_REQD {
            return Err(ClientHandshakeError::TlsRequired);
        }
        match self.state {
            State::StructuredReply => {
                // Any error (typically ERR_UNSUP) means simple replies only;
                // anything other than ACK is not a valid answer.
                self.structured = match reply.ty {
                    REP_ACK => true,
                    ty if ty & REP_FLAG_ERROR != 0 => false,
                    _ => return Err(ClientHandshakeError::Malformed("structured reply answer")),
                };
                if self.structured && self.opts.base_allocation {
                    self.send_set_meta_context(out);
                } else {
                    self.send_go(out);
                }
            }
            State::SetMetaContext => match reply.ty {
                REP_META_CONTEXT => {
                    // Format (NBD_REP_META_CONTEXT): context id u32, name.
                    let mut r = Reader::new(&reply.data);
                    let id = r
                        .u32()
                        .ok_or(ClientHandshakeError::Malformed("meta context reply"))?;
                    if r.take(reply.data.len() - 4) == Some(BASE_ALLOCATION.as_bytes()) {
                        self.base_allocation = Some(id);
                    }
                }
                REP_ACK => self.send_go(out),
                // Errors (unsupported, no such context): carry on without.
                ty if ty & REP_FLAG_ERROR != 0 => {
                    self.base_allocation = None;
                    self.send_go(out);
                }
                _ => return Err(ClientHandshakeError::Malformed("meta context answer")),
            },
            State::Go => match reply.ty {
                REP_INFO => self.on_info(&reply.data)?,
                REP_ACK => return self.finish().map(Some),
                REP_ERR_UNSUP => {
                    // A server from before OPT_GO: fall back to
                    // OPT_EXPORT_NAME, which can only be answered with the
                    // export or a dropped connection.
                    put_option(out, OPT_EXPORT_NAME, self.opts.export.as_bytes());
                    self.state = State::ExportName;
                }
                ty if ty & REP_FLAG_ERROR != 0 => {
                    return Err(ClientHandshakeError::ExportRefused {
                        export: self.opts.export.clone(),
                        code: ty,
                        message: String::from_utf8_lossy(&reply.data).into_owned(),
                    })
                }
                // Other informational replies are allowed and ignorable.
                _ => {}
            },
            State::Greeting | State::ExportName | State::Done => {
                unreachable!("on_reply is only called while waiting for an option reply")
            }
        }
        Ok(None)
    }

    fn on_info(&mut self, data: &[u8]) -> Result<(), ClientHandshakeError> {
        let mut r = Reader::new(data);
        let Some(kind) = r.u16() else {
            return Err(ClientHandshakeError::Malformed("NBD_REP_INFO"));
        };
        match kind {
            INFO_EXPORT => {
                // Format (NBD_INFO_EXPORT): type u16 = 0, size u64,
                // transmission flags u16.
                let (Some(size), Some(flags), true) = (r.u64(), r.u16(), r.is_empty()) else {
                    return Err(ClientHandshakeError::Malformed("NBD_INFO_EXPORT"));
                };
                self.export = Some((size, flags));
            }
            INFO_BLOCK_SIZE => {
                // Format (NBD_INFO_BLOCK_SIZE): type u16 = 3, minimum u32,
                // preferred u32, maximum u32.
                let (Some(min), Some(preferred), Some(max), true) =
                    (r.u32(), r.u32(), r.u32(), r.is_empty())
                else {
                    return Err(ClientHandshakeError::Malformed("NBD_INFO_BLOCK_SIZE"));
                };
                // The spec: min a power of two up to 64 KiB, preferred a
                // power of two at least min, max a multiple of min (or
                // 0xffffffff). Anything else makes splitting impossible.
                let bad = !min.is_power_of_two()
                    || min > 64 * 1024
                    || !preferred.is_power_of_two()
                    || preferred < min
                    || max < min
                    || (max != u32::MAX && !max.is_multiple_of(min));
                if bad {
                    return Err(ClientHandshakeError::BadBlockSizes {
                        min,
                        preferred,
                        max,
                    });
                }
                self.block_sizes = Some(ServerBlockSizes {
                    min,
                    preferred,
                    max,
                });
            }
            // Names and descriptions are for humans; unknown types must be
            // ignored.
            _ => {}
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<ClientStep, ClientHandshakeError> {
        let Some((size, transmission_flags)) = self.export else {
            return Err(ClientHandshakeError::NoExportInfo);
        };
        self.state = State::Done;
        Ok(ClientStep::Done(ClientNegotiated {
            size,
            transmission_flags,
            block_sizes: self.block_sizes,
            structured_replies: self.structured,
            base_allocation: self.base_allocation,
        }))
    }

    fn send_set_meta_context(&mut self, out: &mut BytesMut) {
        // Format (NBD_OPT_SET_META_CONTEXT data): export name length u32,
        // name, number of queries u32, then per query: length u32, query.
        let name = self.opts.export.as_bytes();
        let mut data = BytesMut::with_capacity(12 + name.len() + BASE_ALLOCATION.len());
        put_string(&mut data, name);
        data.put_u32(1);
        put_string(&mut data, BASE_ALLOCATION.as_bytes());
        put_option(out, OPT_SET_META_CONTEXT, &data);
        self.state = State::SetMetaContext;
    }

    fn send_go(&mut self, out: &mut BytesMut) {
        // Format (NBD_OPT_GO data): export name length u32, name, number of
        // information requests u16, then each request type u16. Asking for
        // INFO_BLOCK_SIZE also tells the server we honour its limits.
        let name = self.opts.export.as_bytes();
        let mut data = BytesMut::with_capacity(8 + name.len());
        put_string(&mut data, name);
        data.put_u16(1);
        data.put_u16(INFO_BLOCK_SIZE);
        put_option(out, OPT_GO, &data);
        self.state = State::Go;
    }
}

fn put_string(out: &mut BytesMut, s: &[u8]) {
    // Strings are capped at 4096 bytes by the constructor, so this fits.
    out.put_u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
    out.put_slice(s);
}

/// Format (option): IHAVEOPT u64, option u32, data length u32, data.
fn put_option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    put_string(out, data);
}

struct OptionReply {
    option: u32,
    ty: u32,
    data: BytesMut,
}

/// Format (option reply): magic u64 = 0x3e889045565a9, option u32, reply
/// type u32, data length u32, data.
fn take_option_reply(input: &mut BytesMut) -> Result<Option<OptionReply>, ClientHandshakeError> {
    let mut r = Reader::new(input);
    let (Some(magic), Some(option), Some(ty), Some(len)) = (r.u64(), r.u32(), r.u32(), r.u32())
    else {
        return Ok(None);
    };
    if magic != OPTION_REPLY_MAGIC {
        return Err(ClientHandshakeError::BadReplyMagic(magic));
    }
    if len > MAX_OPTION_REPLY_LEN {
        return Err(ClientHandshakeError::ReplyTooLarge(len));
    }
    let total = OPTION_REPLY_HEADER_LEN + len as usize;
    if input.len() < total {
        input.reserve(total - input.len());
        return Ok(None);
    }
    input.advance(OPTION_REPLY_HEADER_LEN);
    let data = input.split_to(len as usize);
    Ok(Some(OptionReply { option, ty, data }))
}
