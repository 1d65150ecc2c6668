//! Cedar: judges each message with Cedar policies, evaluated by cedar-policy
//! inside the component. It owns the mapping of a message onto Cedar's
//! principal, action, resource and context, and the rules that turn Cedar's
//! answer into a verdict; the policies themselves are the user's.
//!
//! - principal: `Agent::"<agent id>"`, its identity attributes as entity
//!   attributes (strings);
//! - action: `Action::"<method>"`, e.g. `Action::"tools/call"`;
//! - resource: `Tool::"<tool>"` (a member of `Server::"<server>"`) for
//!   `tools/call` and its answer, else `Server::"<server>"`;
//! - context: `direction`, `kind`, `method`, `server`, `annotations`,
//!   `arguments` and `drift`, from the input document (JSON `null`s are
//!   left out, numbers that are not 64-bit integers become strings).
//!
//! Cedar allows only what a `permit` allows and no `forbid` forbids. A
//! denial's reason is its forbids' `@reason` annotations (or ids); when
//! every forbid that matched is annotated `@approval`, the call is held for
//! a person instead. `@tag` annotations of the deciding policies label the
//! record. A `forbid` whose condition fails to evaluate counts as matching,
//! so an error never allows.

use cedar_policy::{
    Authorizer, Context, Decision, Effect, Entities, Entity, EntityId, EntityTypeName, EntityUid,
    PolicyId, PolicySet, RestrictedExpression, Schema, ValidationMode, Validator,
};
use portcullis_policy::Verdict;
use portcullis_policy::document::DocumentPolicy;
use serde::Deserialize;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::str::FromStr;

/// The settings as written in the config.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The policies, in Cedar's syntax.
    policies: String,
    /// A Cedar schema (Cedar's syntax); when given, the policies are
    /// validated against it (strict mode) before they serve.
    #[serde(default)]
    schema: Option<String>,
    /// Report which policies each message exercised (`portcullis test
    /// --coverage` sets it).
    #[serde(default)]
    coverage: bool,
}

/// Parsed (and validated) policies, ready to judge messages.
pub struct Cedar {
    policies: PolicySet,
    authorizer: Authorizer,
    /// The schema's actions and their groups (`action in Action::"writes"`).
    actions: Vec<Entity>,
    /// With coverage: the policies that decided the last message (or failed).
    exercised: Option<RefCell<Vec<String>>>,
}

impl<'de> Deserialize<'de> for Cedar {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Cedar::new(Settings::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

impl Cedar {
    /// Parses the policies and, with a schema, validates them.
    pub fn new(settings: Settings) -> Result<Self, String> {
        let policies =
            PolicySet::from_str(&settings.policies).map_err(|e| format!("policies: {e}"))?;
        let mut actions = Vec::new();
        if let Some(schema) = settings.schema {
            let (schema, _) =
                Schema::from_cedarschema_str(&schema).map_err(|e| format!("schema: {e}"))?;
            let entities = schema
                .action_entities()
                .map_err(|e| format!("schema: {e}"))?;
            actions = entities.iter().cloned().collect();
            let result = Validator::new(schema).validate(&policies, ValidationMode::Strict);
            if !result.validation_passed() {
                let errors: Vec<String> =
                    result.validation_errors().map(|e| e.to_string()).collect();
                return Err(format!(
                    "policies do not match the schema: {}",
                    errors.join("; ")
                ));
            }
        }
        Ok(Cedar {
            policies,
            authorizer: Authorizer::new(),
            actions,
            exercised: settings.coverage.then(RefCell::default),
        })
    }

    fn effect(&self, id: &PolicyId) -> Option<Effect> {
        self.policies.policy(id).map(|p| p.effect())
    }

    /// A policy's `@id`, else the id Cedar gave it (`policy0`, …).
    fn name(&self, id: &PolicyId) -> String {
        let name = self.policies.annotation(id, "id").unwrap_or(id.as_ref());
        name.to_string()
    }

    fn reason(&self, id: &PolicyId, failed: &BTreeSet<&PolicyId>) -> String {
        let name = self.name(id);
        if failed.contains(id) {
            return format!("forbid {name} could not be evaluated");
        }
        match self.policies.annotation(id, "reason") {
            Some(reason) => reason.to_string(),
            None => format!("forbidden by {name}"),
        }
    }

    fn tagged(&self, verdict: Verdict, deciding: &BTreeSet<&PolicyId>) -> Verdict {
        deciding
            .iter()
            .filter_map(|id| self.policies.annotation(id, "tag"))
            .fold(verdict, |v, tag| v.tag(tag))
    }
}

/// The Cedar request and entities for an input document.
fn request(input: &Value, actions: &[Entity]) -> Result<(cedar_policy::Request, Entities), String> {
    let text = |key: &str| input[key].as_str().unwrap_or_default().to_string();
    let (server, method) = (text("server"), text("method"));
    let agent = uid("Agent", input["agent"]["id"].as_str().unwrap_or_default())?;
    let attributes: HashMap<String, RestrictedExpression> = input["agent"]["attributes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            Some((
                k.clone(),
                RestrictedExpression::new_string(v.as_str()?.into()),
            ))
        })
        .collect();
    let server_uid = uid("Server", &server)?;
    let mut entities = vec![
        Entity::new(agent.clone(), attributes, HashSet::new()).map_err(|e| e.to_string())?,
        Entity::new_no_attrs(server_uid.clone(), HashSet::new()),
    ];
    let resource = match input["tool"].as_str() {
        Some(tool) => {
            let tool = uid("Tool", tool)?;
            entities.push(Entity::new_no_attrs(
                tool.clone(),
                HashSet::from([server_uid]),
            ));
            tool
        }
        None => server_uid,
    };
    let mut context = Vec::new();
    for key in [
        "direction",
        "kind",
        "method",
        "server",
        "annotations",
        "arguments",
        "drift",
    ] {
        if let Some(value) = cedar_value(&input[key])? {
            context.push((key.to_string(), value));
        }
    }
    let context = Context::from_pairs(context).map_err(|e| e.to_string())?;
    let action = uid("Action", &method)?;
    let request = cedar_policy::Request::new(agent, action, resource, context, None)
        .map_err(|e| e.to_string())?;
    entities.extend(actions.iter().cloned());
    let entities = Entities::from_entities(entities, None).map_err(|e| e.to_string())?;
    Ok((request, entities))
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let kind = EntityTypeName::from_str(kind).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(kind, EntityId::new(id)))
}

/// A JSON value as a Cedar value, built directly (never through Cedar's
/// JSON form, whose `__entity` and `__extn` keys would let an argument
/// name an entity). `null`s are left out.
fn cedar_value(value: &Value) -> Result<Option<RestrictedExpression>, String> {
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => RestrictedExpression::new_long(i),
            None => RestrictedExpression::new_string(n.to_string()),
        },
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Array(items) => {
            let mut values = Vec::new();
            for item in items {
                values.extend(cedar_value(item)?);
            }
            RestrictedExpression::new_set(values)
        }
        Value::Object(fields) => {
            let mut record = Vec::new();
            for (key, item) in fields {
                if let Some(value) = cedar_value(item)? {
                    record.push((key.clone(), value));
                }
            }
            RestrictedExpression::new_record(record).map_err(|e| e.to_string())?
        }
    }))
}

impl DocumentPolicy for Cedar {
    /// Judges the input document.
    fn judge(&self, input: &Value) -> Verdict {
        let (request, entities) = match request(input, &self.actions) {
            Ok(built) => built,
            Err(e) => return Verdict::deny(format!("cannot put the message to Cedar: {e}")),
        };
        let response = self
            .authorizer
            .is_authorized(&request, &self.policies, &entities);
        let diagnostics = response.diagnostics();
        let failed: BTreeSet<&PolicyId> = diagnostics
            .errors()
            .map(|cedar_policy::AuthorizationError::PolicyEvaluationError(e)| e.policy_id())
            .filter(|id| self.effect(id) == Some(Effect::Forbid))
            .collect();
        let reasons: BTreeSet<&PolicyId> = diagnostics.reason().collect();
        if let Some(cell) = &self.exercised {
            let decided = reasons.iter().chain(&failed).map(|id| self.name(id));
            *cell.borrow_mut() = decided.collect();
        }
        if failed.is_empty() && response.decision() == Decision::Allow {
            return self.tagged(Verdict::allow(), &reasons);
        }
        let forbids: BTreeSet<&PolicyId> = reasons
            .into_iter()
            .filter(|id| self.effect(id) == Some(Effect::Forbid))
            .chain(failed.iter().copied())
            .collect();
        if forbids.is_empty() {
            return Verdict::deny("no Cedar policy permits this");
        }
        let why: Vec<String> = forbids.iter().map(|id| self.reason(id, &failed)).collect();
        let held = failed.is_empty()
            && forbids
                .iter()
                .all(|id| self.policies.annotation(id, "approval").is_some());
        let verdict = if held {
            Verdict::require_approval(why.join("; "))
        } else {
            Verdict::deny(why.join("; "))
        };
        self.tagged(verdict, &forbids)
    }

    /// With `coverage`: the coverage line of the last message judged (a
    /// policy counts as exercised when it decided or failed).
    fn coverage(&self) -> Option<String> {
        let exercised = self.exercised.as_ref()?.borrow();
        let all: Vec<String> = self
            .policies
            .policies()
            .map(|p| self.name(p.id()))
            .collect();
        Some(portcullis_policy::coverage::line(&all, &exercised))
    }
}

// Natively the evaluator is a library (for tests and the benchmark); built
// for WebAssembly it is the component.
#[cfg(target_arch = "wasm32")]
portcullis_policy::export_document_policy!(Cedar);

#[cfg(test)]
mod tests;
