//! The webhook transport of a delivering sink: each batch is POSTed (a JSON
//! array, or an OTLP logs or traces export for an OpenTelemetry collector)
//! to an HTTP(S) endpoint, signed with HMAC-SHA256 (`X-Portcullis-Signature:
//! sha256=HEX` over the body) — or, for OTLP/gRPC, sent as the collector's
//! `Export` call over HTTP/2. Queueing, batching and retrying are the
//! delivering sink's (see [`super::delivery`]).

use super::delivery::Transport;
use crate::config::{BatchFormat, Protocol};
use crate::util::outbound::{self, HttpClient};
use anyhow::Result;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how a webhook sink POSTs.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Where batches are POSTed.
    pub url: String,
    /// How a batch is encoded.
    pub format: BatchFormat,
    /// How it is sent.
    pub protocol: Protocol,
    /// The HMAC-SHA256 key signing each body, if any.
    pub secret: Option<String>,
    /// Extra request headers (e.g. an Authorization).
    pub headers: BTreeMap<String, String>,
}

/// POSTs batches to one endpoint.
pub struct Webhook {
    options: WebhookOptions,
    /// Made on the delivery thread, at its first batch.
    sender: Option<(tokio::runtime::Runtime, HttpClient)>,
}

impl Webhook {
    /// A transport POSTing as `options` say.
    pub fn new(options: WebhookOptions) -> Self {
        Self {
            options,
            sender: None,
        }
    }
}

impl Transport for Webhook {
    fn send(&mut self, batch: &[String]) -> Result<()> {
        let options = &self.options;
        let (runtime, client) = match &mut self.sender {
            Some(sender) => sender,
            none => none.insert(match options.protocol {
                Protocol::Http => outbound::sender()?,
                Protocol::Grpc => (outbound::runtime()?, outbound::grpc_client()?),
            }),
        };
        let (body, kind, service) = match options.format {
            BatchFormat::Json => (
                format!("[{}]", batch.join(",")).into_bytes(),
                "application/json",
                "",
            ),
            BatchFormat::Otlp => (
                super::otlp::logs::export(batch),
                "application/x-protobuf",
                "opentelemetry.proto.collector.logs.v1.LogsService",
            ),
            BatchFormat::OtlpTraces => (
                super::otlp::traces::export(batch),
                "application/x-protobuf",
                "opentelemetry.proto.collector.trace.v1.TraceService",
            ),
        };
        let mut headers: Vec<(String, String)> = options.headers.clone().into_iter().collect();
        if let Some(secret) = &options.secret {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            let signature = crate::util::encode::hex(ring::hmac::sign(&key, &body).as_ref());
            headers.push((
                "x-portcullis-signature".into(),
                format!("sha256={signature}"),
            ));
        }
        let url = &options.url;
        match options.protocol {
            Protocol::Http => runtime.block_on(outbound::post(
                client,
                url,
                kind,
                &headers,
                body,
                ATTEMPT_TIMEOUT,
            )),
            Protocol::Grpc => {
                let method = format!("{}/{service}/Export", url.trim_end_matches('/'));
                runtime.block_on(outbound::grpc_call(
                    client,
                    &method,
                    &headers,
                    &body,
                    ATTEMPT_TIMEOUT,
                ))
            }
        }
    }
}
