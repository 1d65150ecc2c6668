//! `portcullis bench --config FILE --soak CALLS`: a long run through
//! `portcullis serve` — the config's chain and audit sinks in front of the
//! in-process fast server — by concurrent clients that also open and end
//! sessions as they go. It reports this process' resident memory after the
//! warm-up and at the end (it must stay flat), every call that failed (there
//! must be none), the calls per second, and whether the chained trail the
//! run wrote verifies.

use super::gateway::{self, KEY, Session, Started};
use crate::audit::{self, chain};
use crate::config::SinkConfig;
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Calls before the starting memory is read: enough for the process to
/// reach its working size (the allocator's arenas, the blocking threads'
/// pool, the trail's buffers).
const WARM_UP: u64 = 100_000;
/// Calls a client makes in one session before it ends it and opens another.
const CALLS_PER_SESSION: u64 = 10_000;
/// How often (in calls) the memory is sampled and progress printed.
const SAMPLE_EVERY: u64 = 100_000;

/// Runs `calls` calls of `tool` with `arguments` from `clients` clients.
pub fn run(config: &Path, tool: &str, arguments: &Value, calls: u64, clients: usize) -> Result<()> {
    let runtime = crate::http::runtime()?;
    runtime.block_on(soak(config, tool, arguments, calls, clients))
}

async fn soak(
    config: &Path,
    tool: &str,
    arguments: &Value,
    calls: u64,
    clients: usize,
) -> Result<()> {
    let Started {
        gateway_url,
        current,
        gateway,
        ..
    } = gateway::start(config, tool).await?;
    if chained_trails(&current.get().config.audit.sinks).is_empty() {
        bail!(
            "{}: --soak needs a chained file sink to verify",
            config.display()
        );
    }
    let call = json!({ "jsonrpc": "2.0", "id": 1, "method": "tools/call",
                       "params": { "name": tool, "arguments": arguments } })
    .to_string();
    let counts = Arc::new(Counts::default());
    let mut rss_start = None;
    let mut rss_max = 0;
    let started = Instant::now();
    let target = calls + WARM_UP;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (url, call, counts) = (gateway_url.clone(), call.clone(), counts.clone());
            tokio::spawn(async move { client(&url, &call, &counts, target).await })
        })
        .collect();
    let mut next_sample = WARM_UP;
    let mut measured_from = (Instant::now(), 0);
    while counts.done() < target {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let done = counts.done();
        if done >= next_sample {
            let rss = rss_kib()?;
            rss_max = rss_max.max(rss);
            if rss_start.is_none() {
                rss_start = Some(rss);
                measured_from = (Instant::now(), done);
            }
            println!(
                "  {done:>9} calls  {:>6.1} s  RSS {} MiB  errors {}",
                started.elapsed().as_secs_f64(),
                rss / 1024,
                counts.errors.load(Ordering::Relaxed)
            );
            next_sample += SAMPLE_EVERY;
        }
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    for task in tasks {
        task.await??;
    }
    let (from, done_then) = measured_from;
    let measured = counts.done() - done_then;
    let rate = measured as f64 / from.elapsed().as_secs_f64();
    let rss_end = rss_kib()?;
    let rss_trimmed = trimmed_rss_kib()?;
    let rss_start = rss_start.context("the run ended before the warm-up")?;
    let errors = counts.errors.load(Ordering::Relaxed);
    println!(
        "soak: {} calls after {WARM_UP} warm-up, {clients} clients, new session every {CALLS_PER_SESSION} calls",
        counts.done() - WARM_UP
    );
    println!("  calls/s {rate:.0}   errors {errors}");
    println!(
        "  RSS after warm-up {} MiB, at the end {} MiB ({:+.1}%), highest {} MiB",
        rss_start / 1024,
        rss_end / 1024,
        (rss_end as f64 / rss_start as f64 - 1.0) * 100.0,
        rss_max / 1024
    );
    println!(
        "  at the end, once the allocator returned what it holds free: {} MiB",
        rss_trimmed / 1024
    );
    let (opened, standing) = gateway.session_count();
    println!("  sessions kept at the end: {opened} opened, {standing} standing");
    audit::flush(std::time::Duration::from_secs(10));
    let started = Instant::now();
    // Listed now: the trail rotated while the run wrote it.
    for files in &chained_trails(&current.get().config.audit.sinks) {
        let verified = chain::verify(files, None)?;
        if let Some(broken) = verified.breaks.first() {
            bail!("the trail does not verify: {broken}");
        }
        println!(
            "  trail verifies: {} records in {} file(s), unbroken ({:.1} s to check)",
            verified.records,
            verified.files.len(),
            started.elapsed().as_secs_f64()
        );
    }
    if errors > 0 {
        bail!("{errors} calls failed");
    }
    Ok(())
}

/// Calls made and failed, across clients.
#[derive(Default)]
struct Counts {
    made: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn done(&self) -> u64 {
        self.made.load(Ordering::Relaxed)
    }
}

/// One client: calls until `target` calls are made in all, opening a new
/// session (and ending the last) every [`CALLS_PER_SESSION`] calls.
async fn client(url: &str, call: &str, counts: &Counts, target: u64) -> Result<()> {
    let mut session = Session::open(url, Some(KEY)).await?;
    let mut in_session = 0;
    while counts.made.fetch_add(1, Ordering::Relaxed) < target {
        if session.time(call).await.is_err() {
            counts.errors.fetch_add(1, Ordering::Relaxed);
        }
        in_session += 1;
        if in_session == CALLS_PER_SESSION {
            if session.end().await.is_err() {
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
            session = Session::open(url, Some(KEY)).await?;
            in_session = 0;
        }
    }
    counts.made.fetch_sub(1, Ordering::Relaxed);
    session.end().await
}

/// The files of each chained file sink, rotated ones included.
fn chained_trails(sinks: &[SinkConfig]) -> Vec<Vec<PathBuf>> {
    sinks
        .iter()
        .filter_map(|sink| match sink {
            SinkConfig::File {
                path, chain: true, ..
            } => {
                let mut files = audit::rotated_files(path);
                files.push(path.clone());
                Some(files)
            }
            _ => None,
        })
        .collect()
}

/// This process' resident memory once the allocator has handed its free
/// memory back to the system: what is still in use, apart from what the
/// allocator keeps for reuse.
fn trimmed_rss_kib() -> Result<u64> {
    // SAFETY: malloc_trim only releases free memory the allocator holds;
    // it takes no pointer and may be called at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    rss_kib()
}

/// This process' resident memory, in KiB.
fn rss_kib() -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/self/status")
}
