//! The HTTP shell of the management API (hyper, HTTP/1.1): a Unix socket
//! (the default; its file mode is the access control), TCP with TLS and a
//! bearer token, and a plain-TCP listener that serves only `/metrics` for
//! Prometheus. It parses nothing beyond HTTP: bodies are limited to
//! [`MAX_BODY`] and must be JSON; everything else is the [`Api`]'s.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use super::{Api, ApiError, HttpRequest, Reply, MAX_BODY};

/// How long a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener lets through.
#[derive(Clone)]
struct Policy {
    /// Required as `Authorization: Bearer TOKEN`.
    token: Option<Arc<Zeroizing<String>>>,
    metrics_only: bool,
}

/// Serves the API on a Unix socket until `stop`.
pub async fn serve_unix(
    listener: UnixListener,
    api: Arc<dyn Api>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let policy = Policy {
        token: None,
        metrics_only: false,
    };
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        spawn_connection(stream, api.clone(), policy.clone());
    }
}

/// Serves the API over TCP with TLS, every request carrying `token`.
pub async fn serve_tls(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    token: Zeroizing<String>,
    api: Arc<dyn Api>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let policy = Policy {
        token: Some(Arc::new(token)),
        metrics_only: false,
    };
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (tls, api, policy) = (tls.clone(), api.clone(), policy.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(stream)).await {
                Ok(Ok(s)) => spawn_connection(s, api, policy),
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "API: TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "API: TLS handshake timed out"),
            }
        });
    }
}

/// Serves only `GET /metrics` over plain TCP (what Prometheus scrapes).
pub async fn serve_metrics(
    listener: TcpListener,
    api: Arc<dyn Api>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let policy = Policy {
        token: None,
        metrics_only: true,
    };
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            a = listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        spawn_connection(stream, api.clone(), policy.clone());
    }
}

fn spawn_connection<S>(stream: S, api: Arc<dyn Api>, policy: Policy)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let service = hyper::service::service_fn(move |req| {
            let (api, policy) = (api.clone(), policy.clone());
            async move { Ok::<_, Infallible>(respond(api.as_ref(), &policy, req).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "API connection ended");
        }
    });
}

async fn respond(api: &dyn Api, policy: &Policy, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match handle(api, policy, req).await {
        Ok(Reply::Json { status, body }) => json_response(status, &body),
        Ok(Reply::Metrics(text)) => {
            let mut r = Response::new(Full::new(Bytes::from(text)));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Err(e) => {
            let body = serde_json::to_value(&e).unwrap_or_default();
            let mut r = json_response(e.status, &body);
            if e.status == 401 {
                r.headers_mut()
                    .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            }
            r
        }
    }
}

fn json_response(status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_vec_pretty(body).unwrap_or_default();
    text.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

async fn handle(api: &dyn Api, policy: &Policy, req: Request<Incoming>) -> Result<Reply, ApiError> {
    if let Some(token) = &policy.token {
        let given = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return Err(ApiError::new(
                401,
                "unauthorized",
                "missing or wrong bearer token: send Authorization: Bearer <the token in the edge's token_file>",
            ));
        }
    }
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    if policy.metrics_only && !(method == "GET" && path == "/metrics") {
        return Err(ApiError::not_found(
            "this listener serves only GET /metrics; the API is on the Unix socket",
        ));
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let json = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim() == "application/json")
        });
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                ApiError::bad_request(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    if !body.is_empty() && !json {
        return Err(ApiError::new(
            415,
            "unsupported_media_type",
            "send the body as JSON with Content-Type: application/json",
        ));
    }
    api.handle(HttpRequest {
        method,
        path,
        query,
        body,
    })
    .await
}

fn too_large() -> ApiError {
    ApiError::new(
        413,
        "payload_too_large",
        format!("request bodies are limited to {MAX_BODY} bytes"),
    )
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (kv.to_owned(), String::new()),
        })
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    // Hash first so the comparison's time does not depend on lengths.
    blake3::hash(a) == blake3::hash(b)
}
