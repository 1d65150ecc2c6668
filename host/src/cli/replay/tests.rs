//! Rebuilding messages from records, and what cannot be rebuilt.

use super::*;
use serde_json::json;

fn record(value: Value) -> Recorded {
    serde_json::from_value(value).unwrap()
}

fn call(extra: Value) -> Value {
    let mut base = json!({
        "id": "r1", "time": "t", "agent": "ci-bot", "agent_attributes": {"team": "qa"},
        "server": "fs", "direction": "client-to-server", "kind": "request",
        "method": "tools/call", "tool": "write_file", "arguments_sha256": "ab",
        "arguments": {"path": "/tmp/x"}, "outcome": "allow",
        "annotations": {"readOnlyHint": false, "title": "Write"}, "policies": [],
    });
    base.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    base
}

#[test]
fn a_tool_call_is_rebuilt_with_its_arguments_annotations_and_agent() {
    let exchange = exchange(&record(call(json!({})))).unwrap();
    assert_eq!(exchange.method, "tools/call");
    assert_eq!(
        serde_json::from_str::<Value>(exchange.params.as_deref().unwrap()).unwrap(),
        json!({"name": "write_file", "arguments": {"path": "/tmp/x"}})
    );
    let annotations = exchange.annotations.unwrap();
    assert_eq!(annotations.read_only_hint, Some(false));
    assert_eq!(annotations.title.as_deref(), Some("Write"));
    assert_eq!(
        exchange.agent.attributes,
        [("team".to_string(), "qa".to_string())]
    );
    assert_eq!(exchange.kind, MessageKind::Request);
}

#[test]
fn other_requests_get_their_params_back() {
    let read =
        call(json!({"method": "resources/read", "tool": null, "arguments": {"uri": "file:///a"}}));
    let exchange = exchange(&record(read)).unwrap();
    assert_eq!(exchange.params.as_deref(), Some(r#"{"uri":"file:///a"}"#));
    let ping =
        call(json!({"method": "ping", "tool": null, "arguments": null, "arguments_sha256": null}));
    assert_eq!(exchange_of(ping).params, None);
}

fn exchange_of(value: Value) -> Exchange {
    exchange(&record(value)).unwrap()
}

#[test]
fn what_the_trail_does_not_hold_is_skipped_never_guessed() {
    let skipped = |extra: Value| exchange(&record(call(extra))).err();
    assert_eq!(
        skipped(json!({"arguments": null})),
        Some(Skipped::NoArguments)
    );
    assert_eq!(skipped(json!({"kind": "result"})), Some(Skipped::Answer));
    let answer = exchange_of(call(
        json!({"kind": "result", "direction": "server-to-client",
                                         "result": {"content": []}}),
    ));
    assert_eq!(answer.kind, MessageKind::Result);
    assert_eq!(answer.result.as_deref(), Some(r#"{"content":[]}"#));
    assert!(
        answer
            .params
            .unwrap()
            .contains(r#""arguments":{"path":"/tmp/x"}"#)
    );
    assert_eq!(skipped(json!({"kind": "invalid"})), Some(Skipped::Unjudged));
    // Refused by a rate limit: no policy decided it.
    let limited = json!({"outcome": "deny", "decided_by": "rate-limit", "policies": []});
    assert_eq!(skipped(limited), Some(Skipped::Boundary));
    let by_policy =
        json!({"outcome": "deny", "decided_by": "guard", "policies": [{"policy": "guard"}]});
    assert_eq!(skipped(by_policy), None);
}

#[test]
fn transitions_are_checked() {
    assert_eq!(
        parse_transition("deny-to-allow").as_deref(),
        Ok("deny-to-allow")
    );
    assert_eq!(parse_transition("any").as_deref(), Ok("any"));
    assert!(parse_transition("deny-to-deny").is_err());
    assert!(parse_transition("allowed-to-deny").is_err());
    assert!(parse_transition("deny").is_err());
}

#[test]
fn the_summary_counts_changes_by_transition_policy_tool_and_agent() {
    let side = |outcome: &str, by: Option<&str>| Side {
        outcome: outcome.into(),
        decided_by: by.map(Into::into),
        reason: None,
        tags: Vec::new(),
    };
    let change = |tool: &str, before: Side, after: Side| Change {
        id: "r".into(),
        time: "t".into(),
        agent: "ci-bot".into(),
        server: "fs".into(),
        method: "tools/call".into(),
        tool: Some(tool.into()),
        before,
        after,
    };
    let mut report = Report {
        records: 5,
        replayed: 3,
        ..Report::default()
    };
    report.skipped.insert(Skipped::Answer, 2);
    report.changed.push(change(
        "write_file",
        side("allow", None),
        side("deny", Some("rego")),
    ));
    report.changed.push(change(
        "move_file",
        side("allow", None),
        side("deny", Some("rego")),
    ));
    report.changed.push(change(
        "read",
        side("deny", Some("old")),
        side("allow", None),
    ));
    let text = report.summary(Path::new("new.toml"));
    assert!(
        text.starts_with("replayed 3 of 5 decisions against new.toml\n"),
        "{text}"
    );
    assert!(text.contains("not replayed: 2 answers"), "{text}");
    assert!(text.contains("changed: 3\n"), "{text}");
    let line = |name: &str, n: usize| format!("  {name:<40} {n}\n");
    assert!(text.contains(&line("allow -> deny", 2)), "{text}");
    assert!(text.contains(&line("deny -> allow", 1)), "{text}");
    assert!(
        text.contains(&line("rego", 2)) && text.contains(&line("old", 1)),
        "{text}"
    );
    assert!(text.contains(&line("ci-bot", 3)), "{text}");
}

#[test]
fn a_call_that_went_to_a_person_was_held_whatever_they_decided() {
    let approved = record(call(json!({"approval": "a1"})));
    assert_eq!(approved.chain_outcome(), "hold");
    let refused = record(call(
        json!({"outcome": "deny", "approval": "a1", "decided_by": "gate",
                                     "policies": [{"policy": "gate"}]}),
    ));
    assert_eq!(refused.chain_outcome(), "hold");
    let too_many = record(call(
        json!({"outcome": "deny", "tags": ["approval:too-many"]}),
    ));
    assert_eq!(too_many.chain_outcome(), "hold");
    assert_eq!(record(call(json!({}))).chain_outcome(), "allow");
}

#[test]
fn unreadable_and_over_long_lines_are_counted_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let trail = dir.path().join("trail.jsonl");
    let mut text = b"not json\n\xff\xfe\n{\"event\":\"reload\"}\n".to_vec();
    text.extend(vec![b'x'; (MAX_RECORD_BYTES + 10) as usize]);
    text.extend(b"\n\n");
    std::fs::write(&trail, text).unwrap();
    let config = dir.path().join("empty.toml");
    std::fs::write(&config, "").unwrap();
    let config = Config::load(&config).unwrap();
    let engine = PolicyEngine::new(&config.engine).unwrap();
    let guard = Guard::load(&engine, &config).unwrap();
    let mut report = Report::default();
    report.replay_file(&guard, &trail).unwrap();
    assert_eq!((report.unreadable_lines, report.records), (3, 0));
}
