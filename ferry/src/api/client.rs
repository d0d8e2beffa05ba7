//! The CLI's side of the API: one HTTP/1.1 request over the daemon's Unix
//! socket.

use std::path::{Path, PathBuf};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// A daemon's API socket.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

/// A reply: its status and body.
#[derive(Debug)]
pub struct ApiReply {
    pub status: u16,
    pub body: Bytes,
}

impl ApiReply {
    /// The body as JSON, or the error message the daemon gave.
    pub fn json<T: for<'de> serde::Deserialize<'de>>(&self) -> anyhow::Result<T> {
        if !(200..300).contains(&self.status) {
            let message = serde_json::from_slice::<super::ApiError>(&self.body).map_or_else(
                |_| String::from_utf8_lossy(&self.body).into_owned(),
                |e| e.message,
            );
            anyhow::bail!("{message}");
        }
        serde_json::from_slice(&self.body).context("the daemon's reply is not the expected JSON")
    }
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        ApiClient {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; `body` goes as JSON.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<ApiReply> {
        let stream = UnixStream::connect(&self.socket).await.with_context(|| {
            format!(
                "connecting to the API socket {}: is the daemon running? (give --api PATH or set FERRY_API)",
                self.socket.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("starting HTTP on the API socket")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "ferry");
        let payload = match body {
            Some(b) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(b)?)
            }
            None => Bytes::new(),
        };
        let reply = sender
            .send_request(req.body(Full::new(payload))?)
            .await
            .context("sending the request")?;
        let status = reply.status().as_u16();
        let body = reply
            .into_body()
            .collect()
            .await
            .context("reading the reply")?
            .to_bytes();
        Ok(ApiReply { status, body })
    }
}
