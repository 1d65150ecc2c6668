//! One policy of the chain: its compiled component, settings, limits and
//! instance lifecycle, and the running of one evaluation in a sandboxed store.
//! Every way a policy can fail — a trap, a missed deadline, exhausted memory,
//! malformed output — comes back as a [`Failure`] with a readable reason,
//! never as a panic or a raw backtrace.

use crate::config::{Config, Grant, InstanceMode, PolicyConfig};
use crate::contract::{self, Direction, Exchange, MessageKind, Outcome, ToolDrift, Verdict};
use crate::policy::engine::{
    EPOCH_TICK, EpochTicker, LogLine, PolicyEngine, PolicyState, truncate,
};
use crate::policy::kv::{KeyValue, MemoryStore};
use anyhow::{Context, Result, anyhow, bail};
use std::sync::{Arc, Mutex};
use wasmtime::{ResourceLimiter, Store, Trap};

/// How many idle instances a reusing policy keeps.
const MAX_IDLE_INSTANCES: usize = 8;

/// Which hook to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// `on-request`: client → server.
    Request,
    /// `on-response`: server → client.
    Response,
}

impl Hook {
    /// The hook that judges messages travelling `direction`.
    pub fn for_direction(direction: Direction) -> Self {
        match direction {
            Direction::ClientToServer => Hook::Request,
            Direction::ServerToClient => Hook::Response,
        }
    }
}

/// Why an evaluation produced no usable verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure(pub String);

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The outcome of one evaluation and what the policy logged during it.
#[derive(Debug)]
pub struct Evaluation {
    /// The verdict, or why there is none.
    pub result: Result<Verdict, Failure>,
    /// Lines the policy logged.
    pub logs: Vec<LogLine>,
}

impl Evaluation {
    fn failed(failure: Failure) -> Self {
        Self {
            result: Err(failure),
            logs: Vec::new(),
        }
    }
}

/// A loaded, validated policy.
pub struct Policy {
    /// The configured name.
    pub name: Arc<str>,
    /// Hex sha256 of the module file.
    pub sha256: Arc<str>,
    pre: contract::PolicyPre<PolicyState>,
    ticker: Arc<EpochTicker>,
    store: Arc<dyn KeyValue>,
    settings: String,
    timeout_ms: u64,
    memory_limit: usize,
    grants: Vec<Grant>,
    instances: InstanceMode,
    recycle_after: u64,
    idle: Mutex<Vec<Instance>>,
}

/// A live instance and its store.
struct Instance {
    store: Store<PolicyState>,
    hooks: contract::Policy,
    /// Evaluations it has served.
    calls: u64,
}

impl Policy {
    /// Compiles the module, links it, and instantiates and configures it once
    /// so that bad modules and bad settings fail here, not on traffic.
    pub fn load(engine: &PolicyEngine, config: &Config, policy: &PolicyConfig) -> Result<Self> {
        let module = engine.prepare(policy.module.path()?)?;
        if let Some(pulled) = policy.module.pulled()
            && pulled.component.strip_prefix("sha256:") != Some(&*module.sha256)
        {
            bail!(
                "{} changed in the cache after it was verified (expected {})",
                pulled.path.display(),
                pulled.component
            );
        }
        // Start-up and fixtures run against a scratch store, so what the
        // fixtures count never reaches the counters of live traffic.
        let mut loaded = Self {
            name: policy.name.as_str().into(),
            sha256: module.sha256,
            pre: module.pre,
            ticker: engine.ticker(),
            store: Arc::new(MemoryStore::default()),
            settings: policy.settings.to_string(),
            timeout_ms: config.timeout_ms(policy),
            memory_limit: usize::try_from(config.memory_bytes(policy))?,
            grants: policy.grants.clone(),
            instances: policy.instances,
            recycle_after: policy.recycle_after,
            idle: Mutex::new(Vec::new()),
        };
        let first = loaded
            .instantiate()
            .map_err(|f| anyhow!("{f}"))
            .context("the policy did not start")?;
        loaded.release(first);
        for fixture in policy.all_fixtures() {
            crate::policy::fixtures::check(&loaded, fixture)?;
        }
        loaded.store = engine.store();
        loaded.idle.lock().expect("idle instances poisoned").clear();
        Ok(loaded)
    }

    /// Runs one hook on `exchange`, whose tools drifted as `drift` says, and
    /// checks the verdict is well formed.
    pub fn evaluate(&self, hook: Hook, exchange: &Exchange, drift: &[ToolDrift]) -> Evaluation {
        let _running = self.ticker.running();
        let mut instance = match self.take_idle() {
            Some(mut reused) => {
                reused.store.set_epoch_deadline(self.deadline_ticks());
                reused
            }
            None => match self.instantiate() {
                Ok(fresh) => fresh,
                Err(failure) => return Evaluation::failed(failure),
            },
        };
        instance.store.data_mut().drift = drift.to_vec();
        let hooks = instance.hooks.portcullis_policy_hooks();
        let called = match hook {
            Hook::Request => hooks.call_on_request(&mut instance.store, exchange),
            Hook::Response => hooks.call_on_response(&mut instance.store, exchange),
        };
        instance.calls += 1;
        let logs = instance.store.data_mut().take_logs();
        let result = match called {
            Ok(verdict) => {
                self.release(instance);
                check_verdict(&verdict, exchange.kind).map(|()| verdict)
            }
            Err(e) => Err(self.failure(&instance.store, e)),
        };
        Evaluation { result, logs }
    }

    fn take_idle(&self) -> Option<Instance> {
        match self.instances {
            InstanceMode::Reuse => self.idle.lock().ok()?.pop(),
            InstanceMode::Fresh => None,
        }
    }

    /// Keeps a healthy instance for reuse, unless it has served its share.
    fn release(&self, instance: Instance) {
        if self.instances == InstanceMode::Reuse
            && instance.calls < self.recycle_after
            && let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE_INSTANCES
        {
            idle.push(instance);
        }
    }

    /// A new instance with `configure` already called. Its deadline covers
    /// start-up and the first evaluation together.
    fn instantiate(&self) -> Result<Instance, Failure> {
        let _running = self.ticker.running();
        let state = PolicyState::new(
            self.name.clone(),
            self.memory_limit,
            &self.grants,
            self.store.clone(),
        );
        let mut store = Store::new(self.pre.engine(), state);
        store.limiter(|state| state as &mut dyn ResourceLimiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(self.deadline_ticks());
        let hooks = self
            .pre
            .instantiate(&mut store)
            .map_err(|e| self.failure(&store, e))?;
        match hooks
            .portcullis_policy_hooks()
            .call_configure(&mut store, &self.settings)
        {
            Ok(Ok(())) => Ok(Instance {
                store,
                hooks,
                calls: 0,
            }),
            Ok(Err(reason)) => Err(Failure(format!("rejected its settings: {reason}"))),
            Err(e) => Err(self.failure(&store, e)),
        }
    }

    fn deadline_ticks(&self) -> u64 {
        let tick = EPOCH_TICK.as_millis() as u64;
        self.timeout_ms.div_ceil(tick)
    }

    /// Turns a wasmtime error into a readable reason.
    fn failure(&self, store: &Store<PolicyState>, error: wasmtime::Error) -> Failure {
        let state = store.data();
        if state.memory_exceeded() {
            return Failure(format!(
                "exceeded its memory limit of {} MiB",
                self.memory_limit >> 20
            ));
        }
        let reason = match error.downcast_ref::<Trap>() {
            Some(Trap::Interrupt) => format!("exceeded its deadline of {} ms", self.timeout_ms),
            Some(trap) => format!("trapped: {trap}"),
            None => format!("failed: {}", error.root_cause()),
        };
        match state.stderr_text() {
            Some(text) => Failure(format!("{reason}: {}", truncate(&text, 512))),
            None => Failure(reason),
        }
    }
}

/// A `modify` must carry valid JSON, and `params` must stay an object or array.
fn check_verdict(verdict: &Verdict, kind: MessageKind) -> Result<(), Failure> {
    let Outcome::Modify(payload) = &verdict.outcome else {
        return Ok(());
    };
    let value: serde_json::Value = serde_json::from_str(payload).map_err(|e| {
        Failure(format!(
            "returned malformed output: modify payload is not JSON ({e})"
        ))
    })?;
    let is_params = matches!(kind, MessageKind::Request | MessageKind::Notification);
    if is_params && !(value.is_object() || value.is_array()) {
        return Err(Failure(
            "returned malformed output: modified params must be an object or array".into(),
        ));
    }
    Ok(())
}
