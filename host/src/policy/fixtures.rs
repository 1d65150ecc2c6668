//! Policy fixtures: example messages with the verdict a policy must give them,
//! in JSON files a policy ships with. Portcullis runs them before a policy
//! serves — at start and before every reload swaps it in — so a policy that
//! no longer behaves as its authors promised never replaces a working one;
//! `portcullis test` runs them on their own and prints a report, and
//! `portcullis eval` shows how a policy judges one message.
//!
//! A fixture file is a JSON array of cases:
//!
//! ```json
//! [{ "name": "writes are refused",
//!    "exchange": { "method": "tools/call", "tool": "write_file",
//!                  "annotations": { "readOnlyHint": false },
//!                  "params": { "name": "write_file", "arguments": { "path": "/x" } } },
//!    "expect": "deny" }]
//! ```
//!
//! `exchange` fields default to a client-to-server request from agent
//! `fixture` to server `fixture`; `params` and `result` are JSON values;
//! `drift` gives what the policy's `surface.drift` import answers, e.g.
//! `[{ "tool": "write_file", "kinds": ["escalated"], "diff": "…" }]`.
//! `expect` is `allow`, `deny`, `require-approval` or `modify`; with `modify`,
//! `modified` may give the payload expected; `tags` may give the audit tags
//! expected.

use crate::config::DriftKind;
use crate::config::{
    Config, EngineConfig, FailureMode, InstanceMode, Mode, ModuleSource, PolicyConfig,
};
use crate::contract::{
    Agent, Direction, Drifted, Exchange, MessageKind, Outcome, ToolAnnotations, ToolDrift,
};
use crate::policy::coverage::Coverage;
use crate::policy::engine::PolicyEngine;
use crate::policy::module::{Hook, Policy};
use crate::util::stats::Stats;
use anyhow::{Context, Result, bail};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use std::time::Instant;

/// One case of a fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fixture {
    /// What the case shows.
    pub name: String,
    /// The message.
    pub exchange: FixtureExchange,
    /// The verdict expected.
    pub expect: Expected,
    /// For `modify`: the payload expected.
    pub modified: Option<Value>,
    /// The audit tags expected, in order.
    pub tags: Option<Vec<String>>,
}

/// The outcome a fixture expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expected {
    /// `allow`.
    Allow,
    /// `deny`.
    Deny,
    /// `require-approval`.
    RequireApproval,
    /// `modify`.
    Modify,
}

impl Expected {
    fn as_str(self) -> &'static str {
        match self {
            Expected::Allow => "allow",
            Expected::Deny => "deny",
            Expected::RequireApproval => "require-approval",
            Expected::Modify => "modify",
        }
    }
}

/// A verdict's outcome as a person reads it.
fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Allow => "allow".into(),
        Outcome::Deny(denial) => format!("deny ({}): {}", denial.code, denial.reason),
        Outcome::RequireApproval(reason) => format!("require-approval: {reason}"),
        Outcome::Modify(payload) => format!("modify: {payload}"),
    }
}

/// An exchange as written in a fixture file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FixtureExchange {
    #[serde(default = "client_to_server")]
    direction: String,
    #[serde(default = "request")]
    kind: String,
    #[serde(default = "fixture")]
    server: String,
    #[serde(default)]
    agent: Option<FixtureAgent>,
    method: String,
    tool: Option<String>,
    annotations: Option<FixtureAnnotations>,
    params: Option<Value>,
    result: Option<Value>,
    #[serde(default)]
    drift: Vec<FixtureDrift>,
}

/// A message as a policy is shown it: the exchange and its tools' drift.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The message.
    pub exchange: Exchange,
    /// What `surface.drift` answers while it is judged.
    pub drift: Vec<ToolDrift>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureDrift {
    server: Option<String>,
    tool: String,
    kinds: Vec<DriftKind>,
    #[serde(default)]
    diff: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureAgent {
    id: String,
    #[serde(default)]
    attributes: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FixtureAnnotations {
    title: Option<String>,
    read_only_hint: Option<bool>,
    destructive_hint: Option<bool>,
    idempotent_hint: Option<bool>,
    open_world_hint: Option<bool>,
}

fn client_to_server() -> String {
    "client-to-server".into()
}
fn request() -> String {
    "request".into()
}
fn fixture() -> String {
    "fixture".into()
}

impl FixtureExchange {
    fn to_sample(&self) -> Result<Sample> {
        let direction = match self.direction.as_str() {
            "client-to-server" => Direction::ClientToServer,
            "server-to-client" => Direction::ServerToClient,
            other => bail!("unknown direction '{other}'"),
        };
        let kind = match self.kind.as_str() {
            "request" => MessageKind::Request,
            "notification" => MessageKind::Notification,
            "result" => MessageKind::Result,
            "error" => MessageKind::Error,
            other => bail!("unknown kind '{other}'"),
        };
        let agent = match &self.agent {
            Some(a) => Agent {
                id: a.id.clone(),
                attributes: a.attributes.clone().into_iter().collect(),
            },
            None => Agent {
                id: "fixture".into(),
                attributes: Vec::new(),
            },
        };
        let drift = self
            .drift
            .iter()
            .map(|d| ToolDrift {
                server: d.server.clone().unwrap_or_else(|| self.server.clone()),
                tool: d.tool.clone(),
                kinds: d.kinds.iter().map(|k| Drifted::from(*k)).collect(),
                diff: d.diff.clone(),
            })
            .collect();
        let exchange = Exchange {
            direction,
            kind,
            server: self.server.clone(),
            agent,
            method: self.method.clone(),
            tool: self.tool.clone(),
            annotations: self.annotations.as_ref().map(|a| ToolAnnotations {
                title: a.title.clone(),
                read_only_hint: a.read_only_hint,
                destructive_hint: a.destructive_hint,
                idempotent_hint: a.idempotent_hint,
                open_world_hint: a.open_world_hint,
            }),
            params: self.params.as_ref().map(Value::to_string),
            result: self.result.as_ref().map(Value::to_string),
        };
        Ok(Sample { exchange, drift })
    }
}

/// Reads a fixture file.
pub fn read(path: &Path) -> Result<Vec<Fixture>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read fixtures {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("fixtures {} are not valid", path.display()))
}

/// The messages of a fixture file's cases, as a policy is shown them.
pub fn samples(path: &Path) -> Result<Vec<Sample>> {
    read(path)?
        .iter()
        .map(|case| {
            let sample = case.exchange.to_sample();
            sample.with_context(|| format!("fixture '{}' ({})", case.name, path.display()))
        })
        .collect()
}

/// Runs every case of the fixture file at `path` against `policy`; the first
/// case that fails is the error.
pub fn check(policy: &Policy, path: &Path) -> Result<()> {
    for case in read(path)? {
        if let Err(why) = run(policy, &case, &mut Coverage::default()) {
            bail!("fixture '{}' ({}): {why}", case.name, path.display());
        }
    }
    Ok(())
}

/// Reads an exchange written as in a fixture (the `exchange` of a case).
pub fn read_exchange(path: &Path) -> Result<Sample> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let exchange: FixtureExchange = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an exchange", path.display()))?;
    exchange.to_sample()
}

/// Loads a policy module on its own, as `portcullis test`, `eval` and
/// `bench` do:
/// default engine limits, every scope, fail-closed.
pub fn standalone(
    engine: &PolicyEngine,
    module: &Path,
    settings: &Value,
    instances: InstanceMode,
) -> Result<Policy> {
    let config = Config::parse("", Path::new("standalone.toml"))?;
    let policy_config = PolicyConfig {
        name: module
            .file_stem()
            .map_or("policy".into(), |s| s.to_string_lossy().into_owned()),
        module: ModuleSource::File(module.to_path_buf()),
        follow: false,
        settings: settings.clone(),
        settings_files: BTreeMap::new(),
        agents: vec!["*".into()],
        servers: vec!["*".into()],
        methods: vec!["*".into()],
        tools: vec!["*".into()],
        failure: FailureMode::Closed,
        mode: Mode::Enforce,
        instances,
        recycle_after: 10_000,
        timeout_ms: None,
        memory_mb: None,
        grants: Vec::new(),
        fixtures: Vec::new(),
    };
    Policy::load(engine, &config, &policy_config)
        .with_context(|| format!("policy {}", module.display()))
}

/// `portcullis test`: loads the module at `module` with `settings` and runs
/// every case of every file, printing one line per case and, for a failure,
/// what differed; with `coverage`, asks the policy to report which of its
/// rules the cases exercised (`coverage = true` in its settings) and prints
/// the rules none did. Returns the exit code: 0 when every case passed.
pub fn test(module: &Path, mut settings: Value, files: &[PathBuf], coverage: bool) -> Result<i32> {
    if coverage {
        let table = settings
            .as_object_mut()
            .context("--coverage needs the settings to be a JSON object")?;
        table.insert("coverage".into(), Value::Bool(true));
    }
    let engine = PolicyEngine::new(&EngineConfig::default())?;
    let policy = standalone(&engine, module, &settings, InstanceMode::Fresh)
        .map_err(|e| if coverage {
            e.context("with --coverage, the policy is given `coverage = true`: only policies that report coverage (the rego, cedar and cel components) accept it")
        } else {
            e
        })?;
    let mut covered = Coverage::default();
    println!(
        "policy {}  sha256 {}",
        module.display(),
        &policy.sha256[..12]
    );
    let (mut passed, mut failed) = (0, 0);
    for file in files {
        for case in read(file)? {
            match run(&policy, &case, &mut covered) {
                Ok(()) => {
                    passed += 1;
                    println!("  PASS  {}  ({})", case.name, file.display());
                }
                Err(why) => {
                    failed += 1;
                    println!("  FAIL  {}  ({})", case.name, file.display());
                    for line in why.lines() {
                        println!("        {line}");
                    }
                }
            }
        }
    }
    println!("fixtures: {passed} passed, {failed} failed");
    if coverage {
        print!("{}", covered.report());
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// `portcullis eval`: judges the exchange in the file at `message` (written
/// as in a fixture) and prints the verdict, its tags, what the policy logged,
/// and how long it took on a fresh instance and on a reused one.
pub fn eval(module: &Path, settings: Value, message: &Path) -> Result<i32> {
    let sample = read_exchange(message)?;
    let hook = Hook::for_direction(sample.exchange.direction);
    let engine = PolicyEngine::new(&EngineConfig::default())?;
    let fresh = standalone(&engine, module, &settings, InstanceMode::Fresh)?;
    println!(
        "policy   {}  sha256 {}",
        module.display(),
        &fresh.sha256[..12]
    );
    let started = Instant::now();
    let evaluation = fresh.evaluate(hook, &sample.exchange, &sample.drift);
    let first = started.elapsed();
    match &evaluation.result {
        Ok(verdict) => {
            println!("verdict  {}", describe(&verdict.outcome));
            if !verdict.tags.is_empty() {
                println!("tags     {}", verdict.tags.join(", "));
            }
        }
        Err(failure) => println!("failure  the policy {failure}"),
    }
    for line in &evaluation.logs {
        println!("log      {:<5} {}", line.level, line.message);
    }
    let reused = standalone(&engine, module, &settings, InstanceMode::Reuse)?;
    let reused_p50 = Stats::of(&mut time_calls(&reused, hook, &sample, 200)).p50;
    println!(
        "time     {:.1} µs on a fresh instance; {:.1} µs median on a reused one",
        first.as_secs_f64() * 1e6,
        reused_p50.as_secs_f64() * 1e6
    );
    Ok(if evaluation.result.is_ok() { 0 } else { 1 })
}

/// Runs one case; the error says how the verdict differed.
fn run(policy: &Policy, case: &Fixture, coverage: &mut Coverage) -> Result<(), String> {
    let sample = case
        .exchange
        .to_sample()
        .map_err(|e| format!("invalid exchange: {e:#}"))?;
    let hook = Hook::for_direction(sample.exchange.direction);
    let evaluation = policy.evaluate(hook, &sample.exchange, &sample.drift);
    coverage.add(&evaluation.logs);
    let verdict = evaluation.result.map_err(|f| format!("the policy {f}"))?;
    let (got, payload) = match &verdict.outcome {
        Outcome::Allow => (Expected::Allow, None),
        Outcome::Deny(_) => (Expected::Deny, None),
        Outcome::RequireApproval(_) => (Expected::RequireApproval, None),
        Outcome::Modify(payload) => (Expected::Modify, Some(payload)),
    };
    if got != case.expect {
        let expected = case.expect.as_str();
        return Err(format!(
            "expected {expected}, got {}",
            describe(&verdict.outcome)
        ));
    }
    if let Some(tags) = case.tags.as_ref().filter(|tags| **tags != verdict.tags) {
        return Err(format!(
            "expected the tags {tags:?}, got {:?}",
            verdict.tags
        ));
    }
    if let (Some(want), Some(payload)) = (&case.modified, payload) {
        let payload: Value = serde_json::from_str(payload).map_err(|e| e.to_string())?;
        if &payload != want {
            let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
            return Err(format!(
                "the modified payload differs\nexpected:\n{}\ngot:\n{}",
                pretty(want),
                pretty(&payload)
            ));
        }
    }
    Ok(())
}

/// Times `iterations` evaluations of `sample` by `policy`, after a tenth
/// as many warm-up evaluations.
pub fn time_calls(
    policy: &Policy,
    hook: Hook,
    sample: &Sample,
    iterations: usize,
) -> Vec<Duration> {
    (0..iterations / 10 + iterations)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(policy.evaluate(hook, &sample.exchange, &sample.drift));
            started.elapsed()
        })
        .skip(iterations / 10)
        .collect()
}
