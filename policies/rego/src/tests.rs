//! The Rego component's rules for turning values into verdicts, natively.

use super::*;
use portcullis_policy::Outcome;
use serde_json::json;

fn rego(settings: Value) -> Result<Rego, String> {
    Rego::new(serde_json::from_value(settings).map_err(|e| e.to_string())?)
}

fn call(tool: &str, read_only: bool, arguments: Value) -> Value {
    json!({
        "direction": "client-to-server", "kind": "request", "server": "fs",
        "agent": {"id": "ci-bot", "attributes": {}}, "method": "tools/call", "tool": tool,
        "annotations": {"readOnlyHint": read_only}, "arguments": arguments,
        "params": {"name": tool, "arguments": arguments}, "result": null, "drift": [],
    })
}

const GUARD: &str = r#"
package mcp

deny contains sprintf("tool '%s' is not declared read-only", [input.tool]) if {
    input.method == "tools/call"
    not input.annotations.readOnlyHint
}

require_approval contains "deleting needs a person" if input.tool == "delete"

tags contains "checked" if count(deny) == 0
"#;

#[test]
fn a_package_decides_with_deny_approval_and_tags() {
    let rego = rego(json!({ "policy": GUARD })).unwrap();
    let read = rego.judge(&call("read", true, json!({})));
    assert_eq!(read.outcome, Outcome::Allow);
    assert_eq!(read.tags, ["checked"]);
    let write = rego.judge(&call("write", false, json!({})));
    match write.outcome {
        Outcome::Deny(d) => assert_eq!(d.reason, "tool 'write' is not declared read-only"),
        other => panic!("{other:?}"),
    }
    assert!(write.tags.is_empty());
    let delete = rego.judge(&call("delete", true, json!({})));
    assert_eq!(
        delete.outcome,
        Outcome::RequireApproval("deleting needs a person".into())
    );
}

#[test]
fn a_deny_set_query_with_no_reasons_allows() {
    let rego = rego(json!({ "policy": GUARD, "query": "data.mcp.deny" })).unwrap();
    assert_eq!(
        rego.judge(&call("read", true, json!({}))).outcome,
        Outcome::Allow
    );
    assert!(matches!(
        rego.judge(&call("w", false, json!({}))).outcome,
        Outcome::Deny(_)
    ));
}

#[test]
fn a_boolean_allow_rule_decides() {
    let policy = "package mcp\ndefault allow := false\nallow if input.agent.id == data.trusted";
    let rego =
        rego(json!({ "policy": policy, "query": "data.mcp.allow", "data": {"trusted": "ci-bot"} }))
            .unwrap();
    assert_eq!(
        rego.judge(&call("x", false, json!({}))).outcome,
        Outcome::Allow
    );
    let mut other = call("x", false, json!({}));
    other["agent"]["id"] = json!("intruder");
    match rego.judge(&other).outcome {
        Outcome::Deny(d) => assert_eq!(d.reason, "data.mcp.allow is false"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_undefined_query_denies() {
    let policy = "package mcp\nallow if input.tool == \"x\"";
    let rego = rego(json!({ "policy": policy, "query": "data.mcp.allow" })).unwrap();
    match rego.judge(&call("y", true, json!({}))).outcome {
        Outcome::Deny(d) => assert_eq!(d.reason, "data.mcp.allow is undefined"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn modify_replaces_the_payload() {
    let policy = "package mcp\nmodify := object.union(object.remove(input.params, [\"arguments\"]), {\"arguments\": {}}) if input.tool == \"x\"";
    let rego = rego(json!({ "policy": policy })).unwrap();
    match rego.judge(&call("x", true, json!({"secret": "s"}))).outcome {
        Outcome::Modify(payload) => {
            assert_eq!(
                serde_json::from_str::<Value>(&payload).unwrap(),
                json!({"name": "x", "arguments": {}})
            )
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_text_a_missing_package_and_bad_data_are_refused_at_configure() {
    let err = |s| rego(s).err().unwrap();
    assert!(err(json!({ "policy": "package mcp\ndeny contains x if {" })).contains("policy.rego"));
    assert!(err(json!({ "policy": GUARD, "query": "data.mpc.deny" })).contains("names no package"));
    assert!(err(json!({ "policy": GUARD, "data": [1] })).contains("data must be a table"));
    assert!(err(json!({})).contains("policy"));
    assert!(err(json!({ "policy": GUARD, "polcy": 1 })).contains("unknown field"));
}

#[test]
fn several_modules_share_packages() {
    let lib = "package lib\nwrites := {\"write_file\", \"move_file\"}";
    let main = "package mcp\nimport data.lib\ndeny contains \"write\" if lib.writes[input.tool]";
    let rego = rego(json!({ "modules": { "lib.rego": lib, "main.rego": main } })).unwrap();
    assert!(matches!(
        rego.judge(&call("move_file", true, json!({}))).outcome,
        Outcome::Deny(_)
    ));
}

#[test]
fn coverage_names_the_lines_a_message_ran() {
    let rego = rego(json!({ "policy": GUARD, "coverage": true })).unwrap();
    let mut list = call("write", false, json!({}));
    list["method"] = json!("tools/list");
    rego.judge(&list);
    let line = rego.coverage().unwrap();
    let line: Value = serde_json::from_str(line.strip_prefix("coverage ").unwrap()).unwrap();
    let (all, hit) = (
        line["all"].as_array().unwrap(),
        line["hit"].as_array().unwrap(),
    );
    assert!(!hit.is_empty() && hit.len() < all.len(), "{line}");
    assert!(
        hit.iter()
            .all(|h| all.contains(h) && h.as_str().unwrap().starts_with("policy.rego:"))
    );
}

#[test]
fn an_argument_cannot_turn_the_input_undefined() {
    // regorus' own conversion reads this key as serde's private number marker.
    let rego = rego(json!({ "policy": GUARD })).unwrap();
    let forged = call(
        "write",
        false,
        json!({"z": {"$serde_json::private::Number": "x"}}),
    );
    assert!(matches!(rego.judge(&forged).outcome, Outcome::Deny(_)));
    let policy = "package mcp\ndeny contains \"number\" if is_number(input.arguments.z)";
    let rego = rego_with(policy);
    let numeric = call(
        "x",
        true,
        json!({"z": {"$serde_json::private::Number": "1"}}),
    );
    assert_eq!(
        rego.judge(&numeric).outcome,
        Outcome::Allow,
        "an object stays an object"
    );
}

fn rego_with(policy: &str) -> Rego {
    rego(json!({ "policy": policy })).unwrap()
}

#[test]
fn rules_of_any_shape_that_hold_deny() {
    let deny_if = rego_with("package mcp\ndeny if input.tool == \"x\"");
    match deny_if.judge(&call("x", true, json!({}))).outcome {
        Outcome::Deny(d) => assert_eq!(d.reason, "data.mcp.deny is true"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        deny_if.judge(&call("y", true, json!({}))).outcome,
        Outcome::Allow
    );
    let message = rego_with("package mcp\ndeny := \"no\" if input.tool == \"x\"");
    assert!(
        matches!(message.judge(&call("x", true, json!({}))).outcome, Outcome::Deny(d) if d.reason == "no")
    );
    let approval = rego_with("package mcp\nrequire_approval if input.tool == \"x\"");
    assert!(matches!(
        approval.judge(&call("x", true, json!({}))).outcome,
        Outcome::RequireApproval(_)
    ));
    let allow = rego_with("package mcp\nallow := \"yes\"");
    assert!(
        matches!(
            allow.judge(&call("x", true, json!({}))).outcome,
            Outcome::Deny(_)
        ),
        "allow must be true"
    );
}

#[test]
fn a_boolean_deny_query_denies_when_true() {
    let policy = "package mcp\ndefault deny := false\ndeny if input.tool == \"x\"";
    let rego = rego(json!({ "policy": policy, "query": "data.mcp.deny" })).unwrap();
    assert!(matches!(
        rego.judge(&call("x", true, json!({}))).outcome,
        Outcome::Deny(_)
    ));
    assert_eq!(
        rego.judge(&call("y", true, json!({}))).outcome,
        Outcome::Allow
    );
}
