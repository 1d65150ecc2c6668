//! The status report of running Portcullis processes: each process keeps a
//! small JSON file (named after its pid) in the status directory up to date —
//! loaded policies with their digests and load times, the last reload's
//! result, and in `serve` mode its servers' health — and `portcullis status`
//! reads them all. Files of processes that
//! are gone are ignored and removed.

use crate::upstream::Health;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One process' status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// The process.
    pub pid: u32,
    /// Its config file.
    pub config: PathBuf,
    /// The server it fronts.
    pub server: String,
    /// When it started (RFC 3339).
    pub started: String,
    /// How many generations it has loaded (1 = none reloaded).
    pub generation: u64,
    /// The policies serving now, in chain order.
    pub policies: Vec<PolicyStatus>,
    /// The last reload attempt, if any.
    pub last_reload: Option<ReloadStatus>,
    /// In `serve` mode: how each upstream server is doing.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub servers: BTreeMap<String, Health>,
    /// Its name among the deployment's replicas (`[state] replica`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// One serving policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Its name.
    pub name: String,
    /// sha256 of its module.
    pub sha256: String,
    /// When this version was loaded (RFC 3339).
    pub loaded_at: String,
    /// For a registry module: the reference and the manifest digest it
    /// resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The outcome of a reload attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// When (RFC 3339).
    pub time: String,
    /// `file` or `signal`.
    pub trigger: String,
    /// `ok`, `unchanged` or `failed`.
    pub result: String,
    /// Why it failed.
    pub error: Option<String>,
}

/// The status directory: `PORTCULLIS_STATUS_DIR`, else
/// `$XDG_RUNTIME_DIR/portcullis`, else `portcullis-status` in the temp dir.
pub fn dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("PORTCULLIS_STATUS_DIR") {
        return dir.into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(run) => PathBuf::from(run).join("portcullis"),
        None => std::env::temp_dir().join("portcullis-status"),
    }
}

impl Status {
    fn path(dir: &Path, pid: u32) -> PathBuf {
        dir.join(format!("{pid}.json"))
    }

    /// Writes this status atomically to the status directory.
    pub fn publish(&self) -> Result<()> {
        let dir = dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let path = Self::path(&dir, self.pid);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(())
    }

    /// Removes this process' status file.
    pub fn withdraw(pid: u32) {
        let _ = std::fs::remove_file(Self::path(&dir(), pid));
    }
}

/// The statuses of every live Portcullis process, by pid.
pub fn read_all(dir: &Path) -> Vec<Status> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut all: Vec<Status> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let status: Status = serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok()?;
            if Path::new(&format!("/proc/{}", status.pid)).exists() {
                Some(status)
            } else {
                let _ = std::fs::remove_file(e.path());
                None
            }
        })
        .collect();
    all.sort_by_key(|s| s.pid);
    all
}

/// `portcullis status`: prints every live process' status; JSON with `json`.
pub fn print(json: bool) -> Result<()> {
    let all = read_all(&dir());
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!(
            "no running portcullis processes (status directory {})",
            dir().display()
        );
    }
    for s in all {
        println!(
            "pid {}  server {}  config {}",
            s.pid,
            s.server,
            s.config.display()
        );
        println!("  started {}  generation {}", s.started, s.generation);
        if let Some(replica) = &s.replica {
            println!("  replica {replica}");
        }
        for p in &s.policies {
            println!(
                "  policy {:<20} sha256 {}  loaded {}",
                p.name,
                &p.sha256[..16.min(p.sha256.len())],
                p.loaded_at
            );
            if let Some(source) = &p.source {
                println!("         from {source}");
            }
        }
        match &s.last_reload {
            Some(r) => println!(
                "  last reload {} ({}) {}{}",
                r.time,
                r.trigger,
                r.result,
                r.error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
            None => println!("  last reload: none"),
        }
        for (name, health) in &s.servers {
            let pid = health.pid.map(|p| format!("  pid {p}")).unwrap_or_default();
            let error = health
                .last_error
                .as_deref()
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default();
            println!(
                "  server {name:<20} {}  restarts {}{pid}{error}",
                health.state, health.restarts
            );
        }
    }
    Ok(())
}
