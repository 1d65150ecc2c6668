//! `portcullis bench --evaluators DIR`: what the sandbox costs the policy
//! languages. For the Rego, Cedar and CEL examples in DIR (one config each,
//! the same guardrails), it judges the same messages — each example's
//! fixtures, the reference conformance suite among them — with the
//! evaluator component on reused instances, with the same crate evaluating
//! the same rules natively (in a build with the `native-evaluators`
//! feature), and with Portcullis' Rust reference policy, interleaved call by
//! call so the machine's drift hits all alike, and prints p50/p99 and the
//! ratios. Every path starts from the message's JSON text.

use crate::config::{Config, EngineConfig, InstanceMode};
use crate::contract::Outcome;
use crate::policy::engine::PolicyEngine;
use crate::policy::fixtures::{self, Sample};
use crate::policy::module::{Hook, Policy};
use crate::util::stats::Stats;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::time::{Duration, Instant};

/// The languages measured, each an example directory in DIR.
const LANGUAGES: [&str; 3] = ["rego", "cedar", "cel"];

/// The Rust reference policy's settings: the examples' roots and allow list.
const REFERENCE_SETTINGS: &str =
    r#"{"allow": ["list_allowed_directories"], "roots": ["/srv/data"]}"#;

/// A way of judging a message: its outcome, or why it failed.
type Judge = Box<dyn Fn(&Sample) -> String>;

/// One way of judging a message, timed per call.
struct Contender {
    label: String,
    judge: Judge,
    samples: Vec<Duration>,
}

/// Runs the benchmark and prints its table.
pub fn run(dir: &Path, reference: &Path, iterations: usize) -> Result<()> {
    let engine = PolicyEngine::new(&EngineConfig::default())?;
    let mut messages = Vec::new();
    let mut contenders = Vec::new();
    for language in LANGUAGES {
        let path = dir.join(language).join("portcullis.toml");
        let config = Config::load(&path)?;
        let policy = config
            .policies
            .first()
            .with_context(|| format!("{} has no policy", path.display()))?;
        if messages.is_empty() {
            for file in &policy.fixtures {
                messages.extend(fixtures::samples(file)?);
            }
        }
        let module = policy.module.path()?;
        let wasm = fixtures::standalone(&engine, module, &policy.settings, InstanceMode::Reuse)?;
        if let Some(native) = native::judge(language, &policy.settings)? {
            contenders.push(contender(&format!("{language:<6} native"), native));
        }
        contenders.push(contender(&format!("{language:<6} wasm"), in_sandbox(wasm)));
    }
    if messages.is_empty() {
        bail!(
            "the examples in {} name no fixtures to judge",
            dir.display()
        );
    }
    let settings = serde_json::from_str(REFERENCE_SETTINGS)?;
    let rust = fixtures::standalone(&engine, reference, &settings, InstanceMode::Reuse)?;
    // The reference implements the conformance suite's rules only (no
    // deny-list or secrets check), so it is a yardstick of cost, not of
    // verdicts: the evaluators must agree among themselves.
    agree(&contenders, &messages)?;
    contenders.push(contender("rust   wasm (reference)", in_sandbox(rust)));

    let rounds = (iterations / messages.len()).max(1);
    println!(
        "policy languages: {} messages, {} calls per way of judging, interleaved; \
         every way starts from the message's JSON",
        messages.len(),
        rounds * messages.len()
    );
    for round in 0..rounds / 10 + rounds {
        for message in &messages {
            for contender in &mut contenders {
                let started = Instant::now();
                std::hint::black_box((contender.judge)(message));
                if round >= rounds / 10 {
                    contender.samples.push(started.elapsed());
                }
            }
        }
    }
    let stats: Vec<(String, Stats)> = contenders
        .iter_mut()
        .map(|c| (c.label.clone(), Stats::of(&mut c.samples)))
        .collect();
    for (label, stats) in &stats {
        println!("{}", stats.line(label));
    }
    let find = |label: &str| stats.iter().find(|(l, _)| l == label).map(|(_, s)| s);
    let reference = find("rust   wasm (reference)").expect("measured above");
    for language in LANGUAGES {
        let wasm = find(&format!("{language:<6} wasm")).expect("measured above");
        match find(&format!("{language:<6} native")) {
            Some(native) => println!(
                "  {language:<6} wasm / native      p50 {:.2}×  p99 {:.2}×",
                ratio(wasm.p50, native.p50),
                ratio(wasm.p99, native.p99)
            ),
            None => println!("  {language:<6} native: {}", native::MISSING),
        }
        println!(
            "  {language:<6} wasm / reference   p50 {:.2}×  p99 {:.2}×",
            ratio(wasm.p50, reference.p50),
            ratio(wasm.p99, reference.p99)
        );
    }
    Ok(())
}

fn contender(label: &str, judge: Judge) -> Contender {
    Contender {
        label: label.into(),
        judge,
        samples: Vec::new(),
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}

/// A component judging through the engine, as the relay has it judge.
fn in_sandbox(policy: Policy) -> Judge {
    Box::new(move |sample: &Sample| {
        let hook = Hook::for_direction(sample.exchange.direction);
        match policy
            .evaluate(hook, &sample.exchange, &sample.drift)
            .result
        {
            Ok(verdict) => outcome(&verdict.outcome).into(),
            Err(failure) => format!("failed: {failure}"),
        }
    })
}

fn outcome(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Allow => "allow",
        Outcome::Deny(_) => "deny",
        Outcome::RequireApproval(_) => "require-approval",
        Outcome::Modify(_) => "modify",
    }
}

/// Every way of judging gives every message the same outcome, or the
/// comparison means nothing.
fn agree(contenders: &[Contender], messages: &[Sample]) -> Result<()> {
    for (n, message) in messages.iter().enumerate() {
        let outcomes: Vec<String> = contenders.iter().map(|c| (c.judge)(message)).collect();
        if outcomes.iter().any(|o| o != &outcomes[0]) {
            let each: Vec<String> = contenders
                .iter()
                .zip(&outcomes)
                .map(|(c, o)| format!("{}: {o}", c.label.trim()))
                .collect();
            bail!(
                "message {} is judged differently: {}",
                n + 1,
                each.join(", ")
            );
        }
    }
    Ok(())
}

/// The same crates, evaluating the same rules outside WebAssembly.
#[cfg(feature = "native-evaluators")]
mod native {
    use super::*;
    use crate::contract::{Direction, Drifted as DriftKind, Exchange, MessageKind, ToolDrift};
    use portcullis_policy as sdk;
    use sdk::document::DocumentPolicy;
    use serde_json::Value;

    /// Shown when a language has no native evaluator (each has one here).
    pub const MISSING: &str = "no native evaluator";

    /// The native evaluator for `language` with `settings`.
    pub fn judge(language: &str, settings: &Value) -> Result<Option<Judge>> {
        let settings = settings.clone();
        let judge: Judge = match language {
            "rego" => {
                let rules: rego::Rego = parse(settings)?;
                Box::new(move |s: &Sample| verdict(&rules.judge(&document(s))))
            }
            "cedar" => {
                let rules: cedar::Cedar = parse(settings)?;
                Box::new(move |s: &Sample| verdict(&rules.judge(&document(s))))
            }
            "cel" => {
                let rules: cel::Cel = parse(settings)?;
                Box::new(move |s: &Sample| verdict(&rules.judge(&document(s))))
            }
            other => bail!("no native evaluator for {other}"),
        };
        Ok(Some(judge))
    }

    fn parse<T: serde::de::DeserializeOwned>(settings: Value) -> Result<T> {
        serde_json::from_value(settings).context("the native evaluator refused the settings")
    }

    /// The input document, built from the message's JSON text exactly as
    /// the component builds it.
    fn document(sample: &Sample) -> Value {
        let drift: Vec<sdk::ToolDrift> = sample.drift.iter().map(drifted).collect();
        sdk::document::document(&exchange(&sample.exchange), &drift)
    }

    fn verdict(verdict: &sdk::Verdict) -> String {
        match verdict.outcome {
            sdk::Outcome::Allow => "allow",
            sdk::Outcome::Deny(_) => "deny",
            sdk::Outcome::RequireApproval(_) => "require-approval",
            sdk::Outcome::Modify(_) => "modify",
        }
        .into()
    }

    fn exchange(e: &Exchange) -> sdk::Exchange {
        sdk::Exchange {
            direction: match e.direction {
                Direction::ClientToServer => sdk::Direction::ClientToServer,
                Direction::ServerToClient => sdk::Direction::ServerToClient,
            },
            kind: match e.kind {
                MessageKind::Request => sdk::MessageKind::Request,
                MessageKind::Notification => sdk::MessageKind::Notification,
                MessageKind::Result => sdk::MessageKind::Result,
                MessageKind::Error => sdk::MessageKind::Error,
            },
            server: e.server.clone(),
            agent: sdk::Agent {
                id: e.agent.id.clone(),
                attributes: e.agent.attributes.clone(),
            },
            method: e.method.clone(),
            tool: e.tool.clone(),
            annotations: e.annotations.as_ref().map(|a| sdk::ToolAnnotations {
                title: a.title.clone(),
                read_only_hint: a.read_only_hint,
                destructive_hint: a.destructive_hint,
                idempotent_hint: a.idempotent_hint,
                open_world_hint: a.open_world_hint,
            }),
            params: e.params.clone(),
            result: e.result.clone(),
        }
    }

    fn drifted(d: &ToolDrift) -> sdk::ToolDrift {
        sdk::ToolDrift {
            server: d.server.clone(),
            tool: d.tool.clone(),
            kinds: d
                .kinds
                .iter()
                .map(|k| match k {
                    DriftKind::Added => sdk::DriftKind::Added,
                    DriftKind::Removed => sdk::DriftKind::Removed,
                    DriftKind::Description => sdk::DriftKind::Description,
                    DriftKind::Schema => sdk::DriftKind::Schema,
                    DriftKind::Annotations => sdk::DriftKind::Annotations,
                    DriftKind::Escalated => sdk::DriftKind::Escalated,
                })
                .collect(),
            diff: d.diff.clone(),
        }
    }
}

/// Without the `native-evaluators` feature, only the sandboxed side runs.
#[cfg(not(feature = "native-evaluators"))]
mod native {
    use super::*;

    pub const MISSING: &str = "not in this build \
        (cargo build --release -p portcullis --features native-evaluators)";

    pub fn judge(_language: &str, _settings: &serde_json::Value) -> Result<Option<Judge>> {
        Ok(None)
    }
}
