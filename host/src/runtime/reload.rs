//! Hot reload. A [`Generation`] is everything one version of the config
//! builds — the policy chain, the audit sinks, the lock file in force and the
//! rate limits. The [`Reloader`] watches the config file and every file it
//! names (modules, fixtures, the lock file), surviving editors'
//! save-by-rename, delete-and-recreate and bursts of events, and reloads on
//! SIGHUP too. A new generation is built and validated completely off the
//! request path (compiled through the cache, instantiated, settings and
//! fixtures checked) and only then swapped in, in one step, for every relay. A
//! version that fails any step never replaces the running one: the failure is
//! logged, audited as a reload event and shown in the status report.

use crate::audit::{ReloadRecord, ReloadedPolicy};
use crate::policy::engine::PolicyEngine;
use crate::registry::sources::Moved;
use crate::relay::generation::{Current, Generation};
use crate::runtime::status::{PolicyStatus, ReloadStatus, Status};
use crate::upstream::Health;
use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A moved tag whose reload did not take it is tried again after this
/// many polls (a refusal for a passing reason, such as a registry error,
/// heals; a lasting one costs one attempt per this many polls).
const RETRY_AFTER_POLLS: u32 = 10;
/// A burst of file events ends after this much quiet...
const QUIET: Duration = Duration::from_millis(20);
/// ...or after this long, whichever comes first.
const MAX_BURST: Duration = Duration::from_millis(200);

/// An error on one line: wasmtime's can span many.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What set off a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A watched file changed.
    File,
    /// SIGHUP.
    Signal,
    /// A followed tag moved in its registry.
    Registry,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::File => "file",
            Trigger::Signal => "signal",
            Trigger::Registry => "registry",
        }
    }
}

/// Rebuilds and swaps the process' generations, and reports on it.
pub struct Reloader {
    engine: Arc<PolicyEngine>,
    current: Arc<Current>,
    config: PathBuf,
    extra_audit: Option<PathBuf>,
    status: Mutex<Status>,
}

impl Reloader {
    /// A reloader for `current`, whose generation came from `config`.
    pub fn new(
        engine: Arc<PolicyEngine>,
        current: Arc<Current>,
        config: PathBuf,
        extra_audit: Option<PathBuf>,
        server: &str,
    ) -> Self {
        let generation = current.get();
        let base = config.parent().unwrap_or(std::path::Path::new("."));
        let replica = generation.config.state.replica(base).ok().flatten();
        if let Some(replica) = &replica {
            crate::util::metrics::global().replica(replica);
        }
        let status = Status {
            pid: std::process::id(),
            config: std::path::absolute(&config).unwrap_or_else(|_| config.clone()),
            server: server.to_string(),
            started: crate::util::clock::rfc3339_now(),
            generation: generation.number,
            policies: policy_statuses(&generation, None),
            last_reload: None,
            servers: BTreeMap::new(),
            replica,
        };
        Self {
            engine,
            current,
            config,
            extra_audit,
            status: Mutex::new(status),
        }
    }

    /// Records how the upstream servers are doing (`serve` mode), and
    /// publishes the status report when that changed.
    pub fn set_servers(&self, servers: BTreeMap<String, Health>) {
        let mut status = self.status.lock().expect("status lock poisoned");
        if status.servers == servers {
            return;
        }
        status.servers = servers;
        if let Err(e) = status.publish() {
            tracing::warn!("cannot publish the status report: {e:#}");
        }
    }

    /// The status report as it stands.
    pub fn status(&self) -> Status {
        self.status.lock().expect("status lock poisoned").clone()
    }

    /// Builds the next generation and swaps it in, or leaves the current one
    /// serving and reports why not.
    pub fn reload(&self, trigger: Trigger) -> ReloadStatus {
        let current = self.current.get();
        let started = Instant::now();
        let next = Generation::load(
            &self.engine,
            &self.config,
            self.extra_audit.as_deref(),
            current.number + 1,
            Some(&current),
        );
        let outcome = match next {
            Ok(next) if next.fingerprint == current.fingerprint => {
                tracing::debug!("reload: nothing changed");
                self.report(trigger, "unchanged", None, None)
            }
            Ok(next) => {
                let record = reload_record(trigger, "ok", None, &next, Some(&current));
                match next.audit.write(&record) {
                    Ok(()) => {
                        let policies = policy_statuses(&next, Some(&self.status()));
                        let number = next.number;
                        self.current.swap(next);
                        tracing::info!(
                            generation = number,
                            ms = started.elapsed().as_millis() as u64,
                            "reloaded"
                        );
                        self.report(trigger, "ok", None, Some((number, policies)))
                    }
                    Err(e) => self.fail(
                        trigger,
                        &current,
                        format!("the new audit sinks failed: {e:#}"),
                    ),
                }
            }
            Err(e) => self.fail(trigger, &current, one_line(&format!("{e:#}"))),
        };
        if let Err(e) = self.status().publish() {
            tracing::warn!("cannot publish the status report: {e:#}");
        }
        outcome
    }

    fn fail(&self, trigger: Trigger, current: &Generation, error: String) -> ReloadStatus {
        tracing::error!("reload failed; the previous policies keep serving: {error}");
        let record = reload_record(trigger, "failed", Some(error.clone()), current, None);
        if let Err(e) = current.audit.write(&record) {
            tracing::error!("cannot audit the failed reload: {e:#}");
        }
        self.report(trigger, "failed", Some(error), None)
    }

    fn report(
        &self,
        trigger: Trigger,
        result: &str,
        error: Option<String>,
        swapped: Option<(u64, Vec<PolicyStatus>)>,
    ) -> ReloadStatus {
        crate::util::metrics::global().reload(result);
        let reload = ReloadStatus {
            time: crate::util::clock::rfc3339_now(),
            trigger: trigger.as_str().into(),
            result: result.into(),
            error,
        };
        let mut status = self.status.lock().expect("status lock poisoned");
        if let Some((generation, policies)) = swapped {
            status.generation = generation;
            status.policies = policies;
        }
        status.last_reload = Some(reload.clone());
        reload
    }

    /// Publishes the status report, then watches the files and SIGHUP from a
    /// background thread for as long as the process runs.
    pub fn start(self: Arc<Self>) -> Result<()> {
        if let Err(e) = self.status().publish() {
            tracing::warn!("cannot publish the status report: {e:#}");
        }
        let (triggers, next) = mpsc::channel();
        let watched = Arc::new(Mutex::new(HashSet::new()));
        let mut watcher = {
            let (triggers, watched) = (triggers.clone(), watched.clone());
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if !changes_content(&event.kind) {
                    return;
                }
                let watched = watched.lock().expect("watch list poisoned");
                if event.paths.iter().any(|p| watched.contains(p)) {
                    let _ = triggers.send(Trigger::File);
                }
            })
            .context("cannot watch files")?
        };
        self.clone().follow_tags(triggers.clone())?;
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])
            .context("cannot watch SIGHUP")?;
        std::thread::Builder::new()
            .name("portcullis-sighup".into())
            .spawn(move || {
                for _ in signals.forever() {
                    let _ = triggers.send(Trigger::Signal);
                }
            })
            .context("cannot start the SIGHUP thread")?;
        std::thread::Builder::new()
            .name("portcullis-reload".into())
            .spawn(move || {
                let mut dirs = HashSet::new();
                self.rewatch(&mut watcher, &watched, &mut dirs);
                while let Ok(first) = next.recv() {
                    let trigger = settle(&next, first);
                    self.reload(trigger);
                    self.rewatch(&mut watcher, &watched, &mut dirs);
                }
            })
            .context("cannot start the reload thread")?;
        Ok(())
    }

    /// Checks the tags of policies with `follow = true` every
    /// `[policy_sources] refresh_secs`, from a background thread, and asks
    /// for a reload when one names a digest not tried yet, or one tried whose
    /// signatures changed since (see [`worth_a_reload`]).
    fn follow_tags(self: Arc<Self>, triggers: mpsc::Sender<Trigger>) -> Result<()> {
        std::thread::Builder::new()
            .name("portcullis-follow".into())
            .spawn(move || {
                let mut tried = HashMap::new();
                loop {
                    let generation = self.current.get();
                    let every = Duration::from_secs(generation.config.policy_sources.refresh_secs);
                    std::thread::sleep(every);
                    let moved =
                        match crate::registry::sources::moved_tags(&self.current.get().config) {
                            Ok(moved) => moved,
                            Err(e) => {
                                tracing::warn!("cannot check followed tags: {e:#}");
                                continue;
                            }
                        };
                    if !worth_a_reload(&mut tried, moved, every * RETRY_AFTER_POLLS) {
                        continue;
                    }
                    if triggers.send(Trigger::Registry).is_err() {
                        return;
                    }
                }
            })
            .context("cannot start the thread that follows tags")?;
        Ok(())
    }

    /// Watches the directories of the current generation's files (a
    /// directory watch survives a file being replaced by rename).
    fn rewatch(
        &self,
        watcher: &mut impl Watcher,
        watched: &Mutex<HashSet<PathBuf>>,
        dirs: &mut HashSet<PathBuf>,
    ) {
        let mut files = self.current.get().watched_files();
        files.extend(std::path::absolute(&self.config));
        for dir in files.iter().filter_map(|f| f.parent()) {
            if dirs.insert(dir.to_path_buf())
                && let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive)
            {
                tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
                dirs.remove(dir);
            }
        }
        *watched.lock().expect("watch list poisoned") = files;
    }
}

/// True for events that may change what a file holds. Reads are not
/// (reloading reads every watched file, and must not trigger itself).
fn changes_content(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode, EventKind};
    match kind {
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
    }
}

/// Whether `moved` holds a move not tried yet, or tried longer than `retry`
/// ago; notes the time of each move it reports. A move that is no longer
/// there (taken, or the tag moved back) is forgotten, so the same move
/// later is tried afresh.
fn worth_a_reload(tried: &mut HashMap<Moved, Instant>, moved: Vec<Moved>, retry: Duration) -> bool {
    tried.retain(|m, _| moved.contains(m));
    let mut due = false;
    for m in moved {
        let stale = tried.get(&m).is_none_or(|at| at.elapsed() >= retry);
        if stale {
            tracing::info!(
                policy = m.policy,
                from = m.from,
                to = m.to,
                "a followed tag moved; reloading"
            );
            tried.insert(m, Instant::now());
            due = true;
        }
    }
    due
}

/// Waits for a burst of triggers to end; a signal in the burst wins.
fn settle(next: &mpsc::Receiver<Trigger>, first: Trigger) -> Trigger {
    let deadline = Instant::now() + MAX_BURST;
    let mut trigger = first;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match next.recv_timeout(QUIET.min(left)) {
            Ok(Trigger::Signal) => trigger = Trigger::Signal,
            Ok(Trigger::File | Trigger::Registry) => {}
            Err(_) => break,
        }
    }
    trigger
}

/// The status lines of `generation`'s policies; a policy whose module did not
/// change keeps its earlier load time.
fn policy_statuses(generation: &Generation, before: Option<&Status>) -> Vec<PolicyStatus> {
    generation
        .guard
        .policies()
        .map(|p| {
            let earlier = before
                .and_then(|s| {
                    s.policies
                        .iter()
                        .find(|q| *q.name == *p.name && *q.sha256 == *p.sha256)
                })
                .map(|q| q.loaded_at.clone());
            let module = generation.policy_config(&p.name).map(|c| &c.module);
            let source = module.and_then(|m| Some((m.reference()?, m.pulled()?)));
            PolicyStatus {
                name: p.name.to_string(),
                sha256: p.sha256.to_string(),
                loaded_at: earlier.unwrap_or_else(|| generation.loaded_at.clone()),
                source: source
                    .map(|(reference, pulled)| format!("{reference} ({})", pulled.digest)),
            }
        })
        .collect()
}

/// The audit event of a reload: the policies of `generation` with the digests
/// they replace in `previous`.
fn reload_record(
    trigger: Trigger,
    result: &'static str,
    error: Option<String>,
    generation: &Generation,
    previous: Option<&Generation>,
) -> ReloadRecord {
    let policies = generation
        .guard
        .policies()
        .map(|p| {
            let module = |g: &Generation| g.policy_config(&p.name).map(|c| c.module.clone());
            let now = module(generation);
            let pulled = now.as_ref().and_then(|m| m.pulled());
            let before = previous.and_then(module);
            ReloadedPolicy {
                name: p.name.to_string(),
                sha256: p.sha256.to_string(),
                previous_sha256: previous
                    .and_then(|g| g.guard.policies().find(|q| q.name == p.name))
                    .map(|q| q.sha256.to_string()),
                source: now
                    .as_ref()
                    .and_then(|m| m.reference())
                    .map(|r| r.to_string()),
                digest: pulled.map(|p| p.digest.clone()),
                previous_digest: before
                    .as_ref()
                    .and_then(|m| m.pulled())
                    .map(|p| p.digest.clone()),
                signer: pulled.and_then(|p| p.signer.clone()),
            }
        })
        .collect();
    ReloadRecord::new(trigger.as_str(), result, generation.number, error, policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(from: &str, to: &str, signatures: Option<&str>) -> Moved {
        Moved {
            policy: "gate".into(),
            from: from.into(),
            to: to.into(),
            signatures: signatures.map(str::to_string),
        }
    }

    #[test]
    fn a_move_is_tried_once_until_it_changes_goes_away_or_is_due_again() {
        let hour = Duration::from_secs(3600);
        let mut tried = HashMap::new();
        assert!(worth_a_reload(
            &mut tried,
            vec![moved("a", "b", None)],
            hour
        ));
        assert!(!worth_a_reload(
            &mut tried,
            vec![moved("a", "b", None)],
            hour
        ));
        // Signed since: worth another try.
        assert!(worth_a_reload(
            &mut tried,
            vec![moved("a", "b", Some("s"))],
            hour
        ));
        // Taken (no move left), then rolled back and re-released: tried afresh.
        assert!(!worth_a_reload(&mut tried, vec![], hour));
        assert!(worth_a_reload(
            &mut tried,
            vec![moved("b", "a", None)],
            hour
        ));
        assert!(!worth_a_reload(&mut tried, vec![], hour));
        assert!(worth_a_reload(
            &mut tried,
            vec![moved("a", "b", Some("s"))],
            hour
        ));
        // A refusal for a passing reason is retried once due.
        assert!(worth_a_reload(
            &mut tried,
            vec![moved("a", "b", Some("s"))],
            Duration::ZERO
        ));
    }
}
