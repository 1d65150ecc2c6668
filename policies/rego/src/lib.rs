//! Rego: judges each message with Rego modules, evaluated by regorus inside
//! the component, over Portcullis' input document (`input`) and the
//! settings' `data`. It owns the settings' meaning and the rules that turn
//! a query's value into a verdict; the modules themselves are the user's.
//!
//! The query's value decides:
//! - a set or array: empty allows; otherwise it lists the reasons to deny;
//! - a boolean: `true` allows, `false` denies — unless the query ends in
//!   `.deny`, where `true` denies;
//! - an object (e.g. `data.mcp`, the whole package): `deny` holding denies
//!   (a non-empty set of reasons, or `true` from a `deny if …` rule, or any
//!   other value); an `allow` present and not `true` denies;
//!   `require_approval` holding holds the call for a person; `modify`
//!   replaces the payload; `tags` label the record whatever the outcome;
//! - undefined: denies, so a typo never allows; a string or number denies
//!   with it as the reason.

use portcullis_policy::Verdict;
use portcullis_policy::document::DocumentPolicy;
use serde::Deserialize;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// The settings as written in the config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// One module's text.
    #[serde(default)]
    policy: Option<String>,
    /// Several modules, by name (the name shows in errors).
    #[serde(default)]
    modules: BTreeMap<String, String>,
    /// The query whose value decides.
    #[serde(default = "default_query")]
    query: String,
    /// The `data` document the modules read besides `input`.
    #[serde(default)]
    data: Option<Value>,
    /// Report which lines each message ran (`portcullis test --coverage`
    /// sets it).
    #[serde(default)]
    coverage: bool,
}

fn default_query() -> String {
    "data.mcp".into()
}

/// Compiled modules and the query, ready to judge messages.
pub struct Rego {
    engine: RefCell<regorus::Engine>,
    query: String,
    coverage: bool,
}

impl<'de> Deserialize<'de> for Rego {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Rego::new(Settings::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl Rego {
    /// Parses the modules, loads `data` and checks that the query names a
    /// package some module defines.
    pub fn new(settings: Settings) -> Result<Self, String> {
        let mut engine = regorus::Engine::new();
        let mut modules = settings.modules;
        if let Some(policy) = settings.policy {
            modules.insert("policy.rego".into(), policy);
        }
        if modules.is_empty() {
            return Err("give the Rego text in `policy` or `modules`".into());
        }
        for (name, text) in modules {
            engine
                .add_policy(name.clone(), text)
                .map_err(|e| format!("{name}: {e}"))?;
        }
        if let Some(data) = settings.data {
            if !data.is_object() {
                return Err("data must be a table".into());
            }
            engine
                .add_data(rego_value(&data))
                .map_err(|e| format!("data: {e}"))?;
        }
        let packages = engine.get_packages().map_err(|e| e.to_string())?;
        let query = settings.query;
        if !packages
            .iter()
            .any(|p| query == *p || query.starts_with(&format!("{p}.")))
        {
            return Err(format!(
                "query '{query}' names no package the modules define ({})",
                packages.join(", ")
            ));
        }
        engine.set_enable_coverage(settings.coverage);
        Ok(Rego {
            engine: RefCell::new(engine),
            query,
            coverage: settings.coverage,
        })
    }
}

/// A JSON value as a Rego value, built member by member: regorus' own
/// conversion reads serde's private number marker (an object whose key is
/// `$serde_json::private::Number`) as a number, and turns the whole input
/// undefined when that fails, which an argument must never be able to do.
fn rego_value(value: &Value) -> regorus::Value {
    match value {
        Value::Null => regorus::Value::Null,
        Value::Bool(b) => regorus::Value::from(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => regorus::Value::from(i),
            (None, Some(u)) => regorus::Value::from(u),
            _ => regorus::Value::from(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => regorus::Value::from(s.as_str()),
        Value::Array(items) => {
            regorus::Value::from(items.iter().map(rego_value).collect::<Vec<_>>())
        }
        Value::Object(fields) => regorus::Value::from(
            fields
                .iter()
                .map(|(k, v)| (regorus::Value::from(k.as_str()), rego_value(v)))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

/// The verdict a query's value stands for (the rules in the top comment).
fn verdict(query: &str, value: &Value) -> Verdict {
    let denies_when_true = query.ends_with(".deny");
    match value {
        Value::Bool(b) if *b == denies_when_true => Verdict::deny(format!("{query} is {b}")),
        Value::Bool(_) => Verdict::allow(),
        Value::Null => Verdict::deny(format!("{query} is null")),
        Value::Object(decision) => {
            let verdict = if let Some(reasons) = holding(query, decision, "deny") {
                Verdict::deny(reasons)
            } else if let Some(allow) = decision.get("allow").filter(|a| **a != Value::Bool(true)) {
                Verdict::deny(format!("{query}.allow is {allow}"))
            } else if let Some(reasons) = holding(query, decision, "require_approval") {
                Verdict::require_approval(reasons)
            } else if let Some(payload) = decision.get("modify").filter(|m| !m.is_null()) {
                Verdict::modify(payload)
            } else {
                Verdict::allow()
            };
            let tags = decision.get("tags").and_then(Value::as_array);
            tags.into_iter()
                .flatten()
                .fold(verdict, |v, t| v.tag(text(t)))
        }
        reasons => match holding_value(query, reasons) {
            Some(reasons) => Verdict::deny(reasons),
            None => Verdict::allow(),
        },
    }
}

/// The reasons `decision[key]` gives, if it holds.
fn holding(query: &str, decision: &serde_json::Map<String, Value>, key: &str) -> Option<String> {
    holding_value(&format!("{query}.{key}"), decision.get(key)?)
}

/// Whether a rule's value holds, and its reasons: a non-empty set or array
/// holds with its elements as reasons; `true`, a string or any other value
/// holds too (a `deny if …` rule is `true`); only an empty set or array,
/// `false` and `null` do not.
fn holding_value(name: &str, value: &Value) -> Option<String> {
    match value {
        Value::Array(reasons) if reasons.is_empty() => None,
        Value::Array(reasons) => Some(joined(reasons)),
        Value::Bool(false) | Value::Null => None,
        Value::Bool(true) => Some(format!("{name} is true")),
        other => Some(text(other)),
    }
}

fn joined(reasons: &[Value]) -> String {
    reasons.iter().map(text).collect::<Vec<_>>().join("; ")
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl DocumentPolicy for Rego {
    /// Judges the input document.
    fn judge(&self, input: &Value) -> Verdict {
        let mut engine = self.engine.borrow_mut();
        if self.coverage {
            engine.clear_coverage_data();
        }
        engine.set_input(rego_value(input));
        let value = match engine.eval_query(self.query.clone(), false) {
            Ok(results) => results
                .result
                .into_iter()
                .next()
                .and_then(|r| r.expressions.into_iter().next())
                .map(|e| e.value),
            Err(e) => return Verdict::deny(format!("{} failed: {e}", self.query)),
        };
        let value = match value.map(|v| v.to_json_str()) {
            None => return Verdict::deny(format!("{} is undefined", self.query)),
            Some(Err(e)) => {
                return Verdict::deny(format!("{} gave no JSON value: {e}", self.query));
            }
            Some(Ok(text)) => match serde_json::from_str(&text) {
                Ok(value) => value,
                Err(e) => return Verdict::deny(format!("{} gave no JSON value: {e}", self.query)),
            },
        };
        verdict(&self.query, &value)
    }

    /// With `coverage`: the coverage line of the last message judged, by
    /// module line (`name:line`).
    fn coverage(&self) -> Option<String> {
        if !self.coverage {
            return None;
        }
        let report = self.engine.borrow().get_coverage_report().ok()?;
        let (mut all, mut hit) = (Vec::new(), Vec::new());
        for file in &report.files {
            let mut lines: Vec<(u32, bool)> = file.covered.iter().map(|l| (*l, true)).collect();
            lines.extend(file.not_covered.iter().map(|l| (*l, false)));
            lines.sort_unstable();
            for (line, covered) in lines {
                let name = format!("{}:{line}", file.path);
                if covered {
                    hit.push(name.clone());
                }
                all.push(name);
            }
        }
        Some(portcullis_policy::coverage::line(&all, &hit))
    }
}

// Natively the evaluator is a library (for tests and the benchmark); built
// for WebAssembly it is the component.
#[cfg(target_arch = "wasm32")]
portcullis_policy::export_document_policy!(Rego);

#[cfg(test)]
mod tests;
