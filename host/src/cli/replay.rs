//! `portcullis replay`: re-judges the messages recorded in audit trails with
//! another config's policy chain, and reports which decisions would change.
//! Nothing is relayed, no MCP server is contacted, no audit record is
//! written, and the policies' store is a fresh one in memory (never the
//! deployment's Redis); registry modules are pulled as `check` pulls them.
//!
//! A record is replayed only when the trail holds what the policies saw:
//! its arguments (`audit.include_arguments`), an answer's result and its
//! request's arguments (`audit.include_results`), and for a tool call the
//! tool's annotations and drift as recorded. Answers without their results,
//! records without arguments, and decisions made at the boundary rather than
//! by a policy (rate limits, approval rules, pins) are counted and reported,
//! never guessed.

use crate::audit::RecordedAnnotations;
use crate::config::{Config, ModuleSource};
use crate::contract::{Agent, Direction, Exchange, MessageKind};
use crate::policy::chain::{Decided, Guard};
use crate::policy::engine::PolicyEngine;
use crate::registry::Sources;
use crate::surface::drift::ToolDrift;
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

/// The command's arguments.
#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// Audit trail files (JSON Lines, as the file sink writes them).
    #[arg(required = true)]
    trails: Vec<PathBuf>,
    /// The config whose policy chain judges the recorded messages.
    #[arg(long)]
    config: PathBuf,
    /// Print every changed decision, with before and after, as JSON.
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when a decision changes this way: FROM-to-TO
    /// (outcomes allow, modify, deny, hold), or `any`. Repeatable.
    #[arg(long = "fail-on", value_name = "TRANSITION", value_parser = parse_transition)]
    fail_on: Vec<String>,
}

const OUTCOMES: [&str; 4] = ["allow", "modify", "deny", "hold"];

/// The longest trail line read as a record (longer ones are counted as
/// unreadable, never held whole).
const MAX_RECORD_BYTES: u64 = 64 << 20;

fn parse_transition(text: &str) -> Result<String, String> {
    if text == "any" {
        return Ok(text.into());
    }
    match text.split_once("-to-") {
        Some((from, to)) if from != to && OUTCOMES.contains(&from) && OUTCOMES.contains(&to) => {
            Ok(text.into())
        }
        _ => Err(format!(
            "write FROM-to-TO with two different outcomes of {}, or any",
            OUTCOMES.join(", ")
        )),
    }
}

/// Runs the replay, prints the report, and returns the exit status.
pub fn run(args: &ReplayArgs) -> Result<i32> {
    let mut config = Config::load(&args.config)?;
    pull_modules(&mut config)?;
    let engine = PolicyEngine::new(&config.engine)?;
    let guard = Guard::load(&engine, &config)?;
    let mut report = Report::default();
    for trail in &args.trails {
        report.replay_file(&guard, trail)?;
    }
    if report.replayed == 0 && !args.fail_on.is_empty() {
        bail!("nothing in the trails could be replayed, so --fail-on cannot tell");
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.summary(&args.config));
    }
    let hits: Vec<&String> = args
        .fail_on
        .iter()
        .filter(|t| {
            report
                .changed
                .iter()
                .any(|c| t.as_str() == "any" || c.transition() == **t)
        })
        .collect();
    for hit in &hits {
        eprintln!("portcullis: replay: a decision changed {hit} (--fail-on)");
    }
    Ok(if hits.is_empty() { 0 } else { 1 })
}

/// Pulls the config's registry modules, as serving would.
fn pull_modules(config: &mut Config) -> Result<()> {
    if config.modules().all(|m| m.reference().is_none()) {
        return Ok(());
    }
    let sources = Sources::new(config)?;
    for module in config.modules_mut() {
        if let ModuleSource::Oci { reference, pulled } = module {
            let module = sources
                .pull(reference)
                .with_context(|| format!("cannot pull {reference}"))?;
            *pulled = Some(Box::new(module));
        }
    }
    Ok(())
}

/// One decision record of a trail, as much of it as a replay reads.
#[derive(Debug, Deserialize)]
struct Recorded {
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    id: String,
    #[serde(default)]
    time: String,
    #[serde(default)]
    agent: String,
    #[serde(default)]
    agent_attributes: BTreeMap<String, String>,
    #[serde(default)]
    server: String,
    #[serde(default)]
    direction: String,
    #[serde(default)]
    kind: String,
    method: Option<String>,
    tool: Option<String>,
    arguments_sha256: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
    #[serde(default)]
    outcome: String,
    reason: Option<String>,
    decided_by: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
    /// Set when the call went to a person (approved, refused, or run under
    /// an earlier approval).
    approval: Option<String>,
    #[serde(default)]
    drift: Vec<ToolDrift>,
    annotations: Option<RecordedAnnotations>,
    #[serde(default)]
    policies: Vec<RecordedVerdict>,
}

impl Recorded {
    /// What the policy chain decided: a call that went to a person was
    /// held, whatever the person then decided.
    fn chain_outcome(&self) -> &str {
        let asked = self.approval.is_some() || self.tags.iter().any(|t| t.starts_with("approval:"));
        if asked { "hold" } else { &self.outcome }
    }
}

#[derive(Debug, Deserialize)]
struct RecordedVerdict {
    policy: String,
}

/// Why a record was not re-judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Skipped {
    /// An answer recorded without its result (`audit.include_results`).
    Answer,
    /// Recorded without its arguments (`audit.include_arguments = false`).
    NoArguments,
    /// Refused before any policy judged it (unreadable, malformed).
    Unjudged,
    /// Decided at the boundary (a rate limit, an approval rule, a pin), not
    /// by a policy.
    Boundary,
}

impl Skipped {
    fn describe(self) -> &'static str {
        match self {
            Skipped::Answer => {
                "answers recorded without their results (audit.include_results = false)"
            }
            Skipped::NoArguments => "recorded without arguments (audit.include_arguments = false)",
            Skipped::Unjudged => "refused before any policy judged them (unreadable or malformed)",
            Skipped::Boundary => {
                "decided at the boundary, not by a policy (rate limits, approval rules, pins)"
            }
        }
    }
}

/// One side of a changed decision.
#[derive(Debug, Serialize)]
struct Side {
    outcome: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    decided_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tags: Vec<String>,
}

/// A decision the new chain makes differently.
#[derive(Debug, Serialize)]
struct Change {
    id: String,
    time: String,
    agent: String,
    server: String,
    method: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<String>,
    before: Side,
    after: Side,
}

impl Change {
    fn transition(&self) -> String {
        format!("{}-to-{}", self.before.outcome, self.after.outcome)
    }

    /// The policy behind the change: the one that now refuses or holds,
    /// else the one that used to.
    fn policy(&self) -> &str {
        let after = self.after.decided_by.as_deref();
        after.or(self.before.decided_by.as_deref()).unwrap_or("-")
    }
}

/// How the summary groups changes: a change's name in one section.
type Grouping = dyn Fn(&Change) -> String;

/// What a replay found.
#[derive(Debug, Default, Serialize)]
struct Report {
    /// Decision records read.
    records: usize,
    /// Lines that were not JSON records.
    unreadable_lines: usize,
    /// Records re-judged.
    replayed: usize,
    /// Records not re-judged, by why.
    skipped: BTreeMap<Skipped, usize>,
    /// Re-judged records whose outcome would not change but that a
    /// monitor-mode policy of the new chain would refuse or hold.
    monitored: usize,
    /// Every decision that would change.
    changed: Vec<Change>,
}

impl Report {
    fn replay_file(&mut self, guard: &Guard, path: &Path) -> Result<()> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        let mut reader = std::io::BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_RECORD_BYTES + 1)
                .read_until(b'\n', &mut line)
                .with_context(|| format!("cannot read {}", path.display()))?;
            if read == 0 {
                break;
            }
            if line.len() as u64 > MAX_RECORD_BYTES {
                // Skip the rest of an over-long line without holding it.
                while !line.ends_with(b"\n") {
                    line.clear();
                    let more = (&mut reader)
                        .take(MAX_RECORD_BYTES)
                        .read_until(b'\n', &mut line)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    if more == 0 {
                        break;
                    }
                }
                self.unreadable_lines += 1;
                continue;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Recorded>(&line) {
                Ok(record) if record.event.is_none() && !record.direction.is_empty() => {
                    self.records += 1;
                    self.replay(guard, &record);
                }
                Ok(_) => {}
                Err(_) => self.unreadable_lines += 1,
            }
        }
        Ok(())
    }

    fn replay(&mut self, guard: &Guard, record: &Recorded) {
        let mut exchange = match exchange(record) {
            Ok(exchange) => exchange,
            Err(skipped) => {
                *self.skipped.entry(skipped).or_default() += 1;
                return;
            }
        };
        self.replayed += 1;
        let drift: Vec<_> = record.drift.iter().map(ToolDrift::to_wit).collect();
        let decision = guard.decide(&mut exchange, &drift);
        let (outcome, refusal) = match &decision.outcome {
            Decided::Allow => ("allow", None),
            Decided::Modify(_) => ("modify", None),
            Decided::Deny(refusal) => ("deny", Some(refusal)),
            Decided::Hold(refusal, _) => ("hold", Some(refusal)),
        };
        let before = record.chain_outcome();
        if outcome == before {
            let would = |v: &&crate::policy::chain::PolicyVerdict| {
                !v.enforced && matches!(v.verdict, "deny" | "require-approval")
            };
            if decision.verdicts.iter().any(|v| would(&v)) {
                self.monitored += 1;
            }
            return;
        }
        self.changed.push(Change {
            id: record.id.clone(),
            time: record.time.clone(),
            agent: record.agent.clone(),
            server: record.server.clone(),
            method: exchange.method.clone(),
            tool: record.tool.clone(),
            before: Side {
                outcome: before.into(),
                decided_by: record.decided_by.clone(),
                reason: record.reason.clone(),
                tags: record.tags.clone(),
            },
            after: Side {
                outcome: outcome.into(),
                decided_by: refusal.map(|r| r.policy.to_string()),
                reason: refusal.map(|r| r.reason.clone()),
                tags: decision.tags(),
            },
        });
    }

    /// The readable report.
    fn summary(&self, config: &Path) -> String {
        let mut out = format!(
            "replayed {} of {} decisions against {}\n",
            self.replayed,
            self.records,
            config.display()
        );
        for (why, count) in &self.skipped {
            out += &format!("  not replayed: {count} {}\n", why.describe());
        }
        if self.unreadable_lines > 0 {
            out += &format!("  {} lines were not audit records\n", self.unreadable_lines);
        }
        if self.monitored > 0 {
            out += &format!(
                "  {} unchanged decisions a monitor-mode policy would refuse or hold\n",
                self.monitored
            );
        }
        out += &format!("changed: {}\n", self.changed.len());
        let count = |key: &Grouping| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for change in &self.changed {
                *counts.entry(key(change)).or_default() += 1;
            }
            counts
        };
        let sections: [(&str, &Grouping); 4] = [
            ("", &|c| c.transition().replace("-to-", " -> ")),
            ("by policy", &|c| c.policy().to_string()),
            ("by tool", &|c| {
                c.tool.clone().unwrap_or_else(|| c.method.clone())
            }),
            ("by agent", &|c| c.agent.clone()),
        ];
        for (title, key) in sections {
            if self.changed.is_empty() {
                break;
            }
            if !title.is_empty() {
                out += &format!("{title}:\n");
            }
            for (name, n) in count(key) {
                out += &format!("  {name:<40} {n}\n");
            }
        }
        out
    }
}

/// The message a record describes, as the policies saw it, or why it
/// cannot be rebuilt.
fn exchange(record: &Recorded) -> Result<Exchange, Skipped> {
    let kind = match record.kind.as_str() {
        "request" => MessageKind::Request,
        "notification" => MessageKind::Notification,
        "result" => MessageKind::Result,
        "error" => MessageKind::Error,
        _ => return Err(Skipped::Unjudged),
    };
    let answer = matches!(kind, MessageKind::Result | MessageKind::Error);
    if answer && record.result.is_none() {
        return Err(Skipped::Answer);
    }
    if record.arguments_sha256.is_some() && record.arguments.is_none() {
        return Err(Skipped::NoArguments);
    }
    let judged_by_policy = |name: &str| record.policies.iter().any(|p| p.policy == name);
    if matches!(record.outcome.as_str(), "deny" | "hold")
        && !record.decided_by.as_deref().is_some_and(judged_by_policy)
    {
        return Err(Skipped::Boundary);
    }
    let method = record.method.clone().unwrap_or_default();
    let params = match (&record.tool, &record.arguments) {
        (Some(tool), arguments) if method == "tools/call" => {
            let mut params = serde_json::Map::new();
            params.insert("name".into(), Value::String(tool.clone()));
            if let Some(arguments) = arguments {
                params.insert("arguments".into(), arguments.clone());
            }
            Some(Value::Object(params).to_string())
        }
        (_, arguments) => arguments.as_ref().map(Value::to_string),
    };
    let direction = match record.direction.as_str() {
        "server-to-client" => Direction::ServerToClient,
        _ => Direction::ClientToServer,
    };
    Ok(Exchange {
        direction,
        kind,
        server: record.server.clone(),
        agent: Agent {
            id: record.agent.clone(),
            attributes: record.agent_attributes.clone().into_iter().collect(),
        },
        method,
        tool: record.tool.clone(),
        annotations: record.annotations.as_ref().map(Into::into),
        params,
        result: record.result.as_ref().map(Value::to_string),
    })
}

#[cfg(test)]
mod tests;
