//! Delivering sinks: sinks that carry records to another system — a webhook,
//! an OTLP collector, a WebAssembly sink component. Writing a record only
//! appends it to the sink's [`Spool`] on disk (no network on the message
//! path); a delivery thread of the sink's own hands what the spool holds to
//! its [`Transport`], in order, in batches of up to `batch_records` (waiting
//! up to `batch_wait` for a batch to fill), and offers a batch that failed
//! again with exponential backoff and jitter until it is taken — so a
//! receiver that goes away gets every record, in order, when it comes back,
//! and a slow one never holds up a message or another sink. Each record
//! carries its unique `id` for the receiver to de-duplicate a batch delivered
//! twice (sent, then the answer lost). One delivery thread per sink per
//! process, whatever reloads do: a reload hands the running thread the
//! newly configured transport for its next batch.

use super::Sink;
use super::spool::Spool;
use crate::util::outbound;
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// The wait before the first retry; it doubles after each.
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often an idle delivery thread looks at its spool.
const POLL: Duration = Duration::from_millis(20);

/// What carries a batch to its destination.
pub trait Transport: Send {
    /// Delivers `batch` (records' JSON text, oldest first); an error means
    /// none of them is taken as delivered.
    fn send(&mut self, batch: &[String]) -> Result<()>;
}

/// How a delivering sink queues and batches.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// What the sink is (`webhook`, `component`), for logs and errors.
    pub kind: &'static str,
    /// The sink's name, unique per kind: its endpoint or configured name.
    /// Its spool and metrics are known by it.
    pub name: String,
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

/// A delivering sink, as the audit trail writes to it.
pub struct DeliveringSink {
    delivery: Arc<Delivery>,
}

/// The spool, transport and delivery thread of one sink in this process.
struct Delivery {
    options: DeliveryOptions,
    spool: Spool,
    dropped: AtomicU64,
    /// A transport configured since the thread took its own, taken before
    /// the next batch.
    next: Mutex<Option<Box<dyn Transport>>>,
}

/// The deliveries running in this process, by kind and name.
fn running() -> &'static Mutex<HashMap<String, Weak<Delivery>>> {
    static RUNNING: OnceLock<Mutex<HashMap<String, Weak<Delivery>>>> = OnceLock::new();
    RUNNING.get_or_init(Default::default)
}

impl DeliveringSink {
    /// The sink `options` names, delivering through `transport`: the
    /// running delivery if this process has one (it takes `transport` for
    /// its next batch), else a new one on a free spool slot.
    pub fn open(options: DeliveryOptions, transport: Box<dyn Transport>) -> Result<Self> {
        let key = format!("{} {}", options.kind, options.name);
        let mut deliveries = running().lock().expect("delivery registry poisoned");
        if let Some(delivery) = deliveries.get(&key).and_then(Weak::upgrade) {
            *delivery.next.lock().expect("transport slot poisoned") = Some(transport);
            return Ok(Self { delivery });
        }
        let root = options.spool_dir.join(crate::util::encode::hex(
            &<sha2::Sha256 as sha2::Digest>::digest(options.name.as_bytes())[..8],
        ));
        let spool = Spool::open(&root, options.spool_max_bytes)?;
        let delivery = Arc::new(Delivery {
            options,
            spool,
            dropped: AtomicU64::new(0),
            next: Mutex::new(None),
        });
        let weak = Arc::downgrade(&delivery);
        deliveries.insert(key, Arc::downgrade(&delivery));
        std::thread::Builder::new()
            .name(format!("audit-{}", delivery.options.kind))
            .spawn(move || deliver(&weak, transport))
            .context("cannot start the delivery thread")?;
        Ok(Self { delivery })
    }
}

impl Sink for DeliveringSink {
    fn write(&self, line: &str) -> Result<()> {
        let delivery = &self.delivery;
        let name = &delivery.options.name;
        if delivery.spool.push(line)? {
            return Ok(());
        }
        if delivery.options.drop_when_full {
            let dropped = delivery.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::warn!(sink = %name, dropped, "spool full: record dropped");
            crate::util::metrics::global().audit_dropped(name);
            return Ok(());
        }
        bail!(
            "the spool is full ({} bytes waiting)",
            delivery.spool.backlog()
        )
    }

    fn delivers(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!(
            "{} {}",
            self.delivery.options.kind, self.delivery.options.name
        )
    }
}

/// Waits, up to `within`, until every delivering sink of this process has
/// delivered its spool (Portcullis is stopping); what is left waits in the
/// spool for the next process to take over the slot.
pub fn flush(within: Duration) {
    let deliveries: Vec<Arc<Delivery>> = running()
        .lock()
        .expect("delivery registry poisoned")
        .values()
        .filter_map(Weak::upgrade)
        .collect();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline && deliveries.iter().any(|d| d.spool.backlog() > 0) {
        std::thread::sleep(POLL);
    }
    for delivery in deliveries.iter().filter(|d| d.spool.backlog() > 0) {
        tracing::warn!(sink = %delivery.options.name, bytes = delivery.spool.backlog(),
            "undelivered audit records stay in the spool for the next start");
    }
}

/// The delivery thread: sends what the spool holds until the sink is gone.
fn deliver(delivery: &Weak<Delivery>, mut transport: Box<dyn Transport>) {
    let mut failures = 0;
    let mut waiting_since: Option<Instant> = None;
    loop {
        let Some(delivery) = delivery.upgrade() else {
            return;
        };
        let options = &delivery.options;
        let metrics = crate::util::metrics::global();
        metrics.audit_backlog(&options.name, delivery.spool.backlog());
        let (batch, end) = match delivery.spool.peek(options.batch_records) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(sink = %options.name, "cannot read the spool: {e:#}");
                (Vec::new(), 0)
            }
        };
        // A batch that is not full waits a little for more.
        let full = batch.len() >= options.batch_records;
        let started = *waiting_since.get_or_insert_with(Instant::now);
        if batch.is_empty() || (!full && started.elapsed() < options.batch_wait) {
            drop(delivery);
            std::thread::sleep(POLL);
            continue;
        }
        waiting_since = None;
        if let Some(next) = delivery
            .next
            .lock()
            .expect("transport slot poisoned")
            .take()
        {
            transport = next;
        }
        match transport.send(&batch) {
            Ok(()) => {
                failures = 0;
                metrics.audit_delivered(&options.name, batch.len() as u64);
                if let Err(e) = delivery.spool.commit(end) {
                    tracing::error!(sink = %options.name, "cannot move the spool's cursor: {e:#}");
                }
            }
            Err(e) => {
                metrics.audit_delivery_failed(&options.name);
                failures += 1;
                let wait = outbound::backoff(failures, FIRST_RETRY, MAX_BACKOFF);
                tracing::warn!(sink = %options.name, kind = options.kind, retry_in = ?wait,
                    "audit delivery failed: {e:#}");
                drop(delivery);
                std::thread::sleep(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails its first `failing` batches, then keeps what it is sent.
    struct Flaky {
        failing: usize,
        got: Arc<Mutex<Vec<Vec<String>>>>,
    }

    impl Transport for Flaky {
        fn send(&mut self, batch: &[String]) -> Result<()> {
            if self.failing > 0 {
                self.failing -= 1;
                bail!("receiver down");
            }
            self.got.lock().unwrap().push(batch.to_vec());
            Ok(())
        }
    }

    #[test]
    fn a_failing_transport_gets_every_record_again_in_order_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let options = DeliveryOptions {
            kind: "test",
            name: "flaky".into(),
            batch_records: 3,
            batch_wait: Duration::from_millis(50),
            spool_dir: dir.path().to_path_buf(),
            spool_max_bytes: 1 << 20,
            drop_when_full: false,
        };
        let flaky = Flaky {
            failing: 2,
            got: got.clone(),
        };
        let sink = DeliveringSink::open(options, Box::new(flaky)).unwrap();
        for n in 0..7 {
            sink.write(&format!("{{\"n\":{n}}}\n")).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.lock().unwrap().iter().flatten().count() < 7 && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        let batches = got.lock().unwrap().clone();
        assert!(batches.iter().all(|b| b.len() <= 3), "{batches:?}");
        let records: Vec<String> = batches.into_iter().flatten().collect();
        let expected: Vec<String> = (0..7).map(|n| format!("{{\"n\":{n}}}")).collect();
        assert_eq!(records, expected, "each once, in order, after two failures");
        assert_eq!(sink.delivery.spool.backlog(), 0);
    }
}
