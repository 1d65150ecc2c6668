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

use crate::audit::ApprovalRecord;
use crate::audit::{Audit, ReloadRecord, ReloadedPolicy};
use crate::boundary::Boundary;
use crate::config::Config;
use crate::engine::{PolicyEngine, hex};
use crate::guard::Guard;
use crate::hold::Holding;
use crate::jwt::Verifier;
use crate::lock::Pins;
use crate::ratelimit::RateRules;
use crate::status::{PolicyStatus, ReloadStatus, Status};
use crate::upstream::Health;
use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant, SystemTime};

/// A burst of file events ends after this much quiet...
const QUIET: Duration = Duration::from_millis(20);
/// ...or after this long, whichever comes first.
const MAX_BURST: Duration = Duration::from_millis(200);

/// The policy chain and audit sinks built from one version of the config.
pub struct Generation {
    /// 1 for the first, then one more per successful reload.
    pub number: u64,
    /// The config it was built from.
    pub config: Config,
    /// The policy chain.
    pub guard: Guard,
    /// The audit sinks.
    pub audit: Audit,
    /// The checker of agents' JWTs, when `[jwt]` is configured.
    pub jwt: Option<Verifier>,
    /// The lock file in force, when `[pinning]` is configured.
    pub pins: Option<Pins>,
    /// The rate limits.
    pub rates: RateRules,
    /// When it was built (RFC 3339).
    pub loaded_at: String,
    fingerprint: String,
}

impl Generation {
    /// Reads the config at `path` and builds everything it names. Any error —
    /// in the config, a module, its settings or its fixtures — fails the whole
    /// generation.
    pub fn load(
        engine: &PolicyEngine,
        path: &Path,
        extra_audit: Option<&Path>,
        number: u64,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let config = Config::parse(&text, path)?;
        let guard = Guard::load(engine, &config)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let jwt = config
            .jwt
            .as_ref()
            .map(|jwt| Verifier::new(jwt, base))
            .transpose()
            .with_context(|| format!("{}", path.display()))?;
        let pins = config.lock_path().map(Pins::load).transpose()?;
        let rates = RateRules::new(&config.rate_limits);
        let audit = Audit::open(&config, extra_audit.map(Path::to_path_buf))?;
        let mut fingerprint = Sha256::new();
        fingerprint.update(text.as_bytes());
        if let Some(pins) = &pins {
            fingerprint.update(pins.digest.as_bytes());
        }
        if let Some(file) = config.jwt.as_ref().and_then(|j| j.jwks_file.as_ref()) {
            fingerprint.update(std::fs::read(file).unwrap_or_default());
        }
        for policy in guard.policies() {
            fingerprint.update(policy.sha256.as_bytes());
        }
        for module in config.audit.sink_modules() {
            fingerprint.update(std::fs::read(module).unwrap_or_default());
        }
        Ok(Self {
            number,
            config,
            guard,
            audit,
            jwt,
            pins,
            rates,
            loaded_at: now(),
            fingerprint: hex(&fingerprint.finalize()),
        })
    }

    /// The files whose change calls for a reload, as absolute paths.
    pub fn watched_files(&self) -> HashSet<PathBuf> {
        let policies = self.config.policies.iter();
        std::iter::once(&self.config.path)
            .chain(policies.clone().map(|p| &p.module))
            .chain(policies.flat_map(|p| &p.fixtures))
            .chain(self.config.jwt.iter().filter_map(|j| j.jwks_file.as_ref()))
            .chain(self.config.pinning.iter().filter_map(|p| p.lock.as_ref()))
            .chain(self.config.audit.sink_modules())
            .filter_map(|p| std::path::absolute(p).ok())
            .collect()
    }
}

/// An error on one line: wasmtime's can span many.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn now() -> String {
    humantime::format_rfc3339_micros(SystemTime::now()).to_string()
}

/// What set off a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A watched file changed.
    File,
    /// SIGHUP.
    Signal,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::File => "file",
            Trigger::Signal => "signal",
        }
    }
}

/// The generation in charge, shared by every relay of the process, and the
/// boundary's memory, which outlives generations.
pub struct Current {
    generation: RwLock<Arc<Generation>>,
    /// Rate buckets, quarantines and compiled schemas.
    pub boundary: Boundary,
    /// Where calls are held for approval.
    pub holding: Holding,
}

impl Current {
    /// `generation` in charge.
    pub fn new(generation: Generation) -> Self {
        Self {
            holding: Holding::new(&generation.config),
            generation: RwLock::new(Arc::new(generation)),
            boundary: Boundary::default(),
        }
    }

    /// Cancels the approvals that processes which have ended left pending
    /// (their calls cannot run any more), auditing each.
    pub fn cancel_orphans(&self) {
        let cancelled = match self.holding.cancel_orphans() {
            Ok(cancelled) => cancelled,
            Err(e) => {
                tracing::warn!("cannot look for orphaned approvals: {e:#}");
                return;
            }
        };
        let audit = &self.get().audit;
        for approval in cancelled {
            tracing::info!(approval = %approval.id, "cancelled an approval whose process ended");
            crate::metrics::global().approval(approval.state.as_str());
            if let Err(e) = audit.write(&ApprovalRecord::new(&approval, None, true)) {
                tracing::error!("{e:#}");
            }
        }
    }

    /// The generation judging messages now.
    pub fn get(&self) -> Arc<Generation> {
        self.generation
            .read()
            .expect("generation lock poisoned")
            .clone()
    }

    /// Puts `next` in charge, in one step: messages already being judged
    /// finish with the generation they started with. Returns the previous one.
    pub fn swap(&self, next: Generation) -> Arc<Generation> {
        let mut current = self.generation.write().expect("generation lock poisoned");
        std::mem::replace(&mut *current, Arc::new(next))
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
        let status = Status {
            pid: std::process::id(),
            config: std::path::absolute(&config).unwrap_or_else(|_| config.clone()),
            server: server.to_string(),
            started: now(),
            generation: generation.number,
            policies: policy_statuses(&generation, None),
            last_reload: None,
            servers: BTreeMap::new(),
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
        crate::metrics::global().reload(result);
        let reload = ReloadStatus {
            time: now(),
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

/// Waits for a burst of triggers to end; a signal in the burst wins.
fn settle(next: &mpsc::Receiver<Trigger>, first: Trigger) -> Trigger {
    let deadline = Instant::now() + MAX_BURST;
    let mut trigger = first;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match next.recv_timeout(QUIET.min(left)) {
            Ok(Trigger::Signal) => trigger = Trigger::Signal,
            Ok(Trigger::File) => {}
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
            PolicyStatus {
                name: p.name.to_string(),
                sha256: p.sha256.to_string(),
                loaded_at: earlier.unwrap_or_else(|| generation.loaded_at.clone()),
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
        .map(|p| ReloadedPolicy {
            name: p.name.to_string(),
            sha256: p.sha256.to_string(),
            previous_sha256: previous
                .and_then(|g| g.guard.policies().find(|q| q.name == p.name))
                .map(|q| q.sha256.to_string()),
        })
        .collect();
    ReloadRecord::new(trigger.as_str(), result, generation.number, error, policies)
}
