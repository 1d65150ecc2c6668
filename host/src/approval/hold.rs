//! This process' side of approvals: the store it holds calls in (opened on
//! the first hold, so a deployment that never holds a call never creates
//! one), the rule a held call falls under, telling people it waits, who
//! this process is as a holder, waiting for decisions ([`Awaiting`]), and
//! cancelling the approvals of calls a previous process held when it ended.

use crate::approval::notify::Notifier;
use crate::approval::store::{Approval, Approvals, Call, Terms};
use crate::approval::waiting::{Awaiting, Then};
use crate::config::{AdminConfig, ApprovalRule, ApprovalsConfig, Config, StoreLocation};
use anyhow::{Result, anyhow};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use wildmatch::WildMatch;

/// Where this process holds calls.
pub struct Holding {
    location: StoreLocation,
    holder: String,
    store: OnceLock<Result<Arc<Approvals>, String>>,
    awaiting: OnceLock<Result<Arc<Awaiting>, String>>,
    notifier: OnceLock<Notifier>,
}

/// What the approval rule a call falls under says.
#[derive(Debug, PartialEq)]
pub struct Applied {
    /// Who may decide, and what it takes.
    pub terms: Terms,
    /// How long the call may wait.
    pub expires_in: Duration,
    /// Whether the client's own user is asked too.
    pub elicit: bool,
}

/// What the first rule of `config` matching `call` says; a call no rule
/// matches may be decided by any approver, once, within the default expiry.
pub fn rule_for(config: &ApprovalsConfig, call: &Call) -> Applied {
    let default_expiry = Duration::from_secs(config.expiry_secs);
    let Some(rule) = config.rules.iter().find(|rule| matches(rule, call)) else {
        return Applied {
            terms: Terms::default(),
            expires_in: default_expiry,
            elicit: false,
        };
    };
    Applied {
        terms: Terms {
            approvers: (!rule.approvers.is_empty()).then(|| rule.approvers.clone()),
            required: rule.required,
            reuse_ms: rule.reuse_secs.saturating_mul(1000),
        },
        expires_in: rule.expiry_secs.map_or(default_expiry, Duration::from_secs),
        elicit: rule.elicit,
    }
}

fn matches(rule: &ApprovalRule, call: &Call) -> bool {
    let any = |globs: &[String], name: &str| globs.iter().any(|g| WildMatch::new(g).matches(name));
    let tool = call.tool.as_deref().unwrap_or(&call.method);
    any(&rule.servers, &call.server)
        && any(&rule.tools, tool)
        && any(&rule.policies, &call.policy)
        && (rule.tags.is_empty() || rule.tags.iter().any(|t| call.tags.contains(t)))
}

impl Holding {
    /// Holding as `config` says, for this process.
    pub fn new(config: &Config) -> Self {
        Self {
            location: config.approvals_store(),
            holder: this_process(),
            store: OnceLock::new(),
            awaiting: OnceLock::new(),
            notifier: OnceLock::new(),
        }
    }

    /// Tells the webhooks `config` names that `approval` waits (the notice
    /// thread starts with the first).
    pub fn announce(&self, config: &Config, approval: &Approval) {
        let urls = &config.approvals.notify;
        if urls.is_empty() {
            return;
        }
        let page = config.admin.as_ref().map(AdminConfig::url);
        self.notifier
            .get_or_init(Notifier::start)
            .tell(urls, approval, page.as_deref());
    }

    /// The store, opened on first use; the error says why it cannot be.
    pub fn store(&self) -> Result<Arc<Approvals>> {
        self.store
            .get_or_init(|| {
                Approvals::open(&self.location)
                    .map(Arc::new)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone()
            .map_err(|e| anyhow!(e))
    }

    /// This process, as the holder of its calls.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Calls `then` once approval `id` (expiring at `expires_ms`) has
    /// ended; no thread waits meanwhile. When nothing can watch the store,
    /// `then` is given back with the reason.
    pub fn on_end(
        &self,
        id: &str,
        expires_ms: u64,
        then: Then,
    ) -> Result<(), (anyhow::Error, Then)> {
        let awaiting = self
            .awaiting
            .get_or_init(|| {
                self.store()
                    .and_then(Awaiting::start)
                    .map_err(|e| format!("{e:#}"))
            })
            .clone();
        match awaiting {
            Ok(awaiting) => {
                awaiting.on_end(id, expires_ms, then);
                Ok(())
            }
            Err(e) => Err((anyhow!(e), then)),
        }
    }

    /// Cancels the pending approvals of calls held by processes that have
    /// ended (their calls can no longer run); nothing when there is no store
    /// yet.
    pub fn cancel_orphans(&self) -> Result<Vec<Approval>> {
        if !crate::approval::store::exists(&self.location) {
            return Ok(Vec::new());
        }
        self.store()?.cancel_orphans(alive)
    }
}

/// This process as a holder: its machine's host name, its pid and its start
/// time (clock ticks since boot), which together name it even after the pid
/// is reused, and tell it from a replica's on another machine.
fn this_process() -> String {
    let pid = std::process::id();
    format!(
        "{}:{pid}:{}",
        host_name(),
        start_time(pid).unwrap_or_default()
    )
}

/// Whether the process a holder names may still be running: one on this
/// machine is looked up; one on another machine (a replica sharing a
/// PostgreSQL store) cannot be, so it counts as running, and its calls'
/// approvals end by expiring.
pub fn alive(holder: &str) -> bool {
    let (host, process) = match holder.split(':').count() {
        3 => holder.split_once(':').expect("three parts"),
        // Written before holders named their machine: one on this one.
        2 => ("", holder),
        _ => return false,
    };
    if !host.is_empty() && host != host_name() {
        return true;
    }
    let Some((pid, started)) = process.split_once(':') else {
        return false;
    };
    pid.parse()
        .ok()
        .and_then(start_time)
        .is_some_and(|now| now == started)
}

/// This machine's host name (a pod's name on Kubernetes).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().replace(':', "_"))
        .unwrap_or_default()
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
    fn this_process_is_alive_and_a_stale_holder_here_is_not() {
        let me = this_process();
        assert!(alive(&me), "{me}");
        let (host, process) = me.split_once(':').unwrap();
        let (pid, started) = process.split_once(':').unwrap();
        assert!(
            !alive(&format!("{host}:{pid}:1")),
            "same pid, another start"
        );
        assert!(!alive(&format!("{host}:4194305:1")), "no such pid");
        assert!(alive(&format!("{pid}:{started}")), "written before hosts");
        assert!(!alive(&format!("{pid}:1")));
        assert!(
            alive("another-machine:4194305:1"),
            "another machine's replica cannot be looked up"
        );
        assert!(!alive("garbage"));
    }
}
