//! `portcullis pin`: asks the configured servers what they offer — tools,
//! prompts, resource templates, every page — and writes it to the lock file,
//! or, with `--check`, reports how it drifted from the lock without writing.

use crate::config::Config;
use crate::protocol::parsed::Parsed;
use crate::surface::drift::{self, ToolDrift};
use crate::surface::lock::{Listing, Lock, Pinned};
use crate::upstream::{self, Upstream};
use anyhow::{Context, Result, bail};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Most pages read from one list.
const MAX_PAGES: usize = 1000;

/// Runs `portcullis pin`; returns the exit code (with `check`: 1 on drift).
pub fn run(config_path: &Path, server: Option<&str>, check: bool) -> Result<i32> {
    let config = Config::load(config_path)?;
    let lock_path = config.lock_file();
    let timeout = Duration::from_secs(config.serve.request_timeout_secs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let upstreams = upstream::start_all(&config, server, runtime.handle())?;
    let surveyed = runtime.block_on(survey_all(&upstreams, timeout));
    for upstream in upstreams.values() {
        upstream.stop();
    }
    let surveyed = surveyed?;
    let existing = match lock_path.exists() {
        true => Some(Lock::load(&lock_path)?),
        false => None,
    };
    if check {
        let Some(lock) = existing else {
            bail!(
                "no lock file at {}; write one with `portcullis pin --config {}`",
                lock_path.display(),
                config_path.display()
            );
        };
        return Ok(report_drift(&lock, &surveyed));
    }
    let mut lock = match (existing, server) {
        (Some(lock), Some(_)) => lock,
        _ => Lock::new(),
    };
    for (name, pinned) in surveyed {
        println!(
            "{name}: {} tools, {} prompts, {} resource templates",
            pinned.tools.len(),
            pinned.prompts.len(),
            pinned.resource_templates.len()
        );
        lock.servers.insert(name, pinned);
    }
    lock.save(&lock_path)?;
    println!("wrote {}", lock_path.display());
    if config.pinning.is_none() {
        println!("add a [pinning] section to the config to enforce it");
    }
    Ok(0)
}

/// What each server offers now.
async fn survey_all(
    upstreams: &BTreeMap<String, Arc<Upstream>>,
    timeout: Duration,
) -> Result<BTreeMap<String, Pinned>> {
    let mut surveyed = BTreeMap::new();
    for (name, upstream) in upstreams {
        let pinned = survey(upstream, timeout)
            .await
            .with_context(|| format!("server '{name}'"))?;
        surveyed.insert(name.clone(), pinned);
    }
    Ok(surveyed)
}

/// Every list the server offers, every page of it.
async fn survey(upstream: &Upstream, timeout: Duration) -> Result<Pinned> {
    let init = upstream.initialized(timeout).await?;
    let mut pinned = Pinned::default();
    let mut id = 0;
    for listing in Listing::ALL {
        if init["capabilities"].get(listing.capability()).is_none() {
            continue;
        }
        let mut cursor: Option<String> = None;
        for _ in 0..MAX_PAGES {
            id += 1;
            let params = match &cursor {
                Some(cursor) => serde_json::json!({ "cursor": cursor }),
                None => serde_json::json!({}),
            };
            let request = serde_json::json!({
                "jsonrpc": "2.0", "id": id, "method": listing.method(), "params": params
            });
            let request = Parsed::parse(request.to_string())?;
            let answer = upstream.request(&request, timeout, None).await??;
            let mut answer: Value = serde_json::from_str(answer.text())
                .with_context(|| format!("{} answer is not JSON", listing.method()))?;
            let result = answer["result"].take();
            let Some(items) = result[listing.member()].as_array() else {
                // A server that offers resources need not offer templates.
                if listing == Listing::ResourceTemplates {
                    break;
                }
                bail!("{} failed: {}", listing.method(), answer["error"]);
            };
            pinned.items_mut(listing).extend(listing.definitions(items));
            cursor = result["nextCursor"].as_str().map(str::to_string);
            if cursor.is_none() {
                break;
            }
        }
    }
    Ok(pinned)
}

/// Prints how each server drifted from `lock`; returns 1 if any did.
fn report_drift(lock: &Lock, surveyed: &BTreeMap<String, Pinned>) -> i32 {
    let mut drifted = 0;
    for (name, now) in surveyed {
        let Some(pinned) = lock.servers.get(name) else {
            println!("{name}: not pinned");
            drifted += 1;
            continue;
        };
        let found = server_drift(name, pinned, now);
        if found.is_empty() {
            println!("{name}: matches the lock");
            continue;
        }
        drifted += 1;
        println!("{name}: drifted");
        for (listing, d) in found {
            let kinds: Vec<&str> = d.kinds.iter().map(|k| k.as_str()).collect();
            println!("  {} {} [{}]", listing.member(), d.tool, kinds.join(", "));
            for line in &d.diff {
                println!("      {line}");
            }
        }
    }
    i32::from(drifted > 0)
}

/// Every item of every list that differs from the lock.
fn server_drift(server: &str, pinned: &Pinned, now: &Pinned) -> Vec<(Listing, ToolDrift)> {
    Listing::ALL
        .iter()
        .flat_map(|listing| {
            drift::compare(server, pinned.items(*listing), now.items(*listing), true)
                .into_iter()
                .map(|d| (*listing, d))
        })
        .collect()
}
