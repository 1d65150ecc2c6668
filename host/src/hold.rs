//! This process' side of approvals: the store it holds calls in (opened on
//! the first hold, so a deployment that never holds a call never creates
//! one), how long a call may wait, who this process is as a holder, waiting
//! for a decision, and cancelling the approvals of calls a previous process
//! held when it ended.

use crate::approvals::{Approval, Approvals, POLL, State};
use crate::config::Config;
use anyhow::{Result, anyhow};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Where this process holds calls.
pub struct Holding {
    path: PathBuf,
    expiry: Duration,
    holder: String,
    store: OnceLock<Result<Arc<Approvals>, String>>,
}

impl Holding {
    /// Holding as `config` says, for this process.
    pub fn new(config: &Config) -> Self {
        Self {
            path: config.approvals_store(),
            expiry: Duration::from_secs(config.approvals.expiry_secs),
            holder: this_process(),
            store: OnceLock::new(),
        }
    }

    /// The store, opened on first use; the error says why it cannot be.
    pub fn store(&self) -> Result<Arc<Approvals>> {
        self.store
            .get_or_init(|| {
                Approvals::open(&self.path)
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(|e| anyhow!(e))
    }

    /// How long a held call waits for a decision.
    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    /// This process, as the holder of its calls.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Waits until approval `id` is no longer pending (expiring it when its
    /// time is up) and returns it as it ended.
    pub fn wait(&self, id: &str) -> Result<Approval> {
        let store = self.store()?;
        loop {
            let approval = store
                .get(id)?
                .ok_or_else(|| anyhow!("approval '{id}' vanished from the store"))?;
            if approval.state != State::Pending {
                return Ok(approval);
            }
            if crate::approvals::now_ms() >= approval.expires_ms {
                return store.settle(
                    id,
                    State::Expired,
                    "portcullis",
                    Some("nobody decided in time"),
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Cancels the pending approvals of calls held by processes that have
    /// ended (their calls can no longer run); nothing when there is no store
    /// yet.
    pub fn cancel_orphans(&self) -> Result<Vec<Approval>> {
        if !self.path.exists() {
            return Ok(Vec::new());
        }
        self.store()?.cancel_orphans(alive)
    }
}

/// This process as a holder: its pid and start time (clock ticks since
/// boot), which together name it even after the pid is reused.
fn this_process() -> String {
    let pid = std::process::id();
    format!("{pid}:{}", start_time(pid).unwrap_or_default())
}

/// Whether the process a holder names is still running.
pub fn alive(holder: &str) -> bool {
    let Some((pid, started)) = holder.split_once(':') else {
        return false;
    };
    pid.parse()
        .ok()
        .and_then(start_time)
        .is_some_and(|now| now == started)
}

/// A process' start time from /proc (field 22 of its stat line).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is parenthesised and may hold spaces.
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_stale_holder_is_not() {
        let me = this_process();
        assert!(alive(&me), "{me}");
        let (pid, _) = me.split_once(':').unwrap();
        assert!(!alive(&format!("{pid}:1")), "same pid, another start");
        assert!(!alive("4194305:1"), "no such pid");
        assert!(!alive("garbage"));
    }
}
