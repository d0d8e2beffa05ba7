//! Text key=value data (RFC 7143 §6.1) and operational-key negotiation
//! (RFC 7143 §6.2, §13), shared by the login phase and full-feature Text
//! requests.

use crate::login::{LoginConfig, SessionKind, SessionParams};

/// §6.1: a key name is at most 63 bytes.
pub const MAX_KEY_LEN: usize = 63;
/// §6.1: a value is at most 255 bytes unless its key says otherwise.
pub const MAX_VALUE_LEN: usize = 255;
/// Large binary values (CHAP challenges and responses) may be longer; 8192
/// bytes is the largest text that fits a default-sized data segment.
pub const MAX_LARGE_VALUE_LEN: usize = 8192;

/// RFC 7143 range of the data-length keys: 512 to 2^24-1.
pub const MIN_DATA_LENGTH: u32 = 512;
pub const MAX_DATA_LENGTH: u32 = (1 << 24) - 1;
/// The receive limit both sides assume until it is declared (§13.12).
pub const DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH: u32 = 8192;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("text pair is not valid UTF-8")]
    BadUtf8,
    #[error("text pair has no '='")]
    MissingEquals,
    #[error("empty key")]
    EmptyKey,
    #[error("key longer than {MAX_KEY_LEN} bytes")]
    KeyTooLong,
    #[error("key has a character outside A-Z a-z 0-9 . - + @ _")]
    BadKeyChar,
    #[error("value of {key} longer than {limit} bytes")]
    ValueTooLong { key: String, limit: usize },
}

fn value_limit(key: &str) -> usize {
    match key {
        "CHAP_C" | "CHAP_R" => MAX_LARGE_VALUE_LEN,
        _ => MAX_VALUE_LEN,
    }
}

/// Parses a data segment of NUL-terminated `key=value` pairs.
///
/// Tolerates a missing final NUL and empty strings between NULs (some
/// initiators pad with extra NULs). Keys are checked against the §6.1
/// character set and length; values against their length limit.
pub fn parse_pairs(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut pairs = Vec::new();
    for raw in data.split(|&b| b == 0) {
        if raw.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(raw).map_err(|_| TextError::BadUtf8)?;
        let (key, value) = text.split_once('=').ok_or(TextError::MissingEquals)?;
        if key.is_empty() {
            return Err(TextError::EmptyKey);
        }
        if key.len() > MAX_KEY_LEN {
            return Err(TextError::KeyTooLong);
        }
        if !key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_'))
        {
            return Err(TextError::BadKeyChar);
        }
        let limit = value_limit(key);
        if value.len() > limit {
            return Err(TextError::ValueTooLong {
                key: key.to_string(),
                limit,
            });
        }
        pairs.push((key.to_string(), value.to_string()));
    }
    Ok(pairs)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref().as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_ref().as_bytes());
        out.push(0);
    }
    out
}

/// Parses a numerical value (§6.1: decimal-constant or hex-constant).
/// Returns None for anything else, including empty strings and overflow.
pub fn parse_number(value: &str) -> Option<u64> {
    if let Some(hex) = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        if hex.is_empty() || hex.len() > 16 {
            return None;
        }
        return u64::from_str_radix(hex, 16)
            .ok()
            .filter(|_| hex.bytes().all(|c| c.is_ascii_hexdigit()));
    }
    if value.is_empty() || !value.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn parse_in_range(value: &str, lo: u32, hi: u32) -> Option<u32> {
    parse_number(value)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| (lo..=hi).contains(n))
}

/// §6.2.2: Boolean values are exactly `Yes` or `No`.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "Yes" => Some(true),
        "No" => Some(false),
        _ => None,
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// §6.2: these constants may only be answers, never offers.
fn is_reserved_constant(value: &str) -> bool {
    matches!(value, "Reject" | "Irrelevant" | "NotUnderstood")
}

/// Our side of the negotiation: what the target accepts or offers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The MaxRecvDataSegmentLength we declare: the largest data segment the
    /// initiator may send us.
    pub max_recv_data_segment_length: u32,
    /// Upper bound on MaxBurstLength (result function Minimum).
    pub max_burst_length: u32,
    /// Upper bound on FirstBurstLength (Minimum, and never above MaxBurst).
    pub first_burst_length: u32,
    /// Upper bound on MaxOutstandingR2T (Minimum).
    pub max_outstanding_r2t: u32,
    /// Whether we allow immediate data (ImmediateData, AND).
    pub immediate_data: bool,
    /// Whether we insist on an R2T before any unsolicited data (InitialR2T,
    /// OR): false lets the initiator send a first burst unsolicited.
    pub initial_r2t: bool,
    /// Whether we accept CRC32C header / data digests.
    pub header_digest: bool,
    pub data_digest: bool,
    /// Our DefaultTime2Wait (Maximum) and DefaultTime2Retain (Minimum).
    pub default_time2wait: u32,
    pub default_time2retain: u32,
    /// Bound on the text accumulated across continued login PDUs.
    pub max_login_text: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_recv_data_segment_length: 256 * 1024,
            max_burst_length: 1024 * 1024,
            first_burst_length: 256 * 1024,
            max_outstanding_r2t: 1,
            immediate_data: true,
            initial_r2t: false,
            header_digest: true,
            data_digest: true,
            default_time2wait: 2,
            // ERL 0: nothing survives a connection loss, so we do not
            // promise to retain tasks.
            default_time2retain: 0,
            max_login_text: 64 * 1024,
        }
    }
}

impl Limits {
    /// Clamps configured values into RFC ranges and keeps FirstBurst <=
    /// MaxBurst, so a bad config cannot make us offer an illegal value.
    #[must_use]
    pub fn sanitized(&self) -> Limits {
        let clamp = |v: u32| v.clamp(MIN_DATA_LENGTH, MAX_DATA_LENGTH);
        let max_burst_length = clamp(self.max_burst_length);
        Limits {
            max_recv_data_segment_length: clamp(self.max_recv_data_segment_length),
            max_burst_length,
            first_burst_length: clamp(self.first_burst_length).min(max_burst_length),
            max_outstanding_r2t: self.max_outstanding_r2t.clamp(1, 65535),
            default_time2wait: self.default_time2wait.min(3600),
            default_time2retain: self.default_time2retain.min(3600),
            max_login_text: self.max_login_text.max(MAX_LARGE_VALUE_LEN),
            ..self.clone()
        }
    }
}

/// The outcome of every operational key, with RFC 7143 defaults where not
/// negotiated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// CRC32C (true) or None.
    pub header_digest: bool,
    pub data_digest: bool,
    /// The initiator's MaxRecvDataSegmentLength: the largest data segment
    /// WE may send (8192 if it did not declare one).
    pub max_send_data_segment: u32,
    /// Ours: the largest data segment the initiator may send us (8192 if we
    /// never got to declare it, e.g. a login straight from security to FFP).
    pub max_recv_data_segment: u32,
    pub first_burst_length: u32,
    pub max_burst_length: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub max_connections: u32,
    pub error_recovery_level: u8,
    pub data_pdu_in_order: bool,
    pub data_sequence_in_order: bool,
    pub default_time2wait: u32,
    pub default_time2retain: u32,
}

impl Default for Negotiated {
    fn default() -> Negotiated {
        Negotiated {
            header_digest: false,
            data_digest: false,
            max_send_data_segment: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            max_recv_data_segment: DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH,
            first_burst_length: 65536,
            max_burst_length: 262_144,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            max_connections: 1,
            error_recovery_level: 0,
            data_pdu_in_order: true,
            data_sequence_in_order: true,
            default_time2wait: 2,
            default_time2retain: 20,
        }
    }
}

/// A negotiation failure that ends the login with an initiator error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("reserved constant {value:?} offered for {key}")]
    ReservedValue { key: String, value: String },
    #[error("unacceptable answer {value:?} to our offer of {key}")]
    BadAnswer { key: String, value: String },
    #[error("our offer of {0} was not answered")]
    Unanswered(String),
}

/// Keys irrelevant to discovery sessions (§13: "Irrelevant when:
/// SessionType=Discovery"). The initiator keeps its defaults for them.
const DISCOVERY_IRRELEVANT: &[&str] = &[
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "TaskReporting",
];

/// Keys this module negotiates (login-only, except the declaratives).
const OPERATIONAL_KEYS: &[&str] = &[
    "HeaderDigest",
    "DataDigest",
    "MaxConnections",
    "InitialR2T",
    "ImmediateData",
    "MaxRecvDataSegmentLength",
    "MaxBurstLength",
    "FirstBurstLength",
    "DefaultTime2Wait",
    "DefaultTime2Retain",
    "MaxOutstandingR2T",
    "DataPDUInOrder",
    "DataSequenceInOrder",
    "ErrorRecoveryLevel",
    "TaskReporting",
    "iSCSIProtocolLevel",
    "IFMarker",
    "OFMarker",
    "IFMarkInt",
    "OFMarkInt",
    "RDMAExtensions",
];

/// Whether `key` is an operational key handled by [`Negotiation`].
pub fn is_operational_key(key: &str) -> bool {
    OPERATIONAL_KEYS.contains(&key)
}

/// State of the operational negotiation of one login.
#[derive(Clone, Debug)]
pub struct Negotiation {
    limits: Limits,
    discovery: bool,
    values: Negotiated,
    initiator_mrdsl: Option<u32>,
    declared_mrdsl: bool,
    /// Keys the initiator proposed (so we do not offer them ourselves).
    proposed: Vec<String>,
    /// Our own offers still awaiting the initiator's answer.
    offered: Vec<(&'static str, u32)>,
}

impl Negotiation {
    pub fn new(limits: &Limits, discovery: bool) -> Negotiation {
        Negotiation {
            limits: limits.sanitized(),
            discovery,
            values: Negotiated::default(),
            initiator_mrdsl: None,
            declared_mrdsl: false,
            proposed: Vec::new(),
            offered: Vec::new(),
        }
    }

    /// Answers one key from the initiator. `Ok(None)` means no answer is
    /// due (declarative key, or an answer to our own offer).
    pub fn negotiate_key(
        &mut self,
        key: &str,
        value: &str,
    ) -> Result<Option<String>, NegotiationError> {
        let answer = self.answer_key(key, value)?;
        if answer.as_deref() == Some("Reject") {
            // A rejected proposal leaves the key unnegotiated: our own
            // offer for it (a lower limit) must still go out.
            if let Some(i) = self.proposed.iter().rposition(|k| k == key) {
                self.proposed.remove(i);
            }
        }
        Ok(answer)
    }

    fn answer_key(&mut self, key: &str, value: &str) -> Result<Option<String>, NegotiationError> {
        if let Some(i) = self.offered.iter().position(|(k, _)| *k == key) {
            let (k, offer) = self.offered.remove(i);
            self.accept_answer(k, value, offer)?;
            return Ok(None);
        }
        if is_reserved_constant(value) {
            return Err(NegotiationError::ReservedValue {
                key: key.to_string(),
                value: value.to_string(),
            });
        }
        self.proposed.push(key.to_string());
        if self.discovery && DISCOVERY_IRRELEVANT.contains(&key) {
            return Ok(Some("Irrelevant".into()));
        }
        let l = &self.limits;
        let v = &mut self.values;
        let reject = || Ok(Some("Reject".to_string()));
        let answer = match key {
            "HeaderDigest" | "DataDigest" => {
                let allow_crc = if key == "HeaderDigest" {
                    l.header_digest
                } else {
                    l.data_digest
                };
                let pick = value
                    .split(',')
                    .find(|d| *d == "None" || (allow_crc && *d == "CRC32C"));
                let Some(pick) = pick else { return reject() };
                let crc = pick == "CRC32C";
                if key == "HeaderDigest" {
                    v.header_digest = crc;
                } else {
                    v.data_digest = crc;
                }
                pick.to_string()
            }
            "MaxRecvDataSegmentLength" => {
                // Declarative: the initiator states its own limit.
                let Some(n) = parse_in_range(value, MIN_DATA_LENGTH, MAX_DATA_LENGTH) else {
                    return reject();
                };
                self.initiator_mrdsl = Some(n);
                return Ok(None);
            }
            "MaxBurstLength" | "FirstBurstLength" => {
                let Some(n) = parse_in_range(value, MIN_DATA_LENGTH, MAX_DATA_LENGTH) else {
                    return reject();
                };
                let r = if key == "MaxBurstLength" {
                    v.max_burst_length = n.min(l.max_burst_length);
                    v.max_burst_length
                } else {
                    // Clamped again to MaxBurstLength in finish_batch.
                    v.first_burst_length = n.min(l.first_burst_length);
                    v.first_burst_length
                };
                r.to_string()
            }
            "MaxOutstandingR2T" => {
                let Some(n) = parse_in_range(value, 1, 65535) else {
                    return reject();
                };
                v.max_outstanding_r2t = n.min(l.max_outstanding_r2t);
                v.max_outstanding_r2t.to_string()
            }
            "MaxConnections" => {
                // One connection per session: MC/S is not supported.
                if parse_in_range(value, 1, 65535).is_none() {
                    return reject();
                }
                v.max_connections = 1;
                "1".into()
            }
            "DefaultTime2Wait" => {
                let Some(n) = parse_in_range(value, 0, 3600) else {
                    return reject();
                };
                v.default_time2wait = n.max(l.default_time2wait);
                v.default_time2wait.to_string()
            }
            "DefaultTime2Retain" => {
                let Some(n) = parse_in_range(value, 0, 3600) else {
                    return reject();
                };
                v.default_time2retain = n.min(l.default_time2retain);
                v.default_time2retain.to_string()
            }
            "ErrorRecoveryLevel" => {
                // We implement level 0 only: Minimum with 0.
                if parse_in_range(value, 0, 2).is_none() {
                    return reject();
                }
                v.error_recovery_level = 0;
                "0".into()
            }
            "InitialR2T" | "ImmediateData" | "DataPDUInOrder" | "DataSequenceInOrder" => {
                let Some(b) = parse_bool(value) else {
                    return reject();
                };
                let r = match key {
                    "InitialR2T" => {
                        v.initial_r2t = b || l.initial_r2t;
                        v.initial_r2t
                    }
                    "ImmediateData" => {
                        v.immediate_data = b && l.immediate_data;
                        v.immediate_data
                    }
                    // OR with our Yes: we require in-order data, which
                    // keeps the session's Data-Out tracking simple.
                    "DataPDUInOrder" => {
                        v.data_pdu_in_order = true;
                        true
                    }
                    _ => {
                        v.data_sequence_in_order = true;
                        true
                    }
                };
                yes_no(r)
            }
            "TaskReporting" => {
                if value.split(',').any(|t| t == "RFC3720") {
                    "RFC3720".into()
                } else {
                    return reject();
                }
            }
            "iSCSIProtocolLevel" => {
                // RFC 7143 is level 1; Minimum.
                let Some(n) = parse_in_range(value, 0, 31) else {
                    return reject();
                };
                n.min(1).to_string()
            }
            // §13.25 (obsolete in 7143): Reject is preferred for the marker
            // booleans, but "No" is allowed and is what every RFC 3720
            // initiator (open-iscsi, libiscsi) understands; LIO answers No.
            // RDMAExtensions (iSER, RFC 7145) is a Boolean AND: we are
            // plain TCP.
            "IFMarker" | "OFMarker" | "RDMAExtensions" => {
                if parse_bool(value).is_none() {
                    return reject();
                }
                "No".into()
            }
            "IFMarkInt" | "OFMarkInt" => "Reject".into(),
            // Target-only or full-feature-only keys sent during login.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" | "SendTargets" => {
                "Irrelevant".into()
            }
            _ => "NotUnderstood".into(),
        };
        Ok(Some(answer))
    }

    fn accept_answer(
        &mut self,
        key: &'static str,
        value: &str,
        offer: u32,
    ) -> Result<(), NegotiationError> {
        let bad = || NegotiationError::BadAnswer {
            key: key.to_string(),
            value: value.to_string(),
        };
        match key {
            "MaxBurstLength" | "FirstBurstLength" => {
                let n = parse_in_range(value, MIN_DATA_LENGTH, offer).ok_or_else(bad)?;
                if key == "MaxBurstLength" {
                    self.values.max_burst_length = n;
                } else {
                    self.values.first_burst_length = n;
                }
            }
            "ImmediateData" => {
                if value != "No" {
                    return Err(bad());
                }
            }
            _ => return Err(bad()),
        }
        Ok(())
    }

    /// Post-processing of one batch of answers: FirstBurstLength must not
    /// exceed MaxBurstLength (§13.14), whatever order the keys came in.
    pub fn finish_batch(&mut self, answers: &mut [(String, String)]) {
        let max = self.values.max_burst_length;
        if self.values.first_burst_length > max {
            self.values.first_burst_length = max;
            for (k, v) in answers.iter_mut() {
                if k == "FirstBurstLength" && v.parse::<u32>().is_ok() {
                    *v = max.to_string();
                }
            }
        }
    }

    /// Whether the initiator declared its MaxRecvDataSegmentLength.
    pub fn initiator_declared_mrdsl(&self) -> bool {
        self.initiator_mrdsl.is_some()
    }

    /// Our MaxRecvDataSegmentLength declaration, the first time only.
    pub fn declare_mrdsl(&mut self) -> Option<(String, String)> {
        if self.declared_mrdsl {
            return None;
        }
        self.declared_mrdsl = true;
        Some((
            "MaxRecvDataSegmentLength".into(),
            self.limits.max_recv_data_segment_length.to_string(),
        ))
    }

    /// Keys we must offer because the initiator did not, and the RFC
    /// default exceeds what we accept. Each offer needs an answer, so the
    /// caller must not transit in the response that carries them.
    pub fn target_offers(&mut self) -> Vec<(String, String)> {
        if self.discovery {
            return Vec::new();
        }
        let mut out = Vec::new();
        let defaults = Negotiated::default();
        let l = self.limits.clone();
        let proposed = self.proposed.clone();
        let not_proposed = |k: &str| !proposed.iter().any(|p| p == k);
        let mut want: Vec<(&'static str, u32)> = Vec::new();
        if not_proposed("MaxBurstLength") && l.max_burst_length < defaults.max_burst_length {
            want.push(("MaxBurstLength", l.max_burst_length));
        }
        if not_proposed("FirstBurstLength") && l.first_burst_length < defaults.first_burst_length {
            want.push(("FirstBurstLength", l.first_burst_length));
        }
        for (k, n) in want {
            if !self.offered.iter().any(|(o, _)| *o == k) {
                self.offered.push((k, n));
                self.proposed.push(k.to_string());
                out.push((k.to_string(), n.to_string()));
            }
        }
        if not_proposed("ImmediateData") && !l.immediate_data {
            // AND with No: the outcome is No whatever the initiator says,
            // and its answer is optional (§6.2.2).
            self.values.immediate_data = false;
            self.offered.push(("ImmediateData", 0));
            self.proposed.push("ImmediateData".into());
            out.push(("ImmediateData".into(), "No".into()));
        }
        out
    }

    /// Fails if an offer that needs an answer was left unanswered. Called
    /// after the batch following our offers.
    pub fn check_answered(&mut self) -> Result<(), NegotiationError> {
        // ImmediateData=No needs no answer.
        self.offered.retain(|(k, _)| *k != "ImmediateData");
        match self.offered.first() {
            Some((k, _)) => Err(NegotiationError::Unanswered((*k).to_string())),
            None => Ok(()),
        }
    }

    /// Whether offers of ours are outstanding.
    pub fn has_outstanding_offers(&self) -> bool {
        self.offered.iter().any(|(k, _)| *k != "ImmediateData")
    }

    /// The final parameters.
    pub fn negotiated(&self) -> Negotiated {
        let mut n = self.values.clone();
        n.max_send_data_segment = self
            .initiator_mrdsl
            .unwrap_or(DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH);
        n.max_recv_data_segment = if self.declared_mrdsl {
            self.limits.max_recv_data_segment_length
        } else {
            DEFAULT_MAX_RECV_DATA_SEGMENT_LENGTH
        };
        n.first_burst_length = n.first_burst_length.min(n.max_burst_length);
        n
    }
}

fn iscsi_name_eq(a: &str, b: &str) -> bool {
    // iSCSI names are normalised to lower case (RFC 3722), so compare
    // without regard to ASCII case.
    a.eq_ignore_ascii_case(b)
}

/// Whether `initiator` may see and log in to `target`.
pub fn initiator_allowed(target: &crate::login::TargetConfig, initiator: &str) -> bool {
    target.allowed_initiators.is_empty()
        || target
            .allowed_initiators
            .iter()
            .any(|a| iscsi_name_eq(a, initiator))
}

/// Answers a Text Request in full-feature phase. Equivalent to
/// [`answer_text_update`] on a copy of `session`, discarding declarations;
/// a malformed request gets an empty answer.
pub fn answer_text(config: &LoginConfig, session: &SessionParams, request: &[u8]) -> Vec<u8> {
    let mut copy = session.clone();
    answer_text_update(config, &mut copy, request).unwrap_or_default()
}

/// Answers a Text Request in full-feature phase and applies the
/// initiator's declarations to `session` (MaxRecvDataSegmentLength changes
/// `negotiated.max_send_data_segment`, InitiatorAlias the alias). A
/// malformed request is an error: the caller should send a Reject PDU.
pub fn answer_text_update(
    config: &LoginConfig,
    session: &mut SessionParams,
    request: &[u8],
) -> Result<Vec<u8>, TextError> {
    let pairs = parse_pairs(request)?;
    let mut answers: Vec<(String, String)> = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (key, value) in &pairs {
        // A key is answered once; a repeat is the initiator's error and
        // answering it twice would only confuse it further.
        if seen.contains(&key.as_str()) {
            continue;
        }
        seen.push(key);
        match key.as_str() {
            "SendTargets" => send_targets(config, session, value, &mut answers),
            "MaxRecvDataSegmentLength" => {
                match parse_in_range(value, MIN_DATA_LENGTH, MAX_DATA_LENGTH) {
                    Some(n) => session.negotiated.max_send_data_segment = n,
                    None => answers.push((key.clone(), "Reject".into())),
                }
            }
            "InitiatorAlias" => session.initiator_alias = Some(value.clone()),
            k if is_operational_key(k)
                || matches!(
                    k,
                    "InitiatorName"
                        | "TargetName"
                        | "SessionType"
                        | "AuthMethod"
                        | "TargetAlias"
                        | "TargetAddress"
                        | "TargetPortalGroupTag"
                )
                || k.starts_with("CHAP_") =>
            {
                // Login-only keys cannot be renegotiated in full feature.
                answers.push((key.clone(), "Reject".into()));
            }
            _ => answers.push((key.clone(), "NotUnderstood".into())),
        }
    }
    Ok(encode_pairs(&answers))
}

/// §13.3 / Appendix C: `All` lists every target this initiator may access
/// (discovery sessions only); a name lists that target; an empty value
/// lists the session's own target (normal sessions only).
fn send_targets(
    config: &LoginConfig,
    session: &SessionParams,
    value: &str,
    answers: &mut Vec<(String, String)>,
) {
    let visible = |t: &&crate::login::TargetConfig| initiator_allowed(t, &session.initiator_name);
    let selected: Vec<&crate::login::TargetConfig> = match (&session.kind, value) {
        (SessionKind::Discovery, "All") => config.targets.iter().filter(visible).collect(),
        (SessionKind::Normal { .. }, "All") | (SessionKind::Discovery, "") => {
            answers.push(("SendTargets".into(), "Reject".into()));
            return;
        }
        (SessionKind::Discovery, name) => config
            .targets
            .iter()
            .filter(|t| iscsi_name_eq(&t.name, name))
            .filter(visible)
            .collect(),
        (SessionKind::Normal { target }, name) => config
            .targets
            .iter()
            .filter(|t| iscsi_name_eq(&t.name, target))
            .filter(|t| name.is_empty() || iscsi_name_eq(&t.name, name))
            .collect(),
    };
    for t in selected {
        answers.push(("TargetName".into(), t.name.clone()));
        for portal in &config.portals {
            answers.push(("TargetAddress".into(), portal.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::login::{ChapConfig, TargetConfig};

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    #[test]
    fn text_parse_basic_and_tolerant() {
        assert_eq!(
            parse_pairs(b"A=1\0B=x=y\0").unwrap(),
            pairs(&[("A", "1"), ("B", "x=y")])
        );
        // Missing final NUL, empty strings, empty value.
        assert_eq!(
            parse_pairs(b"\0A=1\0\0B=").unwrap(),
            pairs(&[("A", "1"), ("B", "")])
        );
        assert_eq!(parse_pairs(b"").unwrap(), vec![]);
    }

    #[test]
    fn text_parse_errors() {
        assert_eq!(parse_pairs(b"A\0"), Err(TextError::MissingEquals));
        assert_eq!(parse_pairs(b"=1\0"), Err(TextError::EmptyKey));
        assert_eq!(parse_pairs(b"A\xff=1\0"), Err(TextError::BadUtf8));
        assert_eq!(parse_pairs(b"A B=1\0"), Err(TextError::BadKeyChar));
        let long_key = format!("{}=1", "K".repeat(64));
        assert_eq!(parse_pairs(long_key.as_bytes()), Err(TextError::KeyTooLong));
        let ok_key = format!("{}=1", "K".repeat(63));
        assert!(parse_pairs(ok_key.as_bytes()).is_ok());
        let long_val = format!("A={}", "v".repeat(256));
        assert!(matches!(
            parse_pairs(long_val.as_bytes()),
            Err(TextError::ValueTooLong { limit: 255, .. })
        ));
        let chap = format!("CHAP_C=0x{}", "a".repeat(2000));
        assert!(parse_pairs(chap.as_bytes()).is_ok());
        let chap = format!("CHAP_C=0x{}", "a".repeat(8192));
        assert!(parse_pairs(chap.as_bytes()).is_err());
    }

    #[test]
    fn text_encode_roundtrip() {
        let enc = encode_pairs(&[("A", "1"), ("TargetName", "iqn.x")]);
        assert_eq!(enc, b"A=1\0TargetName=iqn.x\0");
        assert_eq!(
            parse_pairs(&enc).unwrap(),
            pairs(&[("A", "1"), ("TargetName", "iqn.x")])
        );
    }

    #[test]
    fn text_numbers_and_bools() {
        assert_eq!(parse_number("8192"), Some(8192));
        assert_eq!(parse_number("0x2000"), Some(8192));
        assert_eq!(parse_number("0X2000"), Some(8192));
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_number("0x"), None);
        assert_eq!(parse_number("+5"), None);
        assert_eq!(parse_number("-5"), None);
        assert_eq!(parse_number("99999999999999999999999"), None);
        assert_eq!(parse_bool("Yes"), Some(true));
        assert_eq!(parse_bool("No"), Some(false));
        assert_eq!(parse_bool("yes"), None);
    }

    fn neg(discovery: bool) -> Negotiation {
        Negotiation::new(&Limits::default(), discovery)
    }

    fn ans(n: &mut Negotiation, k: &str, v: &str) -> Option<String> {
        n.negotiate_key(k, v).unwrap()
    }

    #[test]
    fn text_negotiate_digest_lists() {
        let mut n = neg(false);
        assert_eq!(
            ans(&mut n, "HeaderDigest", "CRC32C,None").as_deref(),
            Some("CRC32C")
        );
        assert_eq!(
            ans(&mut n, "DataDigest", "None,CRC32C").as_deref(),
            Some("None")
        );
        let v = n.negotiated();
        assert!(v.header_digest && !v.data_digest);

        let limits = Limits {
            header_digest: false,
            ..Limits::default()
        };
        let mut n = Negotiation::new(&limits, false);
        assert_eq!(
            ans(&mut n, "HeaderDigest", "CRC32C,None").as_deref(),
            Some("None")
        );
        assert_eq!(
            ans(&mut n, "DataDigest", "MD5,CRC32C").as_deref(),
            Some("CRC32C")
        );
        let mut n = Negotiation::new(&limits, false);
        assert_eq!(
            ans(&mut n, "HeaderDigest", "CRC32C").as_deref(),
            Some("Reject")
        );
        assert!(!n.negotiated().header_digest);
    }

    #[test]
    fn text_negotiate_numeric_min_max() {
        let mut n = neg(false);
        assert_eq!(
            ans(&mut n, "MaxBurstLength", "16776192").as_deref(),
            Some("1048576")
        );
        assert_eq!(
            ans(&mut n, "FirstBurstLength", "65536").as_deref(),
            Some("65536")
        );
        assert_eq!(ans(&mut n, "MaxOutstandingR2T", "8").as_deref(), Some("1"));
        assert_eq!(ans(&mut n, "MaxConnections", "8").as_deref(), Some("1"));
        assert_eq!(
            ans(&mut n, "DefaultTime2Retain", "20").as_deref(),
            Some("0")
        );
        assert_eq!(ans(&mut n, "DefaultTime2Wait", "0").as_deref(), Some("2"));
        assert_eq!(ans(&mut n, "ErrorRecoveryLevel", "2").as_deref(), Some("0"));
        let v = n.negotiated();
        assert_eq!(v.max_burst_length, 1_048_576);
        assert_eq!(v.first_burst_length, 65536);
        assert_eq!(v.max_outstanding_r2t, 1);
        assert_eq!(v.default_time2wait, 2);
        assert_eq!(v.default_time2retain, 0);

        let mut n = neg(false);
        assert_eq!(ans(&mut n, "DefaultTime2Wait", "10").as_deref(), Some("10"));
        assert_eq!(
            ans(&mut n, "MaxBurstLength", "0x10000").as_deref(),
            Some("65536")
        );
    }

    #[test]
    fn text_negotiate_first_burst_clamped_to_max_burst() {
        let mut n = neg(false);
        let mut answers = vec![
            (
                "FirstBurstLength".to_string(),
                ans(&mut n, "FirstBurstLength", "262144").unwrap(),
            ),
            (
                "MaxBurstLength".to_string(),
                ans(&mut n, "MaxBurstLength", "131072").unwrap(),
            ),
        ];
        n.finish_batch(&mut answers);
        assert_eq!(answers[0].1, "131072");
        assert_eq!(n.negotiated().first_burst_length, 131_072);
    }

    #[test]
    fn text_negotiate_booleans() {
        let mut n = neg(false);
        // OR: our No with their Yes gives Yes; AND: their Yes with our Yes.
        assert_eq!(ans(&mut n, "InitialR2T", "Yes").as_deref(), Some("Yes"));
        assert_eq!(ans(&mut n, "ImmediateData", "Yes").as_deref(), Some("Yes"));
        assert_eq!(ans(&mut n, "DataPDUInOrder", "No").as_deref(), Some("Yes"));
        assert_eq!(
            ans(&mut n, "DataSequenceInOrder", "No").as_deref(),
            Some("Yes")
        );
        let v = n.negotiated();
        assert!(v.initial_r2t && v.immediate_data && v.data_pdu_in_order);

        let mut n = neg(false);
        assert_eq!(ans(&mut n, "InitialR2T", "No").as_deref(), Some("No"));
        assert_eq!(ans(&mut n, "ImmediateData", "No").as_deref(), Some("No"));
        let v = n.negotiated();
        assert!(!v.initial_r2t && !v.immediate_data);

        let limits = Limits {
            immediate_data: false,
            initial_r2t: true,
            ..Limits::default()
        };
        let mut n = Negotiation::new(&limits, false);
        assert_eq!(ans(&mut n, "InitialR2T", "No").as_deref(), Some("Yes"));
        assert_eq!(ans(&mut n, "ImmediateData", "Yes").as_deref(), Some("No"));
        assert_eq!(
            ans(&mut n, "ImmediateData2", "Yes").as_deref(),
            Some("NotUnderstood")
        );
    }

    #[test]
    fn text_negotiate_rejects_out_of_range() {
        let mut n = neg(false);
        for (k, v) in [
            ("MaxBurstLength", "511"),
            ("MaxBurstLength", "16777216"),
            ("FirstBurstLength", "abc"),
            ("MaxRecvDataSegmentLength", "100"),
            ("MaxOutstandingR2T", "0"),
            ("MaxConnections", "65536"),
            ("DefaultTime2Wait", "3601"),
            ("DefaultTime2Retain", "-1"),
            ("ErrorRecoveryLevel", "3"),
            ("InitialR2T", "maybe"),
            ("HeaderDigest", "MD5"),
            ("TaskReporting", "FastAbort"),
            ("IFMarkInt", "2048~8192"),
        ] {
            assert_eq!(ans(&mut n, k, v).as_deref(), Some("Reject"), "{k}={v}");
        }
        assert_eq!(
            n.negotiated(),
            Negotiated {
                max_send_data_segment: 8192,
                ..Negotiated::default()
            }
        );
    }

    #[test]
    fn text_negotiate_special_answers() {
        let mut n = neg(false);
        assert_eq!(
            ans(&mut n, "X-com.example.Foo", "1").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(
            ans(&mut n, "X#NodeArchitecture", "x").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(
            ans(&mut n, "Frobnicate", "1").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(ans(&mut n, "IFMarker", "No").as_deref(), Some("No"));
        assert_eq!(ans(&mut n, "OFMarker", "Yes").as_deref(), Some("No"));
        assert_eq!(ans(&mut n, "RDMAExtensions", "Yes").as_deref(), Some("No"));
        assert_eq!(
            ans(&mut n, "SendTargets", "All").as_deref(),
            Some("Irrelevant")
        );
        assert_eq!(
            ans(&mut n, "TaskReporting", "ResponseFence,RFC3720").as_deref(),
            Some("RFC3720")
        );
        assert_eq!(ans(&mut n, "iSCSIProtocolLevel", "2").as_deref(), Some("1"));
        assert_eq!(ans(&mut n, "MaxRecvDataSegmentLength", "65536"), None);
        assert_eq!(n.negotiated().max_send_data_segment, 65536);
        assert!(matches!(
            n.negotiate_key("InitialR2T", "Reject"),
            Err(NegotiationError::ReservedValue { .. })
        ));
    }

    #[test]
    fn text_negotiate_discovery_irrelevant() {
        let mut n = neg(true);
        assert_eq!(
            ans(&mut n, "MaxBurstLength", "262144").as_deref(),
            Some("Irrelevant")
        );
        assert_eq!(
            ans(&mut n, "ImmediateData", "Yes").as_deref(),
            Some("Irrelevant")
        );
        assert_eq!(ans(&mut n, "HeaderDigest", "None").as_deref(), Some("None"));
        assert_eq!(n.target_offers(), vec![]);
    }

    #[test]
    fn text_target_offers_when_defaults_exceed_limits() {
        let limits = Limits {
            max_burst_length: 131_072,
            first_burst_length: 32768,
            immediate_data: false,
            ..Limits::default()
        };
        let mut n = Negotiation::new(&limits, false);
        let offers = n.target_offers();
        assert_eq!(
            offers,
            pairs(&[
                ("MaxBurstLength", "131072"),
                ("FirstBurstLength", "32768"),
                ("ImmediateData", "No")
            ])
        );
        assert!(n.has_outstanding_offers());
        assert_eq!(ans(&mut n, "MaxBurstLength", "65536"), None);
        assert!(n.check_answered().is_err());
        assert_eq!(ans(&mut n, "FirstBurstLength", "32768"), None);
        n.check_answered().unwrap();
        let v = n.negotiated();
        assert_eq!(
            (v.max_burst_length, v.first_burst_length, v.immediate_data),
            (65536, 32768, false)
        );
        // An answer above our offer is refused.
        let mut n = Negotiation::new(&limits, false);
        n.target_offers();
        assert!(n.negotiate_key("MaxBurstLength", "262144").is_err());
    }

    fn config() -> LoginConfig {
        LoginConfig {
            targets: vec![
                TargetConfig {
                    name: "iqn.2024-01.io.ferry:open".into(),
                    alias: None,
                    allowed_initiators: vec![],
                    chap: None,
                },
                TargetConfig {
                    name: "iqn.2024-01.io.ferry:acl".into(),
                    alias: None,
                    allowed_initiators: vec!["iqn.2024-01.io.client:good".into()],
                    chap: Some(ChapConfig {
                        user: "u".into(),
                        secret: b"s".to_vec(),
                        mutual: None,
                    }),
                },
            ],
            portal_group_tag: 1,
            portals: vec!["10.0.0.1:3260,1".into(), "[fd00::1]:3260,1".into()],
            limits: Limits::default(),
            discovery_chap: None,
        }
    }

    fn session(kind: SessionKind, initiator: &str) -> SessionParams {
        SessionParams {
            kind,
            initiator_name: initiator.into(),
            initiator_alias: None,
            isid: [0; 6],
            requested_tsih: 0,
            cid: 0,
            negotiated: Negotiated::default(),
            cmdsn: 0,
        }
    }

    #[test]
    fn text_send_targets_all_filters_by_acl() {
        let cfg = config();
        let good = session(SessionKind::Discovery, "IQN.2024-01.io.client:GOOD");
        let out = parse_pairs(&answer_text(&cfg, &good, b"SendTargets=All\0")).unwrap();
        assert_eq!(
            out,
            pairs(&[
                ("TargetName", "iqn.2024-01.io.ferry:open"),
                ("TargetAddress", "10.0.0.1:3260,1"),
                ("TargetAddress", "[fd00::1]:3260,1"),
                ("TargetName", "iqn.2024-01.io.ferry:acl"),
                ("TargetAddress", "10.0.0.1:3260,1"),
                ("TargetAddress", "[fd00::1]:3260,1"),
            ])
        );
        let bad = session(SessionKind::Discovery, "iqn.2024-01.io.client:bad");
        let out = parse_pairs(&answer_text(&cfg, &bad, b"SendTargets=All\0")).unwrap();
        assert_eq!(out.iter().filter(|(k, _)| k == "TargetName").count(), 1);
        assert_eq!(out[0].1, "iqn.2024-01.io.ferry:open");
        // A named target the initiator may not see is simply absent.
        let out = answer_text(&cfg, &bad, b"SendTargets=iqn.2024-01.io.ferry:acl\0");
        assert!(out.is_empty());
        let out = parse_pairs(&answer_text(
            &cfg,
            &bad,
            b"SendTargets=iqn.2024-01.io.ferry:open\0",
        ))
        .unwrap();
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn text_send_targets_normal_session() {
        let cfg = config();
        let s = session(
            SessionKind::Normal {
                target: "iqn.2024-01.io.ferry:open".into(),
            },
            "iqn.x:y",
        );
        let own = parse_pairs(&answer_text(&cfg, &s, b"SendTargets=\0")).unwrap();
        assert_eq!(
            own[0],
            ("TargetName".into(), "iqn.2024-01.io.ferry:open".into())
        );
        assert_eq!(own.len(), 3);
        let named = answer_text(&cfg, &s, b"SendTargets=iqn.2024-01.io.ferry:open\0");
        assert_eq!(parse_pairs(&named).unwrap(), own);
        assert!(answer_text(&cfg, &s, b"SendTargets=iqn.2024-01.io.ferry:acl\0").is_empty());
        assert_eq!(
            answer_text(&cfg, &s, b"SendTargets=All\0"),
            b"SendTargets=Reject\0"
        );
    }

    #[test]
    fn text_ffp_other_keys() {
        let cfg = config();
        let mut s = session(SessionKind::Discovery, "iqn.x:y");
        let out = answer_text_update(
            &cfg,
            &mut s,
            b"MaxRecvDataSegmentLength=65536\0InitiatorAlias=host\0MaxBurstLength=512\0X-foo=1\0Bogus=2\0MaxRecvDataSegmentLength=1\0",
        )
        .unwrap();
        assert_eq!(
            parse_pairs(&out).unwrap(),
            pairs(&[
                ("MaxBurstLength", "Reject"),
                ("X-foo", "NotUnderstood"),
                ("Bogus", "NotUnderstood")
            ])
        );
        assert_eq!(s.negotiated.max_send_data_segment, 65536);
        assert_eq!(s.initiator_alias.as_deref(), Some("host"));
        let out = answer_text_update(&cfg, &mut s, b"MaxRecvDataSegmentLength=5\0").unwrap();
        assert_eq!(out, b"MaxRecvDataSegmentLength=Reject\0");
        assert!(answer_text_update(&cfg, &mut s, b"nokey\0").is_err());
        assert!(answer_text(&cfg, &s, b"nokey\0").is_empty());
    }
}
