//! CEL: judges each message with a list of CEL rules, evaluated by the `cel`
//! crate inside the component, over Portcullis' input document (`input`)
//! and the settings' `data`. It owns the rules' settings and the way their
//! results combine into a verdict; the expressions are the user's.
//!
//! Each rule has exactly one condition — `deny_if`, `require_approval_if` or
//! `tag_if` — a `reason` and `tags`. Every rule is evaluated, in order:
//! - any `deny_if` that holds denies, with the reasons and tags of all that
//!   hold;
//! - otherwise any `require_approval_if` that holds holds the call for a
//!   person, with their reasons and tags;
//! - otherwise the message is allowed, labelled with the tags of the
//!   `tag_if` rules that hold.
//!
//! A `deny_if` or `require_approval_if` that fails to evaluate, or gives
//! something other than a boolean, counts as holding, so an error never
//! allows; a `tag_if` that fails adds nothing.

use cel_interpreter::{Context, Env, Program, Value as CelValue};
use portcullis_policy::Verdict;
use portcullis_policy::document::DocumentPolicy;
use serde::Deserialize;
use serde_json::Value;
use std::cell::RefCell;
use std::sync::Arc;

/// The settings as written in the config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The rules, in order.
    rules: Vec<RuleSettings>,
    /// A value the expressions read as `data`.
    #[serde(default)]
    data: Value,
    /// Report which rules each message exercised (`portcullis test
    /// --coverage` sets it).
    #[serde(default)]
    coverage: bool,
}

/// One rule as written in the config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleSettings {
    #[serde(default)]
    deny_if: Option<String>,
    #[serde(default)]
    require_approval_if: Option<String>,
    #[serde(default)]
    tag_if: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

/// What a rule does when its condition holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Effect {
    Deny,
    RequireApproval,
    Tag,
}

struct Rule {
    label: String,
    effect: Effect,
    source: String,
    program: Program,
    reason: String,
    tags: Vec<String>,
}

/// Compiled rules, ready to judge messages.
pub struct Cel {
    rules: Vec<Rule>,
    env: Arc<Env>,
    data: CelValue,
    /// With coverage: the rules the last message exercised.
    exercised: Option<RefCell<Vec<usize>>>,
}

impl<'de> Deserialize<'de> for Cel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Cel::new(Settings::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl Cel {
    /// Compiles every rule; the first that does not compile is refused with
    /// its number.
    pub fn new(settings: Settings) -> Result<Self, String> {
        let env = Arc::new(Env::stdlib());
        let mut rules = Vec::new();
        for (n, rule) in settings.rules.into_iter().enumerate() {
            let at = format!("rule {}", n + 1);
            let conditions = [
                (Effect::Deny, rule.deny_if),
                (Effect::RequireApproval, rule.require_approval_if),
                (Effect::Tag, rule.tag_if),
            ];
            let mut given = conditions.into_iter().filter_map(|(e, c)| Some((e, c?)));
            let (Some((effect, source)), None) = (given.next(), given.next()) else {
                return Err(format!(
                    "{at}: give exactly one of deny_if, require_approval_if, tag_if"
                ));
            };
            let program = env
                .compile(&source)
                .map_err(|e| format!("{at}: {}: {e}", source.trim()))?;
            let mut label = format!("{at}: {}", rule.reason.as_deref().unwrap_or(source.trim()));
            let reason = rule
                .reason
                .unwrap_or_else(|| format!("{at} holds: {}", source.trim()));
            if label.chars().count() > 72 {
                label = label.chars().take(71).chain(['…']).collect();
            }
            rules.push(Rule {
                label,
                effect,
                source,
                program,
                reason,
                tags: rule.tags,
            });
        }
        let data = cel_interpreter::to_value(&settings.data).map_err(|e| format!("data: {e}"))?;
        let exercised = settings.coverage.then(RefCell::default);
        Ok(Cel {
            rules,
            env,
            data,
            exercised,
        })
    }
}

fn slot(effect: Effect) -> usize {
    match effect {
        Effect::Deny => 0,
        Effect::RequireApproval => 1,
        Effect::Tag => 2,
    }
}

fn reasons(held: &[(String, &Vec<String>)]) -> String {
    let reasons: Vec<&str> = held.iter().map(|(r, _)| r.as_str()).collect();
    reasons.join("; ")
}

impl DocumentPolicy for Cel {
    /// Judges the input document.
    fn judge(&self, input: &Value) -> Verdict {
        let mut context = Context::with_env(self.env.clone());
        match cel_interpreter::to_value(input) {
            Ok(input) => context.add_variable_from_value("input", input),
            Err(e) => return Verdict::deny(format!("cannot put the message to CEL: {e}")),
        }
        context.add_variable_from_value("data", self.data.clone());
        let mut held = [Vec::new(), Vec::new(), Vec::new()];
        let mut exercised = Vec::new();
        for (n, rule) in self.rules.iter().enumerate() {
            let reason = match rule.program.execute(&context) {
                Ok(CelValue::Bool(true)) => rule.reason.clone(),
                Ok(other) if rule.effect != Effect::Tag && other != CelValue::Bool(false) => {
                    format!("{} gave {other:?}, not a boolean", rule.source.trim())
                }
                Err(e) if rule.effect != Effect::Tag => {
                    format!("{} failed: {e}", rule.source.trim())
                }
                _ => continue,
            };
            held[slot(rule.effect)].push((reason, &rule.tags));
            exercised.push(n);
        }
        if let Some(cell) = &self.exercised {
            *cell.borrow_mut() = exercised;
        }
        let [denied, approval, tagged] = held;
        let (verdict, deciding) = if !denied.is_empty() {
            (Verdict::deny(reasons(&denied)), denied)
        } else if !approval.is_empty() {
            (Verdict::require_approval(reasons(&approval)), approval)
        } else {
            (Verdict::allow(), tagged)
        };
        deciding
            .iter()
            .flat_map(|(_, tags)| tags.iter())
            .fold(verdict, |v, t| v.tag(t.clone()))
    }

    /// With `coverage`: the coverage line of the last message judged (a
    /// rule counts as exercised when it held or failed).
    fn coverage(&self) -> Option<String> {
        let exercised = self.exercised.as_ref()?.borrow();
        let all: Vec<String> = self.rules.iter().map(|r| r.label.clone()).collect();
        let hit: Vec<String> = exercised.iter().map(|&n| all[n].clone()).collect();
        Some(portcullis_policy::coverage::line(&all, &hit))
    }
}

// Natively the evaluator is a library (for tests and the benchmark); built
// for WebAssembly it is the component.
#[cfg(target_arch = "wasm32")]
portcullis_policy::export_document_policy!(Cel);

#[cfg(test)]
mod tests;
