//! The guard chain's semantics and the engine's limits, exercised with the
//! real policy components from `policies/` (built by `scripts/build-policies`)
//! and no server: first deny wins, modifications feed forward, approval holds
//! unless a later policy denies, monitor mode never enforces, failures follow
//! the failure mode, and scopes select policies.

use portcullis::config::Config;
use portcullis::contract::{Agent, Direction, Exchange, MessageKind, ToolAnnotations};
use portcullis::policy::chain::{Decided, Decision, Guard};
use portcullis::policy::engine::PolicyEngine;
use std::path::PathBuf;

fn policies_dir() -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/target/wasm32-wasip2/release");
    assert!(
        dir.join("read_only.wasm").exists(),
        "build the policies first: scripts/build-policies"
    );
    dir
}

/// A guard from config text whose module paths are relative to the policies
/// build directory.
fn guard(policies: &str) -> Guard {
    let cache = tempfile::tempdir().unwrap();
    let text = format!(
        "[engine]\ncache_dir = \"{}\"\n{policies}",
        cache.path().display()
    );
    let config = Config::parse(&text, &policies_dir().join("test.toml")).unwrap();
    let engine = PolicyEngine::new(&config.engine).unwrap();
    Guard::load(&engine, &config).unwrap()
}

fn call(tool: &str, arguments: &str, read_only: bool) -> Exchange {
    Exchange {
        direction: Direction::ClientToServer,
        kind: MessageKind::Request,
        server: "fs".into(),
        agent: Agent {
            id: "agent".into(),
            attributes: vec![],
        },
        method: "tools/call".into(),
        tool: Some(tool.into()),
        annotations: Some(ToolAnnotations {
            title: None,
            read_only_hint: Some(read_only),
            destructive_hint: None,
            idempotent_hint: None,
            open_world_hint: None,
        }),
        params: Some(format!(r#"{{"name":"{tool}","arguments":{arguments}}}"#)),
        result: None,
    }
}

fn result_of_call(result: &str) -> Exchange {
    Exchange {
        direction: Direction::ServerToClient,
        kind: MessageKind::Result,
        result: Some(result.into()),
        ..call("read_file", "{}", true)
    }
}

fn verdicts(decision: &Decision) -> Vec<(&str, &str, bool)> {
    decision
        .verdicts
        .iter()
        .map(|v| (&*v.policy, v.verdict, v.enforced))
        .collect()
}

fn denied_by(decision: &Decision) -> Option<(&str, i32, &str)> {
    match &decision.outcome {
        Decided::Deny(r) => Some((&*r.policy, r.code, r.reason.as_str())),
        _ => None,
    }
}

#[test]
fn the_first_deny_wins_and_stops_the_chain() {
    let guard = guard(
        r#"
        [[policy]]
        name = "filter"
        module = "tool_filter.wasm"
        [[policy.settings.rules]]
        deny = ["write_*"]
        [[policy]]
        name = "loops"
        module = "misbehave.wasm"
        settings = { mode = "loop", tool = "write_file" }
        "#,
    );
    let decision = guard.decide(&mut call("write_file", "{}", false), &[]);
    assert_eq!(denied_by(&decision).map(|d| d.0), Some("filter"));
    assert_eq!(
        verdicts(&decision),
        vec![("filter", "deny", true)],
        "the looping policy never ran"
    );
}

#[test]
fn a_modification_feeds_the_next_policy() {
    let guard = guard(
        r#"
        [[policy]]
        name = "redact-1"
        module = "redact_secrets.wasm"
        [[policy]]
        name = "redact-2"
        module = "redact_secrets.wasm"
        "#,
    );
    let mut exchange =
        result_of_call(r#"{"content":[{"type":"text","text":"key AKIAIOSFODNN7EXAMPLE"}]}"#);
    let decision = guard.decide(&mut exchange, &[]);
    assert_eq!(
        decision.outcome,
        Decided::Modify(
            r#"{"content":[{"type":"text","text":"key [REDACTED:aws-access-key-id]"}]}"#.into()
        )
    );
    assert_eq!(
        verdicts(&decision),
        vec![("redact-1", "modify", true), ("redact-2", "allow", true)]
    );
    assert_eq!(decision.tags(), vec!["redacted".to_string()]);
}

#[test]
fn approval_holds_unless_a_later_policy_denies() {
    let gate = r#"
        [[policy]]
        name = "gate"
        module = "approval_gate.wasm"
        "#;
    let allowing = guard(&format!(
        "{gate}\n[[policy]]\nname = \"filter\"\nmodule = \"tool_filter.wasm\"\n[[policy.settings.rules]]\nallow = [\"*\"]\n"
    ));
    let decision = allowing.decide(&mut call("delete_file", "{}", false), &[]);
    let Decided::Hold(held, payload) = &decision.outcome else {
        panic!("not held: {:?}", decision.outcome);
    };
    assert_eq!(&*held.policy, "gate");
    assert!(
        held.reason.starts_with("tool 'delete_file'"),
        "{}",
        held.reason
    );
    assert_eq!(payload, &None, "nothing modified the call");
    assert_eq!(
        verdicts(&decision),
        vec![
            ("gate", "require-approval", true),
            ("filter", "allow", true)
        ]
    );

    let denying = guard(&format!(
        "{gate}\n[[policy]]\nname = \"filter\"\nmodule = \"tool_filter.wasm\"\n[[policy.settings.rules]]\ndeny = [\"delete_*\"]\n"
    ));
    let decision = denying.decide(&mut call("delete_file", "{}", false), &[]);
    assert_eq!(denied_by(&decision).map(|d| d.0), Some("filter"));

    let decision = allowing.decide(&mut call("read_file", "{}", true), &[]);
    assert_eq!(
        decision.outcome,
        Decided::Allow,
        "read-only tools need no approval"
    );
}

#[test]
fn monitor_mode_records_without_enforcing() {
    let guard = guard(
        r#"
        [[policy]]
        name = "ro"
        module = "read_only.wasm"
        mode = "monitor"
        "#,
    );
    let decision = guard.decide(&mut call("write_file", "{}", false), &[]);
    assert_eq!(decision.outcome, Decided::Allow);
    assert_eq!(verdicts(&decision), vec![("ro", "deny", false)]);
}

#[test]
fn failures_deny_unless_the_policy_is_fail_open() {
    let closed = guard(
        r#"
        [[policy]]
        name = "trap"
        module = "misbehave.wasm"
        settings = { mode = "trap", tool = "x" }
        "#,
    );
    let decision = closed.decide(&mut call("x", "{}", true), &[]);
    let (policy, code, reason) = denied_by(&decision).unwrap();
    assert_eq!((policy, code), ("trap", -32002));
    assert!(
        reason.contains("trapped") && reason.contains("misbehave: deliberate trap"),
        "{reason}"
    );

    let open = guard(
        r#"
        [[policy]]
        name = "trap"
        module = "misbehave.wasm"
        failure = "open"
        settings = { mode = "trap", tool = "x" }
        "#,
    );
    let decision = open.decide(&mut call("x", "{}", true), &[]);
    assert_eq!(decision.outcome, Decided::Allow);
    assert_eq!(verdicts(&decision), vec![("trap", "error", true)]);
}

#[test]
fn deadlines_and_memory_caps_are_enforced_per_policy() {
    let guard = guard(
        r#"
        [[policy]]
        name = "loop"
        module = "misbehave.wasm"
        timeout_ms = 20
        settings = { mode = "loop", tool = "spin" }
        [[policy]]
        name = "hoard"
        module = "misbehave.wasm"
        memory_mb = 4
        settings = { mode = "alloc", tool = "hoard" }
        "#,
    );
    let spin = guard.decide(&mut call("spin", "{}", true), &[]);
    assert!(
        denied_by(&spin)
            .unwrap()
            .2
            .contains("exceeded its deadline of 20 ms")
    );
    let hoard = guard.decide(&mut call("hoard", "{}", true), &[]);
    assert!(
        denied_by(&hoard)
            .unwrap()
            .2
            .contains("exceeded its memory limit of 4 MiB")
    );
    assert_eq!(
        guard.decide(&mut call("other", "{}", true), &[]).outcome,
        Decided::Allow,
        "still serving"
    );
}

#[test]
fn scopes_select_policies_by_server_method_and_tool() {
    let guard = guard(
        r#"
        [[policy]]
        name = "writes-only"
        module = "read_only.wasm"
        tools = ["write_*"]
        [[policy]]
        name = "other-server"
        module = "read_only.wasm"
        servers = ["github"]
        [[policy]]
        name = "lists-only"
        module = "read_only.wasm"
        methods = ["tools/list"]
        "#,
    );
    let decision = guard.decide(&mut call("read_file", "{}", false), &[]);
    assert!(decision.verdicts.is_empty(), "{:?}", verdicts(&decision));
    let decision = guard.decide(&mut call("write_file", "{}", false), &[]);
    assert_eq!(verdicts(&decision), vec![("writes-only", "deny", true)]);
}

#[test]
fn instances_are_reused_or_fresh_as_configured() {
    for mode in ["fresh", "reuse"] {
        let guard = guard(&format!(
            "[[policy]]\nname = \"guard\"\nmodule = \"argument_guard.wasm\"\ninstances = \"{mode}\"\nsettings = {{ roots = [\"/srv\"] }}\n"
        ));
        for _ in 0..3 {
            let inside = guard.decide(&mut call("read", r#"{"path":"/srv/a"}"#, true), &[]);
            assert_eq!(inside.outcome, Decided::Allow, "{mode}");
            let outside = guard.decide(
                &mut call("read", r#"{"path":"/srv/../etc/passwd"}"#, true),
                &[],
            );
            assert!(
                denied_by(&outside)
                    .unwrap()
                    .2
                    .contains("outside the allowed roots"),
                "{mode}"
            );
        }
    }
}

#[test]
fn what_a_policy_logs_is_kept_with_its_verdict() {
    let guard = guard(
        r#"
        [[policy]]
        name = "chatty"
        module = "misbehave.wasm"
        settings = { mode = "log", tool = "x" }
        "#,
    );
    for _ in 0..2 {
        let decision = guard.decide(&mut call("x", "{}", true), &[]);
        let logs = &decision.verdicts[0].logs;
        assert_eq!(logs.len(), 1, "one line per evaluation, none carried over");
        assert_eq!(
            (logs[0].level, logs[0].message.as_str()),
            ("info", "misbehave: hello from the policy")
        );
        assert_eq!(decision.tags(), vec!["logged".to_string()]);
    }
}

#[test]
fn reused_instances_keep_state_until_recycled_and_fresh_ones_never_do() {
    let tags = |instances: &str| {
        let guard = guard(&format!(
            "[[policy]]\nname = \"counter\"\nmodule = \"misbehave.wasm\"\n{instances}\nsettings = {{ mode = \"count\", tool = \"x\" }}\n"
        ));
        (0..5)
            .map(|_| guard.decide(&mut call("x", "{}", true), &[]).tags()[0].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(tags("instances = \"fresh\""), ["call-1"; 5]);
    assert_eq!(
        tags("instances = \"reuse\""),
        ["call-1", "call-2", "call-3", "call-4", "call-5"]
    );
    assert_eq!(
        tags("instances = \"reuse\"\nrecycle_after = 2"),
        ["call-1", "call-2", "call-1", "call-2", "call-1"]
    );
}
