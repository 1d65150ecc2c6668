//! What judges messages: a [`Generation`] is everything one version of the
//! config builds — the policy chain, the audit sinks, the JWT checker, the
//! lock file in force and the rate limits — and [`Current`] is the one in
//! charge, shared by every relay of the process, with what outlives
//! generations (the boundary's memory, the calls held for approval).
//! Building the next generation and swapping it in is `runtime::reload`'s.

use crate::approval::hold::Holding;
use crate::audit::{ApprovalRecord, Audit, ModuleRecord};
use crate::config::Config;
use crate::identity::Identity;
use crate::identity::jwt::Verifier;
use crate::policy::chain::Guard;
use crate::policy::engine::PolicyEngine;
use crate::relay::boundary::Boundary;
use crate::state::Shared;
use crate::surface::lock::Pins;
use crate::surface::ratelimit::RateRules;
use crate::util::encode::hex;
use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

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
    /// A digest of every file it was built from: equal digests, same
    /// generation.
    pub fingerprint: String,
}

impl Generation {
    /// Whether `caller`'s credential, read again under this generation now,
    /// grants `server`: for what outlives the request that authenticated
    /// it (a held call, an event stream).
    pub fn grants(&self, caller: &Identity, server: &str) -> bool {
        let now = crate::util::clock::unix_now();
        caller
            .now(&self.config, self.jwt.as_ref(), now)
            .is_some_and(|caller| caller.may_use(server))
    }

    /// Reads the config at `path` and builds everything it names. Any error —
    /// in the config, a module, its settings or its fixtures — fails the whole
    /// generation.
    /// `previous`, the generation serving, keeps its registry modules'
    /// digests where a tag is not followed or names a refused version.
    pub fn load(
        engine: &PolicyEngine,
        path: &Path,
        extra_audit: Option<&Path>,
        number: u64,
        previous: Option<&Generation>,
    ) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut config = Config::parse(&text, path)?;
        let refusals = match crate::registry::resolve(&mut config, previous.map(|g| &g.config)) {
            Ok(refusals) => refusals,
            Err(e) => {
                if let Some(refused) = e.downcast_ref::<crate::registry::Refused>() {
                    audit_refusal(&config, extra_audit, refused);
                }
                return Err(e);
            }
        };
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
        for refused in &refusals {
            audit.write(&ModuleRecord::refused(refused))?;
        }
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
        for policy in &config.policies {
            // With settings_files, the settings hold texts the config does not.
            fingerprint.update(policy.settings.to_string().as_bytes());
        }
        for module in config.modules() {
            match module.pulled() {
                Some(pulled) => fingerprint.update(pulled.digest.as_bytes()),
                None => fingerprint.update(std::fs::read(module.path()?).unwrap_or_default()),
            }
        }
        Ok(Self {
            number,
            config,
            guard,
            audit,
            jwt,
            pins,
            rates,
            loaded_at: crate::util::clock::rfc3339_now(),
            fingerprint: hex(&fingerprint.finalize()),
        })
    }

    /// How the config names the policy `name`.
    pub fn policy_config(&self, name: &str) -> Option<&crate::config::PolicyConfig> {
        self.config.policies.iter().find(|p| p.name == name)
    }

    /// The files whose change calls for a reload, as absolute paths.
    pub fn watched_files(&self) -> HashSet<PathBuf> {
        let policies = self.config.policies.iter();
        let modules = self.config.modules().filter_map(|m| m.file());
        std::iter::once(self.config.path.as_path())
            .chain(modules)
            .chain(
                policies
                    .clone()
                    .flat_map(|p| &p.fixtures)
                    .map(PathBuf::as_path),
            )
            .chain(
                policies
                    .flat_map(|p| p.settings_files.values().flat_map(|f| f.paths()))
                    .map(PathBuf::as_path),
            )
            .chain(
                self.config
                    .jwt
                    .iter()
                    .filter_map(|j| j.jwks_file.as_deref()),
            )
            .chain(self.config.pinning.iter().filter_map(|p| p.lock.as_deref()))
            .chain(self.config.trust.keys.iter().map(PathBuf::as_path))
            .filter_map(|p| std::path::absolute(p).ok())
            .collect()
    }
}

/// Audits a registry module refused by `[trust]` through the sinks
/// `config` can open (a component sink whose module was not pulled cannot).
fn audit_refusal(config: &Config, extra_audit: Option<&Path>, refused: &crate::registry::Refused) {
    let written = Audit::open_pulled(config, extra_audit.map(Path::to_path_buf))
        .and_then(|audit| audit.write(&ModuleRecord::refused(refused)));
    if let Err(e) = written {
        tracing::error!(
            "cannot audit the refused module {}: {e:#}",
            refused.reference
        );
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
    /// The deployment's shared state (`[state] redis`), if any.
    pub state: Option<Arc<Shared>>,
}

impl Current {
    /// `generation` in charge.
    pub fn new(generation: Generation) -> Self {
        Self::with_boundary(generation, Boundary::default(), None)
    }

    /// `generation` in charge, with the deployment's `shared` state (from
    /// `[state]`) holding what processes must agree on.
    pub fn shared(generation: Generation, shared: Option<Arc<Shared>>) -> Self {
        let boundary = shared
            .clone()
            .map_or_else(Boundary::default, Boundary::shared);
        Self::with_boundary(generation, boundary, shared)
    }

    fn with_boundary(
        generation: Generation,
        boundary: Boundary,
        state: Option<Arc<Shared>>,
    ) -> Self {
        Self {
            holding: Holding::new(&generation.config),
            generation: RwLock::new(Arc::new(generation)),
            boundary,
            state,
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
            crate::util::metrics::global().approval(approval.state.as_str());
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
