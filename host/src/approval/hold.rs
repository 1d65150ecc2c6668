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
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use wildmatch::WildMatch;

/// Where this process holds calls.
pub struct Holding {
    location: StoreLocation,
    holder: String,
    /// The store and its watcher, once opened; a failure to open them is
    /// remembered for [`RETRY`], then tried again.
    opened: Mutex<Opening>,
    notifier: OnceLock<Notifier>,
}

/// The store and its watcher, as far as they were opened.
#[derive(Default)]
struct Opening {
    store: Option<Arc<Approvals>>,
    awaiting: Option<Arc<Awaiting>>,
    failed: Option<(Instant, String)>,
}

/// How long a store that could not be opened is not tried again (calls
/// that need it meanwhile are refused at once).
const RETRY: Duration = Duration::from_secs(1);

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
            opened: Mutex::default(),
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

    /// The store, opened on first use; the error says why it cannot be (a
    /// database that was down is tried again, at most every [`RETRY`]).
    pub fn store(&self) -> Result<Arc<Approvals>> {
        self.with_opened(|opened| {
            if let Some(store) = &opened.store {
                return Ok(store.clone());
            }
            if let Some((at, why)) = &opened.failed
                && at.elapsed() < RETRY
            {
                return Err(anyhow!(why.clone()));
            }
            match Approvals::open(&self.location) {
                Ok(store) => {
                    let store = Arc::new(store);
                    opened.store = Some(store.clone());
                    opened.failed = None;
                    Ok(store)
                }
                Err(e) => {
                    opened.failed = Some((Instant::now(), format!("{e:#}")));
                    Err(e)
                }
            }
        })
    }

    fn with_opened<T>(&self, work: impl FnOnce(&mut Opening) -> T) -> T {
        let mut opened = self
            .opened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        work(&mut opened)
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
        let awaiting = self.store().and_then(|store| {
            self.with_opened(|opened| match &opened.awaiting {
                Some(awaiting) => Ok(awaiting.clone()),
                None => {
                    let awaiting = Awaiting::start(store)?;
                    opened.awaiting = Some(awaiting.clone());
                    Ok(awaiting)
                }
            })
        });
        match awaiting {
            Ok(awaiting) => {
                awaiting.on_end(id, expires_ms, then);
                Ok(())
            }
            Err(e) => Err((e, then)),
        }
    }

    /// Cancels the pending approvals of calls held by processes that have
    /// ended (their calls can no longer run); nothing when there is no store
    /// yet.
    pub fn cancel_orphans(&self) -> Result<Vec<Approval>> {
        if !crate::approval::store::exists(&self.location) {
            return Ok(Vec::new());
        }
        let across_machines = matches!(self.location, StoreLocation::Postgres { .. });
        self.store()?
            .cancel_orphans(|holder| alive(holder, across_machines))
    }
}

/// This process as a holder: where its pid means something (see
/// [`pid_space`]), its pid and its start time (clock ticks since boot),
/// which together name it even after the pid is reused, and tell it from a
/// replica's on another machine or in another container.
fn this_process() -> String {
    let pid = std::process::id();
    format!(
        "{}:{pid}:{}",
        pid_space(),
        start_time(pid).unwrap_or_default()
    )
}

/// Whether the process a holder names may still be running: one in this
/// pid space is looked up; one of this host before it booted again is gone,
/// unless the store is shared `across_machines` (PostgreSQL: another
/// machine may bear the same host name); any other (a replica elsewhere, a
/// container of its own) cannot be looked up, so it counts as running, and
/// its calls' approvals end by expiring.
pub fn alive(holder: &str, across_machines: bool) -> bool {
    let (place, process) = match holder.split(':').count() {
        3 => holder.split_once(':').expect("three parts"),
        // Written before holders named their place: one of this machine.
        2 => ("", holder),
        _ => return false,
    };
    let here = pid_space();
    if !place.is_empty() && place != here {
        let host_boot = |place: &str| {
            let mut parts = place.split('~');
            (
                parts.next().map(str::to_string),
                parts.next().map(str::to_string),
            )
        };
        let ((host, boot), (my_host, my_boot)) = (host_boot(place), host_boot(&here));
        let rebooted = host == my_host && boot != my_boot;
        return across_machines || !rebooted;
    }
    let Some((pid, started)) = process.split_once(':') else {
        return false;
    };
    pid.parse()
        .ok()
        .and_then(start_time)
        .is_some_and(|now| now == started)
}

/// Where this process' pid can be looked up: its host name (a pod's name on
/// Kubernetes), the machine's boot and its pid namespace. Containers sharing
/// a host name (host networking, a fixed `hostname`) but not their pids —
/// each replica pid 1 of its own — are told apart.
fn pid_space() -> String {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let host = read("/proc/sys/kernel/hostname");
    let boot = read("/proc/sys/kernel/random/boot_id");
    let namespace = std::fs::read_link("/proc/self/ns/pid")
        .map(|link| link.display().to_string())
        .unwrap_or_default();
    let boot: String = boot.trim().chars().take(8).collect();
    let namespace: String = namespace.chars().filter(char::is_ascii_digit).collect();
    format!("{}~{boot}~{namespace}", host.trim()).replace(':', "_")
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
        assert!(alive(&me, false) && alive(&me, true), "{me}");
        let (place, process) = me.split_once(':').unwrap();
        let (pid, started) = process.split_once(':').unwrap();
        for across in [false, true] {
            assert!(
                !alive(&format!("{place}:{pid}:1"), across),
                "same pid, another start"
            );
            assert!(!alive(&format!("{place}:4194305:1"), across), "no such pid");
            assert!(
                alive(&format!("{pid}:{started}"), across),
                "written before places"
            );
            assert!(!alive(&format!("{pid}:1"), across));
            assert!(!alive("garbage", across));
            assert!(
                alive("another-machine~12345678~4026531836:4194305:1", across),
                "another machine's replica cannot be looked up"
            );
        }
        let mut parts = place.split('~');
        let (host, _, namespace) = (parts.next().unwrap(), parts.next(), parts.next().unwrap());
        let other_container = format!("{place}0:1:1");
        assert!(
            alive(&other_container, false),
            "a container with the same host name but its own pids is another place"
        );
        let before_boot = format!("{host}~zzzzzzzz~{namespace}:{pid}:{started}");
        assert!(
            !alive(&before_boot, false),
            "this host before it booted again: gone"
        );
        assert!(
            alive(&before_boot, true),
            "across machines, the same host name may be another machine's"
        );
    }
}
