//! The Cedar component's mapping and verdict rules, natively.

use super::*;
use portcullis_policy::Outcome;
use serde_json::json;

fn cedar(policies: &str) -> Result<Cedar, String> {
    Cedar::new(serde_json::from_value(json!({ "policies": policies })).unwrap())
}

fn call(tool: &str, read_only: bool, arguments: Value) -> Value {
    json!({
        "direction": "client-to-server", "kind": "request", "server": "fs",
        "agent": {"id": "ci-bot", "attributes": {"team": "payments"}}, "method": "tools/call",
        "tool": tool, "annotations": {"readOnlyHint": read_only}, "arguments": arguments,
        "params": {"name": tool, "arguments": arguments}, "result": null, "drift": [],
    })
}

const GUARD: &str = r#"
@tag("checked")
permit (principal, action == Action::"tools/call", resource in Server::"fs")
when { principal.team == "payments" };

@id("read-only") @tag("write-refused") @reason("tool is not declared read-only")
forbid (principal, action == Action::"tools/call", resource)
unless { context.annotations has readOnlyHint && context.annotations.readOnlyHint };

@approval @reason("deleting needs a person")
forbid (principal, action, resource == Tool::"delete");

@reason("path outside /srv")
forbid (principal, action, resource)
when { context.arguments has path && !(context.arguments.path like "/srv/*") };
"#;

fn outcome(cedar: &Cedar, input: Value) -> (Outcome, Vec<String>) {
    let v = cedar.judge(&input);
    (v.outcome, v.tags)
}

#[test]
fn permits_forbids_approvals_and_tags() {
    let cedar = cedar(GUARD).unwrap();
    assert_eq!(
        outcome(&cedar, call("read", true, json!({"path": "/srv/a"}))),
        (Outcome::Allow, vec!["checked".to_string()])
    );
    let (write, tags) = outcome(&cedar, call("write", false, json!({})));
    assert!(matches!(write, Outcome::Deny(d) if d.reason == "tool is not declared read-only"));
    assert_eq!(tags, ["write-refused"]);
    assert_eq!(
        outcome(&cedar, call("delete", true, json!({}))).0,
        Outcome::RequireApproval("deleting needs a person".into())
    );
    assert!(matches!(
        outcome(&cedar, call("read", true, json!({"path": "/etc/passwd"}))).0,
        Outcome::Deny(d) if d.reason == "path outside /srv"
    ));
}

#[test]
fn nothing_permitted_is_denied() {
    let cedar = cedar(GUARD).unwrap();
    let mut other = call("read", true, json!({}));
    other["agent"]["attributes"] = json!({});
    assert!(matches!(outcome(&cedar, other).0,
        Outcome::Deny(d) if d.reason == "no Cedar policy permits this"));
}

#[test]
fn a_forbid_that_errors_denies() {
    let cedar = cedar(GUARD).unwrap();
    // `like` on a number is a type error inside the path forbid.
    let (o, _) = outcome(&cedar, call("read", true, json!({"path": 7})));
    assert!(matches!(o, Outcome::Deny(d) if d.reason.contains("could not be evaluated")),);
}

#[test]
fn an_argument_cannot_name_an_entity() {
    let policies = r#"permit (principal, action, resource);
        forbid (principal, action, resource) unless { context.arguments.who == Agent::"admin" };"#;
    let cedar = cedar(policies).unwrap();
    let forged = call(
        "x",
        true,
        json!({"who": {"__entity": {"type": "Agent", "id": "admin"}}}),
    );
    assert!(matches!(outcome(&cedar, forged).0, Outcome::Deny(_)));
}

#[test]
fn nulls_are_left_out_and_big_numbers_become_strings() {
    let policies = r#"permit (principal, action, resource)
        when { !(context.arguments has gone) && context.arguments.big == "18446744073709551615" };"#;
    let cedar = cedar(policies).unwrap();
    let input = call(
        "x",
        true,
        json!({"gone": null, "big": 18446744073709551615u64}),
    );
    assert_eq!(outcome(&cedar, input).0, Outcome::Allow);
}

#[test]
fn bad_policies_and_schema_mismatches_are_refused_at_configure() {
    assert!(
        cedar("permit (principal, action, resource")
            .err()
            .unwrap()
            .starts_with("policies:")
    );
    let schema = include_str!("../mcp.cedarschema");
    let settings = |policies: &str| json!({ "policies": policies, "schema": schema });
    let ok = r#"forbid (principal, action == Action::"tools/call", resource)
        unless { context.annotations has readOnlyHint && context.annotations.readOnlyHint };"#;
    assert!(Cedar::new(serde_json::from_value(settings(ok)).unwrap()).is_ok());
    let typo = r#"forbid (principal, action == Action::"tools/call", resource)
        unless { context.annotatons has readOnlyHint };"#;
    let err = Cedar::new(serde_json::from_value(settings(typo)).unwrap())
        .err()
        .unwrap();
    assert!(err.contains("do not match the schema"), "{err}");
}

#[test]
fn coverage_names_the_policies_that_decided() {
    let settings = json!({ "policies": GUARD, "coverage": true });
    let cedar = Cedar::new(serde_json::from_value(settings).unwrap()).unwrap();
    cedar.judge(&call("write", false, json!({})));
    let line = cedar.coverage().unwrap();
    let line: Value = serde_json::from_str(line.strip_prefix("coverage ").unwrap()).unwrap();
    assert_eq!(line["all"].as_array().unwrap().len(), 4);
    assert_eq!(line["hit"], json!(["read-only"]));
}

#[test]
fn action_groups_of_the_schema_apply() {
    let schema = r#"
        entity Agent; entity Server; entity Tool in [Server];
        action writes;
        action "tools/call" in [writes] appliesTo { principal: Agent, resource: Tool, context: {} };
    "#;
    let policies = r#"permit (principal, action, resource);
        @reason("writes are off") forbid (principal, action in Action::"writes", resource);"#;
    let settings = json!({ "policies": policies, "schema": schema });
    let cedar = Cedar::new(serde_json::from_value(settings).unwrap()).unwrap();
    let (o, _) = outcome(&cedar, call("write", false, json!({})));
    assert!(matches!(o, Outcome::Deny(d) if d.reason == "writes are off"));
}
