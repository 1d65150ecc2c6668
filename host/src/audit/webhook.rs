//! The webhook sink: records are POSTed in batches (a JSON array, or an
//! OTLP logs export for an OpenTelemetry collector) to an HTTP(S) endpoint, signed with HMAC-SHA256 (`X-Portcullis-Signature:
//! sha256=HEX` over the body), from a delivery thread of their own. Writing
//! a record only appends it to the sink's [`Spool`]; the thread sends what
//! the spool holds, in order, in batches of up to `batch_records` (waiting up
//! to `batch_ms` for a batch to fill), and retries a batch that fails with
//! exponential backoff and jitter until it is delivered — so a receiver that
//! goes away gets every record, in order, when it comes back, and a slow one
//! never holds up a message. Each record carries its unique `id` for the
//! receiver to de-duplicate a batch delivered twice (sent, then the answer
//! lost). One delivery thread per endpoint per process, whatever reloads do.

use super::Sink;
use super::spool::Spool;
use crate::config::BatchFormat;
use crate::outbound::{self, HttpClient};
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The wait before the first retry; it doubles after each.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long one attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a webhook sink delivers.
#[derive(Debug, Clone)]
pub struct WebhookOptions {
    /// Where batches are POSTed.
    pub url: String,
    /// How a batch is encoded.
    pub format: BatchFormat,
    /// The HMAC-SHA256 key signing each body, if any.
    pub secret: Option<String>,
    /// Extra request headers (e.g. an Authorization).
    pub headers: BTreeMap<String, String>,
    /// Records per batch, at most.
    pub batch_records: usize,
    /// How long a batch waits to fill.
    pub batch_wait: Duration,
    /// The spool's directory (a slot per process is made under it).
    pub spool_dir: PathBuf,
    /// The spool's bound, in bytes.
    pub spool_max_bytes: u64,
    /// Drop records when the spool is full (counted) instead of refusing
    /// the messages they describe.
    pub drop_when_full: bool,
}

/// A webhook endpoint's sink.
pub struct WebhookSink {
    delivery: Arc<Delivery>,
}

/// The spool and delivery thread of one endpoint in this process.
struct Delivery {
    url: String,
    spool: Spool,
    drop_when_full: bool,
    dropped: AtomicU64,
}

/// The deliveries running in this process, by endpoint.
fn running() -> &'static Mutex<HashMap<String, Weak<Delivery>>> {
    static RUNNING: OnceLock<Mutex<HashMap<String, Weak<Delivery>>>> = OnceLock::new();
    RUNNING.get_or_init(Default::default)
}

impl WebhookSink {
    /// The sink for `options.url`: the running delivery if this process has
    /// one (a reload keeps it), else a new one on a free spool slot.
    pub fn open(options: WebhookOptions) -> Result<Self> {
        let mut deliveries = running().lock().expect("webhook registry poisoned");
        if let Some(delivery) = deliveries.get(&options.url).and_then(Weak::upgrade) {
            return Ok(Self { delivery });
        }
        let root = options.spool_dir.join(crate::engine::hex(
            &<sha2::Sha256 as sha2::Digest>::digest(options.url.as_bytes())[..8],
        ));
        let spool = Spool::open(&root, options.spool_max_bytes)?;
        let delivery = Arc::new(Delivery {
            url: options.url.clone(),
            spool,
            drop_when_full: options.drop_when_full,
            dropped: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&delivery);
        deliveries.insert(options.url.clone(), Arc::downgrade(&delivery));
        std::thread::Builder::new()
            .name("audit-webhook".into())
            .spawn(move || deliver(&weak, &options))
            .context("cannot start the webhook delivery thread")?;
        Ok(Self { delivery })
    }
}

impl Sink for WebhookSink {
    fn write(&self, line: &str) -> Result<()> {
        let delivery = &self.delivery;
        if delivery.spool.push(line)? {
            return Ok(());
        }
        if delivery.drop_when_full {
            let dropped = delivery.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(url = %delivery.url, dropped, "webhook spool full: record dropped");
            crate::metrics::global().audit_dropped(&delivery.url);
            return Ok(());
        }
        bail!(
            "the spool is full ({} bytes waiting)",
            delivery.spool.backlog()
        )
    }

    fn describe(&self) -> String {
        format!("webhook {}", self.delivery.url)
    }
}

/// Waits, up to `within`, until every delivering sink of this process has
/// delivered its spool (Portcullis is stopping); what is left waits in the
/// spool for the next process to take over the slot.
pub fn flush(within: Duration) {
    let deliveries: Vec<Arc<Delivery>> = running()
        .lock()
        .expect("webhook registry poisoned")
        .values()
        .filter_map(Weak::upgrade)
        .collect();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && deliveries.iter().any(|d| d.spool.backlog() > 0) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for delivery in deliveries.iter().filter(|d| d.spool.backlog() > 0) {
        tracing::warn!(url = %delivery.url, bytes = delivery.spool.backlog(),
            "undelivered audit records stay in the spool for the next start");
    }
}

/// The delivery thread: sends what the spool holds until the sink is gone.
fn deliver(delivery: &Weak<Delivery>, options: &WebhookOptions) {
    let (runtime, client) = match outbound::sender() {
        Ok(sender) => sender,
        Err(e) => return tracing::error!("webhook sink cannot start: {e:#}"),
    };
    let mut failures = 0;
    let mut waiting_since: Option<Instant> = None;
    loop {
        let Some(delivery) = delivery.upgrade() else {
            return;
        };
        let (batch, end) = match delivery.spool.peek(options.batch_records) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(url = %options.url, "cannot read the spool: {e:#}");
                (Vec::new(), 0)
            }
        };
        // A batch that is not full waits a little for more.
        let full = batch.len() >= options.batch_records;
        let started = *waiting_since.get_or_insert_with(Instant::now);
        if batch.is_empty() || (!full && started.elapsed() < options.batch_wait) {
            drop(delivery);
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        waiting_since = None;
        let body = match options.format {
            BatchFormat::Json => format!("[{}]", batch.join(",")).into_bytes(),
            BatchFormat::Otlp => super::otlp::export(&batch),
        };
        match runtime.block_on(post(&client, options, body)) {
            Ok(()) => {
                failures = 0;
                crate::metrics::global().audit_delivered(&options.url, batch.len() as u64);
                if let Err(e) = delivery.spool.commit(end) {
                    tracing::error!(url = %options.url, "cannot move the spool's cursor: {e:#}");
                }
            }
            Err(e) => {
                crate::metrics::global().audit_delivery_failed(&options.url);
                failures += 1;
                let wait = outbound::backoff(failures, FIRST_RETRY, MAX_BACKOFF);
                tracing::warn!(url = %options.url, retry_in = ?wait, "webhook delivery failed: {e:#}");
                drop(delivery);
                std::thread::sleep(wait);
            }
        }
    }
}

/// POSTs one batch, signed when there is a secret.
async fn post(client: &HttpClient, options: &WebhookOptions, body: Vec<u8>) -> Result<()> {
    let kind = match options.format {
        BatchFormat::Json => "application/json",
        BatchFormat::Otlp => "application/x-protobuf",
    };
    let mut headers: Vec<(String, String)> = options.headers.clone().into_iter().collect();
    if let Some(secret) = &options.secret {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let signature = crate::engine::hex(ring::hmac::sign(&key, &body).as_ref());
        headers.push((
            "x-portcullis-signature".into(),
            format!("sha256={signature}"),
        ));
    }
    outbound::post(client, &options.url, kind, &headers, body, ATTEMPT_TIMEOUT).await
}
