//! `portcullis bench --audit`: what auditing costs a message — the time
//! `Audit::write` takes per record to a JSON Lines file, plain and chained,
//! with fsync per record (alone, and 16 writers sharing fsyncs by group
//! commit), and to a webhook sink (its spool) whose receiver is down, against
//! serializing the record alone in the same run — and the records per
//! second each sustains.

use crate::audit::{
    Audit, AuditRecord, DeliveringSink, DeliveryOptions, FileOptions, FileSink, Webhook,
    WebhookOptions,
};
use crate::config::{BatchFormat, Protocol};
use crate::contract::Agent;
use crate::util::stats::{Stats, micros};
use anyhow::Result;
use std::time::{Duration, Instant};

/// Measures `records` writes per variant, after a tenth as many warm-up
/// writes, into a temporary directory.
pub fn run(records: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-audit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let record = sample();
    println!(
        "audit: {records} records of {} bytes each",
        serde_json::to_string(&record)?.len() + 1
    );
    let baseline = measure(records, || {
        serde_json::to_string(&record).map(drop).map_err(Into::into)
    })?;
    println!("{}", baseline.0.line("serialize only"));
    let variants = [
        ("file", FileOptions::default()),
        (
            "file, chained",
            FileOptions {
                chain: true,
                ..FileOptions::default()
            },
        ),
        (
            "chained + rotating",
            FileOptions {
                chain: true,
                rotate_bytes: 64 << 20,
                ..FileOptions::default()
            },
        ),
        (
            "file, fsync",
            FileOptions {
                fsync: true,
                ..FileOptions::default()
            },
        ),
    ];
    for (n, (label, options)) in variants.into_iter().enumerate() {
        let path = dir.join(format!("audit-{n}.jsonl"));
        let audit = Audit::with_sinks(vec![Box::new(FileSink::open_with(&path, options.clone())?)]);
        // A disk flush per record is a thousand times slower: fewer of them.
        let count = if options.fsync {
            records / 200
        } else {
            records
        };
        let (stats, per_second) = measure(count.max(10), || audit.write(&record))?;
        println!(
            "{}  {:>9.0} records/s  (+{} p50 over serializing)",
            stats.line(label),
            per_second,
            micros(stats.p50.saturating_sub(baseline.0.p50))
        );
    }
    // Writers at once (a serve process' sessions): group commit lets one
    // fsync cover the records of all that wrote while the last one ran.
    let path = dir.join("audit-concurrent.jsonl");
    let options = FileOptions {
        fsync: true,
        ..FileOptions::default()
    };
    let audit = Audit::with_sinks(vec![Box::new(FileSink::open_with(&path, options)?)]);
    let per_writer = (records / 200 / WRITERS).max(10);
    let (stats, per_second) = measure_concurrent(per_writer, || audit.write(&record))?;
    println!(
        "{}  {:>9.0} records/s  (+{} p50 over serializing)",
        stats.line(&format!("fsync, {WRITERS} writers")),
        per_second,
        micros(stats.p50.saturating_sub(baseline.0.p50))
    );
    // A webhook whose receiver is down: every record stays spooled, which
    // is what the message path pays whatever the receiver does.
    let webhook = Webhook::new(WebhookOptions {
        url: "http://127.0.0.1:9/unreachable".into(),
        format: BatchFormat::Json,
        protocol: Protocol::Http,
        secret: Some("bench".into()),
        headers: Default::default(),
    });
    let options = DeliveryOptions {
        kind: "webhook",
        name: "http://127.0.0.1:9/unreachable".into(),
        batch_records: 500,
        batch_wait: Duration::from_secs(1),
        spool_dir: dir.join("spool"),
        spool_max_bytes: u64::MAX,
        drop_when_full: false,
    };
    let sink = DeliveringSink::open(options, Box::new(webhook))?;
    let audit = Audit::with_sinks(vec![Box::new(sink)]);
    let (stats, per_second) = measure(records, || audit.write(&record))?;
    println!(
        "{}  {:>9.0} records/s  (+{} p50 over serializing)",
        stats.line("webhook, receiver down"),
        per_second,
        micros(stats.p50.saturating_sub(baseline.0.p50))
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// Per-call percentiles of `write`, and calls per second over the run.
fn measure(records: usize, mut write: impl FnMut() -> Result<()>) -> Result<(Stats, f64)> {
    for _ in 0..records / 10 {
        write()?;
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(records);
    let started = Instant::now();
    for _ in 0..records {
        let at = Instant::now();
        write()?;
        samples.push(at.elapsed());
    }
    let per_second = records as f64 / started.elapsed().as_secs_f64();
    Ok((Stats::of(&mut samples), per_second))
}

/// Writers at once in the concurrent measurement.
const WRITERS: usize = 16;

/// Per-call percentiles of `write` called `per_writer` times by each of
/// [`WRITERS`] threads at once, and calls per second over the run.
fn measure_concurrent(
    per_writer: usize,
    write: impl Fn() -> Result<()> + Sync,
) -> Result<(Stats, f64)> {
    let started = Instant::now();
    let samples: Vec<Result<Vec<Duration>>> = std::thread::scope(|scope| {
        let writers: Vec<_> = (0..WRITERS)
            .map(|_| {
                scope.spawn(|| {
                    (0..per_writer)
                        .map(|_| {
                            let at = Instant::now();
                            write().map(|()| at.elapsed())
                        })
                        .collect()
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().expect("writer panicked"))
            .collect()
    });
    let per_second = (WRITERS * per_writer) as f64 / started.elapsed().as_secs_f64();
    let mut samples: Vec<Duration> = samples.into_iter().collect::<Result<Vec<_>>>()?.concat();
    Ok((Stats::of(&mut samples), per_second))
}

/// A typical allowed `tools/call` record.
fn sample() -> AuditRecord {
    let agent = Agent {
        id: "claude-desktop".into(),
        attributes: vec![("team".into(), "platform".into())],
    };
    let mut record = AuditRecord::new(&agent, "filesystem", "client-to-server");
    record.kind = "request";
    record.method = Some("tools/call".into());
    record.tool = Some("write_file".into());
    record.arguments_sha256 = Some("9f2c".repeat(16));
    record.arguments = Some(serde_json::json!({
        "path": "/srv/reports/2026-11/summary.md",
        "content": "Quarterly summary: revenue up 4%, churn down 1%; see the attached tables."
    }));
    record.latency_us = 7;
    record
}
