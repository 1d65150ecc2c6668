//! Tool input schemas (JSON Schema) compiled once and applied to `tools/call`
//! arguments, with errors that name the offending field. Schemas never
//! fetch anything: a remote `$ref` does not resolve and the schema is not
//! used. [`Schemas`] caches the schemas servers list, by their text.

use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Schemas cached before the cache starts afresh.
const MAX_CACHED: usize = 4096;
/// Validation errors reported per call.
const MAX_ERRORS: usize = 8;

/// A compiled input schema.
pub struct Schema(jsonschema::Validator);

/// Why arguments do not fit their schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// JSON Pointer into the arguments of the first offending field (`""`
    /// for the arguments as a whole).
    pub field: String,
    /// Every problem found, each `POINTER: what is wrong`.
    pub errors: Vec<String>,
}

impl Invalid {
    /// The error message the agent reads.
    pub fn message(&self) -> String {
        let first = self.errors.first().map_or("", String::as_str);
        format!("Invalid params: arguments{first}")
    }
}

impl Schema {
    /// Compiles `schema`; the error says why it is not usable.
    pub fn compile(schema: &Value) -> Result<Self, String> {
        jsonschema::validator_for(schema)
            .map(Schema)
            .map_err(|e| e.to_string())
    }

    /// Checks `arguments` (absent arguments are checked as `{}`).
    pub fn check(&self, arguments: Option<&Value>) -> Result<(), Invalid> {
        let empty = Value::Object(Default::default());
        let arguments = arguments.unwrap_or(&empty);
        let mut errors = self.0.iter_errors(arguments).peekable();
        let Some(first) = errors.peek() else {
            return Ok(());
        };
        let field = first.instance_path().as_str().to_string();
        let errors = errors
            .take(MAX_ERRORS)
            .map(|e| format!("{}: {e}", e.instance_path().as_str()))
            .collect();
        Err(Invalid { field, errors })
    }
}

/// Schemas compiled from servers' `tools/list` results, shared by every
/// session, so a schema many agents list is compiled once.
#[derive(Default)]
pub struct Schemas {
    compiled: Mutex<HashMap<String, Option<Arc<Schema>>>>,
}

impl Schemas {
    /// The compiled form of `schema`; `None` (logged once) if it is not
    /// usable JSON Schema.
    pub fn get(&self, schema: &Value) -> Option<Arc<Schema>> {
        let text = schema.to_string();
        let mut compiled = self.compiled.lock().expect("schema cache poisoned");
        if let Some(known) = compiled.get(&text) {
            return known.clone();
        }
        let fresh = match Schema::compile(schema) {
            Ok(schema) => Some(Arc::new(schema)),
            Err(e) => {
                tracing::warn!(
                    "a listed input schema is not valid JSON Schema, so arguments are not checked against it: {e}"
                );
                None
            }
        };
        if compiled.len() >= MAX_CACHED {
            compiled.clear();
        }
        compiled.insert(text, fresh.clone());
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Schema {
        Schema::compile(&json!({
            "type": "object",
            "properties": {
                "path": {"type": "string", "minLength": 1},
                "mode": {"enum": ["r", "w"]},
                "lines": {"type": "array", "items": {"$ref": "#/$defs/line"}}
            },
            "required": ["path"],
            "additionalProperties": false,
            "$defs": {"line": {"type": "integer", "minimum": 1}}
        }))
        .unwrap()
    }

    #[test]
    fn valid_arguments_pass() {
        let ok = json!({"path": "/a", "mode": "r", "lines": [1, 2]});
        assert_eq!(schema().check(Some(&ok)), Ok(()));
    }

    #[test]
    fn errors_name_the_offending_field() {
        let bad = schema()
            .check(Some(&json!({"path": "/a", "lines": [1, 0]})))
            .unwrap_err();
        assert_eq!(bad.field, "/lines/1");
        assert!(
            bad.message()
                .starts_with("Invalid params: arguments/lines/1: 0 is less than the minimum"),
            "{}",
            bad.message()
        );

        let wrong_type = schema().check(Some(&json!({"path": 5}))).unwrap_err();
        assert_eq!(wrong_type.field, "/path");
        assert!(
            wrong_type.message().contains("5 is not of type \"string\""),
            "{}",
            wrong_type.message()
        );

        let missing = schema().check(None).unwrap_err();
        assert_eq!(missing.field, "");
        assert!(
            missing
                .message()
                .contains("\"path\" is a required property"),
            "{}",
            missing.message()
        );

        let extra = schema()
            .check(Some(&json!({"path": "/a", "force": true})))
            .unwrap_err();
        assert!(extra.message().contains("force"), "{}", extra.message());
    }

    #[test]
    fn unusable_schemas_are_not_used_and_never_fetched() {
        assert!(Schema::compile(&json!({"type": 12})).is_err());
        let remote = json!({"$ref": "https://example.com/schema.json"});
        assert!(Schema::compile(&remote).is_err());
        let cache = Schemas::default();
        assert!(cache.get(&json!({"type": 12})).is_none());
        let a = cache.get(&json!({"type": "object"})).unwrap();
        let b = cache.get(&json!({"type": "object"})).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "compiled once");
    }
}
