//! The HTTP(S) client Portcullis reaches out with: remote MCP servers, JWKS
//! URLs, and the POSTs of notices and delivering audit sinks (with their
//! retry pacing), and unary gRPC calls over HTTP/2 for OTLP/gRPC. TLS is rustls, trusting the platform's root certificates;
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

/// A new HTTP/1.1 client; fails when no root certificate can be loaded.
pub fn client() -> Result<HttpClient> {
    let connector = connector()?.enable_http1().build();
    Ok(Client::builder(TokioExecutor::new()).build(connector))
}

/// A new HTTP/2-only client, as gRPC needs (`http://`: HTTP/2 without TLS,
/// by prior knowledge; `https://`: negotiated by ALPN).
pub fn grpc_client() -> Result<HttpClient> {
    let connector = connector()?.enable_http2().build();
    Ok(Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(connector))
}

fn connector()
-> Result<hyper_rustls::HttpsConnectorBuilder<hyper_rustls::builderstates::WantsProtocols1>> {
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_native_roots()
        .context("cannot load the platform's TLS root certificates (see SSL_CERT_FILE)")?
        .https_or_http())
}

/// Whether `scheme` is one the client speaks.
pub fn supports(scheme: Option<&str>) -> bool {
    matches!(scheme, Some("http" | "https"))
}

/// A current-thread runtime, for a thread that sends on its own (off the
/// message path).
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for sending")
}

/// A runtime and an HTTP/1.1 client, for a thread that sends on its own.
pub fn sender() -> Result<(tokio::runtime::Runtime, HttpClient)> {
    Ok((runtime()?, client()?))
}

/// An answer: status, headers and (at most [`MAX_ANSWER`] bytes of) body.
pub struct Answer {
    /// The status code.
    pub status: hyper::StatusCode,
    /// The headers.
    pub headers: hyper::HeaderMap,
    /// The body, cut at [`MAX_ANSWER`] bytes.
    pub body: Bytes,
    /// The trailers, if any came.
    pub trailers: hyper::HeaderMap,
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
    exchange(
        client,
        (method, url, headers, body),
        MAX_ANSWER,
        Over::Cut,
        timeout,
    )
    .await
}

/// Sends a `method` request without a body to `url` with `headers`, and
/// reads the answer, whatever its status, within `timeout`; fails if its
/// body is longer than `max` bytes (it is not read past that).
pub async fn fetch(
    client: &HttpClient,
    method: Method,
    url: &str,
    headers: &[(String, String)],
    max: usize,
    timeout: Duration,
) -> Result<Answer> {
    let request = (method, url, headers, Vec::new());
    exchange(client, request, max, Over::Refuse, timeout).await
}

/// What to do with a body longer than its bound.
#[derive(PartialEq)]
enum Over {
    /// Keep what fits.
    Cut,
    /// Fail.
    Refuse,
}

async fn exchange(
    client: &HttpClient,
    (method, url, headers, body): (Method, &str, &[(String, String)], Vec<u8>),
    max: usize,
    over: Over,
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
        let (mut kept, mut trailers) = (Vec::new(), hyper::HeaderMap::new());
        loop {
            let Some(frame) = body.frame().await else {
                break;
            };
            match frame?.into_data() {
                Ok(data) if kept.len() + data.len() > max && over == Over::Refuse => {
                    bail!("the answer is longer than {max} bytes")
                }
                Ok(data) => {
                    let room = max - kept.len();
                    kept.extend_from_slice(&data[..data.len().min(room)]);
                    if kept.len() == max && over == Over::Cut {
                        break;
                    }
                }
                Err(frame) => trailers.extend(frame.into_trailers().unwrap_or_default()),
            }
        }
        anyhow::Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: Bytes::from(kept),
            trailers,
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

/// Calls the unary gRPC method at `url` (`http(s)://HOST:PORT/SERVICE/METHOD`)
/// with `message` (protobuf) and `headers`, on an HTTP/2 client; fails
/// unless the call ends with status 0 (OK) within `timeout`.
pub async fn grpc_call(
    client: &HttpClient,
    url: &str,
    headers: &[(String, String)],
    message: &[u8],
    timeout: Duration,
) -> Result<()> {
    // A length-prefixed message: not compressed, then its length.
    let mut body = Vec::with_capacity(message.len() + 5);
    body.push(0);
    body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    body.extend_from_slice(message);
    let mut headers = headers.to_vec();
    headers.push(("content-type".into(), "application/grpc".into()));
    headers.push(("te".into(), "trailers".into()));
    let answer = send(client, Method::POST, url, &headers, body, timeout).await?;
    if !answer.status.is_success() {
        bail!("HTTP {}", answer.status);
    }
    // In the trailers, or in the headers of an answer without a body.
    let field = |name: &str| {
        let value = answer.trailers.get(name).or(answer.headers.get(name))?;
        Some(String::from_utf8_lossy(value.as_bytes()).into_owned())
    };
    match field("grpc-status").as_deref() {
        Some("0") => Ok(()),
        Some(code) => bail!(
            "gRPC status {code}: {}",
            field("grpc-message").unwrap_or_default()
        ),
        None => bail!("the answer carries no gRPC status"),
    }
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
