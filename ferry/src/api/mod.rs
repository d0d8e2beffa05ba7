//! The management API's shared parts: errors, replies, the route table
//! that describes an API (and generates its OpenAPI document), and the
//! HTTP shell and client.
//!
//! Each daemon (`edge::api`, `origin_api`) declares its routes once, parses
//! every HTTP request into one typed `Request` (method, path and body
//! checked before anything runs, as firecracker's API does), then executes
//! it. The HTTP shell knows nothing of either: it enforces the body limit
//! and the bearer token and hands `(method, path, query, body)` over.

pub mod client;
pub mod http;
pub mod openapi;

use std::collections::BTreeMap;

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The largest request body the API reads (volume specs are a few hundred
/// bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// An error reply: the HTTP status, a stable machine-readable code, and a
/// message that says what was wrong and what to do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    #[serde(skip)]
    pub status: u16,
    /// One of: bad_request, unauthorized, not_found, method_not_allowed,
    /// conflict, payload_too_large, unsupported_media_type, unavailable,
    /// bad_gateway, timeout, internal.
    pub error: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, error: &str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            error: error.to_owned(),
            message: message.into(),
        }
    }
    pub fn bad_request(m: impl Into<String>) -> Self {
        Self::new(400, "bad_request", m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(404, "not_found", m)
    }
    pub fn conflict(m: impl Into<String>) -> Self {
        Self::new(409, "conflict", m)
    }
    pub fn bad_gateway(m: impl Into<String>) -> Self {
        Self::new(502, "bad_gateway", m)
    }
    pub fn unavailable(m: impl Into<String>) -> Self {
        Self::new(503, "unavailable", m)
    }
    pub fn timeout(m: impl Into<String>) -> Self {
        Self::new(504, "timeout", m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(500, "internal", m)
    }
}

/// A successful reply.
#[derive(Debug)]
pub enum Reply {
    Json {
        status: u16,
        body: serde_json::Value,
    },
    /// Prometheus text exposition format.
    Metrics(String),
}

impl Reply {
    pub fn ok<T: Serialize>(body: &T) -> Result<Reply, ApiError> {
        Self::with_status(200, body)
    }

    pub fn with_status<T: Serialize>(status: u16, body: &T) -> Result<Reply, ApiError> {
        serde_json::to_value(body)
            .map(|body| Reply::Json { status, body })
            .map_err(|e| ApiError::internal(format!("encoding the reply: {e}")))
    }
}

/// One HTTP request as the shell hands it over.
#[derive(Debug)]
pub struct HttpRequest {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub body: Bytes,
}

impl HttpRequest {
    /// The body as JSON of type `T`, with an error that names the problem.
    pub fn json<T: for<'de> Deserialize<'de>>(&self) -> Result<T, ApiError> {
        if self.body.is_empty() {
            return Err(ApiError::bad_request("this request needs a JSON body"));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| ApiError::bad_request(format!("malformed JSON body: {e}")))
    }

    /// The path's segments after the leading `/`.
    pub fn segments(&self) -> Vec<&str> {
        self.path.trim_matches('/').split('/').collect()
    }

    /// A numeric query parameter.
    pub fn query_bool(&self, key: &str) -> Result<bool, ApiError> {
        match self.query.get(key).map(String::as_str) {
            None | Some("false" | "0") => Ok(false),
            Some("true" | "1" | "") => Ok(true),
            Some(v) => Err(ApiError::bad_request(format!(
                "query parameter {key}={v:?} is not true or false"
            ))),
        }
    }

    pub fn query_f64(&self, key: &str) -> Result<Option<f64>, ApiError> {
        self.query
            .get(key)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x >= 0.0)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "query parameter {key}={v:?} is not a non-negative number"
                        ))
                    })
            })
            .transpose()
    }
}

/// A schema-producing function, so routes can name request and reply types.
pub type SchemaOf = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

/// The schema of `T` (registered in the document's components).
pub fn schema_of<T: JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    g.subschema_for::<T>()
}

/// One documented endpoint.
#[derive(Clone, Copy)]
pub struct Route {
    pub method: &'static str,
    /// With `{name}`-style parameters.
    pub path: &'static str,
    pub summary: &'static str,
    pub request: Option<SchemaOf>,
    /// The success status and its body (`None`: Prometheus text).
    pub reply: (u16, Option<SchemaOf>),
    /// The error statuses this route can answer besides 400/401/413/415/500.
    pub errors: &'static [u16],
    /// Query parameters: (name, description).
    pub query: &'static [(&'static str, &'static str)],
    /// A body that succeeds against a fresh test deployment (for the API
    /// walk test), with `{origin}` standing for the origin's address.
    pub example: Option<&'static str>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// Whether `path` matches the route's pattern, binding its parameters.
pub fn match_path<'a>(pattern: &str, path: &'a str) -> Option<Vec<&'a str>> {
    let want: Vec<&str> = pattern.trim_matches('/').split('/').collect();
    let got: Vec<&str> = path.trim_matches('/').split('/').collect();
    if want.len() != got.len() {
        return None;
    }
    let mut params = Vec::new();
    for (w, g) in want.iter().zip(&got) {
        if w.starts_with('{') {
            if g.is_empty() {
                return None;
            }
            params.push(*g);
        } else if w != g {
            return None;
        }
    }
    Some(params)
}

/// Finds the route for a request: `Err` is 404 (no such path) or 405 (the
/// path exists with other methods).
pub fn find_route<'r>(
    routes: &'r [Route],
    method: &str,
    path: &str,
) -> Result<(&'r Route, Vec<String>), ApiError> {
    let mut allowed = Vec::new();
    for r in routes {
        if let Some(params) = match_path(r.path, path) {
            if r.method == method {
                return Ok((r, params.into_iter().map(str::to_owned).collect()));
            }
            allowed.push(r.method);
        }
    }
    if allowed.is_empty() {
        Err(ApiError::not_found(format!(
            "no such endpoint {path:?}: see GET /v1/openapi.json for the API"
        )))
    } else {
        Err(ApiError::new(
            405,
            "method_not_allowed",
            format!("{path} takes {}, not {method}", allowed.join(", ")),
        ))
    }
}

/// A daemon's API: its routes, and the execution of a parsed request.
#[async_trait::async_trait]
pub trait Api: Send + Sync + 'static {
    fn title(&self) -> &'static str;
    fn routes(&self) -> &'static [Route];
    async fn handle(&self, req: HttpRequest) -> Result<Reply, ApiError>;
}
