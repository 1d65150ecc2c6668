//! The HTTP(S) client Portcullis reaches out with: remote MCP servers, JWKS
//! URLs, and the POSTs of notices and delivering audit sinks (with their
//! retry pacing). TLS is rustls, trusting the platform's root certificates;
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` replace them, as they do for OpenSSL.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// A client for `http://` and `https://` URLs.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A new client; fails when no root certificate can be loaded.
pub fn client() -> Result<HttpClient> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .context("cannot load the platform's TLS root certificates (see SSL_CERT_FILE)")?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// Whether `scheme` is one the client speaks.
pub fn supports(scheme: Option<&str>) -> bool {
    matches!(scheme, Some("http" | "https"))
}

/// A current-thread runtime and a client, for a thread that sends on its
/// own (off the message path).
pub fn sender() -> Result<(tokio::runtime::Runtime, HttpClient)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for sending")?;
    Ok((runtime, client()?))
}

/// An answer: status, headers and (at most [`MAX_ANSWER`] bytes of) body.
pub struct Answer {
    /// The status code.
    pub status: hyper::StatusCode,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body, cut at [`MAX_ANSWER`] bytes.
    pub body: Bytes,
}

/// The most of an answer's body kept.
pub const MAX_ANSWER: usize = 1 << 20;

/// Sends a `method` request to `url` with `headers` and `body`, and reads
/// the answer, whatever its status, within `timeout`.
pub async fn send(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<Answer> {
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .header(hyper::header::USER_AGENT, "portcullis");
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request.body(Full::new(Bytes::from(body)))?;
    let exchange = async {
        let response = client.request(request).await?;
        let (parts, mut body) = response.into_parts();
        let mut kept = Vec::new();
        while kept.len() < MAX_ANSWER {
            let Some(frame) = body.frame().await else {
                break;
            };
            if let Ok(data) = frame?.into_data() {
                let room = MAX_ANSWER - kept.len();
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        anyhow::Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: Bytes::from(kept),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .context("timed out")?
}

/// POSTs `body` to `url` as `content_type` with `headers`; fails unless a
/// 2xx answer comes within `timeout`.
pub async fn post(
    client: &HttpClient,
    url: &str,
    content_type: &str,
    headers: &[(String, String)],
    body: Vec<u8>,
    timeout: Duration,
) -> Result<()> {
    let mut headers = headers.to_vec();
    headers.push((hyper::header::CONTENT_TYPE.to_string(), content_type.into()));
    let answer = send(client, Method::POST, url, &headers, body, timeout).await?;
    if !answer.status.is_success() {
        bail!("HTTP {}", answer.status);
    }
    Ok(())
}

/// How long to wait before retry `retry` (1 for the first): doubling from
/// `first`, at most `max`, plus up to 250 ms of jitter so that senders do not
/// retry in step.
pub fn backoff(retry: u32, first: Duration, max: Duration) -> Duration {
    let doubled = first.saturating_mul(1 << retry.saturating_sub(1).min(16));
    doubled.min(max) + Duration::from_millis(rand::random::<u64>() % 250)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_a_little_jitter() {
        let (first, max) = (Duration::from_millis(250), Duration::from_secs(30));
        let base = |retry| backoff(retry, first, max).as_millis();
        assert!((250..500).contains(&base(1)));
        assert!((1000..1250).contains(&base(3)));
        assert!((30_000..30_250).contains(&base(40)));
    }
}
