//! The handshake phase: greeting, client flags and option haggling, as a
//! state machine that consumes bytes and produces bytes.
//!
//! Only fixed newstyle is spoken. Every option the client sends is
//! answered; unknown ones with `NBD_REP_ERR_UNSUP`, malformed ones with
//! `NBD_REP_ERR_INVALID`, and haggling continues. The connection is dropped
//! (a [`HandshakeError`]) only where the spec allows a hard disconnect: bad
//! client flags, a broken option stream, plaintext smuggled in behind
//! `NBD_OPT_STARTTLS`, or a client that looks like a denial of service.

use bytes::{Buf, BufMut, BytesMut};

use super::consts::{
    EXPORT_NAME_ZEROES, FLAG_CAN_MULTI_CONN, FLAG_C_FIXED_NEWSTYLE, FLAG_C_KNOWN, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_HAS_FLAGS, FLAG_NO_ZEROES, FLAG_READ_ONLY, FLAG_SEND_CACHE,
    FLAG_SEND_DF, FLAG_SEND_FAST_ZERO, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM,
    FLAG_SEND_WRITE_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT, INFO_NAME,
    MAX_OPTIONS, MAX_OPTION_LEN, MAX_SKIPPABLE_OPTION_LEN, MAX_STRING_LEN, NBDMAGIC,
    OPTION_HEADER_LEN, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK,
    REP_ERR_BLOCK_SIZE_REQD, REP_ERR_INVALID, REP_ERR_TLS_REQD, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN,
    REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
};
use super::{truncate_str, Reader};

/// The only metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// The context id `base:allocation` gets when selected. Ids are opaque to
/// the client and only need to be unique within the connection; a constant
/// makes replies reproducible.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// One export as the handshake presents it.
#[derive(Clone, Debug)]
pub struct ExportInfo {
    /// Canonical name (what `NBD_OPT_LIST` and `NBD_INFO_NAME` report).
    pub name: String,
    /// Free text for humans; may be empty.
    pub description: String,
    pub device: blockcore::DeviceInfo,
}

/// The exports a server offers. Implemented by the server's configuration;
/// the handshake only ever reads it.
pub trait ExportCatalog {
    /// The export a client asked for by name; `""` means the default export.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
}

/// How the server treats TLS on this connection (the spec's NOTLS,
/// SELECTIVETLS-with-no-TLS-only-exports and FORCEDTLS modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// `NBD_OPT_STARTTLS` is answered `NBD_REP_ERR_UNSUP`.
    #[default]
    Off,
    /// STARTTLS is offered; plaintext is allowed too.
    On,
    /// Every option except STARTTLS and ABORT is refused with
    /// `NBD_REP_ERR_TLS_REQD` until TLS is up; `NBD_OPT_EXPORT_NAME` (which
    /// cannot be answered with an error) closes the connection.
    Require,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug)]
pub struct Negotiated {
    pub export: ExportInfo,
    /// The client negotiated `NBD_OPT_STRUCTURED_REPLY`: reads must be
    /// answered with structured replies.
    pub structured_replies: bool,
    /// The context id of `base:allocation`, if the client selected it with
    /// `NBD_OPT_SET_META_CONTEXT` for the export it then picked.
    /// `NBD_CMD_BLOCK_STATUS` is only valid when this is set.
    pub base_allocation: Option<u32>,
    /// The flags sent to the client; [`validate`](super::validate) checks
    /// requests against them.
    pub transmission_flags: u16,
}

/// What the caller does next after [`Handshake::advance`].
#[derive(Debug)]
pub enum Step {
    /// Send the output, read more input, call `advance` again.
    NeedInput,
    /// Send the output (the STARTTLS ack), upgrade the socket to TLS, call
    /// [`Handshake::tls_started`], then continue calling `advance` with
    /// bytes read over TLS.
    StartTls,
    /// Send the output, then switch to the transmission phase. Bytes left
    /// in the input buffer are the first transmission requests.
    Transmission(Negotiated),
    /// Send the output and close the connection (the client aborted, or
    /// `NBD_OPT_EXPORT_NAME` could not be satisfied).
    Closed,
}

/// Fatal handshake errors: the connection must be dropped without a reply.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags this server never advertised; the spec says to
    /// drop the connection.
    #[error("client sent unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`. Plain newstyle
    /// cannot be told apart from garbage once options go wrong, so it is
    /// not supported.
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// An option did not start with `IHAVEOPT`: the stream is out of sync.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// Option data too large even to discard politely.
    #[error("option {option} carries {len} bytes of data, over the limit of {max}")]
    OptionTooLarge { option: u32, len: u32, max: u32 },
    /// `NBD_OPT_EXPORT_NAME` with a name longer than the spec allows; it
    /// cannot be answered with an error.
    #[error("export name of {0} bytes is longer than the spec allows")]
    ExportNameTooLong(u32),
    /// Bytes arrived after `NBD_OPT_STARTTLS` before the TLS upgrade: they
    /// were sent in plaintext and must not be trusted (CVE-2011-0411-style
    /// injection).
    #[error("{0} bytes of plaintext followed NBD_OPT_STARTTLS")]
    PlaintextAfterStartTls(usize),
    /// The client keeps haggling without ever choosing an export.
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    /// `advance` was called between `Step::StartTls` and `tls_started`.
    #[error("advance called while waiting for the TLS upgrade")]
    TlsPending,
    /// `advance` was called after the handshake ended.
    #[error("advance called after the handshake finished")]
    Finished,
}

/// The transmission flags for `info`, given whether structured replies were
/// negotiated.
pub fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let caps = &info.device.caps;
    let mut flags = FLAG_HAS_FLAGS;
    if caps.read_only {
        flags |= FLAG_READ_ONLY;
    }
    if caps.flush {
        flags |= FLAG_SEND_FLUSH;
    }
    // FUA is always honoured: natively, or by flushing after the write.
    if caps.flush || caps.fua {
        flags |= FLAG_SEND_FUA;
    }
    if !caps.read_only {
        // Advertising write-type commands on a read-only export would only
        // invite requests that must fail with EPERM (nbdkit omits them too).
        if caps.trim {
            flags |= FLAG_SEND_TRIM;
        }
        // Write-zeroes can always be emulated with ordinary writes, and a
        // fast-zero request is answered ENOTSUP when it would not be fast,
        // which the spec explicitly allows.
        flags |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if caps.multi_conn {
        flags |= FLAG_CAN_MULTI_CONN;
    }
    // Cache is a hint: succeeding without effect is allowed.
    flags |= FLAG_SEND_CACHE;
    // DF must stay clear without structured replies; with them, a read is
    // always sent as one data chunk anyway.
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for the client's 32-bit flags.
    ClientFlags,
    /// Waiting for the next option header (and its data).
    Options,
    /// Dropping the data of an over-long option as it arrives; `reply` is
    /// sent once `remaining` reaches zero.
    Discard {
        option: u32,
        remaining: u32,
        reply: u32,
    },
    /// STARTTLS was acked; waiting for [`Handshake::tls_started`].
    AwaitTls,
    /// Transmission, or closed.
    Done,
}

/// What `NBD_OPT_SET_META_CONTEXT` last selected.
#[derive(Debug, Clone)]
struct MetaSelection {
    /// The export name exactly as the client sent it: the spec ties the
    /// selection to "the same export name" used to enter transmission.
    export: String,
    base_allocation: bool,
}

/// The server side of the handshake.
#[derive(Debug)]
pub struct Handshake {
    tls: TlsMode,
    tls_active: bool,
    state: State,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
    options_seen: u32,
}

/// Why an option's data was rejected: the reply type and a message for the
/// human at the other end.
type Reject = (u32, &'static str);

impl Handshake {
    /// Starts a handshake, writing the server greeting to `out`.
    pub fn new(tls: TlsMode, out: &mut BytesMut) -> Self {
        // Format (greeting): NBDMAGIC u64, IHAVEOPT u64, handshake flags u16.
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        Handshake {
            tls,
            tls_active: false,
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta: None,
            options_seen: 0,
        }
    }

    /// Whether TLS has been started on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Consumes every complete message at the front of `input` and appends
    /// the replies to `out`. Never consumes more than `input` holds, and
    /// never buffers more than one option of at most
    /// [`MAX_OPTION_LEN`] bytes: larger option data is dropped as it
    /// arrives.
    pub fn advance(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Step, HandshakeError> {
        loop {
            match self.state {
                State::ClientFlags => {
                    // Format (client flags): u32, bit 0 FIXED_NEWSTYLE,
                    // bit 1 NO_ZEROES; every other bit must be clear.
                    let Some(flags) = Reader::new(input).u32() else {
                        return Ok(Step::NeedInput);
                    };
                    input.advance(4);
                    if flags & !FLAG_C_KNOWN != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
                        return Err(HandshakeError::NotFixedNewstyle(flags));
                    }
                    self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Options => {
                    if let Some(step) = self.next_option(input, catalog, out)? {
                        return Ok(step);
                    }
                }
                State::Discard {
                    option,
                    remaining,
                    reply,
                } => {
                    let n = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(input.len());
                    input.advance(n);
                    // n <= remaining, so this cannot underflow; saturate anyway.
                    let left = remaining.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
                    if left > 0 {
                        self.state = State::Discard {
                            option,
                            remaining: left,
                            reply,
                        };
                        return Ok(Step::NeedInput);
                    }
                    let msg = if reply == REP_ERR_TLS_REQD {
                        "TLS is required"
                    } else {
                        "option data too large"
                    };
                    put_reply(out, option, reply, msg.as_bytes());
                    self.state = State::Options;
                }
                State::AwaitTls => return Err(HandshakeError::TlsPending),
                State::Done => return Err(HandshakeError::Finished),
            }
        }
    }

    /// Call once the TLS upgrade after [`Step::StartTls`] succeeded. The spec
    /// forbids carrying negotiation state across the upgrade, so structured
    /// replies and meta contexts must be negotiated again.
    pub fn tls_started(&mut self) {
        if self.state == State::AwaitTls {
            self.tls_active = true;
            self.structured = false;
            self.meta = None;
            self.state = State::Options;
        }
    }

    fn tls_required(&self) -> bool {
        self.tls == TlsMode::Require && !self.tls_active
    }

    /// Handles one option if it is complete in `input`. `Ok(None)` means
    /// "keep going"; `Ok(Some(step))` ends this `advance` call.
    fn next_option(
        &mut self,
        input: &mut BytesMut,
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Result<Option<Step>, HandshakeError> {
        // Format (option header): IHAVEOPT u64, option u32, data length u32,
        // then `length` bytes of option data.
        let mut r = Reader::new(input);
        let (Some(magic), Some(option), Some(len)) = (r.u64(), r.u32(), r.u32()) else {
            return Ok(Some(Step::NeedInput));
        };
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        if len > MAX_SKIPPABLE_OPTION_LEN {
            return Err(HandshakeError::OptionTooLarge {
                option,
                len,
                max: MAX_SKIPPABLE_OPTION_LEN,
            });
        }
        if option == OPT_ABORT {
            // The session ends either way: ack without waiting for data the
            // client should not have sent (the spec says to ignore it).
            let avail = input.len().min(OPTION_HEADER_LEN + len as usize);
            input.advance(avail);
            put_reply(out, option, REP_ACK, &[]);
            self.state = State::Done;
            return Ok(Some(Step::Closed));
        }
        if option == OPT_EXPORT_NAME && len as usize > MAX_STRING_LEN {
            // No error reply exists for EXPORT_NAME, and a name this long
            // breaks a MUST: hang up.
            return Err(HandshakeError::ExportNameTooLong(len));
        }
        self.options_seen += 1;
        if self.options_seen > MAX_OPTIONS {
            return Err(HandshakeError::TooManyOptions(MAX_OPTIONS));
        }
        if len > MAX_OPTION_LEN {
            input.advance(OPTION_HEADER_LEN);
            let reply = if self.tls_required() && option != OPT_STARTTLS {
                REP_ERR_TLS_REQD
            } else {
                REP_ERR_TOO_BIG
            };
            self.state = State::Discard {
                option,
                remaining: len,
                reply,
            };
            return Ok(None);
        }
        let total = OPTION_HEADER_LEN + len as usize;
        if input.len() < total {
            // Not counted yet: the header will be parsed again.
            self.options_seen -= 1;
            input.reserve(total - input.len());
            return Ok(Some(Step::NeedInput));
        }
        input.advance(OPTION_HEADER_LEN);
        let data = input.split_to(len as usize);
        let step = self.handle_option(option, &data, catalog, out);
        if matches!(step, Some(Step::StartTls)) && !input.is_empty() {
            return Err(HandshakeError::PlaintextAfterStartTls(input.len()));
        }
        Ok(step)
    }

    fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Option<Step> {
        if self.tls_required() && option != OPT_STARTTLS {
            if option == OPT_EXPORT_NAME {
                // Cannot be refused with an error: the spec says to hang up.
                self.state = State::Done;
                return Some(Step::Closed);
            }
            put_reply(out, option, REP_ERR_TLS_REQD, b"TLS is required");
            return None;
        }
        match option {
            OPT_EXPORT_NAME => Some(self.export_name(data, catalog, out)),
            OPT_LIST => {
                Self::list(data, catalog, out);
                None
            }
            OPT_STARTTLS => self.starttls(data, out),
            OPT_INFO | OPT_GO => self.info_or_go(option, data, catalog, out),
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    self.structured = true;
                    put_reply(out, option, REP_ACK, &[]);
                } else {
                    put_reply(out, option, REP_ERR_INVALID, b"unexpected option data");
                }
                None
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, catalog, out);
                None
            }
            _ => {
                put_reply(out, option, REP_ERR_UNSUP, b"option not supported");
                None
            }
        }
    }

    fn export_name(
        &mut self,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Step {
        self.state = State::Done;
        let Ok(name) = parse_string(data) else {
            return Step::Closed;
        };
        let Some(export) = catalog.lookup(name) else {
            tracing::debug!(name, "NBD_OPT_EXPORT_NAME for an unknown export");
            return Step::Closed;
        };
        let flags = transmission_flags(&export, self.structured);
        // Format (EXPORT_NAME reply, no option-reply header): export size
        // u64, transmission flags u16, then 124 zero bytes unless the client
        // set NO_ZEROES.
        out.put_u64(export.device.size);
        out.put_u16(flags);
        if !self.no_zeroes {
            out.put_bytes(0, EXPORT_NAME_ZEROES);
        }
        Step::Transmission(self.negotiated(name, export, flags))
    }

    fn negotiated(&self, requested_name: &str, export: ExportInfo, flags: u16) -> Negotiated {
        let base_allocation = match &self.meta {
            Some(m) if self.structured && m.base_allocation && m.export == requested_name => {
                Some(BASE_ALLOCATION_ID)
            }
            _ => None,
        };
        Negotiated {
            export,
            structured_replies: self.structured,
            base_allocation,
            transmission_flags: flags,
        }
    }

    fn list(data: &[u8], catalog: &dyn ExportCatalog, out: &mut BytesMut) {
        if !data.is_empty() {
            put_reply(out, OPT_LIST, REP_ERR_INVALID, b"unexpected option data");
            return;
        }
        for export in catalog.list() {
            if export.name.len() > MAX_STRING_LEN {
                tracing::warn!(
                    len = export.name.len(),
                    "export name too long for NBD; not listed"
                );
                continue;
            }
            let desc = truncate_str(&export.description, MAX_STRING_LEN);
            // Format (NBD_REP_SERVER data): name length u32, name, then the
            // description as free text filling the rest of the reply.
            let len = 4 + export.name.len() + desc.len();
            put_reply_header(out, OPT_LIST, REP_SERVER, len);
            put_len_u32(out, export.name.len());
            out.put_slice(export.name.as_bytes());
            out.put_slice(desc.as_bytes());
        }
        put_reply(out, OPT_LIST, REP_ACK, &[]);
    }

    fn starttls(&mut self, data: &[u8], out: &mut BytesMut) -> Option<Step> {
        let (reply, msg): (u32, &[u8]) = if self.tls == TlsMode::Off {
            (REP_ERR_UNSUP, b"TLS is not configured")
        } else if self.tls_active {
            (REP_ERR_INVALID, b"TLS is already active")
        } else if !data.is_empty() {
            (REP_ERR_INVALID, b"unexpected option data")
        } else {
            put_reply(out, OPT_STARTTLS, REP_ACK, &[]);
            self.state = State::AwaitTls;
            return Some(Step::StartTls);
        };
        put_reply(out, OPT_STARTTLS, reply, msg);
        None
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) -> Option<Step> {
        let (name, requests) = match parse_info_request(data) {
            Ok(parsed) => parsed,
            Err((reply, msg)) => {
                put_reply(out, option, reply, msg.as_bytes());
                return None;
            }
        };
        let Some(export) = catalog.lookup(name) else {
            put_reply(out, option, REP_ERR_UNKNOWN, b"unknown export");
            return None;
        };
        let wants = |info: u16| requests.contains(&info);
        let sizes = export.device.block_sizes;
        if option == OPT_GO && !wants(INFO_BLOCK_SIZE) && sizes.min > 1 {
            // The client did not promise to honour our minimum block size.
            // The spec lets us refuse, and asks us to send the sizes first
            // so a capable client can retry at once.
            put_info_block_size(out, option, &export);
            put_reply(
                out,
                option,
                REP_ERR_BLOCK_SIZE_REQD,
                b"this export needs NBD_INFO_BLOCK_SIZE",
            );
            return None;
        }
        let flags = transmission_flags(&export, self.structured);
        // Format (NBD_REP_INFO / NBD_INFO_EXPORT): info type u16, export
        // size u64, transmission flags u16.
        put_reply_header(out, option, REP_INFO, 12);
        out.put_u16(INFO_EXPORT);
        out.put_u64(export.device.size);
        out.put_u16(flags);
        if wants(INFO_NAME) {
            put_info_string(out, option, INFO_NAME, &export.name);
        }
        if wants(INFO_DESCRIPTION) {
            put_info_string(out, option, INFO_DESCRIPTION, &export.description);
        }
        // Always sent: the client may ignore it, and it is how our limits
        // reach clients that do look.
        put_info_block_size(out, option, &export);
        put_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            self.state = State::Done;
            return Some(Step::Transmission(self.negotiated(name, export, flags)));
        }
        None
    }

    fn meta_context(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut BytesMut,
    ) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection even when it fails.
            self.meta = None;
            if !self.structured {
                put_reply(
                    out,
                    option,
                    REP_ERR_INVALID,
                    b"negotiate structured replies first",
                );
                return;
            }
        }
        let (name, queries) = match parse_meta_request(data) {
            Ok(parsed) => parsed,
            Err((reply, msg)) => {
                put_reply(out, option, reply, msg.as_bytes());
                return;
            }
        };
        if catalog.lookup(name).is_none() {
            put_reply(out, option, REP_ERR_UNKNOWN, b"unknown export");
            return;
        }
        let selected = if set {
            // "base:" is a wildcard for LIST only; the spec says SET ignores
            // it. Unknown namespaces and leaves are ignored, not errors.
            queries.contains(&BASE_ALLOCATION)
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == "base:" || *q == BASE_ALLOCATION)
        };
        if selected {
            // LIST replies carry the reserved context id 0.
            let id = if set { BASE_ALLOCATION_ID } else { 0 };
            // Format (NBD_REP_META_CONTEXT data): context id u32, then the
            // context name filling the rest of the reply.
            put_reply_header(out, option, REP_META_CONTEXT, 4 + BASE_ALLOCATION.len());
            out.put_u32(id);
            out.put_slice(BASE_ALLOCATION.as_bytes());
        }
        if set {
            self.meta = Some(MetaSelection {
                export: name.to_owned(),
                base_allocation: selected,
            });
        }
        put_reply(out, option, REP_ACK, &[]);
    }
}

/// A client-sent string: at most 4096 bytes of UTF-8 without NUL.
fn parse_string(bytes: &[u8]) -> Result<&str, Reject> {
    if bytes.len() > MAX_STRING_LEN {
        return Err((REP_ERR_INVALID, "string longer than 4096 bytes"));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| (REP_ERR_INVALID, "string is not UTF-8"))?;
    if s.contains('\0') {
        return Err((REP_ERR_INVALID, "string contains NUL"));
    }
    Ok(s)
}

/// Reads a u32 length and that many bytes of string.
fn read_string<'a>(r: &mut Reader<'a>) -> Result<&'a str, Reject> {
    const TRUNCATED: Reject = (REP_ERR_INVALID, "option data truncated");
    let len = r.u32().ok_or(TRUNCATED)?;
    if len as usize > MAX_STRING_LEN {
        return Err((REP_ERR_INVALID, "string longer than 4096 bytes"));
    }
    parse_string(r.take(len as usize).ok_or(TRUNCATED)?)
}

/// Parses `NBD_OPT_INFO` / `NBD_OPT_GO` data into the export name and the
/// requested information types.
fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), Reject> {
    const TRUNCATED: Reject = (REP_ERR_INVALID, "option data truncated");
    // Format (INFO/GO data): name length u32, name, number of information
    // requests u16, that many u16 information types.
    let mut r = Reader::new(data);
    let name = read_string(&mut r)?;
    let n = r.u16().ok_or(TRUNCATED)?;
    let mut requests = Vec::with_capacity(usize::from(n).min(data.len() / 2));
    for _ in 0..n {
        requests.push(r.u16().ok_or(TRUNCATED)?);
    }
    if !r.is_empty() {
        return Err((REP_ERR_INVALID, "trailing option data"));
    }
    Ok((name, requests))
}

/// Parses `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` data into
/// the export name and the queries.
fn parse_meta_request(data: &[u8]) -> Result<(&str, Vec<&str>), Reject> {
    const TRUNCATED: Reject = (REP_ERR_INVALID, "option data truncated");
    // Format (meta context data): export name length u32, name, number of
    // queries u32, then per query: length u32, query string.
    let mut r = Reader::new(data);
    let name = read_string(&mut r)?;
    let n = r.u32().ok_or(TRUNCATED)?;
    // Each query takes at least 4 bytes, so a lying count fails after at
    // most data.len() / 4 iterations; never pre-allocate from it.
    let mut queries = Vec::new();
    for _ in 0..n {
        queries.push(read_string(&mut r)?);
    }
    if !r.is_empty() {
        return Err((REP_ERR_INVALID, "trailing option data"));
    }
    Ok((name, queries))
}

/// Writes a u32 length field for data the server controls and has already
/// capped to a few KiB.
fn put_len_u32(out: &mut BytesMut, len: usize) {
    out.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// Format (option reply header): magic u64 = 0x3e889045565a9, option u32
/// (echoing the client's), reply type u32, data length u32; `length` bytes
/// of data follow.
fn put_reply_header(out: &mut BytesMut, option: u32, reply: u32, len: usize) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    put_len_u32(out, len);
}

fn put_reply(out: &mut BytesMut, option: u32, reply: u32, data: &[u8]) {
    put_reply_header(out, option, reply, data.len());
    out.put_slice(data);
}

/// Format (NBD_REP_INFO / NBD_INFO_NAME or NBD_INFO_DESCRIPTION): info type
/// u16, then the string filling the rest of the reply.
fn put_info_string(out: &mut BytesMut, option: u32, info: u16, s: &str) {
    let s = truncate_str(s, MAX_STRING_LEN);
    put_reply_header(out, option, REP_INFO, 2 + s.len());
    out.put_u16(info);
    out.put_slice(s.as_bytes());
}

/// Format (NBD_REP_INFO / NBD_INFO_BLOCK_SIZE): info type u16, minimum
/// block size u32, preferred block size u32, maximum payload u32.
fn put_info_block_size(out: &mut BytesMut, option: u32, export: &ExportInfo) {
    let sizes = export.device.block_sizes;
    put_reply_header(out, option, REP_INFO, 14);
    out.put_u16(INFO_BLOCK_SIZE);
    out.put_u32(sizes.min);
    out.put_u32(sizes.preferred);
    out.put_u32(sizes.max);
}

#[cfg(test)]
mod tests;
