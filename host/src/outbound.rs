//! The HTTP(S) client Portcullis reaches out with: remote MCP servers and
//! JWKS URLs. TLS is rustls, trusting the platform's root certificates;
//! `SSL_CERT_FILE` / `SSL_CERT_DIR` replace them, as they do for OpenSSL.

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

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
