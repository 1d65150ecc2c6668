//! Response redaction: masks secrets (cloud keys, private keys, tokens) in
//! every string of a result before the agent sees it, as `[REDACTED:<kind>]`.

use portcullis_policy::{Exchange, MessageKind, Policy, Value, Verdict, secrets};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {}

/// Redacts every string inside `value`; true if anything changed.
fn redact(value: &mut Value) -> bool {
    match value {
        Value::String(text) => match secrets::redact(text) {
            Some(clean) => {
                *text = clean;
                true
            }
            None => false,
        },
        Value::Array(items) => items
            .iter_mut()
            .fold(false, |changed, v| redact(v) | changed),
        Value::Object(fields) => fields
            .values_mut()
            .fold(false, |changed, v| redact(v) | changed),
        _ => false,
    }
}

struct RedactSecrets;

impl Policy for RedactSecrets {
    type Settings = Settings;

    fn on_response(_: &Settings, exchange: &Exchange) -> Verdict {
        if exchange.kind != MessageKind::Result {
            return Verdict::allow();
        }
        let Some(mut result) = exchange.result_json() else {
            return Verdict::allow();
        };
        if redact(&mut result) {
            Verdict::modify(&result).tag("redacted")
        } else {
            Verdict::allow()
        }
    }
}

portcullis_policy::export!(RedactSecrets);
