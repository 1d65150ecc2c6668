//! The input document: one message as a JSON value, in the shape the Rego,
//! Cedar and CEL evaluators (and anyone writing a policy over plain JSON)
//! read, and [`DocumentPolicy`], a policy that judges that document alone.
//! `docs/policy-languages.md` describes the document field by field.

use crate::{Exchange, Level, ToolDrift, Verdict, drift, log};
use serde_json::{Map, Value, json};

/// A policy that judges a message by its input document, with the same
/// judgement both ways (the document says which way it travels).
pub trait DocumentPolicy: serde::de::DeserializeOwned {
    /// Judges one message's document.
    fn judge(&self, input: &Value) -> Verdict;

    /// The coverage line of the last message judged, when asked for
    /// (see [`crate::coverage`]).
    fn coverage(&self) -> Option<String> {
        None
    }
}

/// Judges `exchange` with `policy`, logging its coverage line if it has one.
pub fn judge<P: DocumentPolicy>(policy: &P, exchange: &Exchange) -> Verdict {
    let verdict = policy.judge(&document(exchange, &drift()));
    if let Some(line) = policy.coverage() {
        log(Level::Debug, &line);
    }
    verdict
}

/// Exports a [`DocumentPolicy`] as the component's hooks.
#[macro_export]
macro_rules! export_document_policy {
    ($policy:ty) => {
        struct __PortcullisDocumentPolicy;

        impl $crate::Policy for __PortcullisDocumentPolicy {
            type Settings = $policy;

            fn on_request(policy: &$policy, exchange: &$crate::Exchange) -> $crate::Verdict {
                $crate::document::judge(policy, exchange)
            }

            fn on_response(policy: &$policy, exchange: &$crate::Exchange) -> $crate::Verdict {
                $crate::document::judge(policy, exchange)
            }
        }

        $crate::export!(__PortcullisDocumentPolicy);
    };
}

/// The document for `exchange`, whose tools drifted as `drift` says.
///
/// `arguments` is the `tools/call` request's `arguments` exactly as sent
/// (any JSON; `{}` when it sent none or the message is not a call);
/// `annotations` holds only the hints the server declared (`{}` when none
/// are known); `params` and `result` are `null` when absent.
pub fn document(exchange: &Exchange, drift: &[ToolDrift]) -> Value {
    let params = parse(exchange.params.as_deref());
    let arguments = match (&params, exchange.method.as_str()) {
        (Value::Object(params), "tools/call") => params.get("arguments").cloned(),
        _ => None,
    };
    json!({
        "direction": exchange.direction.as_str(),
        "kind": exchange.kind.as_str(),
        "server": exchange.server,
        "agent": {
            "id": exchange.agent.id,
            "attributes": exchange.agent.attributes.iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect::<Map<_, _>>(),
        },
        "method": exchange.method,
        "tool": exchange.tool,
        "annotations": annotations(exchange),
        "arguments": arguments.unwrap_or_else(|| Value::Object(Map::new())),
        "params": params,
        "result": parse(exchange.result.as_deref()),
        "drift": drift.iter().map(drifted).collect::<Vec<_>>(),
    })
}

fn annotations(exchange: &Exchange) -> Value {
    let mut hints = Map::new();
    if let Some(a) = &exchange.annotations {
        let mut put = |name: &str, value: Option<Value>| {
            if let Some(value) = value {
                hints.insert(name.to_string(), value);
            }
        };
        put("title", a.title.clone().map(Value::String));
        put("readOnlyHint", a.read_only_hint.map(Value::Bool));
        put("destructiveHint", a.destructive_hint.map(Value::Bool));
        put("idempotentHint", a.idempotent_hint.map(Value::Bool));
        put("openWorldHint", a.open_world_hint.map(Value::Bool));
    }
    Value::Object(hints)
}

fn drifted(drift: &ToolDrift) -> Value {
    let kinds: Vec<&str> = drift.kinds.iter().map(|k| k.as_str()).collect();
    json!({ "server": drift.server, "tool": drift.tool, "kinds": kinds, "diff": drift.diff })
}

fn parse(text: Option<&str>) -> Value {
    text.and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Agent, Direction, DriftKind, MessageKind, ToolAnnotations};

    fn call(arguments: &str) -> Exchange {
        Exchange {
            direction: Direction::ClientToServer,
            kind: MessageKind::Request,
            server: "fs".into(),
            agent: Agent {
                id: "ci-bot".into(),
                attributes: vec![("team".into(), "payments".into())],
            },
            method: "tools/call".into(),
            tool: Some("write_file".into()),
            annotations: Some(ToolAnnotations {
                title: None,
                read_only_hint: Some(false),
                destructive_hint: None,
                idempotent_hint: None,
                open_world_hint: None,
            }),
            params: Some(
                json!({ "name": "write_file", "arguments": serde_json::from_str::<Value>(arguments).unwrap() })
                    .to_string(),
            ),
            result: None,
        }
    }

    #[test]
    fn a_call_shows_its_arguments_hints_and_agent() {
        let drift = [ToolDrift {
            server: "fs".into(),
            tool: "write_file".into(),
            kinds: vec![DriftKind::Escalated],
            diff: "~ x".into(),
        }];
        let doc = document(&call(r#"{"path":"/tmp/a"}"#), &drift);
        assert_eq!(doc["arguments"], json!({"path": "/tmp/a"}));
        assert_eq!(doc["annotations"], json!({"readOnlyHint": false}));
        assert_eq!(doc["agent"]["attributes"]["team"], "payments");
        assert_eq!(doc["drift"][0]["kinds"], json!(["escalated"]));
        assert_eq!(doc["result"], Value::Null);
        assert_eq!(doc["direction"], "client-to-server");
    }

    #[test]
    fn arguments_are_shown_as_sent_even_when_not_an_object() {
        let doc = document(&call(r#"["/etc/passwd"]"#), &[]);
        assert_eq!(doc["arguments"], json!(["/etc/passwd"]));
    }

    #[test]
    fn other_methods_have_empty_arguments_and_hints() {
        let mut list = call("{}");
        list.method = "tools/list".into();
        list.tool = None;
        list.annotations = None;
        list.params = None;
        let doc = document(&list, &[]);
        assert_eq!(doc["arguments"], json!({}));
        assert_eq!(doc["annotations"], json!({}));
        assert_eq!(doc["params"], Value::Null);
        assert_eq!(doc["tool"], Value::Null);
    }
}
