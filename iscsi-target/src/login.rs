//! The login phase (RFC 7143 §6.3, §11.12-11.13), sans-IO.
//!
//! [`Login::step`] is fed each Login Request's parsed fields and returns
//! the response to send, until the login completes (full-feature phase) or
//! fails (reject and close). The connection layer owns the PDU codec,
//! StatSN/ExpCmdSN/MaxCmdSN and TSIH assignment.

use std::sync::Arc;

use crate::chap::{self, ChapChallenge};
use crate::text::{self as text_mod, Negotiation};
pub use crate::text::{Limits, Negotiated};

/// Login status codes (class << 8 | detail), RFC 7143 §11.13.5.
pub mod status {
    pub const SUCCESS: u16 = 0x0000;
    pub const INITIATOR_ERROR: u16 = 0x0200;
    pub const AUTHENTICATION_FAILED: u16 = 0x0201;
    pub const AUTHORIZATION_FAILED: u16 = 0x0202;
    pub const TARGET_NOT_FOUND: u16 = 0x0203;
    pub const UNSUPPORTED_VERSION: u16 = 0x0205;
    pub const MISSING_PARAMETER: u16 = 0x0207;
    pub const SESSION_TYPE_NOT_SUPPORTED: u16 = 0x0209;
    pub const INVALID_DURING_LOGIN: u16 = 0x020b;
    pub const TARGET_ERROR: u16 = 0x0300;
}

/// Bound on Login Request PDUs in one login, so a peer cannot keep a
/// login going forever (e.g. endless empty continuation PDUs).
pub const MAX_LOGIN_PDUS: u32 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Security = 0,
    Operational = 1,
    FullFeature = 3,
}

impl Stage {
    pub const fn from_u8(v: u8) -> Option<Stage> {
        match v {
            0 => Some(Stage::Security),
            1 => Some(Stage::Operational),
            3 => Some(Stage::FullFeature),
            _ => None,
        }
    }
}

/// A Login Request, as the PDU codec parses it.
pub use crate::pdu::LoginPdu as LoginRequest;

/// A Login Response, less StatSN/ExpCmdSN/MaxCmdSN which the connection
/// fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub cont: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub status_class: u8,
    pub status_detail: u8,
    pub data: Vec<u8>,
}

impl LoginResponse {
    /// Status as `class << 8 | detail`, comparable with [`status`].
    pub fn status(&self) -> u16 {
        u16::from(self.status_class) << 8 | u16::from(self.status_detail)
    }
}

#[derive(Debug)]
pub enum LoginStep {
    /// Send this and wait for the next Login Request.
    Continue(LoginResponse),
    /// Login succeeded: the caller assigns the TSIH (new session) or
    /// validates the requested one (adding a connection / reinstatement),
    /// sets `response.tsih`, sends it, and enters full-feature phase with
    /// `session`.
    Complete {
        response: LoginResponse,
        session: SessionParams,
    },
    /// Send this reject (status class 02h initiator error / 03h target
    /// error) and close the connection.
    Fail(LoginResponse),
}

/// Shared by every connection of the portal.
#[derive(Clone, Debug)]
pub struct LoginConfig {
    pub targets: Vec<TargetConfig>,
    pub portal_group_tag: u16,
    /// Addresses advertised in SendTargets, "IP:port,tpgt" (the caller
    /// fills them from the listener).
    pub portals: Vec<String>,
    pub limits: Limits,
    /// CHAP for discovery sessions (None = AuthMethod=None accepted).
    pub discovery_chap: Option<ChapConfig>,
}

impl Default for LoginConfig {
    fn default() -> LoginConfig {
        LoginConfig {
            targets: Vec::new(),
            portal_group_tag: 1,
            portals: Vec::new(),
            limits: Limits::default(),
            discovery_chap: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TargetConfig {
    /// iSCSI name (iqn./eui./naa.), compared case-insensitively.
    pub name: String,
    pub alias: Option<String>,
    /// IQN allow-list; empty = every initiator.
    pub allowed_initiators: Vec<String>,
    pub chap: Option<ChapConfig>,
}

#[derive(Clone)]
pub struct ChapConfig {
    pub user: String,
    pub secret: Vec<u8>,
    /// Mutual CHAP: the name and secret the target answers with when the
    /// initiator challenges it.
    pub mutual: Option<(String, Vec<u8>)>,
}

impl std::fmt::Debug for ChapConfig {
    // Secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapConfig")
            .field("user", &self.user)
            .field("mutual_user", &self.mutual.as_ref().map(|(n, _)| n))
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionKind {
    Discovery,
    /// `target` is the configured name of the target (`TargetConfig::name`).
    Normal {
        target: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionParams {
    pub kind: SessionKind,
    pub initiator_name: String,
    pub initiator_alias: Option<String>,
    pub isid: [u8; 6],
    pub requested_tsih: u16,
    pub cid: u16,
    pub negotiated: Negotiated,
    /// ExpCmdSN to start with (the CmdSN of the login request; login PDUs
    /// do not advance it).
    pub cmdsn: u32,
}

/// Source of unpredictable bytes for CHAP challenges; returns false on
/// failure. Replaceable so tests and fuzzing are deterministic.
pub type RandomSource = Box<dyn FnMut(&mut [u8]) -> bool + Send>;

fn system_random() -> RandomSource {
    let rng = ring::rand::SystemRandom::new();
    Box::new(move |buf: &mut [u8]| ring::rand::SecureRandom::fill(&rng, buf).is_ok())
}

#[derive(Clone, Debug)]
enum Auth {
    /// AuthMethod not negotiated yet.
    Pending,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    AwaitAlgorithm,
    /// Challenge sent; waiting for CHAP_N/CHAP_R.
    AwaitResponse(ChapChallenge),
    /// Authenticated, or no authentication required.
    Done,
}

#[derive(Clone, Debug)]
struct Identity {
    initiator_name: String,
    kind: SessionKind,
    target_alias: Option<String>,
    chap: Option<ChapConfig>,
}

/// The login state machine of one connection.
pub struct Login {
    config: Arc<LoginConfig>,
    rng: RandomSource,
    /// Current stage; None before the first PDU.
    stage: Option<Stage>,
    finished: bool,
    pdus: u32,
    /// Text accumulated across PDUs with the C bit.
    text: Vec<u8>,
    /// ISID, TSIH, CID of the first PDU: they must not change.
    ids: Option<([u8; 6], u16, u16)>,
    identity: Option<Identity>,
    initiator_alias: Option<String>,
    auth: Auth,
    negotiation: Option<Negotiation>,
    /// Every key received so far with its value (duplicate detection).
    seen: Vec<(String, String)>,
    first_response_sent: bool,
    offers_sent: bool,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("stage", &self.stage)
            .field("finished", &self.finished)
            .field("identity", &self.identity)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

const IDENTITY_KEYS: &[&str] = &["InitiatorName", "TargetName", "SessionType"];
const SECURITY_KEYS: &[&str] = &[
    "AuthMethod",
    "CHAP_A",
    "CHAP_I",
    "CHAP_C",
    "CHAP_N",
    "CHAP_R",
];

type Pairs = Vec<(String, String)>;

fn get<'p>(pairs: &'p [(String, String)], key: &str) -> Option<&'p str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

impl Login {
    pub fn new(config: Arc<LoginConfig>) -> Login {
        Login::with_rng(config, system_random())
    }

    /// Like [`Login::new`] with a caller-supplied random source (tests,
    /// fuzzing).
    pub fn with_rng(config: Arc<LoginConfig>, rng: RandomSource) -> Login {
        Login {
            config,
            rng,
            stage: None,
            finished: false,
            pdus: 0,
            text: Vec::new(),
            ids: None,
            identity: None,
            initiator_alias: None,
            auth: Auth::Pending,
            negotiation: None,
            seen: Vec::new(),
            first_response_sent: false,
            offers_sent: false,
        }
    }

    /// The current login stage (None before the first request).
    pub fn stage(&self) -> Option<Stage> {
        self.stage
    }

    /// True once the login completed or failed: any further request is
    /// refused.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Feeds one Login Request. Each PDU is fed as it arrives; text split
    /// with the C bit is accumulated and each partial PDU answered with an
    /// empty Continue response.
    pub fn step(&mut self, req: &LoginRequest) -> LoginStep {
        if self.finished {
            return LoginStep::Fail(self.reject(req, status::INVALID_DURING_LOGIN));
        }
        match self.step_inner(req) {
            Ok(step) => {
                if matches!(step, LoginStep::Complete { .. }) {
                    self.finished = true;
                }
                step
            }
            Err(code) => {
                self.finished = true;
                tracing::debug!(status = format_args!("{code:#06x}"), "login rejected");
                LoginStep::Fail(self.reject(req, code))
            }
        }
    }

    fn reject(&self, req: &LoginRequest, code: u16) -> LoginResponse {
        let [class, detail] = code.to_be_bytes();
        LoginResponse {
            transit: false,
            cont: false,
            csg: self.stage.map_or(req.csg & 3, |s| s as u8),
            nsg: 0,
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            status_class: class,
            status_detail: detail,
            data: Vec::new(),
        }
    }

    fn response(
        req: &LoginRequest,
        csg: Stage,
        next: Option<Stage>,
        data: Vec<u8>,
    ) -> LoginResponse {
        LoginResponse {
            transit: next.is_some(),
            cont: false,
            csg: csg as u8,
            nsg: next.map_or(0, |s| s as u8),
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: req.tsih,
            itt: req.itt,
            status_class: 0,
            status_detail: 0,
            data,
        }
    }

    fn step_inner(&mut self, req: &LoginRequest) -> Result<LoginStep, u16> {
        use status::{AUTHENTICATION_FAILED, INITIATOR_ERROR, UNSUPPORTED_VERSION};

        self.pdus += 1;
        if self.pdus > MAX_LOGIN_PDUS {
            return Err(INITIATOR_ERROR);
        }
        // We speak version 0 only (RFC 7143 §11.12.4).
        if req.version_min != 0 || req.version_max < req.version_min {
            return Err(UNSUPPORTED_VERSION);
        }
        match self.ids {
            None => self.ids = Some((req.isid, req.tsih, req.cid)),
            Some(ids) if ids == (req.isid, req.tsih, req.cid) => {}
            Some(_) => return Err(INITIATOR_ERROR),
        }
        let csg = Stage::from_u8(req.csg)
            .filter(|s| *s != Stage::FullFeature)
            .ok_or(INITIATOR_ERROR)?;
        match self.stage {
            None => self.stage = Some(csg),
            Some(s) if s == csg => {}
            Some(_) => return Err(INITIATOR_ERROR),
        }
        // §11.12.2: C=1 forbids T=1.
        if req.transit && req.cont {
            return Err(INITIATOR_ERROR);
        }
        let requested_next = if req.transit {
            let nsg = Stage::from_u8(req.nsg).ok_or(INITIATOR_ERROR)?;
            if (nsg as u8) <= (csg as u8) {
                return Err(INITIATOR_ERROR);
            }
            Some(nsg)
        } else {
            None
        };

        if self.text.len() + req.data.len() > self.config.limits.sanitized().max_login_text {
            return Err(INITIATOR_ERROR);
        }
        self.text.extend_from_slice(&req.data);
        if req.cont {
            return Ok(LoginStep::Continue(Self::response(
                req,
                csg,
                None,
                Vec::new(),
            )));
        }
        let text = std::mem::take(&mut self.text);
        let pairs = text_mod::parse_pairs(&text).map_err(|_| INITIATOR_ERROR)?;

        let mut answers: Pairs = Vec::new();
        if self.identity.is_none() {
            self.identify(&pairs)?;
            if csg == Stage::Operational {
                // Skipping the security stage is only allowed when we
                // require no authentication.
                if self.identity.as_ref().is_some_and(|i| i.chap.is_some()) {
                    return Err(AUTHENTICATION_FAILED);
                }
                self.auth = Auth::Done;
            }
        }
        let identity = self.identity.clone().ok_or(INITIATOR_ERROR)?;
        if !self.first_response_sent {
            self.first_response_sent = true;
            if let SessionKind::Normal { .. } = identity.kind {
                // §13.9: returned in the first Login Response of a normal
                // session.
                answers.push((
                    "TargetPortalGroupTag".into(),
                    self.config.portal_group_tag.to_string(),
                ));
                if let Some(alias) = &identity.target_alias {
                    answers.push(("TargetAlias".into(), alias.clone()));
                }
            }
        }

        let negotiation = self.negotiation.as_mut().ok_or(INITIATOR_ERROR)?;
        let mut security: Pairs = Vec::new();
        for (key, value) in pairs {
            // §6.2: a key is negotiated once per login; a repeat is an
            // initiator error. Resending an identity key unchanged is
            // tolerated (it renegotiates nothing).
            if let Some((_, prev)) = self.seen.iter().find(|(k, _)| *k == key) {
                if IDENTITY_KEYS.contains(&key.as_str()) && *prev == value {
                    continue;
                }
                return Err(INITIATOR_ERROR);
            }
            self.seen.push((key.clone(), value.clone()));
            match key.as_str() {
                "InitiatorName" => {
                    if !value.eq_ignore_ascii_case(&identity.initiator_name) {
                        return Err(INITIATOR_ERROR);
                    }
                }
                "SessionType" => {
                    let discovery = identity.kind == SessionKind::Discovery;
                    if value != if discovery { "Discovery" } else { "Normal" } {
                        return Err(INITIATOR_ERROR);
                    }
                }
                "TargetName" => match &identity.kind {
                    SessionKind::Discovery => answers.push((key, "Irrelevant".into())),
                    SessionKind::Normal { target } => {
                        if !value.eq_ignore_ascii_case(target) {
                            return Err(INITIATOR_ERROR);
                        }
                    }
                },
                "InitiatorAlias" => self.initiator_alias = Some(value),
                k if SECURITY_KEYS.contains(&k) => {
                    if csg != Stage::Security {
                        return Err(INITIATOR_ERROR);
                    }
                    security.push((key, value));
                }
                _ => {
                    if let Some(answer) = negotiation
                        .negotiate_key(&key, &value)
                        .map_err(|_| INITIATOR_ERROR)?
                    {
                        answers.push((key, answer));
                    }
                }
            }
        }
        negotiation.finish_batch(&mut answers);
        if self.offers_sent {
            // The batch after our offers must carry the answers.
            self.offers_sent = false;
            negotiation.check_answered().map_err(|_| INITIATOR_ERROR)?;
        }

        if csg == Stage::Security {
            self.authenticate(&identity, &security, requested_next.is_some(), &mut answers)?;
        }

        let negotiation = self.negotiation.as_mut().ok_or(INITIATOR_ERROR)?;
        let mut next = None;
        if let Some(nsg) = requested_next {
            match csg {
                Stage::Security if matches!(self.auth, Auth::Done) => {
                    // Our offers need an operational stage: hold a login
                    // that wants to skip it there instead.
                    let needs_op = nsg == Stage::FullFeature && {
                        let mut probe = negotiation.clone();
                        !probe.target_offers().is_empty()
                    };
                    next = Some(if needs_op { Stage::Operational } else { nsg });
                }
                Stage::Operational => {
                    let offers = negotiation.target_offers();
                    if offers.is_empty() {
                        next = Some(nsg);
                    } else {
                        // An offer needs an answer: no transit yet.
                        answers.extend(offers);
                        self.offers_sent = true;
                    }
                }
                _ => {}
            }
        }
        // Declare our receive limit in the operational stage, or wherever
        // the initiator declared its own.
        if csg == Stage::Operational || negotiation.initiator_declared_mrdsl() {
            if let Some(decl) = negotiation.declare_mrdsl() {
                answers.push(decl);
            }
        }

        let response = Self::response(req, csg, next, text_mod::encode_pairs(&answers));
        match next {
            Some(Stage::FullFeature) => {
                let session = SessionParams {
                    kind: identity.kind,
                    initiator_name: identity.initiator_name,
                    initiator_alias: self.initiator_alias.clone(),
                    isid: req.isid,
                    requested_tsih: req.tsih,
                    cid: req.cid,
                    negotiated: negotiation.negotiated(),
                    cmdsn: req.cmdsn,
                };
                self.stage = Some(Stage::FullFeature);
                Ok(LoginStep::Complete { response, session })
            }
            Some(stage) => {
                self.stage = Some(stage);
                Ok(LoginStep::Continue(response))
            }
            None => Ok(LoginStep::Continue(response)),
        }
    }

    /// The first complete text of a login: who is connecting, to what.
    fn identify(&mut self, pairs: &[(String, String)]) -> Result<(), u16> {
        use status::{
            AUTHORIZATION_FAILED, MISSING_PARAMETER, SESSION_TYPE_NOT_SUPPORTED, TARGET_NOT_FOUND,
        };
        let initiator_name = get(pairs, "InitiatorName")
            .filter(|n| !n.is_empty())
            .ok_or(MISSING_PARAMETER)?
            .to_string();
        let discovery = match get(pairs, "SessionType") {
            None | Some("Normal") => false,
            Some("Discovery") => true,
            Some(_) => return Err(SESSION_TYPE_NOT_SUPPORTED),
        };
        let identity = if discovery {
            Identity {
                initiator_name,
                kind: SessionKind::Discovery,
                target_alias: None,
                chap: self.config.discovery_chap.clone(),
            }
        } else {
            let wanted = get(pairs, "TargetName")
                .filter(|n| !n.is_empty())
                .ok_or(MISSING_PARAMETER)?;
            let target = self
                .config
                .targets
                .iter()
                .find(|t| t.name.eq_ignore_ascii_case(wanted))
                .ok_or(TARGET_NOT_FOUND)?;
            if !text_mod::initiator_allowed(target, &initiator_name) {
                return Err(AUTHORIZATION_FAILED);
            }
            Identity {
                initiator_name,
                kind: SessionKind::Normal {
                    target: target.name.clone(),
                },
                target_alias: target.alias.clone(),
                chap: target.chap.clone(),
            }
        };
        self.negotiation = Some(Negotiation::new(&self.config.limits, discovery));
        self.identity = Some(identity);
        Ok(())
    }

    /// Security stage: AuthMethod list negotiation, then CHAP.
    fn authenticate(
        &mut self,
        identity: &Identity,
        keys: &[(String, String)],
        transit_requested: bool,
        answers: &mut Pairs,
    ) -> Result<(), u16> {
        use status::{AUTHENTICATION_FAILED as AUTH, INITIATOR_ERROR, TARGET_ERROR};
        let chap_keys = keys.iter().any(|(k, _)| k.starts_with("CHAP_"));
        let mut method_now = false;
        if let Some(methods) = get(keys, "AuthMethod") {
            if !matches!(self.auth, Auth::Pending) {
                return Err(INITIATOR_ERROR);
            }
            method_now = true;
            // List negotiation: we accept exactly one method, CHAP when
            // credentials are configured, None otherwise. An initiator that
            // cannot meet it fails authentication (§12: "Reject" + close).
            let wanted = if identity.chap.is_some() {
                "CHAP"
            } else {
                "None"
            };
            if !methods.split(',').any(|m| m == wanted) {
                return Err(AUTH);
            }
            answers.push(("AuthMethod".into(), wanted.into()));
            self.auth = if identity.chap.is_some() {
                Auth::AwaitAlgorithm
            } else {
                Auth::Done
            };
        }
        match std::mem::replace(&mut self.auth, Auth::Pending) {
            Auth::Pending => {
                if chap_keys {
                    return Err(AUTH);
                }
                if transit_requested {
                    // Leaving security without an AuthMethod exchange is
                    // only fine when we require none.
                    if identity.chap.is_some() {
                        return Err(AUTH);
                    }
                    self.auth = Auth::Done;
                }
            }
            Auth::AwaitAlgorithm => {
                let Some(list) = get(keys, "CHAP_A") else {
                    if method_now && !chap_keys {
                        // CHAP_A comes in the next request.
                        self.auth = Auth::AwaitAlgorithm;
                        return Ok(());
                    }
                    return Err(AUTH);
                };
                if keys
                    .iter()
                    .any(|(k, _)| k.starts_with("CHAP_") && k != "CHAP_A")
                {
                    return Err(AUTH);
                }
                let algorithm = chap::select_algorithm(list).ok_or(AUTH)?;
                let mut random = vec![0u8; 1 + algorithm.challenge_len()];
                if !(self.rng)(&mut random) {
                    return Err(TARGET_ERROR);
                }
                let challenge = ChapChallenge::from_random(algorithm, &random);
                answers.extend(challenge.keys().map(|(k, v)| (k.to_string(), v)));
                self.auth = Auth::AwaitResponse(challenge);
            }
            Auth::AwaitResponse(challenge) => {
                let cfg = identity.chap.as_ref().ok_or(AUTH)?;
                let (Some(name), Some(response)) = (get(keys, "CHAP_N"), get(keys, "CHAP_R"))
                else {
                    return Err(AUTH);
                };
                if let Err(e) = challenge.verify(&cfg.user, &cfg.secret, name, response) {
                    tracing::info!(error = %e, user = name, "CHAP authentication failed");
                    return Err(AUTH);
                }
                match (get(keys, "CHAP_I"), get(keys, "CHAP_C")) {
                    (None, None) => {}
                    (Some(id), Some(c)) => {
                        // §12.1.3: one secret must not serve both
                        // directions, or a reflected exchange reveals it.
                        if cfg.mutual.as_ref().is_some_and(|(_, m)| *m == cfg.secret) {
                            tracing::warn!(
                                "mutual CHAP refused: target and initiator secrets are equal"
                            );
                            return Err(AUTH);
                        }
                        let reply = challenge
                            .answer_mutual(id, c, cfg.mutual.as_ref())
                            .map_err(|_| AUTH)?;
                        answers.extend(reply.map(|(k, v)| (k.to_string(), v)));
                    }
                    _ => return Err(AUTH),
                }
                self.auth = Auth::Done;
            }
            Auth::Done => {
                if chap_keys {
                    return Err(INITIATOR_ERROR);
                }
                self.auth = Auth::Done;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
// Short names (l, r, p) keep the request/response choreography readable.
#[allow(clippy::many_single_char_names)]
mod tests {
    use super::*;
    use crate::chap::ChapAlgorithm;
    use crate::text::{encode_pairs, parse_pairs};
    use bytes::Bytes;
    use proptest::prelude::*;

    const INITIATOR: &str = "iqn.2024-01.io.client:host1";
    const OPEN: &str = "iqn.2024-01.io.ferry:open";
    const SECURE: &str = "iqn.2024-01.io.ferry:secure";
    const MUTUAL: &str = "iqn.2024-01.io.ferry:mutual";
    const ACL: &str = "iqn.2024-01.io.ferry:acl";

    fn config() -> Arc<LoginConfig> {
        Arc::new(LoginConfig {
            targets: vec![
                TargetConfig {
                    name: OPEN.into(),
                    alias: Some("open disk".into()),
                    allowed_initiators: vec![],
                    chap: None,
                },
                TargetConfig {
                    name: SECURE.into(),
                    alias: None,
                    allowed_initiators: vec![],
                    chap: Some(ChapConfig {
                        user: "alice".into(),
                        secret: b"alice-secret-12".to_vec(),
                        mutual: None,
                    }),
                },
                TargetConfig {
                    name: MUTUAL.into(),
                    alias: None,
                    allowed_initiators: vec![],
                    chap: Some(ChapConfig {
                        user: "bob".into(),
                        secret: b"bob-secret-1234".to_vec(),
                        mutual: Some(("ferry".into(), b"target-secret-1".to_vec())),
                    }),
                },
                TargetConfig {
                    name: ACL.into(),
                    alias: None,
                    allowed_initiators: vec!["iqn.2024-01.io.client:other".into()],
                    chap: None,
                },
            ],
            portals: vec!["192.0.2.1:3260,1".into()],
            ..LoginConfig::default()
        })
    }

    fn det_login(cfg: Arc<LoginConfig>) -> Login {
        let mut n = 0u8;
        Login::with_rng(
            cfg,
            Box::new(move |buf: &mut [u8]| {
                for b in buf {
                    n = n.wrapping_add(7);
                    *b = n;
                }
                true
            }),
        )
    }

    fn req(transit: bool, csg: Stage, nsg: Stage, data: &[u8]) -> LoginRequest {
        LoginRequest {
            transit,
            cont: false,
            csg: csg as u8,
            nsg: nsg as u8,
            version_max: 0,
            version_min: 0,
            isid: [0x80, 1, 2, 3, 4, 5],
            tsih: 0,
            itt: 0x1234,
            cid: 7,
            cmdsn: 42,
            exp_statsn: 0,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn kv(list: &[(&str, &str)]) -> Vec<u8> {
        encode_pairs(list)
    }

    fn cont(step: LoginStep) -> (LoginResponse, Vec<(String, String)>) {
        match step {
            LoginStep::Continue(r) => {
                assert_eq!(r.status(), 0);
                let p = parse_pairs(&r.data).unwrap();
                (r, p)
            }
            other => panic!("expected Continue, got {other:?}"),
        }
    }

    fn complete(step: LoginStep) -> (LoginResponse, SessionParams, Vec<(String, String)>) {
        match step {
            LoginStep::Complete { response, session } => {
                let p = parse_pairs(&response.data).unwrap();
                (response, session, p)
            }
            other => panic!("expected Complete, got {other:?}"),
        }
    }

    fn fail(step: LoginStep) -> u16 {
        match step {
            LoginStep::Fail(r) => {
                assert!(r.status_class == 2 || r.status_class == 3);
                assert!(!r.transit);
                r.status()
            }
            other => panic!("expected Fail, got {other:?}"),
        }
    }

    fn val<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
        get(p, k)
    }

    /// Operational keys as open-iscsi sends them.
    fn open_iscsi_op_keys() -> Vec<u8> {
        kv(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("InitialR2T", "No"),
            ("ImmediateData", "Yes"),
            ("MaxBurstLength", "16776192"),
            ("FirstBurstLength", "262144"),
            ("DefaultTime2Wait", "2"),
            ("DefaultTime2Retain", "0"),
            ("MaxOutstandingR2T", "1"),
            ("DataPDUInOrder", "Yes"),
            ("DataSequenceInOrder", "Yes"),
            ("ErrorRecoveryLevel", "0"),
            ("IFMarker", "No"),
            ("OFMarker", "No"),
        ])
    }

    #[test]
    fn login_discovery_full() {
        let mut l = det_login(config());
        let mut data = kv(&[
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "host1"),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ]);
        let (r, p) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &data)));
        assert!(r.transit);
        assert_eq!((r.csg, r.nsg), (0, 1));
        assert_eq!(
            (r.isid, r.itt, r.version_max, r.version_active),
            ([0x80, 1, 2, 3, 4, 5], 0x1234, 0, 0)
        );
        assert_eq!(p, vec![("AuthMethod".to_string(), "None".to_string())]);
        assert_eq!(l.stage(), Some(Stage::Operational));

        data = kv(&[
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "32768"),
            ("DefaultTime2Wait", "2"),
            ("MaxBurstLength", "262144"),
        ]);
        let (r, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &data)));
        assert!(r.transit);
        assert_eq!((r.csg, r.nsg), (1, 3));
        assert_eq!(val(&p, "HeaderDigest"), Some("CRC32C"));
        assert_eq!(val(&p, "DataDigest"), Some("None"));
        assert_eq!(val(&p, "DefaultTime2Wait"), Some("Irrelevant"));
        assert_eq!(val(&p, "MaxBurstLength"), Some("Irrelevant"));
        assert_eq!(val(&p, "MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(val(&p, "TargetPortalGroupTag"), None);
        assert_eq!(s.kind, SessionKind::Discovery);
        assert_eq!(s.initiator_name, INITIATOR);
        assert_eq!(s.initiator_alias.as_deref(), Some("host1"));
        assert_eq!(s.cmdsn, 42);
        assert_eq!(s.cid, 7);
        assert!(s.negotiated.header_digest);
        assert_eq!(s.negotiated.max_send_data_segment, 32768);
        assert_eq!(s.negotiated.max_recv_data_segment, 262_144);
        assert!(l.is_finished());
        // Another login request after completion is refused.
        assert_eq!(
            fail(l.step(&req(false, Stage::Operational, Stage::Operational, b""))),
            0x020b
        );
    }

    #[test]
    fn login_discovery_ignores_target_name_and_skips_security() {
        let mut l = det_login(config());
        let mut data = kv(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("TargetName", "x"),
        ]);
        data.extend(open_iscsi_op_keys());
        let (_, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &data)));
        assert_eq!(val(&p, "TargetName"), Some("Irrelevant"));
        assert_eq!(val(&p, "InitialR2T"), Some("Irrelevant"));
        assert_eq!(val(&p, "IFMarker"), Some("No"));
        assert_eq!(s.kind, SessionKind::Discovery);
    }

    #[test]
    fn login_normal_no_auth_open_iscsi_style() {
        let mut l = det_login(config());
        let data = kv(&[
            ("InitiatorName", INITIATOR),
            ("InitiatorAlias", "host1"),
            ("TargetName", OPEN),
            ("SessionType", "Normal"),
            ("AuthMethod", "None"),
        ]);
        let (r, p) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &data)));
        assert!(r.transit);
        assert_eq!(val(&p, "TargetPortalGroupTag"), Some("1"));
        assert_eq!(val(&p, "TargetAlias"), Some("open disk"));
        assert_eq!(val(&p, "AuthMethod"), Some("None"));

        let data = open_iscsi_op_keys();
        let (r, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &data)));
        assert_eq!((r.csg, r.nsg, r.transit), (1, 3, true));
        assert_eq!(
            val(&p, "TargetPortalGroupTag"),
            None,
            "only in the first response"
        );
        assert_eq!(val(&p, "InitialR2T"), Some("No"));
        assert_eq!(val(&p, "ImmediateData"), Some("Yes"));
        assert_eq!(val(&p, "MaxBurstLength"), Some("1048576"));
        assert_eq!(val(&p, "FirstBurstLength"), Some("262144"));
        assert_eq!(val(&p, "DefaultTime2Retain"), Some("0"));
        assert_eq!(val(&p, "MaxRecvDataSegmentLength"), Some("262144"));
        assert_eq!(val(&p, "OFMarker"), Some("No"));
        assert_eq!(
            s.kind,
            SessionKind::Normal {
                target: OPEN.into()
            }
        );
        let n = &s.negotiated;
        assert_eq!(n.max_send_data_segment, 262_144);
        assert_eq!(n.max_burst_length, 1_048_576);
        assert_eq!(n.first_burst_length, 262_144);
        assert!(!n.initial_r2t && n.immediate_data);
        assert_eq!(n.error_recovery_level, 0);
        // Each key is answered once.
        let mut keys: Vec<_> = p.iter().map(|(k, _)| k.clone()).collect();
        let len = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), len);
    }

    #[test]
    fn login_libiscsi_style_straight_to_ffp() {
        // libiscsi without credentials starts in the operational stage.
        let mut l = det_login(config());
        let mut data = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("SessionType", "Normal"),
        ]);
        data.extend(open_iscsi_op_keys());
        data.extend(kv(&[("MaxConnections", "1")]));
        let (_, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &data)));
        assert_eq!(val(&p, "TargetPortalGroupTag"), Some("1"));
        assert_eq!(val(&p, "MaxConnections"), Some("1"));
        assert_eq!(s.negotiated.max_connections, 1);
    }

    #[test]
    fn login_security_straight_to_ffp_uses_defaults() {
        let mut l = det_login(config());
        let data = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("AuthMethod", "None"),
        ]);
        let (r, s, _) = complete(l.step(&req(true, Stage::Security, Stage::FullFeature, &data)));
        assert_eq!((r.csg, r.nsg), (0, 3));
        assert_eq!(s.negotiated, Negotiated::default());
    }

    #[test]
    fn login_operational_without_transit_then_transit() {
        let mut l = det_login(config());
        let data = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("MaxBurstLength", "65536"),
        ]);
        let (r, p) = cont(l.step(&req(false, Stage::Operational, Stage::Security, &data)));
        assert!(!r.transit);
        assert_eq!(r.csg, 1);
        assert_eq!(val(&p, "MaxBurstLength"), Some("65536"));
        assert_eq!(val(&p, "MaxRecvDataSegmentLength"), Some("262144"));
        let data = kv(&[("FirstBurstLength", "262144")]);
        let (_, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &data)));
        // Clamped to the MaxBurstLength negotiated in the previous batch.
        assert_eq!(val(&p, "FirstBurstLength"), Some("65536"));
        assert_eq!(val(&p, "MaxRecvDataSegmentLength"), None, "declared once");
        assert_eq!(s.negotiated.first_burst_length, 65536);
        assert_eq!(s.negotiated.max_burst_length, 65536);
    }

    /// Computes the initiator's side of CHAP in the test, independently of
    /// ChapChallenge.
    fn chap_answer(alg: ChapAlgorithm, id: &str, challenge: &str, secret: &[u8]) -> String {
        let id: u8 = id.parse().unwrap();
        let c = chap::decode_binary(challenge).unwrap();
        let digest = match alg {
            ChapAlgorithm::Md5 => {
                use md5::{Digest, Md5};
                let mut h = Md5::new();
                h.update([id]);
                h.update(secret);
                h.update(&c);
                h.finalize().to_vec()
            }
            ChapAlgorithm::Sha256 => {
                let mut buf = vec![id];
                buf.extend_from_slice(secret);
                buf.extend_from_slice(&c);
                ring::digest::digest(&ring::digest::SHA256, &buf)
                    .as_ref()
                    .to_vec()
            }
        };
        chap::encode_hex(&digest)
    }

    /// Runs the security stage up to the challenge; returns (CHAP_I, CHAP_C).
    fn chap_until_challenge(l: &mut Login, target: &str, algs: &str) -> (String, String, String) {
        let data = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", target),
            ("SessionType", "Normal"),
            ("AuthMethod", "CHAP,None"),
        ]);
        let (r, p) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &data)));
        assert!(!r.transit, "must not transit before CHAP");
        assert_eq!(val(&p, "AuthMethod"), Some("CHAP"));
        let data = kv(&[("CHAP_A", algs)]);
        let (r, p) = cont(l.step(&req(false, Stage::Security, Stage::Operational, &data)));
        assert!(!r.transit);
        let a = val(&p, "CHAP_A").unwrap().to_string();
        let i = val(&p, "CHAP_I").unwrap().to_string();
        let c = val(&p, "CHAP_C").unwrap().to_string();
        assert!(c.starts_with("0x"));
        (a, i, c)
    }

    #[test]
    fn login_chap_one_way_md5() {
        let mut l = det_login(config());
        let (a, i, c) = chap_until_challenge(&mut l, SECURE, "5");
        assert_eq!(a, "5");
        assert_eq!(c.len(), 2 + 32);
        let r = chap_answer(ChapAlgorithm::Md5, &i, &c, b"alice-secret-12");
        let data = kv(&[("CHAP_N", "alice"), ("CHAP_R", &r)]);
        let (resp, p) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &data)));
        assert!(resp.transit);
        assert_eq!((resp.csg, resp.nsg), (0, 1));
        assert!(p.is_empty(), "{p:?}");
        let (_, s, _) = complete(l.step(&req(
            true,
            Stage::Operational,
            Stage::FullFeature,
            &open_iscsi_op_keys(),
        )));
        assert_eq!(
            s.kind,
            SessionKind::Normal {
                target: SECURE.into()
            }
        );
    }

    #[test]
    fn login_chap_sha256_preferred_in_initiator_order() {
        let mut l = det_login(config());
        let (a, i, c) = chap_until_challenge(&mut l, SECURE, "7,5");
        assert_eq!(a, "7");
        assert_eq!(c.len(), 2 + 64);
        let r = chap_answer(ChapAlgorithm::Sha256, &i, &c, b"alice-secret-12");
        // Base64 response encoding is accepted too.
        let raw = chap::decode_binary(&r).unwrap();
        let b64 = format!("0b{}", base64_encode(&raw));
        let data = kv(&[("CHAP_N", "alice"), ("CHAP_R", &b64)]);
        let (resp, _) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &data)));
        assert!(resp.transit);
    }

    fn base64_encode(bytes: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in bytes.chunks(3) {
            let mut b = [0u8; 3];
            b[..chunk.len()].copy_from_slice(chunk);
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..=chunk.len() {
                s.push(char::from(T[(n >> (18 - 6 * i) & 63) as usize]));
            }
            for _ in chunk.len()..3 {
                s.push('=');
            }
        }
        s
    }

    #[test]
    fn login_chap_mutual_md5_and_sha256() {
        for (algs, alg) in [("5", ChapAlgorithm::Md5), ("7", ChapAlgorithm::Sha256)] {
            let mut l = det_login(config());
            let (_, i, c) = chap_until_challenge(&mut l, MUTUAL, algs);
            let r = chap_answer(alg, &i, &c, b"bob-secret-1234");
            let my_challenge = "0x00112233445566778899aabbccddeeff0011223344556677";
            let data = kv(&[
                ("CHAP_N", "bob"),
                ("CHAP_R", &r),
                ("CHAP_I", "77"),
                ("CHAP_C", my_challenge),
            ]);
            let (resp, p) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &data)));
            assert!(resp.transit);
            assert_eq!(val(&p, "CHAP_N"), Some("ferry"));
            let want = chap_answer(alg, "77", my_challenge, b"target-secret-1");
            assert_eq!(val(&p, "CHAP_R"), Some(want.as_str()));
        }
    }

    #[test]
    fn login_chap_mutual_reflection_refused() {
        let mut l = det_login(config());
        let (_, i, c) = chap_until_challenge(&mut l, MUTUAL, "5");
        let r = chap_answer(ChapAlgorithm::Md5, &i, &c, b"bob-secret-1234");
        let data = kv(&[
            ("CHAP_N", "bob"),
            ("CHAP_R", &r),
            ("CHAP_I", &i),
            ("CHAP_C", &c),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
            0x0201
        );
    }

    #[test]
    fn login_chap_mutual_same_secret_refused() {
        let mut cfg = (*config()).clone();
        cfg.targets[2].chap.as_mut().unwrap().mutual =
            Some(("ferry".into(), b"bob-secret-1234".to_vec()));
        let mut l = det_login(Arc::new(cfg));
        let (_, i, c) = chap_until_challenge(&mut l, MUTUAL, "5");
        let r = chap_answer(ChapAlgorithm::Md5, &i, &c, b"bob-secret-1234");
        let data = kv(&[
            ("CHAP_N", "bob"),
            ("CHAP_R", &r),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x0102"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
            0x0201
        );
    }

    #[test]
    fn login_chap_mutual_without_target_secret_refused() {
        let mut l = det_login(config());
        let (_, i, c) = chap_until_challenge(&mut l, SECURE, "5");
        let r = chap_answer(ChapAlgorithm::Md5, &i, &c, b"alice-secret-12");
        let data = kv(&[
            ("CHAP_N", "alice"),
            ("CHAP_R", &r),
            ("CHAP_I", "1"),
            ("CHAP_C", "0x0102"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
            0x0201
        );
    }

    #[test]
    fn login_chap_wrong_secret_or_user_refused() {
        for (user, secret) in [
            ("alice", &b"wrong"[..]),
            ("mallory", &b"alice-secret-12"[..]),
        ] {
            let mut l = det_login(config());
            let (_, i, c) = chap_until_challenge(&mut l, SECURE, "5");
            let r = chap_answer(ChapAlgorithm::Md5, &i, &c, secret);
            let data = kv(&[("CHAP_N", user), ("CHAP_R", &r)]);
            assert_eq!(
                fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
                0x0201
            );
            assert!(l.is_finished());
        }
    }

    #[test]
    fn login_chap_required_but_not_offered() {
        // Only None offered.
        let mut l = det_login(config());
        let data = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", SECURE),
            ("AuthMethod", "None"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
            0x0201
        );
        // Security stage skipped.
        let mut l = det_login(config());
        let data = kv(&[("InitiatorName", INITIATOR), ("TargetName", SECURE)]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, &data))),
            0x0201
        );
        // Transit requested with no AuthMethod at all.
        let mut l = det_login(config());
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
            0x0201
        );
        // Unsupported algorithm.
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", SECURE),
            ("AuthMethod", "CHAP"),
        ]);
        cont(l.step(&req(false, Stage::Security, Stage::Operational, &d)));
        let d = kv(&[("CHAP_A", "6,8")]);
        assert_eq!(
            fail(l.step(&req(false, Stage::Security, Stage::Operational, &d))),
            0x0201
        );
        // Response before the challenge.
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", SECURE),
            ("AuthMethod", "CHAP"),
        ]);
        cont(l.step(&req(false, Stage::Security, Stage::Operational, &d)));
        let d = kv(&[("CHAP_N", "alice"), ("CHAP_R", "0x00")]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &d))),
            0x0201
        );
    }

    #[test]
    fn login_chap_only_offered_without_config_fails() {
        let mut l = det_login(config());
        let data = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("AuthMethod", "CHAP"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
            0x0201
        );
    }

    #[test]
    fn login_discovery_chap() {
        let cfg = Arc::new(LoginConfig {
            discovery_chap: Some(ChapConfig {
                user: "disc".into(),
                secret: b"disc-secret-123".to_vec(),
                mutual: None,
            }),
            ..(*config()).clone()
        });
        let mut l = det_login(cfg);
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("SessionType", "Discovery"),
            ("AuthMethod", "CHAP,None"),
        ]);
        let (_, p) = cont(l.step(&req(true, Stage::Security, Stage::Operational, &d)));
        assert_eq!(val(&p, "AuthMethod"), Some("CHAP"));
        let (_, p) = cont(l.step(&req(
            false,
            Stage::Security,
            Stage::Operational,
            &kv(&[("CHAP_A", "5")]),
        )));
        let r = chap_answer(
            ChapAlgorithm::Md5,
            val(&p, "CHAP_I").unwrap(),
            val(&p, "CHAP_C").unwrap(),
            b"disc-secret-123",
        );
        let d = kv(&[("CHAP_N", "disc"), ("CHAP_R", &r)]);
        let (_, s, _) = complete(l.step(&req(true, Stage::Security, Stage::FullFeature, &d)));
        assert_eq!(s.kind, SessionKind::Discovery);
    }

    #[test]
    fn login_identity_errors() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (kv(&[("TargetName", OPEN)]), status::MISSING_PARAMETER),
            (kv(&[("InitiatorName", "")]), status::MISSING_PARAMETER),
            (
                kv(&[("InitiatorName", INITIATOR)]),
                status::MISSING_PARAMETER,
            ),
            (
                kv(&[("InitiatorName", INITIATOR), ("SessionType", "Normal")]),
                status::MISSING_PARAMETER,
            ),
            (
                kv(&[("InitiatorName", INITIATOR), ("TargetName", "iqn.nope:x")]),
                status::TARGET_NOT_FOUND,
            ),
            (
                kv(&[("InitiatorName", INITIATOR), ("TargetName", ACL)]),
                status::AUTHORIZATION_FAILED,
            ),
            (
                kv(&[("InitiatorName", INITIATOR), ("SessionType", "Bogus")]),
                status::SESSION_TYPE_NOT_SUPPORTED,
            ),
        ];
        for (data, want) in cases {
            let mut l = det_login(config());
            assert_eq!(
                fail(l.step(&req(true, Stage::Security, Stage::Operational, &data))),
                want
            );
        }
        // The allow-list admits the listed initiator, case-insensitively.
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", "IQN.2024-01.io.client:OTHER"),
            ("TargetName", ACL),
        ]);
        cont(l.step(&req(true, Stage::Security, Stage::Operational, &d)));
        // Target names are matched case-insensitively too.
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", "IQN.2024-01.IO.FERRY:OPEN"),
        ]);
        let (_, s, _) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d)));
        assert_eq!(
            s.kind,
            SessionKind::Normal {
                target: OPEN.into()
            }
        );
    }

    #[test]
    fn login_version_and_header_errors() {
        let d = kv(&[("InitiatorName", INITIATOR), ("TargetName", OPEN)]);
        let mut l = det_login(config());
        let mut r = req(true, Stage::Security, Stage::Operational, &d);
        r.version_min = 1;
        r.version_max = 2;
        assert_eq!(fail(l.step(&r)), status::UNSUPPORTED_VERSION);

        // T and C together.
        let mut l = det_login(config());
        let mut r = req(true, Stage::Security, Stage::Operational, &d);
        r.cont = true;
        assert_eq!(fail(l.step(&r)), status::INITIATOR_ERROR);

        // Backwards or reserved stage transitions.
        for (csg, nsg) in [(1u8, 0u8), (1, 1), (0, 2), (2, 3), (3, 3)] {
            let mut l = det_login(config());
            let mut r = req(true, Stage::Security, Stage::Operational, &d);
            r.csg = csg;
            r.nsg = nsg;
            assert_eq!(fail(l.step(&r)), status::INITIATOR_ERROR, "{csg}->{nsg}");
        }

        // CSG that does not match the current stage.
        let mut l = det_login(config());
        let d0 = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("AuthMethod", "None"),
        ]);
        cont(l.step(&req(false, Stage::Security, Stage::Operational, &d0)));
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, b""))),
            status::INITIATOR_ERROR
        );

        // ISID changing mid-login.
        let mut l = det_login(config());
        cont(l.step(&req(false, Stage::Security, Stage::Operational, &d0)));
        let mut r = req(true, Stage::Security, Stage::Operational, b"");
        r.isid[5] ^= 1;
        assert_eq!(fail(l.step(&r)), status::INITIATOR_ERROR);

        // Malformed text.
        let mut l = det_login(config());
        assert_eq!(
            fail(l.step(&req(
                true,
                Stage::Security,
                Stage::Operational,
                b"InitiatorName\0"
            ))),
            status::INITIATOR_ERROR
        );
    }

    #[test]
    fn login_duplicate_key_rejected() {
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("MaxBurstLength", "65536"),
            ("MaxBurstLength", "65536"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d))),
            0x0200
        );
        // Across PDUs.
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("ImmediateData", "Yes"),
        ]);
        cont(l.step(&req(false, Stage::Operational, Stage::FullFeature, &d)));
        let d = kv(&[("ImmediateData", "No")]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d))),
            0x0200
        );
        // Identity keys resent unchanged are tolerated; changed are not.
        let mut l = det_login(config());
        let d = kv(&[("InitiatorName", INITIATOR), ("TargetName", OPEN)]);
        cont(l.step(&req(false, Stage::Operational, Stage::FullFeature, &d)));
        cont(l.step(&req(false, Stage::Operational, Stage::FullFeature, &d)));
        let d = kv(&[("TargetName", SECURE)]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d))),
            0x0200
        );
    }

    #[test]
    fn login_security_keys_in_operational_stage_rejected() {
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("AuthMethod", "None"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d))),
            0x0200
        );
    }

    #[test]
    fn login_reserved_constant_offer_rejected() {
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("InitialR2T", "Irrelevant"),
        ]);
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d))),
            0x0200
        );
    }

    #[test]
    fn login_reject_and_not_understood_answers() {
        let mut l = det_login(config());
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("MaxBurstLength", "100"),
            ("ErrorRecoveryLevel", "9"),
            ("X-com.example.Knob", "1"),
            ("Unknown", "1"),
            ("OFMarkInt", "2048~8192"),
        ]);
        let (_, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d)));
        assert_eq!(val(&p, "MaxBurstLength"), Some("Reject"));
        assert_eq!(val(&p, "ErrorRecoveryLevel"), Some("Reject"));
        assert_eq!(val(&p, "X-com.example.Knob"), Some("NotUnderstood"));
        assert_eq!(val(&p, "Unknown"), Some("NotUnderstood"));
        assert_eq!(val(&p, "OFMarkInt"), Some("Reject"));
        assert_eq!(
            s.negotiated.max_burst_length, 262_144,
            "rejected key keeps its default"
        );
    }

    #[test]
    fn login_continued_text_across_pdus() {
        let mut l = det_login(config());
        let mut all = kv(&[("InitiatorName", INITIATOR), ("TargetName", OPEN)]);
        all.extend(open_iscsi_op_keys());
        let (a, b) = all.split_at(37); // splits inside a pair
        let mut r = req(false, Stage::Operational, Stage::FullFeature, a);
        r.cont = true;
        let (resp, p) = cont(l.step(&r));
        assert!(p.is_empty() && resp.data.is_empty() && !resp.transit && !resp.cont);
        assert_eq!(resp.csg, 1);
        let (_, s, p) = complete(l.step(&req(true, Stage::Operational, Stage::FullFeature, b)));
        assert_eq!(val(&p, "TargetPortalGroupTag"), Some("1"));
        assert_eq!(s.negotiated.max_send_data_segment, 262_144);
    }

    #[test]
    fn login_continued_text_bounded() {
        let cfg = Arc::new(LoginConfig {
            limits: Limits {
                max_login_text: 9000,
                ..Limits::default()
            },
            ..(*config()).clone()
        });
        let mut l = det_login(cfg);
        let chunk = vec![b'a'; 4096];
        let mut r = req(false, Stage::Operational, Stage::FullFeature, &chunk);
        r.cont = true;
        cont(l.step(&r));
        cont(l.step(&r));
        assert_eq!(fail(l.step(&r)), 0x0200);
    }

    #[test]
    fn login_pdu_count_bounded() {
        let mut l = det_login(config());
        let mut r = req(false, Stage::Operational, Stage::FullFeature, b"");
        r.cont = true;
        for _ in 0..MAX_LOGIN_PDUS {
            cont(l.step(&r));
        }
        assert_eq!(fail(l.step(&r)), 0x0200);
    }

    #[test]
    fn login_target_offers_when_limits_below_defaults() {
        let cfg = Arc::new(LoginConfig {
            limits: Limits {
                max_burst_length: 131_072,
                ..Limits::default()
            },
            ..(*config()).clone()
        });
        let mut l = det_login(cfg.clone());
        let d = kv(&[("InitiatorName", INITIATOR), ("TargetName", OPEN)]);
        let (r, p) = cont(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d)));
        assert!(!r.transit, "an offer needs an answer before transit");
        assert_eq!(val(&p, "MaxBurstLength"), Some("131072"));
        let (_, s, p) = complete(l.step(&req(
            true,
            Stage::Operational,
            Stage::FullFeature,
            &kv(&[("MaxBurstLength", "131072")]),
        )));
        assert!(
            p.iter().all(|(k, _)| k != "MaxBurstLength"),
            "answers are not answered"
        );
        assert_eq!(s.negotiated.max_burst_length, 131_072);

        // Unanswered offer.
        let mut l = det_login(cfg.clone());
        cont(l.step(&req(true, Stage::Operational, Stage::FullFeature, &d)));
        assert_eq!(
            fail(l.step(&req(true, Stage::Operational, Stage::FullFeature, b""))),
            0x0200
        );

        // A login that tries to skip the operational stage is held there.
        let mut l = det_login(cfg);
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", OPEN),
            ("AuthMethod", "None"),
        ]);
        let (r, _) = cont(l.step(&req(true, Stage::Security, Stage::FullFeature, &d)));
        assert_eq!((r.transit, r.csg, r.nsg), (true, 0, 1));
        assert_eq!(l.stage(), Some(Stage::Operational));
    }

    #[test]
    fn login_rng_failure_is_target_error() {
        let cfg = config();
        let mut l = Login::with_rng(cfg, Box::new(|_: &mut [u8]| false));
        let d = kv(&[
            ("InitiatorName", INITIATOR),
            ("TargetName", SECURE),
            ("AuthMethod", "CHAP"),
        ]);
        cont(l.step(&req(false, Stage::Security, Stage::Operational, &d)));
        let r = l.step(&req(
            false,
            Stage::Security,
            Stage::Operational,
            &kv(&[("CHAP_A", "5")]),
        ));
        assert_eq!(fail(r), status::TARGET_ERROR);
    }

    #[test]
    fn login_system_rng_challenges_differ() {
        let mut a = Login::new(config());
        let mut b = Login::new(config());
        let (_, _, ca) = chap_until_challenge(&mut a, SECURE, "5");
        let (_, _, cb) = chap_until_challenge(&mut b, SECURE, "5");
        assert_ne!(ca, cb);
    }

    fn key_soup() -> impl Strategy<Value = Vec<u8>> {
        let pair = prop_oneof![
            Just("InitiatorName=iqn.2024-01.io.client:a".to_string()),
            Just("TargetName=iqn.2024-01.io.ferry:chap".to_string()),
            Just("TargetName=iqn.2024-01.io.ferry:open".to_string()),
            Just("SessionType=Discovery".to_string()),
            Just("AuthMethod=CHAP,None".to_string()),
            Just("CHAP_A=5".to_string()),
            Just("CHAP_A=7".to_string()),
            Just("CHAP_N=user".to_string()),
            Just("CHAP_I=3".to_string()),
            Just("CHAP_C=0x0102".to_string()),
            "CHAP_R=0x[0-9a-f]{0,70}",
            "(MaxBurstLength|FirstBurstLength|MaxRecvDataSegmentLength|DefaultTime2Wait|ErrorRecoveryLevel)=[0-9]{0,9}",
            "(InitialR2T|ImmediateData|DataPDUInOrder|IFMarker)=(Yes|No|Reject|x)",
            "(HeaderDigest|DataDigest)=(CRC32C|None|,)*",
            "[A-Za-z_]{1,8}=[ -~]{0,10}",
            any::<Vec<u8>>().prop_map(|v| String::from_utf8_lossy(&v).into_owned()),
        ];
        proptest::collection::vec(pair, 0..8).prop_map(|ps| {
            let mut out = Vec::new();
            for p in ps {
                out.extend_from_slice(p.as_bytes());
                out.push(0);
            }
            out
        })
    }

    proptest! {
        #[test]
        fn text_parse_pairs_never_panics(data in any::<Vec<u8>>()) {
            let _ = parse_pairs(&data);
        }

        #[test]
        fn text_parse_encode_roundtrip(
            pairs in proptest::collection::vec(("[A-Za-z0-9.+@_-]{1,63}", "[^\u{0}]{0,60}"), 0..8)
        ) {
            let enc = encode_pairs(&pairs);
            let dec = parse_pairs(&enc).unwrap();
            prop_assert_eq!(dec, pairs);
        }

        #[test]
        fn login_step_never_panics(
            steps in proptest::collection::vec(
                (any::<u8>(), any::<u8>(), any::<u8>(), any::<[u8; 6]>(), any::<u16>(), any::<u32>(),
                 prop_oneof![key_soup(), any::<Vec<u8>>()]),
                1..10,
            )
        ) {
            let mut l = det_login(config());
            for (flags, vmax, vmin, isid, tsih, itt, data) in steps {
                let r = LoginRequest {
                    transit: flags & 0x80 != 0,
                    cont: flags & 0x40 != 0,
                    csg: (flags >> 2) & 3,
                    nsg: flags & 3,
                    version_max: vmax % 2,
                    version_min: vmin % 2,
                    isid,
                    tsih: tsih % 2,
                    itt,
                    cid: 0,
                    cmdsn: 0,
                    exp_statsn: 0,
                    data: Bytes::from(data),
                };
                let was_finished = l.is_finished();
                match l.step(&r) {
                    LoginStep::Continue(resp) => {
                        prop_assert_eq!(resp.status(), 0);
                        prop_assert_eq!(resp.itt, itt);
                        prop_assert!(!was_finished);
                    }
                    LoginStep::Complete { response, .. } => {
                        prop_assert!(response.transit && response.nsg == 3);
                    }
                    LoginStep::Fail(resp) => {
                        prop_assert!(resp.status_class == 2 || resp.status_class == 3);
                    }
                }
            }
        }
    }
}
