//! The CEL component's rules, natively.

use super::*;
use portcullis_policy::Outcome;
use serde_json::json;

fn cel(settings: Value) -> Result<Cel, String> {
    Cel::new(serde_json::from_value(settings).map_err(|e| e.to_string())?)
}

fn call(tool: &str, annotations: Value, arguments: Value) -> Value {
    json!({
        "direction": "client-to-server", "kind": "request", "server": "fs",
        "agent": {"id": "ci-bot", "attributes": {}}, "method": "tools/call", "tool": tool,
        "annotations": annotations, "arguments": arguments,
        "params": {"name": tool, "arguments": arguments}, "result": null, "drift": [],
    })
}

fn guard() -> Cel {
    cel(json!({
        "data": {"roots": ["/srv/"]},
        "rules": [
            {"deny_if": "input.method == 'tools/call' && !input.annotations.readOnlyHint",
             "reason": "not read-only", "tags": ["write-refused"]},
            {"deny_if": "has(input.arguments.path) && !data.roots.exists(r, input.arguments.path.startsWith(r))",
             "reason": "outside the roots", "tags": ["bad-arguments"]},
            {"require_approval_if": "input.tool == 'delete'", "reason": "needs a person"},
            {"tag_if": "input.method == 'tools/call'", "tags": ["checked"]},
        ],
    }))
    .unwrap()
}

#[test]
fn deny_approval_and_tag_rules_combine() {
    let cel = guard();
    let read = cel.judge(&call(
        "read",
        json!({"readOnlyHint": true}),
        json!({"path": "/srv/a"}),
    ));
    assert_eq!(
        (read.outcome, read.tags),
        (Outcome::Allow, vec!["checked".to_string()])
    );
    let write = cel.judge(&call("write", json!({"readOnlyHint": false}), json!({})));
    assert!(matches!(write.outcome, Outcome::Deny(d) if d.reason == "not read-only"));
    assert_eq!(write.tags, ["write-refused"]);
    let outside = cel.judge(&call(
        "read",
        json!({"readOnlyHint": true}),
        json!({"path": "/etc/x"}),
    ));
    assert!(matches!(outside.outcome, Outcome::Deny(d) if d.reason == "outside the roots"));
    let delete = cel.judge(&call("delete", json!({"readOnlyHint": true}), json!({})));
    assert_eq!(
        delete.outcome,
        Outcome::RequireApproval("needs a person".into())
    );
}

#[test]
fn a_deny_rule_that_fails_denies() {
    let cel = guard();
    // No readOnlyHint: the first rule cannot evaluate.
    let v = cel.judge(&call("mystery", json!({}), json!({})));
    assert!(matches!(v.outcome, Outcome::Deny(d) if d.reason.contains("failed")));
    let v = cel.judge(&call(
        "x",
        json!({"readOnlyHint": true}),
        json!(["not", "an", "object"]),
    ));
    assert!(matches!(v.outcome, Outcome::Deny(_)));
}

#[test]
fn a_rule_that_is_not_boolean_denies() {
    let cel = cel(json!({"rules": [{"deny_if": "input.tool"}]})).unwrap();
    let v = cel.judge(&call("x", json!({}), json!({})));
    assert!(matches!(v.outcome, Outcome::Deny(d) if d.reason.contains("not a boolean")));
}

#[test]
fn bad_rules_are_refused_at_configure() {
    let err = |s| cel(s).err().unwrap();
    assert!(err(json!({"rules": [{"deny_if": "input.tool =="}]})).starts_with("rule 1:"));
    assert!(err(json!({"rules": [{"deny_if": "true", "tag_if": "true"}]})).contains("exactly one"));
    assert!(err(json!({"rules": [{"reason": "x"}]})).contains("exactly one"));
    assert!(err(json!({"rules": [{"deny": "true"}]})).contains("unknown field"));
}

#[test]
fn coverage_names_the_rules_a_message_exercised() {
    let cel = cel(json!({
        "coverage": true,
        "rules": [
            {"deny_if": "input.tool == 'write'", "reason": "no writes"},
            {"deny_if": "input.arguments.missing == 1", "reason": "fails without the key"},
            {"tag_if": "true", "tags": ["seen"]},
        ],
    }))
    .unwrap();
    cel.judge(&call("write", json!({}), json!({})));
    let line: Value =
        serde_json::from_str(cel.coverage().unwrap().strip_prefix("coverage ").unwrap()).unwrap();
    assert_eq!(line["all"].as_array().unwrap().len(), 3);
    assert_eq!(
        line["hit"],
        json!([
            "rule 1: no writes",
            "rule 2: fails without the key",
            "rule 3: true"
        ])
    );
    assert!(guard().coverage().is_none(), "only when asked");
}
