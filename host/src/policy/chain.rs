//! The guard chain: which policies apply to a message, running them in
//! configured order, and combining their verdicts into one [`Decision`].
//! First deny wins and stops the chain; a modification feeds the next policy;
//! a required approval holds the message unless a later policy denies;
//! monitor-mode verdicts are recorded, never enforced; a failing policy denies unless it is configured fail-open.

use crate::config::{Config, FailureMode, Mode, PolicyConfig};
use crate::contract::{Exchange, MessageKind, Outcome, ToolDrift};
use crate::policy::engine::{LogLine, PolicyEngine};
use crate::policy::module::{Hook, Policy};
use crate::protocol::jsonrpc::{DENIED, POLICY_FAILED};
use anyhow::{Context, Result};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use wildmatch::WildMatch;

/// The ordered, loaded policy chain.
pub struct Guard {
    chain: Vec<Link>,
}

/// One policy and where and how it applies.
struct Link {
    policy: Policy,
    agents: Vec<WildMatch>,
    servers: Vec<WildMatch>,
    methods: Vec<WildMatch>,
    tools: Vec<WildMatch>,
    mode: Mode,
    failure: FailureMode,
}

/// The chain's combined answer for one message.
#[derive(Debug)]
pub struct Decision {
    /// What happens to the message.
    pub outcome: Decided,
    /// Every policy's own verdict, in chain order.
    pub verdicts: Vec<PolicyVerdict>,
    /// Time spent deciding, in µs.
    pub latency_us: u64,
}

/// What happens to a message.
#[derive(Debug, Clone, PartialEq)]
pub enum Decided {
    /// Relay it unchanged.
    Allow,
    /// Relay it with this payload (JSON text).
    Modify(String),
    /// Refuse it.
    Deny(Refusal),
    /// Hold it for a person's approval: the policy that asked and why; the
    /// payload to relay if approved, when policies modified it.
    Hold(Refusal, Option<String>),
}

/// Why a message was refused (or held).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The JSON-RPC error code.
    pub code: i32,
    /// The policy that refused.
    pub policy: Arc<str>,
    /// Why.
    pub reason: String,
}

impl Refusal {
    /// The error message the refused party reads.
    pub fn message(&self) -> String {
        format!("Denied by policy '{}': {}", self.policy, self.reason)
    }
}

/// What one enforced verdict asks of the chain.
enum Step {
    /// Carry on.
    Pass,
    /// Carry on with this payload.
    Modify(String),
    /// Carry on, but the message needs approval.
    Hold(Refusal),
    /// Stop: the message is refused.
    Deny(Refusal),
}

/// One policy's verdict, as recorded in the audit trail.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyVerdict {
    /// Policy name.
    pub policy: Arc<str>,
    /// sha256 of its module.
    pub sha256: Arc<str>,
    /// `allow`, `deny`, `require-approval`, `modify` or `error`.
    pub verdict: &'static str,
    /// The reason given, or the failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Tags the policy attached.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// False in monitor mode.
    pub enforced: bool,
    /// Evaluation time in µs.
    pub latency_us: u64,
    /// Lines the policy logged (kept in audit records only with
    /// `audit.include_policy_logs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub logs: Vec<LogLine>,
}

impl Guard {
    /// Loads every policy of the config, in order.
    pub fn load(engine: &PolicyEngine, config: &Config) -> Result<Self> {
        let chain = config
            .policies
            .iter()
            .map(|p| Link::load(engine, config, p))
            .collect::<Result<_>>()?;
        Ok(Self { chain })
    }

    /// The loaded policies, in chain order.
    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.chain.iter().map(|l| &l.policy)
    }

    /// Runs the chain on `exchange`, whose tools drifted as `drift` says.
    /// Modifications are applied to `exchange` as they happen, so each policy
    /// sees its predecessors' work.
    pub fn decide(&self, exchange: &mut Exchange, drift: &[ToolDrift]) -> Decision {
        let started = Instant::now();
        let hook = Hook::for_direction(exchange.direction);
        let mut verdicts = Vec::new();
        let mut modified = false;
        let mut hold = None;
        for link in &self.chain {
            if !link.applies(exchange) {
                continue;
            }
            match link.run(hook, exchange, drift, &mut verdicts) {
                Step::Pass => {}
                Step::Modify(payload) => {
                    *payload_of(exchange) = Some(payload);
                    modified = true;
                }
                Step::Hold(refusal) => {
                    hold.get_or_insert(refusal);
                }
                Step::Deny(refusal) => {
                    return Decision::finish(Decided::Deny(refusal), verdicts, started);
                }
            }
        }
        let payload = modified.then(|| payload_of(exchange).clone().unwrap_or_default());
        let outcome = match (hold, payload) {
            (Some(refusal), payload) => Decided::Hold(refusal, payload),
            (None, Some(payload)) => Decided::Modify(payload),
            (None, None) => Decided::Allow,
        };
        Decision::finish(outcome, verdicts, started)
    }
}

impl Decision {
    fn finish(outcome: Decided, verdicts: Vec<PolicyVerdict>, started: Instant) -> Self {
        Self {
            outcome,
            verdicts,
            latency_us: started.elapsed().as_micros() as u64,
        }
    }

    /// Tags of every policy, deduplicated, in order.
    pub fn tags(&self) -> Vec<String> {
        let mut tags: Vec<String> = Vec::new();
        for tag in self.verdicts.iter().flat_map(|v| &v.tags) {
            if !tags.contains(tag) {
                tags.push(tag.clone());
            }
        }
        tags
    }
}

/// The member a modification replaces: params for requests and
/// notifications, the result (or error) for answers.
fn payload_of(exchange: &mut Exchange) -> &mut Option<String> {
    match exchange.kind {
        MessageKind::Request | MessageKind::Notification => &mut exchange.params,
        MessageKind::Result | MessageKind::Error => &mut exchange.result,
    }
}

impl Link {
    fn load(engine: &PolicyEngine, config: &Config, p: &PolicyConfig) -> Result<Self> {
        let policy = Policy::load(engine, config, p)
            .with_context(|| format!("policy '{}' ({})", p.name, p.module))?;
        let globs = |patterns: &[String]| patterns.iter().map(|g| WildMatch::new(g)).collect();
        Ok(Self {
            policy,
            agents: globs(&p.agents),
            servers: globs(&p.servers),
            methods: globs(&p.methods),
            tools: globs(&p.tools),
            mode: p.mode,
            failure: p.failure,
        })
    }

    /// Scope check; a message without a tool matches a tool pattern only if
    /// the pattern matches the empty name (as `*` does).
    fn applies(&self, exchange: &Exchange) -> bool {
        let any = |globs: &[WildMatch], name: &str| globs.iter().any(|g| g.matches(name));
        any(&self.agents, &exchange.agent.id)
            && any(&self.servers, &exchange.server)
            && any(&self.methods, &exchange.method)
            && any(&self.tools, exchange.tool.as_deref().unwrap_or(""))
    }

    /// Evaluates the policy, records its verdict, and returns what the chain
    /// must enforce (nothing in monitor mode).
    fn run(
        &self,
        hook: Hook,
        exchange: &Exchange,
        drift: &[ToolDrift],
        verdicts: &mut Vec<PolicyVerdict>,
    ) -> Step {
        let started = Instant::now();
        let evaluated = self.policy.evaluate(hook, exchange, drift);
        let latency_us = started.elapsed().as_micros() as u64;
        let logs = evaluated.logs;
        let enforced = self.mode == Mode::Enforce;
        let record = |verdict, reason, tags| PolicyVerdict {
            policy: self.policy.name.clone(),
            sha256: self.policy.sha256.clone(),
            verdict,
            reason,
            tags,
            enforced,
            latency_us,
            logs: logs.clone(),
        };
        let (recorded, step) = match evaluated.result {
            Ok(v) => match v.outcome {
                Outcome::Allow => (record("allow", None, v.tags), Step::Pass),
                Outcome::Deny(d) => (
                    record("deny", Some(d.reason.clone()), v.tags),
                    Step::Deny(self.refusal(d.code, d.reason)),
                ),
                Outcome::RequireApproval(reason) => {
                    let hold = Step::Hold(self.refusal(DENIED, reason.clone()));
                    (record("require-approval", Some(reason), v.tags), hold)
                }
                Outcome::Modify(payload) => (record("modify", None, v.tags), Step::Modify(payload)),
            },
            Err(failure) => {
                let reason = format!("the policy {failure}");
                tracing::warn!(policy = %self.policy.name, "{reason}");
                let step = match self.failure {
                    FailureMode::Closed => {
                        Step::Deny(self.refusal(POLICY_FAILED, format!("{reason} (fail-closed)")))
                    }
                    FailureMode::Open => Step::Pass,
                };
                (record("error", Some(reason), Vec::new()), step)
            }
        };
        verdicts.push(recorded);
        if enforced { step } else { Step::Pass }
    }

    fn refusal(&self, code: i32, reason: String) -> Refusal {
        Refusal {
            code,
            policy: self.policy.name.clone(),
            reason,
        }
    }
}
